"""Export: a verified, self-contained Hugging Face folder that plain transformers loads in a fresh
process (where `explorer` cannot be imported), written atomically, with the CLI on top."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from explorer.errors import Cancelled
from explorer.events import Progress
from explorer.model.configuration_subnet import SubnetConfig
from explorer.model.subnet import LayerChoice, Subnet
from explorer.pick.export import TOLERANCE as EXPORT_TOLERANCE
from explorer.pick.export import ExportError, _install, check_target, export_subnet, source_files
from explorer.pick.reform import ReformSettings, reform

FRESH = r'''
import importlib.util, json, sys
assert importlib.util.find_spec("explorer") is None, "explorer must not be importable here"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
ids = torch.tensor([prompt])
with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
assert not any(m == "explorer" or m.startswith("explorer.") for m in sys.modules)
print("FRESH " + json.dumps({"tokens": out[0].tolist(), "heads": [m.self_attn.head_dim for m in model.model.layers],
                             "vocab": len(tok)}))
'''


def small_subnet(shape) -> Subnet:
    """Eight narrowed blocks of thirty (different widths per block), the rest dropped: a quick export."""
    layers = []
    for i in range(shape.num_layers):
        if i % 4 or i >= 32:
            layers.append(None)
            continue
        pairs = 8 + 4 * (i % 3)
        groups = tuple(tuple(range(k, k + pairs)) for k in range(shape.num_kv_heads))
        layers.append(LayerChoice(groups, tuple(range(0, shape.intermediate_size, 2 + i % 2))))
    return Subnet(tuple(layers))


@pytest.mark.slow
def test_reformed_export_reloads_in_a_fresh_process(embedded, tmp_path):
    lm = embedded
    sub = small_subnet(lm.shape)
    torch.manual_seed(0)
    windows = torch.randint(0, lm.shape.vocab_size, (2, 64))
    result = reform(lm, sub, ReformSettings(batch_size=2), calib_windows=windows)
    model = result.model
    events: list = []
    res = export_subnet(lm, model, sub, tmp_path / "model", {"heldout_ppl": 1.0}, {"test": True},
                        on_event=events.append, reformed={"digest": result.digest, "settings": result.settings.to_dict()})
    out = Path(res.path)
    # The reference is the base model with the reformed weights written in and the omitted ones zeroed
    # (an independent computation), so the sums run in another order: fp32 rounding, not 0.0.
    assert res.verified and res.same_tokens and res.max_logit_diff <= EXPORT_TOLERANCE
    assert [e.done for e in events if isinstance(e, Progress)][-1] == 5
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "configuration_subnet.py", "modeling_subnet.py", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json", "subnet.json", "README.md", "export.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    for name, src in source_files().items():  # the very code the engine runs
        assert (out / name).read_bytes() == src.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.zip"]  # no partial folders left
    with zipfile.ZipFile(res.zip_path) as zf:
        assert {f"model/{n}" for n in names} == set(zf.namelist())

    cfg = json.loads((out / "config.json").read_text())
    kept = [l for l in sub.layers if l is not None]
    assert cfg["model_type"] == "subnet_llm"
    assert cfg["auto_map"] == {"AutoConfig": "configuration_subnet.SubnetConfig",
                               "AutoModelForCausalLM": "modeling_subnet.SubnetForCausalLM"}
    assert cfg["intermediate_sizes"] == [l.width for l in kept]
    assert cfg["attn_pairs"] == [[list(g) for g in l.attn_pairs] for l in kept]
    assert cfg["layer_ids"] == [i for i, l in enumerate(sub.layers) if l is not None]
    per_layer = {int(k): v for k, v in cfg["per_layer_config"].items()}
    assert per_layer == {j: {"head_dim": l.head_dim, "intermediate_size": l.width, "num_attention_heads": l.n_heads(lm.shape),
                             "num_key_value_heads": l.n_kv} for j, l in enumerate(kept)}
    record = json.loads((out / "export.json").read_text())
    assert record["provenance"]["reformed"] and record["provenance"]["reform_digest"] == result.digest
    assert "zeroed" in record["verification"]["reference"]
    again = SubnetConfig.from_pretrained(out)
    assert again.attn_pairs == cfg["attn_pairs"] and again.base_head_dim == lm.shape.head_dim
    assert {int(k): v for k, v in again.to_dict()["per_layer_config"].items()} == per_layer
    assert Subnet.load(out / "subnet.json") == sub
    card = (out / "README.md").read_text()
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in card and "apache-2.0" in card and "trust_remote_code=True" in card

    # An independent fresh process, explorer not importable, generates the same tokens.
    prompt = lm.tokenizer.encode("Once upon a time")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    proc = subprocess.run([sys.executable, "-c", FRESH, str(out), json.dumps(prompt)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.split("FRESH ", 1)[1])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert got["tokens"] == want[0].tolist()
    assert got["heads"] == [l.head_dim for l in kept]


@pytest.mark.slow
def test_cancelled_export_leaves_no_folder(embedded, tmp_path):
    from explorer.model.slicing import slice_model

    sub = small_subnet(embedded.shape)
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        export_subnet(embedded, slice_model(embedded.model, sub), sub, tmp_path / "model", {}, {},
                      on_event=lambda e: cancel.set(), cancel=cancel)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_reform_from_subnet_file(embedded, tmp_path, capsys):
    from explorer.app.cli import main

    sub = small_subnet(embedded.shape)
    (tmp_path / "sub.json").write_text(sub.to_json())
    rc = main(["reform", "--subnet", str(tmp_path / "sub.json"), "--out", str(tmp_path / "m"), "--calib-windows", "2",
               "--calib-seq-len", "64", "--heldout-windows", "1", "--seq-len", "64", "--no-zip"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["export"]["verified"] and summary["heldout_ppl"] > 0 and summary["heldout_ppl_unreformed"] > 0
    report = json.loads((tmp_path / "m" / "reform.json").read_text())
    assert report["settings"]["windows"] == 2 and len(report["layers"]) == 2 * sum(l is not None for l in sub.layers)
    assert not (tmp_path / "m.zip").exists()
    # a second export into the same folder replaces it; a folder that is not an export is refused
    assert main(["export", "--subnet", str(tmp_path / "sub.json"), "--out", str(tmp_path / "m"), "--no-verify",
                 "--no-zip", "--heldout-windows", "0"]) == 0
    assert not (tmp_path / "m" / "reform.json").exists()
    assert main(["export", "--subnet", str(tmp_path / "sub.json"), "--out", str(tmp_path), "--heldout-windows", "0"]) == 2


def tiny_lm(name: str, embedded):
    """A tiny random model of an architecture we accept, with the embedded model's tokenizer."""
    from tiny_models import tiny_model

    from explorer.model.loading import LoadedModel
    from explorer.model.subnet import ModelShape

    model = tiny_model(name, vocab=embedded.shape.vocab_size)
    return LoadedModel(model, embedded.tokenizer, ModelShape.from_config(model.config), name, f"tiny {name}", "",
                       torch.float32, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mistral-window", "llama-llama3", "qwen2-window", "gemma3", "granite", "qwen3",
                                  "smollm3"])
