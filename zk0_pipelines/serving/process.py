"""The policy server as a background process (what the Dagster asset starts): one per port, a pid file each.

State lives in ``.zk0/serving/``: ``server-<port>.json`` (pid, address, model, version) and
``server-<port>.log``. Starting a server on a port first stops the one this project started there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from zk0_pipelines import settings
from zk0_pipelines.serving.champion import ServedModel
from zk0_pipelines.serving.robot_protocol import wait_until_serving


@dataclass(frozen=True)
class ServerProcess:
    """A started policy server process."""

    pid: int
    address: str
    model: str
    version: str
    folder: str
    log_path: str


def serving_dir() -> Path:
    """Pid files, logs and lerobot's ``logs/`` folder of the served policy servers."""
    path = settings.state_dir() / "serving"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pid_file(port: int) -> Path:
    return serving_dir() / f"server-{port}.json"


def _alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child, exited: reaped now
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_server(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"zk0_pipelines.cli" in cmdline and b"serve" in cmdline


def stop_server_process(port: int, grace_s: float = 10.0) -> bool:
    """Stop the server this project started on ``port`` (its process group); True if one was stopped."""
    pid_file = _pid_file(port)
    if not pid_file.is_file():
        return False
    pid = int(json.loads(pid_file.read_text())["pid"])
    stopped = False
    if _alive(pid) and _is_our_server(pid):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        stopped = True
    pid_file.unlink(missing_ok=True)
    return stopped


def start_server_process(
    served: ServedModel,
    host: str = "127.0.0.1",
    port: int = 8080,
    device: str = "cpu",
    ready_timeout_s: float = 300.0,
) -> ServerProcess:
    """Start ``zk0 serve`` for ``served`` in its own session and wait until it accepts connections.

    The port binds only after the model is loaded, so a returned server is ready to answer robots.

    Raises:
        RuntimeError: the process exited first (with the tail of its log); TimeoutError: never ready.
    """
    stop_server_process(port)
    log_path = serving_dir() / f"server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "zk0_pipelines.cli",
        "serve",
        "--folder",
        str(served.folder),
        "--model",
        served.name,
        "--version",
        served.version,
        "--alias",
        served.alias,
        "--host",
        host,
        "--port",
        str(port),
        "--device",
        device,
    ]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=serving_dir()
        )
    address = f"{host}:{port}"
    record = ServerProcess(proc.pid, address, served.name, served.version, str(served.folder), str(log_path))
    _pid_file(port).write_text(json.dumps(asdict(record)))
    deadline = time.monotonic() + ready_timeout_s
    while True:
        if proc.poll() is not None:
            _pid_file(port).unlink(missing_ok=True)
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"policy server for {served.label()} exited with {proc.returncode}:\n{tail}")
        try:
            wait_until_serving(address, timeout_s=2.0)
            return record
        except TimeoutError:
            if time.monotonic() > deadline:
                stop_server_process(port)
                raise TimeoutError(
                    f"policy server for {served.label()} not ready at {address} "
                    f"after {ready_timeout_s:.0f} s; log: {log_path}"
                ) from None
