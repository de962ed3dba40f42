"""Run the federated app in Flower's simulation runtime, the non-deprecated way (Flower 1.41).

``run_federated`` starts a private ``flower-superlink --simulation`` (127.0.0.1, a free port, in-memory
state, runtime dependency installation off), submits the app with ``flwr run <app> <connection>
--federation-config num-supernodes=N ... --stream``, streams the Flower/Ray log lines into Python logging (and
``<run_dir>/logs/flwr-run.log``), then stops every process it started, by PID, also on failure or timeout.

The submitted app is a generated folder holding only a ``pyproject.toml``: the components point at the
installed ``zk0_pipelines.federated`` package and ``[tool.flwr.app.config]`` carries this run's validated
config. This keeps the Flower App Bundle tiny (building one from the repository walks the whole virtualenv)
and the run config complete (``flwr run --run-config`` rejects keys missing from the defaults).

``FLWR_HOME`` and ``RAY_TMPDIR`` are per-launch sub-folders of the ones ``configure_local_env`` sets (inside
the checkout), removed after a successful run; Ray gets at most ``num_cpus`` CPUs and a capped object store.

Crash safety: every process a launch starts (SuperLink, SuperExec, flwr-simulation, Ray, ``flwr run``) carries
``ZK0_LAUNCH_ID=<launch id>`` in its environment, and the launch is recorded in
``<run_dir>/logs/launch-<id>.json`` (launcher pid, process pids, its Flower home and Ray temp folder, status).
The SuperLink and ``flwr run`` run in sessions of their own, so a SIGKILL of the launcher's process group
leaves them running. ``run_federated`` therefore first reaps every launch recorded as ``running`` in the run
folder whose launcher is gone: it kills the processes carrying its id (and the recorded ones), removes its
Flower home and Ray temp folder and marks it ``reaped``; a launch whose launcher is still alive makes it
refuse the folder. A new launch then uses a new port, Flower home and Ray folder, and ``resume = true``
continues from the last complete checkpoint.

``run_federated(..., federation="local-deployment")`` runs the same app on Flower's deployment runtime
instead (``deployment.LocalDeployment``, a subclass of ``LocalSimulation``: TLS, SuperNode authentication,
one SuperNode process per dataset), with the same launch records, reaping and run-folder layout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zk0_pipelines.federated.run_config import RunConfig, parse_run_config, pyproject_app_config

log = logging.getLogger(__name__)
flwr_log = logging.getLogger("zk0_pipelines.federated.flwr")

CONNECTION = "zk0"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RUN_ID = re.compile(r"Successfully started run (\d+)")
LAUNCHER_KEYS = ("train-datasets", "eval-datasets", "output-dir")
FEDERATIONS = ("simulation", "local-deployment")  # run_federated's runtimes (deployment: deployment.py)


@dataclass
class FederatedResult:
    """Outcome of :func:`run_federated` (the content of ``<run_dir>/metrics.json`` plus paths)."""

    run_dir: Path
    final_checkpoint: Path
    rounds: list[dict]
    clients: list[dict]
    config: dict
    metrics_path: Path | None = None
    run_id: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class FederatedRunError(RuntimeError):
    """The Flower run did not complete; the message carries the status and the last log lines."""


def build_run_config(
    train_roots: list[Path], eval_roots: list[Path], run_dir: Path, config: Mapping[str, Any]
) -> RunConfig:
    """Validate ``config`` and add the dataset paths and output folder (``ValueError`` naming the key)."""
    clash = sorted(set(config) & set(LAUNCHER_KEYS))
    if clash:
        raise ValueError(f"run config key(s) {clash} are set by run_federated's arguments; remove them")
    values = dict(config)
    values["train-datasets"] = ",".join(str(Path(p).resolve()) for p in train_roots)
    values["eval-datasets"] = ",".join(str(Path(p).resolve()) for p in eval_roots)
    values["output-dir"] = str(Path(run_dir).resolve())
    cfg = parse_run_config(values)
    if not train_roots:
        raise ValueError("run_federated needs at least one training dataset")
    for root in [*train_roots, *eval_roots]:
        if "," in str(root):
            raise ValueError(f"dataset path {root} contains a comma (the run config joins paths with commas)")
        if not (Path(root) / "meta" / "info.json").is_file():
            raise FileNotFoundError(f"dataset {root} has no meta/info.json (not a LeRobot dataset folder)")
    for key in ("min-available-clients", "min-replies"):
        value = cfg.to_dict()[key]
        if value > len(train_roots):
            raise ValueError(
                f"run config key '{key}' is {value} but only {len(train_roots)} training dataset(s) "
                "were given"
            )
    return cfg


def app_pyproject(cfg: RunConfig) -> str:
    """The generated app's ``pyproject.toml`` (components = this package, config = this run)."""
    return (
        "[build-system]\n"
        'requires = ["hatchling"]\n'
        'build-backend = "hatchling.build"\n\n'
        "[project]\n"
        'name = "zk0-federated"\n'
        'version = "0.1.0"\n'
        'description = "zk0 federated SmolVLA fine-tuning (generated by zk0_pipelines.federated.launcher)"\n'
        'license = "Apache-2.0"\n'
        "dependencies = []\n\n"
        "[tool.flwr.app]\n"
        'publisher = "zk0"\n\n'
        "[tool.flwr.app.components]\n"
        'serverapp = "zk0_pipelines.federated.server_app:app"\n'
        'clientapp = "zk0_pipelines.federated.client_app:app"\n\n' + pyproject_app_config(cfg.to_dict())
    )


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def _tool(name: str) -> str:
    candidate = _venv_bin() / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"'{name}' not found next to {sys.executable} nor on PATH (flwr not installed?)"
        )
    return found


