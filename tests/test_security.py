"""What is never executed and never served: no pickles, no remote code unless asked, no path escapes."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from explorer.app.workbench import Workbench as Workspace
from explorer.errors import ExplorerError

ROOT = Path(__file__).resolve().parents[1]


def python_sources():
    return [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts]


def test_no_pickle_loading_anywhere():
    for p in python_sources():
        src = p.read_text(encoding="utf-8")
        assert not re.search(r"\bpickle\.loads?\(|\bjoblib\.load\(|\bnp\.load\([^)]*allow_pickle=True", src), p
        for call in re.findall(r"torch\.load\([^)]*\)", src):
            assert "weights_only=True" in call, (p, call)


def test_server_binds_to_localhost_by_default():
    import app

    assert app.parse_args([]).host == "127.0.0.1"
    assert app.parse_args(["--host", "0.0.0.0"]).host == "0.0.0.0"


def test_run_names_cannot_escape(tmp_path):
    ws = Workspace(tmp_path / "runs", tmp_path / "exports")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "run.json").write_text("{}")
    for bad in ["../secret", "..", "/etc", "a/../../secret", "..\\secret", "", ".hidden", "x" * 200]:
        with pytest.raises(ExplorerError, match="not a valid run name"):
            ws.run_dir(bad)
        with pytest.raises(ExplorerError, match="not a valid run name"):
            ws.new_run_dir(bad)
    with pytest.raises(ExplorerError, match="no saved run"):
        ws.run_dir("missing")


def test_downloads_only_from_the_exports_folder(tmp_path):
    ws = Workspace(tmp_path / "runs", tmp_path / "exports")
    mine = ws.export_dir("run-x")
    mine.mkdir(parents=True)
    assert ws.is_ours(mine / "model.zip")
    assert not ws.is_ours(tmp_path / "runs" / "x.zip")
    assert not ws.is_ours("/etc/passwd")
    assert not ws.is_ours(mine / ".." / ".." / "elsewhere.zip")
    assert ws.export_dir("../../x").parent == ws.exports_root


@pytest.mark.slow
def test_remote_code_is_not_run_unless_allowed(tmp_path, embedded):
    """A folder whose config points at its own modeling code: we load the built-in class and never
    import the folder's Python."""
    from conftest import tiny_llama

    from explorer.model.loading import load_model

    folder = tmp_path / "m"
    tiny_llama(vocab_size=embedded.shape.vocab_size).save_pretrained(folder)
    embedded.tokenizer.save_pretrained(folder)
    marker = tmp_path / "EXECUTED"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    lm = load_model(str(folder))
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()
    shutil.rmtree(folder)
