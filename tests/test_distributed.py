"""Candidate evaluation spread over processes (explorer.search.distributed), on CPU with gloo: two
processes started the way a user starts them (`accelerate launch`, `torch.distributed.run`) find
exactly the candidates, fitness values and fronts one process finds with the same seed, split the
evaluations between them, leave the run directory to process 0, and continue a run that one
process stored part of without evaluating the stored candidates again."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import distributed_search as ds
import pytest
import torch

from bench.app import free_port
from explorer.events import CandidateEvaluated, SearchCancelled, SearchFinished
from explorer.search.runs import Run, open_run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed_search.py"


def _one_process(run_dir: Path, cancel_after: int | None = None) -> list:
    """The search in this process, with the arithmetic of a launched process (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cancel = threading.Event()
        events, seen = [], 0
        for ev in ds.search(run_dir, cancel=cancel):
            events.append(ev)
            if isinstance(ev, CandidateEvaluated):
                seen += 1
                if seen == cancel_after:
                    cancel.set()
        return events
    finally:
        torch.set_num_threads(threads)


def _launch(cmd: list[str], scratch: Path) -> subprocess.CompletedProcess:
    """Run a launcher in its own session (so a hang can be killed with all its workers)."""
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the launched search hung:\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def _record(run: Run) -> list[tuple]:
    """What must not depend on the number of processes: every decision and every fitness number
    (timings and cache counters do)."""
    return [(c.id, c.target, c.generation, c.origin, c.subnet.key(), c.metrics["fitness_nll"],
             c.metrics["fitness_ppl"], c.metrics["fitness_lower_bound"], c.metrics.get("copied_from"))
            for c in run.candidates()]


def _stats(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    events = _one_process(run_dir)
    assert isinstance(events[-1], SearchFinished)
    return {"run": open_run(run_dir), "summary": events[-1].summary}


def test_two_processes_find_what_one_finds(reference, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(SCRIPT), str(run_dir), "--stats", str(tmp_path / "stats")]
    out = _launch(cmd, tmp_path / "scratch")
    assert out.returncode == 0, out.stdout[-3000:]
    one, two = reference["run"], open_run(run_dir)
    assert two.status == "finished"
    want = _record(one)
    assert _record(two) == want
    assert two.fronts() == one.fronts() and two.fronts()["params"]
    assert any(r[7] for r in want) and any(r[8] for r in want)  # the bound stopped some, some were copies
    stats = _stats(tmp_path / "stats")
    assert [s["world"] for s in stats] == [2, 2]
    done = [s["fitness"]["evaluations"] for s in stats]
    assert min(done) > 0 and sum(done) == reference["summary"]["evaluated"]  # split, nothing done twice
    # process 0 alone wrote the run (the other's scratch copy is gone)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in one.path.iterdir())
    names = lambda run: [json.loads(l)["event"] for l in (run.path / "events.jsonl").read_text().splitlines()]  # noqa: E731
    assert names(two) == names(one)
    assert not list((tmp_path / "scratch").glob("explorer-rank*"))


def test_two_processes_resume_a_run_one_process_stored(reference, tmp_path):
    run_dir = tmp_path / "run"
    events = _one_process(run_dir, cancel_after=20)
    assert isinstance(events[-1], SearchCancelled) and len(open_run(run_dir).candidates()) == 20
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           str(run_dir), "--resume", "--stats", str(tmp_path / "stats")]
    out = _launch(cmd, tmp_path / "scratch")
    assert out.returncode == 0, out.stdout[-3000:]
    run = open_run(run_dir)
    assert run.status == "finished"
    assert _record(run) == _record(reference["run"])
    summary = run.meta["summary"]
    assert summary["replayed"] == 20  # the stored candidates were not evaluated again
    stats = _stats(tmp_path / "stats")
    assert min(s["fitness"]["evaluations"] for s in stats) > 0
    assert sum(s["fitness"]["evaluations"] for s in stats) == summary["evaluated"]
    assert not list((tmp_path / "scratch").glob("explorer-rank*"))


def test_a_failure_is_raised_alike_on_the_other_processes():
    """What process 0's failure becomes on the others: an input error keeps its own message (every
    process would have refused it alike), a cancel stays a cancel, anything else names the process."""
    from explorer.errors import Cancelled, ExplorerError
    from explorer.search.distributed import Failure

    e = Failure.of(0, ExplorerError("no model at /nowhere")).error()
    assert type(e) is ExplorerError and str(e) == "no model at /nowhere"
    assert isinstance(Failure.of(1, Cancelled()).error(), Cancelled)
    e = Failure.of(1, RuntimeError("CUDA out of memory")).error()
    assert type(e) is ExplorerError and str(e) == "process 1 failed: RuntimeError: CUDA out of memory"