def superlink_command(port: int, security: list[str]) -> list[str]:
    """``flower-superlink`` on 127.0.0.1:``port`` running ServerApps in subprocesses, with no runtime
    dependency installation; ``security`` is the mode's own flags (``--insecure --simulation`` or TLS)."""
    return [
        _tool("flower-superlink"),
        *security,
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]


def write_connection_config(flwr_home: Path, port: int, security_line: str) -> None:
    """``$FLWR_HOME/config.toml``: the default SuperLink connection ``CONNECTION`` at 127.0.0.1:``port``;
    ``security_line`` is the TOML line saying how to trust it (``insecure = true`` or root certificates)."""
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\n{security_line}\n'
    )


LAUNCH_ENV = "ZK0_LAUNCH_ID"
LAUNCH_RECORD = "launch-{}.json"


def _identity(pid: int) -> dict[str, Any] | None:
    import psutil

    try:
        return {"pid": pid, "create-time": psutil.Process(pid).create_time()}
    except psutil.Error:
        return None


def _same_process(entry: Mapping[str, Any]):
    """The ``psutil.Process`` of a recorded ``{pid, create-time}`` if it is still that process, else None."""
    import psutil

    try:
        proc = psutil.Process(int(entry["pid"]))
        if abs(proc.create_time() - float(entry["create-time"])) < 0.05 and proc.status() != "zombie":
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
            if proc.environ().get(LAUNCH_ENV) == launch_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def kill_processes(procs: list, grace_s: float = 5.0) -> list[int]:
    """SIGTERM ``procs`` (psutil processes), SIGKILL what is left after ``grace_s``; returns their pids."""
    import psutil

    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
            alive.append(proc)
    _, still = psutil.wait_procs(alive, timeout=grace_s)
    for proc in still:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(still, timeout=grace_s)
    return sorted(p.pid for p in alive)


def _remove_launch_dir(path: str | None, root_env: str) -> None:
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
        if launcher.get("pid") != os.getpid() and _same_process(launcher) is not None:
            raise FederatedRunError(
                f"{run_dir} is in use by launch {record.get('launch-id')} "
                f"(launcher pid {launcher.get('pid')})"
            )
        procs = {p.pid: p for p in launch_processes(str(record.get("launch-id")))}
        for entry in record.get("processes", []):
            if (proc := _same_process(entry)) is not None:
                procs.setdefault(proc.pid, proc)
        killed = kill_processes(list(procs.values()))
        _remove_launch_dir(record.get("flwr-home"), "FLWR_HOME")
        _remove_launch_dir(record.get("ray-tmp"), "RAY_TMPDIR")
        record.update({"status": "reaped", "reaped-pids": killed, "reaped-at": time.time()})
        write_json_atomic(path, record)
        log.warning("reaped stale launch %s in %s (killed pids %s)", record.get("launch-id"), run_dir, killed)
        reaped.append(record)
    return reaped


