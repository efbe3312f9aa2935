"""Export a subnet as a real, smaller Hugging Face model folder, verified in a fresh process.

The folder holds `model.safetensors` (never pickles), `config.json` (model_type "subnet_llm",
per-layer widths, kept rotary pairs, `per_layer_config`, `auto_map`), the remote-code files
`configuration_subnet.py` and `modeling_subnet.py` copied from this package's own sources (the
engine runs the very same code, so there is no second copy to keep in sync), the tokenizer,
`generation_config.json`, `subnet.json`, `export.json` and a `README.md` model card.

Verified against an independent reference, never against itself: the folder is reloaded with
plain transformers (fp32, CPU) in a subprocess that cannot import `explorer`, and its logits and
greedy tokens must match the *base* model's own transformers class with the omitted weights
zeroed (`explorer.model.reference`), plus the compensation biases or the reformed o_proj / down_proj
weights the provenance names. A reformed export must carry exactly the weights its reformation
produced (their digest), and every other weight must be the base model's.

Atomic: everything is written into a temporary sibling folder, verified there, and only then
renamed to the target; a killed export leaves only a `*_partial_*` folder behind, never one that
looks done.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import ExplorerError
from ..events import EventSink, Progress, check_cancel, no_event
from ..model import configuration_subnet, modeling_subnet
from ..model.loading import is_subnet_folder
from ..model.subnet import Subnet
from .pickfile import PickFile

PROBE_TEXT = "The history of the city begins with a small settlement on the river, where"
PROMPT_TEXT = "The best way to learn a new language is"
NEW_TOKENS = 16
EXPORT_STEPS = 5
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class ExportError(ExplorerError):
    """The export could not be written or did not verify."""


@dataclass(frozen=True)
class ExportResult:
    path: str
    zip_path: str | None
    verified: bool
    max_logit_diff: float | None
    same_tokens: bool | None
    sample_text: str
    files: tuple[str, ...]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ExportResult":
        return cls(**{**data, "files": tuple(data["files"])})


def source_files() -> dict[str, Path]:
    """The remote-code files, read from the package itself at export time."""
    return {"configuration_subnet.py": Path(configuration_subnet.__file__),
            "modeling_subnet.py": Path(modeling_subnet.__file__)}


def check_target(out_dir: Path) -> None:
    """Refuse to replace anything but an empty folder or an earlier export."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not is_subnet_folder(out_dir, need_record=True))):
        raise ExportError(f"{out_dir} exists and is not an earlier export; choose another --out")


# ---- writing ---------------------------------------------------------------------------------
def write_folder(folder: Path, lm, model, record: PickFile) -> None:
    """Weights, config, remote code, tokenizer, generation config and the subnet file (which reopens as
    this very model: `explorer.pick.pickfile`)."""
    model.save_pretrained(folder, safe_serialization=True)
    for name, src in source_files().items():
        shutil.copyfile(src, folder / name)
    lm.tokenizer.save_pretrained(folder)
    gen = getattr(lm.model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    record.write(folder / "subnet.json")
    bad = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if bad or not (folder / "model.safetensors").is_file():
        raise ExportError(f"the export must hold model.safetensors only, found {bad or 'no model.safetensors'}")


def base_model_id(lm) -> str:
    """The hub id of the base model where known (the embedded model's is its origin), else its spec."""
    from ..model.loading import EMBEDDED

    titles = {m.title: m.hub_id for m in EMBEDDED.values()}
    return titles.get(lm.source, lm.name)


def model_card(lm, subnet: Subnet, metrics: dict, provenance: dict, verification: dict, name: str) -> str:
    shape = lm.shape
    s = subnet.summary(shape)
    base = base_model_id(lm)
    lines = [
        "---", f"license: {lm.license.split()[0] if lm.license else 'unknown'}", f"base_model: {base}",
        "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- subnet-explorer",
        "- structured-pruning", "---", "",
        f"# {name}", "",
        f"A physically smaller subnet of **{lm.source}**, found without training by Subnet Explorer "
        "(the training-free subnet search of \"Search for Efficient Large Language Models\", NeurIPS 2024): "
        "every block keeps its own subset of rotary pairs per KV group and of MLP channels, and whole "
        "blocks may be dropped. Kept weights are inherited from the base model"
        + (" and `o_proj`/`down_proj` were reformed on calibration data." if provenance.get("reformed") else "."),
        "",
        "## Size", "",
        f"- parameters: {metrics.get('params', s['params']):,} of {shape.dense_params:,} "
        f"({metrics.get('params', s['params']) / shape.dense_params:.1%} of the total, "
        f"{s['prunable_fraction']:.1%} of the prunable block weights)",
        f"- blocks kept: {s['layers_kept']} of {shape.num_layers}",
        f"- ideal decode speed-up (weights read per token): {s['ideal_decode_speedup']:.3f}x",
        "", "## Metrics measured at export", "",
        *(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in metrics.items()),
        "", "## How it was found", "",
        "```json", json.dumps(provenance, indent=2, default=str), "```", "",
        "## Verification", "",
        *(f"- {k}: {v}" for k, v in verification.items()),
        "", "## How to load", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(\"PATH\", trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(\"PATH\", trust_remote_code=True)",
        "ids = tokenizer(\"Hello\", return_tensors=\"pt\").input_ids",
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))",
        "```", "",
        "The modelling code (`modeling_subnet.py`, `configuration_subnet.py`) imports only torch and transformers.",
        "", "## Licence", "",
        f"Derived from {base}; the base model's licence applies: **{lm.license}**.", "",
    ]
    return "\n".join(lines)


