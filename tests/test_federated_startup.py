"""Start-up and shut-down details of a launch that no end-to-end run would notice when they regress."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

from zk0_pipelines.federated.launch_records import wait_gone
from zk0_pipelines.federated.launcher import CompletionCheck


def test_the_server_app_module_imports_no_training_stack():
    """In simulation the ServerApp module is loaded in the process that starts Ray: it must not hold Ray's
    start behind torch/lerobot imports (the prewarm thread and ``_run`` import them)."""
    code = (
        "import sys, json\n"
        "from zk0_pipelines.federated import server_app\n"
        "assert server_app.app is not None\n"
        "heavy = sorted(m for m in ('torch', 'lerobot', 'transformers', 'torchvision') if m in sys.modules)\n"
        "print(json.dumps(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_an_exited_process_its_parent_has_not_reaped_counts_as_gone():
    """A stopped launch's Ray processes linger as zombies of a parent that does not reap them at once;
    ``psutil.wait_procs`` waits for those until its timeout, ``wait_gone`` does not."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, time\n"
            "child = subprocess.Popen(['true'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        deadline = time.monotonic() + 10
        while child.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.status() == psutil.STATUS_ZOMBIE
        alive = psutil.Process(parent.pid)
        t0 = time.monotonic()
        still = wait_gone([child, alive], timeout_s=1.0)
        assert time.monotonic() - t0 < 3.0
        assert [p.pid for p in still] == [parent.pid]  # the running one is reported, the zombie is not
        t0 = time.monotonic()
        assert wait_gone([child], timeout_s=30.0) == []
        assert time.monotonic() - t0 < 1.0
    finally:
        parent.kill()
        parent.wait()


def test_completion_check_follows_metrics_json(tmp_path: Path):
    check = CompletionCheck(tmp_path)
    assert check() is False  # no metrics.json yet
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"status": "running", "rounds": []}))
    assert check() is False
    path.write_text(json.dumps({"status": "completed", "rounds": [{"round": 1}]}))
    assert check() is True
    path.write_text(json.dumps({"status": "failed", "error": "boom", "rounds": []}))
    assert check() is False


def test_a_simulation_keeps_one_cpu_for_the_server_and_never_exceeds_the_machine(monkeypatch):
    """Every actor imports the training stack once: on 2 CPUs one actor trains beside the ServerApp."""
    import zk0_pipelines.federated.superlink as sl

    monkeypatch.setattr(sl.os, "cpu_count", lambda: 8)
    assert [sl.simulation_actors(n) for n in (1, 2, 3, 8, 64)] == [1, 1, 2, 7, 7]
    monkeypatch.setattr(sl.os, "cpu_count", lambda: 1)
    assert sl.simulation_actors(2) == 1
