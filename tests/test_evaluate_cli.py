"""`python -m explorer evaluate`, the EvalResult record, and loading an exported subnet folder."""
from __future__ import annotations

import json

import pytest
from conftest import tiny_llama
from test_zeroshot import ITEMS, word_tokenizer

from explorer.model.slicing import slice_model
from explorer.model.subnet import ModelShape, Subnet
from explorer.pick.evaluation import (
    DEFAULT_TASKS,
    EvalError,
    EvalResult,
    EvalSettings,
    evaluate,
    evaluate_subnet,
    format_result,
    load_any,
    parse_tasks,
)
from explorer.pick.zeroshot import continuation_logprobs, encode_pair


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """The real CLI entry, in-process: (exit code, stdout, stderr)."""
    from explorer.app.cli import main

    code = main(["evaluate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_unknown_task_is_one_line_and_exit_2(capsys):
    code, _, err = run_cli(capsys, "--tasks", "ppl,piqa,mmlu")
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: unknown task 'mmlu'")


@pytest.mark.parametrize("args, words", [(("--limit", "-5"), "question limit"), (("--model", "/no/such/dir"), "no model"),
                                         (("--tasks", ","), "no tasks"), (("--batch-size", "0"), "--batch-size")])
def test_bad_input_is_one_line_and_exit_2(capsys, args, words):
    code, _, err = run_cli(capsys, *args) if "--tasks" in args else run_cli(capsys, *args, "--tasks", "piqa")
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and words in lines[0]


def test_parse_tasks():
    assert parse_tasks("ppl, PIQA,arc_e,piqa") == ("ppl", "piqa", "arc_easy")
    assert parse_tasks("all") == DEFAULT_TASKS
    with pytest.raises(EvalError, match="unknown task"):
        parse_tasks("ppl,squad")


def test_result_json_round_trip_and_table():
    model, tok = tiny_llama(seed=2, vocab_size=64), word_tokenizer()
    r = evaluate(model, tok, "winogrande,boolq", limit=3, name="tiny")
    assert [t.task for t in r.tasks] == ["winogrande", "boolq"] and r.ppl is None
    assert all(t.n == 3 for t in r.tasks) and 0 <= r.average <= 1
    back = EvalResult.from_json(r.to_json())
    assert back == r and back.metrics() == r.metrics()
    table = format_result(r)
    assert "winogrande" in table and "average" in table
    assert EvalSettings.from_dict(EvalSettings().to_dict()) == EvalSettings()


@pytest.mark.parametrize("tied", [False, True])
def test_exported_subnet_folder_loads_without_remote_code(tmp_path, tied, capfd):
    """An export-like folder (config model_type subnet_llm + weights + tokenizer) scores like the subnet."""
    base, tok = tiny_llama(seed=4, tie_word_embeddings=tied), word_tokenizer()
    shape = ModelShape.from_config(base.config)
    subnet = Subnet.build([([[0, 2, 5], [1, 3, 6]], list(range(0, 96, 2))), None,
                           ([[0, 1, 2, 3], [4, 5, 6, 7]], list(range(40))), ([[4], [4]], [1, 2, 3])])
    sliced = slice_model(base, subnet, shape)
    sliced.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "subnet_llm"
    capfd.readouterr()
    model, tok2, name = load_any(str(tmp_path))
    said = capfd.readouterr()
    assert "custom code" not in said.out + said.err  # no "run the folder's code? [y/N]" prompt
    assert type(model).__name__ == "SubnetForCausalLM" and name == tmp_path.name
    pairs = [encode_pair(tok2, c, k) for ctxs, conts, _ in ITEMS for c, k in zip(ctxs, conts)]
    assert continuation_logprobs(model, pairs) == pytest.approx(continuation_logprobs(sliced, pairs), abs=1e-5)


@pytest.mark.slow
def test_small_real_run_writes_json(capsys, tmp_path):
    out = tmp_path / "eval.json"
    code, stdout, err = run_cli(capsys, "--tasks", "ppl,arc_easy", "--limit", "8", "--heldout-windows", "2",
                                "--seq-len", "128", "--out", str(out))
    assert code == 0, err[-2000:]
    assert "arc_easy" in stdout and "ppl" in stdout and "zero-shot arc_easy" in err  # table, tqdm bar
    res = EvalResult.from_json(out.read_text())
    assert res.model == "default" and res.task("arc_easy").n == 8
    assert 5 < res.ppl < 200  # embedded dense held-out ppl is ~30 at 512 tokens
    assert res.settings.heldout_windows == 2 and res.info["params"] > 100_000_000


def test_evaluate_subnet_full_equals_dense():
    base, tok = tiny_llama(seed=5, vocab_size=64), word_tokenizer()
    shape = ModelShape.from_config(base.config)
    dense = evaluate(base, tok, "winogrande,arc_easy", limit=4)
    sub = evaluate_subnet(base, tok, Subnet.full(shape), shape, tasks="winogrande,arc_easy", limit=4)
    assert [t.acc for t in sub.tasks] == [t.acc for t in dense.tasks]
    assert [t.acc_norm for t in sub.tasks] == [t.acc_norm for t in dense.tasks]
    assert sub.info["subnet"] == Subnet.full(shape).key()


def test_an_unexpected_error_is_one_line_with_the_traceback_in_the_log(tmp_path, monkeypatch, capsys):
    import explorer.app.cli_search as cli_search
    from explorer.app.cli import main

    def broken(args):
        raise RuntimeError("something we did not foresee\nsecond line")

    monkeypatch.setattr(cli_search, "cmd_front", broken)
    log = tmp_path / "cli.log"
    monkeypatch.setenv("SUBNET_EXPLORER_LOG", str(log))
    assert main(["front", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unexpected RuntimeError: something we did not foresee" in err
    assert str(log) in err and "Traceback" in log.read_text() and "second line" in log.read_text()
