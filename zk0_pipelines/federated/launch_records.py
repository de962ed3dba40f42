"""Launch records and the processes a launch started: find them, stop them, reap what a killed launch left.

Every process a launch starts (SuperLink, SuperExec, flwr-simulation, Ray, SuperNodes, ``flwr run``) carries
``ZK0_LAUNCH_ID=<launch id>`` in its environment, and the launch is recorded in
``<run_dir>/logs/launch-<id>.json`` (launcher pid, process pids, its Flower home and Ray temp folder, status).
The SuperLink and ``flwr run`` run in sessions of their own, so a SIGKILL of the launcher's process group
leaves them running: ``reap_stale_launches`` kills the processes of every launch recorded as ``running``
whose launcher is gone, removes its Flower home and Ray temp folder and marks it ``reaped``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zk0_pipelines import env_settings

log = logging.getLogger(__name__)

LAUNCH_ENV = env_settings.LAUNCH_ID.name
LAUNCH_RECORD = "launch-{}.json"


class FederatedRunError(RuntimeError):
    """The Flower run did not complete; the message carries the status and the last log lines."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def venv_bin() -> Path:
    """The folder of this interpreter's console scripts (``flwr``, ``flower-superlink``, ...)."""
    return Path(sys.executable).parent


def tool_path(name: str) -> str:
    """Path of console script ``name``: next to this interpreter, else on ``PATH``."""
    candidate = venv_bin() / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"'{name}' not found next to {sys.executable} nor on PATH (flwr not installed?)"
        )
    return found


def process_identity(pid: int) -> dict[str, Any] | None:
    """``{pid, create-time}`` of a live process (pids are reused; the pair is not), or None."""
    import psutil

    try:
        return {"pid": pid, "create-time": psutil.Process(pid).create_time()}
    except psutil.Error:
        return None


def same_process(entry: Mapping[str, Any]):
    """The ``psutil.Process`` of a recorded ``{pid, create-time}`` if it is still that process, else None."""
    import psutil

    try:
        proc = psutil.Process(int(entry["pid"]))
        if abs(proc.create_time() - float(entry["create-time"])) < 0.05 and _running(proc):
            return proc
    except (psutil.Error, KeyError, TypeError, ValueError):
        pass
    return None


def launch_processes(launch_id: str) -> list:
    """Live processes (``psutil.Process``) whose environment carries ``ZK0_LAUNCH_ID=<launch_id>``."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(LAUNCH_ENV) == launch_id and _running(proc):
                found.append(proc)
    return found


def _running(proc) -> bool:
    """True while ``proc`` (psutil) runs; an exited process its parent has not reaped yet (a zombie) does not
    (``psutil.wait_procs`` waits for zombies of other parents until its timeout)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(procs: list, timeout_s: float, poll_s: float = 0.05) -> list:
    """Wait up to ``timeout_s`` for ``procs`` (psutil) to exit; returns those still running."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if _running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(poll_s)
        alive = [p for p in alive if _running(p)]
    return alive


def kill_processes(procs: list, grace_s: float = 5.0) -> list[int]:
    """SIGTERM ``procs`` (psutil processes), SIGKILL what is left after ``grace_s``; returns their pids."""
    import psutil

    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
            alive.append(proc)
    still = wait_gone(alive, grace_s)
    for proc in still:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    wait_gone(still, grace_s)
    return sorted(p.pid for p in alive)


def stop_tree(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM ``proc`` and its descendants (as they were at the call) together; SIGKILL what is still
    running after ``grace_s``."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    alive = []
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            if _running(child):
                child.terminate()
                alive.append(child)
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    for child in wait_gone(alive, max(0.0, deadline - time.monotonic())):
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=5)


def remove_launch_dir(path: str | None, root_env: str) -> None:
    """Remove a recorded per-launch folder, only if it lies inside the configured ``root_env`` folder."""
    root = os.environ.get(root_env)
    if not path or not root:
        return
    folder, root_path = Path(path).resolve(), Path(root).resolve()
    if folder != root_path and folder.is_relative_to(root_path):
        shutil.rmtree(folder, ignore_errors=True)


def reap_stale_launches(run_dir: Path) -> list[dict[str, Any]]:
    """Stop what earlier, killed launches in ``run_dir`` left running (module doc); returns their records.

    Raises ``FederatedRunError`` when a launch recorded as running still has its launcher process alive
    (another ``run_federated`` is using the folder).
    """
    from zk0_pipelines.federated.recorder import write_json_atomic

    reaped = []
    for path in sorted((Path(run_dir) / "logs").glob(LAUNCH_RECORD.format("*"))):
        record = json.loads(path.read_text())
        if record.get("status") != "running":
            continue
        launcher = record.get("launcher", {})
        if launcher.get("pid") != os.getpid() and same_process(launcher) is not None:
            raise FederatedRunError(
                f"{run_dir} is in use by launch {record.get('launch-id')} "
                f"(launcher pid {launcher.get('pid')})"
            )
        procs = {p.pid: p for p in launch_processes(str(record.get("launch-id")))}
        for entry in record.get("processes", []):
            if (proc := same_process(entry)) is not None:
                procs.setdefault(proc.pid, proc)
        killed = kill_processes(list(procs.values()))
        remove_launch_dir(record.get("flwr-home"), "FLWR_HOME")
        remove_launch_dir(record.get("ray-tmp"), "RAY_TMPDIR")
        record.update({"status": "reaped", "reaped-pids": killed, "reaped-at": time.time()})
        write_json_atomic(path, record)
        log.warning("reaped stale launch %s in %s (killed pids %s)", record.get("launch-id"), run_dir, killed)
        reaped.append(record)
    return reaped