#: Concurrent single-threaded simulated clients per CPU given to Ray (``LocalSimulation.run_command``).
MAX_CLIENTS_PER_CPU = 2


class LocalSimulation:
    """A private simulation SuperLink plus the ``flwr`` CLI calls against it (context manager)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        num_cpus: int = 2,
        object_store_bytes: int = 512 * 1024**2,
        startup_timeout_s: float = 60.0,
        torch_threads: int = 1,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.logs_dir = self.run_dir / "logs"
        launch_id = uuid.uuid4().hex[:8]
        self.launch_id = launch_id
        self.record_path = self.logs_dir / LAUNCH_RECORD.format(launch_id)
        self.flwr_home = Path(os.environ["FLWR_HOME"]) / "launches" / launch_id
        self.ray_tmp = Path(os.environ["RAY_TMPDIR"]) / launch_id
        self.num_cpus = max(1, min(num_cpus, os.cpu_count() or 1))
        self.object_store_bytes = object_store_bytes
        self.torch_threads = max(1, torch_threads)
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self.superlink: subprocess.Popen | None = None
        self._started: list[subprocess.Popen] = []
        self._identities: list[dict[str, Any]] = []  # {pid, create-time} of what this launch started
        self._tail: deque[str] = deque(maxlen=60)

    # -- environment -------------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """Environment of every process started here."""
        from zk0_pipelines.settings import repo_root

        env = dict(os.environ)
        env.update(
            {
                "PATH": f"{_venv_bin()}{os.pathsep}{env.get('PATH', '')}",
                "FLWR_HOME": str(self.flwr_home),
                "RAY_TMPDIR": str(self.ray_tmp),
                "ZK0_ROOT": str(repo_root()),
                LAUNCH_ENV: self.launch_id,
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_DEDUP_LOGS": "0",
                "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
                "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(self.object_store_bytes),
                "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false",
                # one intra-op thread per process: Ray gives each client 1 CPU, and OpenMP spin-waiting
                # on an oversubscribed machine made steps 10-20x slower in measurements
                "OMP_NUM_THREADS": str(self.torch_threads),
                "MKL_NUM_THREADS": str(self.torch_threads),
            }
        )
        return env

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> LocalSimulation:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _write_record(self, status: str) -> None:
        from zk0_pipelines.federated.recorder import write_json_atomic

        write_json_atomic(
            self.record_path,
            {
                "launch-id": self.launch_id,
                "status": status,
                "launcher": _identity(os.getpid()),
                "processes": self._identities,
                "flwr-home": str(self.flwr_home),
                "ray-tmp": str(self.ray_tmp),
                "port": self.port,
            },
        )

    def _track(self, proc: subprocess.Popen) -> None:
        self._started.append(proc)
        if (ident := _identity(proc.pid)) is not None:
            self._identities.append(ident)
        self._write_record("running")

    def start(self) -> None:
        """Start ``flower-superlink --simulation`` on a free 127.0.0.1 port and wait for its health check."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.ray_tmp.mkdir(parents=True, exist_ok=True)
        self._write_record("running")
        for attempt in range(3):
            self.port = free_port()
            write_connection_config(self.flwr_home, self.port, "insecure = true")
            out = open(self.logs_dir / "superlink.out", "ab")  # noqa: SIM115 - closed with the process
            cmd = superlink_command(self.port, ["--insecure", "--simulation"])
            self.superlink = subprocess.Popen(
                cmd,
                env=self.env(),
                cwd=self.run_dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            out.close()
            self._track(self.superlink)
            if self._wait_healthy():
                log.info("SuperLink pid %d on 127.0.0.1:%d", self.superlink.pid, self.port)
                return
            log.warning("SuperLink did not come up on port %d (attempt %d)", self.port, attempt + 1)
            self._stop_tree(self.superlink)
        raise FederatedRunError(f"flower-superlink failed to start; see {self.logs_dir / 'superlink.out'}")

    def _wait_healthy(self) -> bool:
        import httpx

        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.superlink is None or self.superlink.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).is_success:
                    return True
            time.sleep(0.3)
        return False

    def stop(self) -> None:
        """Stop the SuperLink and every process it spawned (SuperExec, flwr-simulation, Ray), by PID."""
        if self.superlink is not None:
            self._stop_tree(self.superlink)
            self.superlink = None
        for proc in self._started:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        leftovers = launch_processes(self.launch_id)  # e.g. Ray processes re-parented away from the tree
        if leftovers:
            log.info("stopping %d leftover process(es) of launch %s", len(leftovers), self.launch_id)
            kill_processes(leftovers)
        if self.record_path.parent.is_dir():
            self._write_record("stopped")

    @staticmethod
    def _stop_tree(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
        import psutil

        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        alive = []
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                    child.terminate()
                    alive.append(child)
        _, still = psutil.wait_procs(alive, timeout=5)
        for child in still:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()

    def cleanup(self) -> None:
        """Remove the per-launch FLWR_HOME and RAY_TMPDIR (after a successful run)."""
        shutil.rmtree(self.flwr_home, ignore_errors=True)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    # -- flwr CLI ----------------------------------------------------------------------------------------
    def _cli(self, *args: str, timeout_s: float = 120.0) -> str:
        proc = subprocess.run(
            [_tool("flwr"), *args],
            env=self.env(),
            cwd=self.run_dir,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise FederatedRunError(
                f"flwr {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}"
            )
        return proc.stdout

    def run_status(self, run_id: str) -> str:
        """``status`` of a run as ``flwr ls`` reports it (e.g. ``finished:completed``)."""
        out = self._cli("ls", CONNECTION, "--run-id", run_id, "--format", "json")
        runs = json.loads(out[out.index("{") :]).get("runs", [])
        return str(runs[0]["status"]) if runs else "unknown"

    def _pump(self, proc: subprocess.Popen, sink, run_id_box: list[str]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = _ANSI.sub("", raw.rstrip("\n"))
            sink.write(f"{time.strftime('%H:%M:%S')} {line}\n")
            sink.flush()
            self._tail.append(line)
            if not run_id_box and (match := _RUN_ID.search(line)):
                run_id_box.append(match.group(1))
            if line.strip():
                flwr_log.info("%s", line)

    def run_command(self, app_dir: Path, num_supernodes: int) -> list[str]:
        """The ``flwr run`` command line submitting ``app_dir`` (simulation: with its federation config)."""
        # All clients train at once, each single-threaded (OMP_NUM_THREADS), sharing the num_cpus cores:
        # Ray's CPU count is logical and Flower only takes whole CPUs per client, so Ray is told one CPU
        # per SuperNode (at most MAX_CLIENTS_PER_CPU per real CPU) instead of running clients in waves.
        ray_cpus = max(self.num_cpus, min(num_supernodes, MAX_CLIENTS_PER_CPU * self.num_cpus))
        fed = (
            f"num-supernodes={num_supernodes} client-resources-num-cpus=1 "
            f"init-args-num-cpus={ray_cpus} init-args-log-to-driver=true"
        )
        return [_tool("flwr"), "run", str(app_dir), CONNECTION, "--federation-config", fed, "--stream"]

    def run_app(self, app_dir: Path, num_supernodes: int, timeout_s: float) -> tuple[str, str]:
        """Submit ``app_dir`` and stream its logs until it finishes; returns ``(run_id, final status)``."""
        cmd = self.run_command(app_dir, num_supernodes)
        run_id_box: list[str] = []
        deadline = time.monotonic() + timeout_s
        with open(self.logs_dir / "flwr-run.log", "a") as sink:
            proc = subprocess.Popen(
                cmd,
                env=self.env(),
                cwd=self.run_dir,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            self._track(proc)
            pump = threading.Thread(target=self._pump, args=(proc, sink, run_id_box), daemon=True)
            pump.start()
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if run_id_box:
                    with contextlib.suppress(Exception):
                        self._cli("stop", run_id_box[0], CONNECTION, timeout_s=60)
                raise FederatedRunError(
                    f"federated run exceeded {timeout_s:.0f}s; last log lines:\n" + "\n".join(self._tail)
                ) from None
            finally:
                if proc.poll() is None:
                    self._stop_tree(proc, grace_s=5)
                pump.join(timeout=10)
        if not run_id_box:
            raise FederatedRunError("flwr run did not start a run:\n" + "\n".join(self._tail))
        run_id = run_id_box[0]
        status = self.run_status(run_id)
        while status.split(":")[0] != "finished" and time.monotonic() < deadline:
            time.sleep(2.0)  # the log stream can end slightly before the status flips
            status = self.run_status(run_id)
        return run_id, status

    @property
    def tail(self) -> list[str]:
        """The last streamed log lines."""
        return list(self._tail)


def run_federated(
    train_roots: list[Path],
    eval_roots: list[Path],
    run_dir: Path,
    config: Mapping[str, Any],
    *,
    timeout_s: float = 3600.0,
    num_cpus: int = 2,
    object_store_bytes: int = 512 * 1024**2,
    torch_threads: int = 1,
    federation: str = "simulation",
) -> FederatedResult:
    """Run federated training in Flower simulation with one SuperNode per training dataset.

    ``federation = "local-deployment"`` runs the same app on Flower's deployment runtime instead: a TLS,
    node-authenticated SuperLink and one ``flower-supernode`` process per training dataset, each given only
    its own dataset path (``deployment.LocalDeployment``); the run folder has the same layout.

    ``config`` holds run-config keys (see ``run_config.FIELDS``) except ``train-datasets``,
    ``eval-datasets`` and ``output-dir``, which come from the arguments. Everything the server writes
    (checkpoints, metrics.json, final/) and the logs land in ``run_dir``. Processes left running by an earlier
    launch in ``run_dir`` that was killed (even with SIGKILL) are stopped first (module doc); with
    ``resume = true`` the run continues from the last complete checkpoint in ``run_dir``.

    Raises:
        ValueError / FileNotFoundError: bad config or dataset folder, before anything starts.
        FederatedRunError: the run failed or timed out (status and last log lines in the message), or
            another launcher is still using ``run_dir``.
    """
    from zk0_pipelines.federated import recorder as rec
    from zk0_pipelines.settings import configure_local_env

    configure_local_env()
    run_dir = Path(run_dir).resolve()
    cfg = build_run_config([Path(p) for p in train_roots], [Path(p) for p in eval_roots], run_dir, config)
    if federation not in FEDERATIONS:
        raise ValueError(f"federation must be one of {', '.join(FEDERATIONS)}, got {federation!r}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / rec.METRICS_FILE).exists() and not cfg.resume:
        raise FileExistsError(
            f"{run_dir} already holds a run (metrics.json); use a new folder or resume=true"
        )
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    reaped = reap_stale_launches(run_dir)
    if federation == "local-deployment":
        from zk0_pipelines.federated.deployment import LocalDeployment

        sim: LocalSimulation = LocalDeployment(run_dir, list(train_roots), torch_threads=torch_threads)
    else:
        sim = LocalSimulation(
            run_dir, num_cpus=num_cpus, object_store_bytes=object_store_bytes, torch_threads=torch_threads
        )
    ok = False
    try:
        sim.start()
        timings["superlink-start-s"] = time.perf_counter() - t0
        app_dir = sim.flwr_home / "app"
        app_dir.mkdir(parents=True, exist_ok=True)
        (app_dir / "pyproject.toml").write_text(app_pyproject(cfg))
        t1 = time.perf_counter()
        run_id, status = sim.run_app(app_dir, len(train_roots), timeout_s)
        timings["run-s"] = time.perf_counter() - t1
        metrics = _read_metrics(run_dir)
        if status != "finished:completed" or metrics.get("status") != "completed":
            raise FederatedRunError(
                f"federated run {run_id} ended with status {status!r} (metrics.json status "
                f"{metrics.get('status')!r}, error {metrics.get('error')!r}); last log lines:\n"
                + "\n".join(sim.tail)
            )
        ok = True
    finally:
        sim.stop()
        if ok:
            sim.cleanup()
        else:
            log.error("federated run failed; Flower home kept at %s, logs in %s", sim.flwr_home, sim.logs_dir)
    timings["total-s"] = time.perf_counter() - t0
    return FederatedResult(
        run_dir=run_dir,
        final_checkpoint=Path(metrics["final"]),
        rounds=metrics["rounds"],
        clients=metrics["clients"],
        config=metrics["config"],
        metrics_path=run_dir / rec.METRICS_FILE,
        run_id=run_id,
        timings=timings,
        extra={
            **{
                k: metrics.get(k)
                for k in (
                    "norm-stats",
                    "policy",
                    "best-round",
                    "best-eval-loss",
                    "best-action-mse-round",
                    "best-action-mse",
                )
            },
            "launch-id": sim.launch_id,
            "federation": federation,
            "reaped-launches": [r["launch-id"] for r in reaped],
        },
    )


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return {"status": "missing", "error": f"{path} was not written"}
    return json.loads(path.read_text())
