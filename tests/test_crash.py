"""A search process killed with SIGKILL resumes from its JSONL without losing any evaluated candidate."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def complete_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a torn last line
    return out


def test_sigkill_during_search_then_resume(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "explorer", "search", "--targets", "0.8", "--preset", "demo", "--seed", "1",
           "--set", "population=6", "--set", "generations=3", "--set", "baselines=[]", "--set", "latency=false"]
    proc = subprocess.Popen(cmd + ["--out", str(run)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    jsonl = run / "candidates.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if jsonl.exists() and len(complete_lines(jsonl)) >= 5:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the search ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {c["id"]: c for c in complete_lines(jsonl)}
    assert len(before) >= 5
    out = subprocess.run([sys.executable, "-m", "explorer", "search", "--resume", str(run)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    after = {c["id"]: c for c in complete_lines(jsonl)}
    for cid, c in before.items():  # nothing evaluated before the kill is lost or changed
        assert after[cid]["subnet"] == c["subnet"] and after[cid]["metrics"]["fitness_ppl"] == c["metrics"]["fitness_ppl"]
    assert len(after) > len(before)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