def test_export_verifies_against_the_base_model_and_catches_a_wrong_model(arch, embedded, tmp_path):
    """The reference is the base model's own class: an export that ignored the sliding window, the
    llama3 rope, Gemma's per-layer-type rope, Granite's residual multiplier or SmolLM3's rotation-free
    layers would fail, so verification is not the model agreeing with itself."""
    from test_slicing import mixed_subnet, random_means

    from explorer.model.slicing import fill_buffers, slice_model
    from explorer.pick.export import ExportError

    lm = tiny_lm(arch, embedded)
    sub = mixed_subnet(lm.shape, 5)
    means = random_means(lm.shape)
    model = slice_model(lm.model, sub, lm.shape, means)
    res = export_subnet(lm, model, sub, tmp_path / "ok", {}, {}, make_zip=False, means=means)
    assert res.verified and res.same_tokens and res.max_logit_diff <= 1e-4
    wrong = slice_model(lm.model, sub, lm.shape, means)
    if "window" in arch:  # the same weights computing full attention: what an export that drops the window does
        wrong.config.sliding_windows = [None] * len(wrong.config.sliding_windows)
        for block in wrong.model.layers:
            block.window = None
    elif arch == "granite":  # the residual branches unscaled
        wrong.config.residual_multiplier = 1.0
    elif arch in ("gemma3", "smollm3"):  # every block rotated with the first rope set
        wrong.config.layer_rope = [0] * len(wrong.config.layer_rope)
        fill_buffers(wrong, wrong.config, "cpu")
    else:  # default rope frequencies instead of the first set's own
        wrong.config.rope_sets = [{"rope_type": "default", "rope_theta": 1234.0}]
    with pytest.raises(ExportError, match="differs from the reference"):
        export_subnet(lm, wrong, sub, tmp_path / "wrong", {}, {}, make_zip=False, means=means)
    assert not (tmp_path / "wrong").exists()


@pytest.mark.slow
def test_reformed_label_must_match_the_weights(embedded, tmp_path):
    from explorer.pick.export import ExportError

    lm = tiny_lm("llama-bias", embedded)
    from test_slicing import mixed_subnet

    sub = mixed_subnet(lm.shape, 2)
    windows = torch.randint(3, 5000, (4, 24), generator=torch.Generator().manual_seed(0))
    result = reform(lm, sub, ReformSettings(batch_size=2), calib_windows=windows)
    with pytest.raises(ExportError, match="not the ones this reformation produced"):
        export_subnet(lm, result.model, sub, tmp_path / "a", {}, {}, make_zip=False,
                      reformed={"digest": "0" * 16, "settings": {}})
    with pytest.raises(ExportError, match="differs from the reference"):  # reformed weights sold as unreformed
        export_subnet(lm, result.model, sub, tmp_path / "b", {}, {}, make_zip=False)
    ok = export_subnet(lm, result.model, sub, tmp_path / "c", {}, {}, make_zip=False,
                       reformed={"digest": result.digest, "settings": result.settings.to_dict()})
    assert ok.verified


def test_target_checks_and_install(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ExportError):
        check_target(foreign)
    check_target(tmp_path / "new")  # absent is fine
    old, new = tmp_path / "old_export", tmp_path / "staged"
    for folder, tag in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "subnet_llm", "tag": tag}))
        (folder / "subnet.json").write_text("{}")
    check_target(old)  # an earlier export may be replaced
    _install(new, old)
    assert json.loads((old / "config.json").read_text())["tag"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "old_export"]


def test_export_tolerance_is_relative_to_the_largest_logit():
    """fp32 rounding grows with the logits' scale; a wrong model is off by whole units either way."""
    from explorer.pick.export import allowed_difference

    assert allowed_difference(torch.tensor([0.5, -0.2])) == EXPORT_TOLERANCE
    assert allowed_difference(torch.tensor([[3.0, -22.8]])) == pytest.approx(22.8 * EXPORT_TOLERANCE)
