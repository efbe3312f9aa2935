"""Two Subnet Explorer jobs on one machine share its cores instead of fighting over them, and say so."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import torch

from explorer.model.cores import FULL_THREADS, CoreShare, running_jobs


def _register(folder, proc, kind="search"):
    record = {"pid": proc.pid, "created": psutil.Process(proc.pid).create_time(), "kind": kind, "started": 0}
    (folder / f"{proc.pid}-1.json").write_text(json.dumps(record))


def test_a_job_takes_its_share_of_the_cores_while_another_process_runs_one(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _register(tmp_path, other)
        (tmp_path / "999999-1.json").write_text(json.dumps({"pid": 999999, "created": 1.0, "kind": "search"}))
        with CoreShare("reformation", tmp_path) as share:
            assert share.shared and torch.get_num_threads() == max(1, FULL_THREADS // 2)
            notes = share.take_notes()
            assert any(f"pid {other.pid} (search)" in n and "reformation uses" in n for n in notes), notes
            assert not (tmp_path / "999999-1.json").exists()  # a job whose process is gone is cleaned up
            assert {r["pid"] for r in running_jobs(tmp_path)} == {other.pid, share.record["pid"]}
            other.kill()
            other.wait()
            time.sleep(0.3)
            share.refresh(force=True)  # the other job ended: the cores come back, and that is said too
            assert not share.shared and torch.get_num_threads() == FULL_THREADS
            assert any("free again" in n for n in share.take_notes())
        assert torch.get_num_threads() == FULL_THREADS and not list(tmp_path.glob(f"{share.record['pid']}-*"))
    finally:
        other.kill()


def test_a_machine_busy_with_other_programs_gets_its_cores_left_to_them(tmp_path):
    """Other programs keeping every core busy (plain loops, not Subnet Explorer jobs): the job uses one
    thread, says so, and takes the cores back once they stop."""
    import os
    import time

    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        with CoreShare("search", tmp_path) as share:
            assert torch.get_num_threads() == 1 and share.busy > 0.4
            assert any("the machine is busy" in n for n in share.take_notes())
            for p in loops:
                p.kill()
                p.wait()
            time.sleep(0.5)
            share.refresh(force=True)
            assert torch.get_num_threads() == FULL_THREADS and any("free again" in n for n in share.take_notes())
    finally:
        for p in loops:
            p.kill()