# ---- verification in a fresh process --------------------------------------------------------
VERIFY_SCRIPT = r'''
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, probe_path, out_path = sys.argv[1:4]
probe = load_file(probe_path)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
with torch.no_grad():
    logits = model(input_ids=probe["ids"]).logits.float()
    prompt = probe["prompt"]
    tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=int(probe["n"]),
                            do_sample=False)
save_file({"logits": logits.contiguous(), "tokens": tokens.contiguous()}, out_path)
print("VERIFY_REPORT " + json.dumps({
    "explorer_imported": any(m == "explorer" or m.startswith("explorer.") for m in sys.modules),
    "class": type(model).__module__ + "." + type(model).__name__,
    "text": tok.decode(tokens[0, prompt.shape[1]:], skip_special_tokens=True),
}), flush=True)
'''
# Max |logit difference| relative to the reference's largest |logit| (at least 1), fp32 on CPU: a sliced matmul
# sums in another order than the zeroed reference, and 30 blocks with large activations amplify that rounding
# (a 50 % subnet of the embedded model: 5.7e-4 on logits up to 22.8; in fp64 both agree to 2.8e-5).
TOLERANCE = 1e-4


def allowed_difference(reference_logits: torch.Tensor) -> float:
    """The largest logit difference an export may have from its reference."""
    return TOLERANCE * max(1.0, float(reference_logits.abs().max()))


def probe_ids(tokenizer, config, min_tokens: int = 64) -> torch.Tensor:
    """Probe tokens, repeated until longer than the model's smallest sliding window (so a window
    that is ignored shows) and at least `min_tokens`, within the context."""
    from ..model.architecture import layer_windows

    ids = tokenizer.encode(PROBE_TEXT)
    windows = [w for w in layer_windows(config) if w is not None]
    want = max(min_tokens, (min(windows) + 16) if windows else 0)
    want = min(want, getattr(config, "max_position_embeddings", 2048))
    while len(ids) < want:
        ids = ids + ids
    return torch.tensor([ids[:want]])


