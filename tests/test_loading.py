"""Loading: the embedded model, local folders, and clear errors for everything else."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from explorer.model.loading import ModelLoadError, _source_key, check_architecture, embedded_cache_dir, load_model

ROOT = Path(__file__).resolve().parents[1]


def save_tiny(folder: Path, embedded) -> Path:
    model = tiny_llama(vocab_size=embedded.shape.vocab_size)
    model.save_pretrained(folder)
    embedded.tokenizer.save_pretrained(folder)
    return folder


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no model folder"):
        load_model(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("archs,msg", [(["BertModel"], "not a causal language model"),
                                      (["GPT2LMHeadModel"], "unsupported architecture"),
                                      (["Gemma2ForCausalLM"], "unsupported architecture")])
def test_unsupported_architectures(tmp_path, archs, msg):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": archs, "model_type": "x"}))
    with pytest.raises(ModelLoadError, match=msg) as e:
        load_model(str(tmp_path))
    assert "LlamaForCausalLM" in str(e.value)  # names what is supported


def test_supported_architectures_pass_the_check():
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        check_architecture({"architectures": [arch]}, "x")


def test_source_key_changes_with_the_source(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"a" * 10)
    k1 = _source_key(f)
    f.write_bytes(b"a" * 11)
    assert _source_key(f) != k1
    os.utime(f, (1_000_000, 1_000_000))
    k2 = _source_key(f)
    os.utime(f, (2_000_000, 2_000_000))
    assert _source_key(f) != k2


@pytest.mark.slow
def test_embedded_model_loads_from_cache(embedded):
    s = embedded.summary()
    assert (s["layers"], s["heads"], s["kv_heads"], s["head_dim"]) == (30, 9, 3, 64)
    assert s["params"] == sum(p.numel() for p in embedded.model.parameters())
    cache = embedded_cache_dir()
    assert (cache / "complete.json").is_file() and (cache / "model.safetensors").is_file()
    assert not list(cache.parent.glob(".tmp-*"))  # atomic write leaves no temporary folder
    cfg = json.loads((cache / "config.json").read_text())
    assert "quantization_config" not in cfg


@pytest.mark.slow
def test_local_folder_and_corrupt_weights(tmp_path, embedded):
    good = save_tiny(tmp_path / "good", embedded)
    lm = load_model(str(good))
    assert lm.shape.num_layers == 4 and lm.name == str(good)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # truncated
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(str(bad))


@pytest.mark.slow
def test_bf16_load(embedded):
    lm = load_model("default", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def test_bad_dtype_and_device():
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("default", dtype="int3")
    with pytest.raises(ModelLoadError, match="device"):
        load_model("default", device="tpu")


@pytest.mark.slow
def test_cli_info_prints_summary_and_perplexity():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "explorer", "info", "--heldout-windows", "2", "--seq-len", "256"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["layers"] == 30 and info["params"] == 134515008
    assert 8 < info["heldout_ppl"] < 80


def test_cli_bad_model_is_one_line_and_nonzero():
    out = subprocess.run([sys.executable, "-m", "explorer", "info", "--model", "/no/such/model"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: no model folder at /no/such/model"]
