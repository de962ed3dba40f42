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


def test_a_simulation_gives_each_actor_several_cpus_and_never_more_than_the_machine(monkeypatch):
    """Each Ray actor imports the training stack once: on a small machine one actor trains with every CPU
    of the launch as intra-op threads instead of one single-threaded actor per CPU."""
    import zk0_pipelines.federated.superlink as sl

    monkeypatch.setattr(sl.os, "cpu_count", lambda: 8)
    assert sl.simulation_actors(2, 2) == (1, 2)
    assert sl.simulation_actors(1, 2) == (1, 1)
    assert sl.simulation_actors(3, 2) == (1, 2)
    assert sl.simulation_actors(8, 2) == (4, 2)
    assert sl.simulation_actors(8, 1) == (8, 1)
    assert sl.simulation_actors(64, 4) == (2, 4)  # capped at the machine's 8 CPUs
    monkeypatch.setattr(sl.os, "cpu_count", lambda: 1)
    assert sl.simulation_actors(2, 2) == (1, 1)


def test_outside_a_ray_actor_the_client_keeps_the_process_thread_count():
    """``use_assigned_cpus`` only acts in a Ray worker (the e2e run checks the actor side)."""
    code = (
        "import torch\n"
        "from zk0_pipelines.federated.runtime import ray_assigned_cpus, use_assigned_cpus\n"
        "torch.set_num_threads(3)\n"
        "use_assigned_cpus()\n"
        "print(ray_assigned_cpus(), torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["None", "3"]