def reload_in_fresh_process(folder: Path, ids: torch.Tensor, prompt: torch.Tensor, timeout: float = 600.0,
                            cancel: threading.Event | None = None) -> dict:
    """Logits on `ids` and greedy tokens after `prompt` of the folder, loaded by plain transformers in
    a subprocess that cannot import `explorer`; Stop (`cancel`) ends the subprocess within a moment."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory(prefix="subnet_verify_") as work:
        w = Path(work)
        save_file({"ids": ids, "prompt": prompt, "n": torch.tensor(NEW_TOKENS)}, w / "probe.safetensors")
        (w / "verify.py").write_text(VERIFY_SCRIPT)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(w / "modules"), TOKENIZERS_PARALLELISM="false",
                   CUDA_VISIBLE_DEVICES="")
        with open(w / "stdout.txt", "w") as out, open(w / "stderr.txt", "w") as err:
            proc = subprocess.Popen([sys.executable, "-I", str(w / "verify.py"), str(folder.resolve()),
                                     str(w / "probe.safetensors"), str(w / "out.safetensors")],
                                    cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True)
            deadline = time.monotonic() + timeout
            while proc.poll() is None:
                if (cancel is not None and cancel.is_set()) or time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    check_cancel(cancel)
                    raise ExportError(f"the verification did not finish in {timeout:.0f} s")
                time.sleep(0.2)
        stdout, stderr = (w / "stdout.txt").read_text(), (w / "stderr.txt").read_text()
        if proc.returncode != 0:
            tail = (stderr.strip().splitlines() or ["no output"])[-1]
            raise ExportError(f"the exported folder does not load with plain transformers: {tail}")
        lines = [l for l in stdout.splitlines() if "VERIFY_REPORT " in l]
        if not lines:
            raise ExportError(f"the verification process printed no report: {stdout[-300:]!r}")
        report = json.loads(lines[-1].split("VERIFY_REPORT ", 1)[1])
        got = load_file(w / "out.safetensors")
    if report["explorer_imported"]:
        raise ExportError("verification imported the explorer package; the export is not self-contained")
    return {**report, "logits": got["logits"], "tokens": got["tokens"]}


@torch.no_grad()
def verify_folder(folder: Path, lm, model, subnet: Subnet, means=None, reformed=None, cancel=None) -> dict:
    """Compare the reloaded folder with the independent reference (see the module docstring)."""
    from ..model.reference import weights_match, zeroed_reference

    tok = lm.tokenizer
    problems = weights_match(lm.model, model, subnet, lm.shape)
    if problems:
        raise ExportError(f"the model's weights are not the base model's cut to the subnet ({problems[0]}, ...)")
    if reformed is not None:
        from .reform import reformed_digest

        if reformed_digest(model) != reformed["digest"]:
            raise ExportError("the weights are not the ones this reformation produced; refusing to label them "
                              "reformed")
    ref = zeroed_reference(lm.model, subnet, lm.shape, means if reformed is None else None,
                           reformed=model if reformed is not None else None)
    ids, prompt = probe_ids(tok, lm.model.config), torch.tensor([tok.encode(PROMPT_TEXT)])
    want = ref(input_ids=ids).logits.float()
    want_tokens = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                               do_sample=False)
    del ref
    got = reload_in_fresh_process(folder, ids, prompt, cancel=cancel)
    diff = float((got["logits"] - want).abs().max())
    same = got["tokens"].shape == want_tokens.shape and bool(torch.equal(got["tokens"], want_tokens))
    what = ("the base model's transformers class with the omitted weights zeroed"
            + (" and the reformed o_proj/down_proj written in" if reformed is not None else
               " plus the compensation biases" if means is not None else ""))
    return {"max_logit_diff": diff, "allowed_diff": allowed_difference(want), "same_tokens": same,
            "sample_text": got["text"], "class": got["class"],
            "prompt": PROMPT_TEXT, "probe_tokens": int(ids.shape[1]), "reference": what}


# ---- the whole step --------------------------------------------------------------------------
def _install(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder into place, moving an earlier export aside first."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}_old_", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def zip_folder(folder: Path) -> Path:
    """`<folder>.zip` holding the folder, written beside it atomically. Weights are stored, not
    deflated: fp32/bf16 tensors barely compress and deflating hundreds of MB takes minutes."""
    target = folder.with_name(folder.name + ".zip")
    fd, tmp_name = tempfile.mkstemp(prefix=f"{folder.name}_partial_", suffix=".zip", dir=folder.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp_name, "w") as zf:
            for f in sorted(folder.iterdir()):
                kind = zipfile.ZIP_STORED if f.suffix in (".safetensors", ".gguf") else zipfile.ZIP_DEFLATED
                zf.write(f, f"{folder.name}/{f.name}", compress_type=kind)
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
    return target


def model_params(model) -> int:
    """The parameters a model holds (tied weights once): the one count an export states."""
    seen: set[int] = set()
    return sum(t.numel() for t in model.parameters() if not (t.data_ptr() in seen or seen.add(t.data_ptr())))


def export_subnet(lm, subnet_model, record: PickFile | Subnet, out_dir: str | Path, metrics: dict, provenance: dict, *,
                  verify: bool = True, make_zip: bool = True, on_event: EventSink = no_event,
                  cancel: threading.Event | None = None, extra_files: dict[str, str] | None = None,
                  means=None, reformed=None) -> ExportResult:
    """Write, verify and install the export; raises ExportError if it does not verify.

    `means`: the channel means of a bias-compensated subnet; `reformed`: {"digest", "settings"} of
    the reformation whose model this is (ReformResult.digest and its settings). Both decide what
    the model must match, and what the provenance says. `record` is the pick's subnet file (or a bare
    subnet, whose file then records the compensation and reformation given here)."""
    t0 = time.perf_counter()
    if isinstance(record, Subnet):
        record = PickFile.of(lm, record, means, None if reformed is None else {**reformed, "sketch": []})
    subnet = record.subnet
    metrics = {**metrics, "params": model_params(subnet_model),
               "fraction": round(model_params(subnet_model) / lm.shape.dense_params, 6)}
    out = Path(out_dir).expanduser().resolve()
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name.replace('-', '_').replace('.', '_')}_partial_", dir=out.parent))
    try:
        on_event(Progress("export", 0, EXPORT_STEPS, "writing weights and code"))
        write_folder(tmp, lm, subnet_model, record)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        check_cancel(cancel)
        on_event(Progress("export", 1, EXPORT_STEPS, "reloading in a fresh process"))
        provenance = {**provenance, "reformed": reformed is not None, "compensated": means is not None}
        if reformed is not None:
            provenance.update(reform_digest=reformed["digest"], reform_settings=reformed["settings"])
        verification: dict = {"verified": False}
        if verify:
            verification = verify_folder(tmp, lm, subnet_model, subnet, means, reformed, cancel)
            if not verification["max_logit_diff"] <= verification["allowed_diff"] or not verification["same_tokens"]:
                raise ExportError(f"the reloaded export differs from the reference (max logit difference "
                                  f"{verification['max_logit_diff']:.3g}, allowed {verification['allowed_diff']:.3g}, "
                                  f"same tokens: {verification['same_tokens']})")
            verification = {"verified": True, **verification, "tolerance": TOLERANCE}
        check_cancel(cancel)
        on_event(Progress("export", 2, EXPORT_STEPS, "model card"))
        summary = {**subnet.summary(lm.shape), "params": metrics["params"], "fraction": metrics["fraction"]}
        (tmp / "export.json").write_text(json.dumps({"metrics": metrics, "provenance": provenance,
                                                     "verification": verification, "subnet": summary,
                                                     "base_model": lm.source, "license": lm.license},
                                                    indent=2, default=str))
        (tmp / "README.md").write_text(model_card(lm, subnet, metrics, provenance, verification, out.name))
        files = tuple(sorted(p.name for p in tmp.iterdir()))
        check_cancel(cancel)
        on_event(Progress("export", 3, EXPORT_STEPS, "installing"))
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    zip_path = None
    if make_zip:
        on_event(Progress("export", 4, EXPORT_STEPS, "zip"))
        zip_path = str(zip_folder(out))
    elif out.with_name(out.name + ".zip").is_file():  # an earlier export's zip no longer matches
        out.with_name(out.name + ".zip").unlink()
    on_event(Progress("export", EXPORT_STEPS, EXPORT_STEPS, "done"))
    return ExportResult(str(out), zip_path, bool(verification["verified"]), verification.get("max_logit_diff"),
                        verification.get("same_tokens"), verification.get("sample_text", ""), files,
                        time.perf_counter() - t0)
