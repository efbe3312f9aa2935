"""Every bad input to the CLI is one line and exit code 2, before any work: no model is loaded, no
run folder is made, nothing is left behind."""
from __future__ import annotations

import json

import pytest

from explorer.app.cli import main


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("args, words", [
    (("--set", "fitness_windows=0"), "fitness_windows (fitness windows) must be at least 1"),
    (("--set", "multiple=0"), "multiple (MLP width step) must be at least 1"),
    (("--set", "population=-1"), "population"),
    (("--set", "top_k=0"), "top_k"),
    (("--set", "generations=2.5"), "must be a whole number"),
    (("--set", "minutes=0"), "time budget"),
    (("--set", "window=0.9"), "window"),
    (("--set", "no_such=1"), "unknown search setting"),
    (("--set", "oops"), "KEY=VALUE"),
    (("--targets", "70%,abc"), "targets must be numbers"),
    (("--targets", "1.5"), "outside (0, 1]"),
    (("--seed", "-3"), "seed"),
])
def test_a_bad_search_setting_is_one_line_before_anything_exists(capsys, tmp_path, args, words):
    out = tmp_path / "run"
    code, lines = run(capsys, "search", "--targets", "0.7", *args, "--out", str(out)) if "--targets" not in args else \
        run(capsys, "search", *args, "--out", str(out))
    assert code == 2 and len(lines) == 1 and words in lines[0], lines
    assert not out.exists()


def test_resume_refuses_what_would_be_ignored(capsys, tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"settings": {}, "shape": {}, "status": "cancelled"}))
    code, lines = run(capsys, "search", "--resume", str(run_dir), "--targets", "0.7", "--set", "generations=3")
    assert code == 2 and len(lines) == 1 and "--targets, --set cannot change them" in lines[0], lines


def test_argument_errors_are_one_line_too(capsys):
    code, lines = run(capsys, "search", "--out")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0]


def test_a_subnet_file_is_bounded_and_read_before_the_model_loads(capsys, tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (64 * 2**20 + 1))
    code, lines = run(capsys, "export", "--subnet", str(big), "--out", str(tmp_path / "e"))
    assert code == 2 and len(lines) == 1 and "MiB; a subnet file of this model takes at most" in lines[0], lines
    garbage = tmp_path / "g.json"
    garbage.write_text("{nope")
    code, lines = run(capsys, "export", "--subnet", str(garbage), "--out", str(tmp_path / "e"))
    assert code == 2 and len(lines) == 1 and "not valid JSON" in lines[0]
    assert not (tmp_path / "e").exists()


def test_reform_demo_is_the_apps_reformation_and_flags_replace_only_themselves():
    from explorer.app.inputs import reform_settings
    from explorer.pick.reform import ReformSettings

    assert reform_settings(True) == ReformSettings.demo()  # --damp's absence no longer overwrites the demo's damp
    assert reform_settings(True, damp=0.5) == ReformSettings(**{**ReformSettings.demo().to_dict(), "damp": 0.5})
    assert reform_settings(False) == ReformSettings()


def test_flags_that_a_bias_free_gguf_needs_reach_the_settings():
    """--no-intercept (reform, export --reform) and --share / --set compensate=false (search) are read by
    the same parsers the app's controls go through."""
    import argparse

    from explorer.app.cli_pick import add_reform_args, reform_settings
    from explorer.app.cli_search import search_overrides

    p = argparse.ArgumentParser()
    add_reform_args(p)
    p.add_argument("--corpus", default=None)
    assert reform_settings(p.parse_args(["--no-intercept"])).intercept is False
    assert reform_settings(p.parse_args([])).intercept is True
    args = argparse.Namespace(set=["compensate=false"], seed=None, corpus=None, minutes=None, fitness_mode=None,
                              space=None, share="prunable")
    assert search_overrides(args) == {"compensate": False, "share": "prunable"}
