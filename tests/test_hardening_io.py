"""Bad files in, one readable line out: corrupt GGUF models (engine and CLI) and subnet JSON files that
are garbage or made for another model (the reader behind the app's "open a subnet JSON")."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from explorer.app.inputs import read_subnet_file as read_file
from explorer.model.loading import ModelLoadError, embedded_gguf, load_model
from explorer.model.subnet import ModelShape, Subnet, SubnetError, uniform_subnet
from explorer.pick.pickfile import file_limit as subnet_file_limit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private model cache, so a failed dequantisation can be seen to leave nothing behind."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SUBNET_EXPLORER_CACHE", str(root))
    return root


def truncated_gguf(folder: Path) -> Path:
    """The first 3 MB of the real embedded GGUF: a valid header whose tensor data stops short."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "model.gguf"
    with open(embedded_gguf(), "rb") as src:
        out.write_bytes(src.read(3_000_000))
    return out


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ---- corrupt GGUF -----------------------------------------------------------------------------
@pytest.mark.parametrize("content,needle", [
    (b"", "is not a GGUF file"),
    (b"PK\x03\x04 this is a zip, not a model" * 10, "is not a GGUF file"),
    (b"GGUF" + (0xDEADBEEF).to_bytes(4, "little") + b"\0" * 64, "format version 3735928559"),
])
def test_garbage_gguf_is_one_clear_error(tmp_path, cache, content, needle):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError, match=needle) as e:
        load_model(str(bad))
    assert str(bad) in one_line(e)
    assert not cache.exists() or not any(cache.iterdir())  # no cache folder, finished or temporary


@pytest.mark.slow
def test_truncated_gguf_is_one_clear_error(tmp_path, cache):
    bad = truncated_gguf(tmp_path / "x")
    with pytest.raises(ModelLoadError, match="could not read the GGUF file .*truncated") as e:
        load_model(str(bad))
    assert str(bad) in one_line(e)
    assert not cache.exists() or not any(cache.iterdir())


def test_folder_holding_only_a_gguf_points_at_the_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="give the .gguf file itself") as e:
        load_model(str(tmp_path / "m"))
    assert "weights.gguf" in one_line(e)


@pytest.mark.slow
def test_cli_info_on_a_truncated_gguf_is_one_line_and_nonzero(tmp_path):
    bad = truncated_gguf(tmp_path / "x")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SUBNET_EXPLORER_CACHE": str(tmp_path / "cache")}
    env.pop("SUBNET_EXPLORER_LOG", None)
    out = subprocess.run([sys.executable, "-m", "explorer", "info", "--model", str(bad)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: could not read the GGUF file {bad}"), out.stderr
    assert out.stdout == ""


@pytest.mark.slow
def test_a_good_gguf_file_loads_and_is_cached(tmp_path, cache, embedded):
    """The same reader that refuses broken files loads a whole one: the embedded GGUF, given by path."""
    link = tmp_path / "smol.gguf"
    link.symlink_to(embedded_gguf())
    lm = load_model(str(link))
    assert lm.shape == embedded.shape and lm.source == f"gguf: {link}"
    folders = [p for p in cache.iterdir()]
    assert len(folders) == 1 and (folders[0] / "complete.json").is_file()
    import torch

    ids = embedded.tokenizer("The sea is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, embedded.model(ids).logits, atol=1e-4)


# ---- subnet JSON files for the app's upload ----------------------------------------------------
SHAPE = ModelShape.from_config(tiny_config())


def read_subnet_file(path: Path, shape: ModelShape) -> Subnet:
    """The subnet of a file read for a model of `shape` (any weights, as a bare subnet names none)."""
    return read_file(path, shape, "fingerprint", "float32").subnet


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def test_subnet_file_round_trip_and_export_form(tmp_path):
    sub = uniform_subnet(SHAPE, 0.5, 0.5)
    assert read_subnet_file(write(tmp_path, "a.json", sub.to_json()), SHAPE) == sub
    # a candidate record (as in candidates.jsonl) carries the subnet under "subnet", compact masks allowed
    rec = {"id": "c1", "subnet": sub.to_dict(compact=True)}
    assert read_subnet_file(write(tmp_path, "b.json", json.dumps(rec)), SHAPE) == sub


@pytest.mark.parametrize("data,needle", [
    (b"", "is empty"),
    (b"\xff\xfe\x00garbage", "not UTF-8 text"),
    ("{not json", "is not a subnet file: not valid JSON"),
    ("[1, 2, 3]", "is not a subnet file: expected a JSON object"),
    ('{"layers": 7}', "is not a subnet file"),
    ('{"layers": [[["x"], ["y"]]]}', "is not a subnet file"),
    ('{"layers": [{"attn_pairs": [["a"]], "mlp_channels": ["b"]}]}', "is not a subnet file"),
    ("[" * 20_000 + "]" * 20_000, r"is not a subnet file.*nested too deeply"),
    ('{"format": "subnet-explorer/subnet", "version": 2, "subnet": {"layers": []}, "compensation": {"x": 1}}',
     "is not a subnet file: its bias compensation is unreadable"),
    ('{"format": "subnet-explorer/subnet", "version": 9, "subnet": {"layers": []}}', "version 9"),
])
def test_garbage_subnet_files_are_one_line(tmp_path, data, needle):
    with pytest.raises(SubnetError, match=needle) as e:
        read_subnet_file(write(tmp_path, "x.json", data), SHAPE)
    assert "x.json" in one_line(e)


def test_subnet_of_another_model_is_refused(tmp_path):
    other = ModelShape.from_config(tiny_config(num_hidden_layers=6))
    with pytest.raises(SubnetError, match="does not fit the loaded model .*6 layers but the model has 4") as e:
        read_subnet_file(write(tmp_path, "other.json", uniform_subnet(other, 0.5, 0.5).to_json()), SHAPE)
    one_line(e)
    wide = Subnet.build([[[list(range(SHAPE.n_pairs))] * SHAPE.num_kv_heads, [0, SHAPE.intermediate_size]]]
                        * SHAPE.num_layers)
    with pytest.raises(SubnetError, match="MLP channel index 96 is out of range"):
        read_subnet_file(write(tmp_path, "wide.json", wide.to_json()), SHAPE)


def test_oversized_subnet_file_is_refused_before_reading(tmp_path):
    limit = subnet_file_limit(SHAPE)
    big = write(tmp_path, "big.json", b" " * (limit + 1))
    with pytest.raises(SubnetError, match="MiB; a subnet file of this model takes at most"):
        read_subnet_file(big, SHAPE)
    # the limit is not tight against a real subnet written out in full
    full = write(tmp_path, "full.json", json.dumps(Subnet.full(SHAPE).to_dict(), indent=2))
    assert full.stat().st_size < limit and read_subnet_file(full, SHAPE) == Subnet.full(SHAPE)
