"""A private ``flower-superlink`` process on 127.0.0.1 and the ``flwr`` CLI calls against it.

``SuperLinkProcess`` holds what both runtimes share: the launch record and process tracking
(``launch_records``), the per-launch ``FLWR_HOME`` / ``RAY_TMPDIR`` and process environment, start on a free
port with retries and a health check, ``flwr run --stream`` with the log lines pumped into Python logging
(and ``<run_dir>/logs/flwr-run.log``), ``flwr ls`` status, and stopping every process of the launch by PID.
Two variants differ only in how the SuperLink is secured and how a run is submitted:

- ``SimulationSuperLink``: ``--insecure --simulation`` (Flower's Ray simulation runtime; plain HTTP
  health check), ``flwr run`` with a federation config (number of SuperNodes, Ray resources);
- ``TlsSuperLink``: TLS from a throwaway CA (``pki``) and ``--enable-supernode-auth``; HTTPS health check
  trusting only that CA; ``flwr run`` against already connected SuperNodes (``deployment``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from zk0_pipelines import env_settings
from zk0_pipelines.federated.launch_records import (
    LAUNCH_ENV,
    LAUNCH_RECORD,
    FederatedRunError,
    free_port,
    kill_processes,
    launch_processes,
    process_identity,
    stop_tree,
    tool_path,
    venv_bin,
)
from zk0_pipelines.federated.pki import DEFAULT_TLS_HOSTS, TlsFiles, write_tls_files

log = logging.getLogger(__name__)
flwr_log = logging.getLogger("zk0_pipelines.federated.flwr")

CONNECTION = "zk0"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RUN_ID = re.compile(r"Successfully started run (\d+)")

#: ``run_app``'s status when the launcher's ``done`` check, not Flower, said the run ended.
SERVER_COMPLETED = "server-completed"

#: How often a SuperExec polls the SuperLink for a submitted run or message (Flower's default: 1 s).
TASK_POLL_INTERVAL_S = 0.1

#: How often ``run_app`` checks the ``flwr run`` process and the ``done`` condition.
WAIT_POLL_S = 0.1

#: SIGTERM → SIGKILL grace when stopping a launch (``SuperLinkProcess.stop``).
STOP_GRACE_S = 15.0
#: The same once the ServerApp recorded the run as completed: Ray's raylet and a draining actor took
#: ~4.5 s to exit after SIGTERM in measurements, with nothing left to save.
COMPLETED_STOP_GRACE_S = 0.2


#: CPUs a launch gives the simulation unless told otherwise (``run_federated(num_cpus=...)``).
SIMULATION_CPUS = 2


def simulation_actors(num_cpus: int = SIMULATION_CPUS) -> int:
    """Ray actors (simulated clients training at once, one intra-op thread each) of a simulation launch.

    One of ``num_cpus`` (at most the machine's) stays with the ServerApp process, which imports the same
    training stack, evaluates the baseline while round 1 trains and evaluates between rounds. Every actor
    process imports the training stack once (several CPU-seconds), so on 2 CPUs one actor trains the
    SuperNodes one after another."""
    return max(1, min(num_cpus, os.cpu_count() or 1) - 1)


def superlink_command(port: int, security: Sequence[str]) -> list[str]:
    """``flower-superlink`` on 127.0.0.1:``port`` running ServerApps in subprocesses, with no runtime
    dependency installation; ``security`` is the variant's own flags (``--insecure --simulation`` or TLS)."""
    return [
        tool_path("flower-superlink"),
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


class SuperLinkProcess:
    """A private SuperLink plus the ``flwr`` CLI calls against it (context manager); see the module doc.

    Subclasses say how it is secured (``security_flags``, ``trust_line``, ``health_ok``) and how a run is
    submitted (``run_command``).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        num_cpus: int = SIMULATION_CPUS,
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
        self.actors = simulation_actors(num_cpus)
        self.object_store_bytes = object_store_bytes
        self.torch_threads = max(1, torch_threads)
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self.superlink: subprocess.Popen | None = None
        self._started: list[subprocess.Popen] = []
        self._identities: list[dict[str, Any]] = []  # {pid, create-time} of what this launch started
        self._tail: deque[str] = deque(maxlen=60)

    # -- the variant's security ------------------------------------------------------------------------
    def security_flags(self) -> list[str]:
        """``flower-superlink`` flags saying how it is secured."""
        raise NotImplementedError

    def trust_line(self) -> str:
        """The ``config.toml`` line telling the ``flwr`` CLI how to trust the SuperLink."""
        raise NotImplementedError

    def health_ok(self) -> bool:
        """One health-check request; True when the SuperLink answered it successfully."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Write what the SuperLink needs before it starts (folders; the TLS variant: its certificates)."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)

    def run_command(self, app_dir: Path, num_supernodes: int) -> list[str]:
        """The ``flwr run`` command line submitting ``app_dir``."""
        return [tool_path("flwr"), "run", str(app_dir), CONNECTION, "--stream"]

    # -- environment -------------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """Environment of every process started here."""
        from zk0_pipelines.settings import repo_root

        env = dict(os.environ)
        env.update(
            {
                "PATH": f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}",
                "FLWR_HOME": str(self.flwr_home),
                "RAY_TMPDIR": str(self.ray_tmp),
                env_settings.ROOT.name: str(repo_root()),
                LAUNCH_ENV: self.launch_id,
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                # the SuperExec asks the SuperLink for a submitted run every second by default
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(TASK_POLL_INTERVAL_S),
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_DEDUP_LOGS": "0",
                "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
                # Ray would start idle workers for the first driver; Flower's actors need workers with its
                # runtime env, so those were killed unused (CPU time spent while the clients import)
                "RAY_prestart_worker_first_driver": "0",
                "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(self.object_store_bytes),
                "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false",
                # one intra-op thread per process: OpenMP spin-waiting on an oversubscribed machine made
                # steps 10-20x slower in measurements (a 2-thread client next to one busy process: 20x),
                # and at demo size a second thread saved ~10 % of a step on an idle machine
                "OMP_NUM_THREADS": str(self.torch_threads),
                "MKL_NUM_THREADS": str(self.torch_threads),
            }
        )
        return env

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> SuperLinkProcess:
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
                "launcher": process_identity(os.getpid()),
                "processes": self._identities,
                "flwr-home": str(self.flwr_home),
                "ray-tmp": str(self.ray_tmp),
                "port": self.port,
            },
        )

    def _track(self, proc: subprocess.Popen) -> None:
        self._started.append(proc)
        if (ident := process_identity(proc.pid)) is not None:
            self._identities.append(ident)
        self._write_record("running")

    def _popen(self, cmd: list[str], log_path: Path) -> subprocess.Popen:
        """Start ``cmd`` in a session of its own with output to ``log_path``; tracked by the launch."""
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                env=self.env(),
                cwd=self.run_dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._track(proc)
        return proc

    def start(self) -> None:
        """Start ``flower-superlink`` on a free 127.0.0.1 port (3 tries) and wait for its health check."""
        self.prepare()
        self._write_record("running")
        for attempt in range(3):
            self.port = free_port()
            write_connection_config(self.flwr_home, self.port, self.trust_line())
            cmd = superlink_command(self.port, self.security_flags())
            self.superlink = self._popen(cmd, self.logs_dir / "superlink.out")
            if self._wait_healthy():
                log.info("%s pid %d on 127.0.0.1:%d", type(self).__name__, self.superlink.pid, self.port)
                return
            log.warning("SuperLink did not come up on port %d (attempt %d)", self.port, attempt + 1)
            stop_tree(self.superlink)
        raise FederatedRunError(f"flower-superlink failed to start; see {self.logs_dir / 'superlink.out'}")

    def _wait_healthy(self) -> bool:
        import httpx

        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.superlink is None or self.superlink.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if self.health_ok():
                    return True
            time.sleep(0.1)
        return False

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop the SuperLink and every process it spawned (SuperExec, flwr-simulation, Ray), by PID:
        SIGTERM, then SIGKILL what is left after ``grace_s`` (``COMPLETED_STOP_GRACE_S`` once the ServerApp
        has written everything: Ray's graceful drain then only costs wall time)."""
        if self.superlink is not None:
            stop_tree(self.superlink, grace_s=grace_s)
            self.superlink = None
        for proc in self._started:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        leftovers = launch_processes(self.launch_id)  # e.g. Ray processes re-parented away from the tree
        if leftovers:
            log.info("stopping %d leftover process(es) of launch %s", len(leftovers), self.launch_id)
            kill_processes(leftovers, grace_s=min(grace_s, 5.0))
        if self.record_path.parent.is_dir():
            self._write_record("stopped")

    def cleanup(self) -> None:
        """Remove the per-launch FLWR_HOME and RAY_TMPDIR (after a successful run)."""
        shutil.rmtree(self.flwr_home, ignore_errors=True)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    # -- flwr CLI ----------------------------------------------------------------------------------------
    def _cli(self, *args: str, timeout_s: float = 300.0) -> str:
        proc = subprocess.run(
            [tool_path("flwr"), *args],
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

    def run_app(
        self,
        app_dir: Path,
        num_supernodes: int,
        timeout_s: float,
        done: Callable[[], bool] | None = None,
    ) -> tuple[str, str]:
        """Submit ``app_dir`` and stream its logs until it finishes; returns ``(run_id, final status)``.

        ``done`` (e.g. "metrics.json says completed") ends the wait as soon as it is true, with status
        ``SERVER_COMPLETED``: the ServerApp has written everything, and what Flower still does (Ray's
        shutdown, the status flip) is cut short by ``stop``. Otherwise the status is Flower's.
        """
        cmd = self.run_command(app_dir, num_supernodes)
        run_id_box: list[str] = []
        deadline = time.monotonic() + timeout_s
        status: str | None = None
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
                status = self._wait_run(proc, run_id_box, deadline, done)
            except subprocess.TimeoutExpired:
                if run_id_box:
                    with contextlib.suppress(Exception):
                        self._cli("stop", run_id_box[0], CONNECTION, timeout_s=60)
                raise FederatedRunError(
                    f"federated run exceeded {timeout_s:.0f}s; last log lines:\n" + "\n".join(self._tail)
                ) from None
            finally:
                if proc.poll() is None:
                    stop_tree(proc, grace_s=5)
                pump.join(timeout=10)
        if not run_id_box:
            raise FederatedRunError("flwr run did not start a run:\n" + "\n".join(self._tail))
        run_id = run_id_box[0]
        if status == SERVER_COMPLETED:
            return run_id, status
        status = status or self.run_status(run_id)
        while status.split(":")[0] != "finished" and time.monotonic() < deadline:
            time.sleep(0.5)  # the log stream can end slightly before the status flips
            status = self.run_status(run_id)
        return run_id, status

    def _wait_run(
        self,
        proc: subprocess.Popen,
        run_id_box: list[str],
        deadline: float,
        done: Callable[[], bool] | None,
    ) -> str | None:
        """Wait for the ``flwr run --stream`` process to end (``None``) or for ``done``
        (``SERVER_COMPLETED``); ``subprocess.TimeoutExpired`` at ``deadline``."""
        while True:
            try:
                proc.wait(timeout=max(0.01, min(WAIT_POLL_S, deadline - time.monotonic())))
                return None
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    raise
            if done is not None and run_id_box and done():
                return SERVER_COMPLETED

    @property
    def tail(self) -> list[str]:
        """The last streamed log lines."""
        return list(self._tail)


class SimulationSuperLink(SuperLinkProcess):
    """``flower-superlink --insecure --simulation``: Flower's Ray simulation runtime on 127.0.0.1."""

    def security_flags(self) -> list[str]:  # noqa: D102 - see the base class
        return ["--insecure", "--simulation"]

    def trust_line(self) -> str:  # noqa: D102
        return "insecure = true"

    def health_ok(self) -> bool:  # noqa: D102
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).is_success

    def prepare(self) -> None:  # noqa: D102
        super().prepare()
        self.ray_tmp.mkdir(parents=True, exist_ok=True)

    def run_command(self, app_dir: Path, num_supernodes: int) -> list[str]:
        """``flwr run`` with the federation config: ``num_supernodes`` simulated nodes, Ray's resources
        (``simulation_actors``: Ray runs as many clients at once as it has actors)."""
        fed = (
            f"num-supernodes={num_supernodes} client-resources-num-cpus=1 "
            f"init-args-num-cpus={self.actors} init-args-log-to-driver=true"
        )
        return [tool_path("flwr"), "run", str(app_dir), CONNECTION, "--federation-config", fed, "--stream"]


class TlsSuperLink(SuperLinkProcess):
    """``flower-superlink`` with TLS from a throwaway CA and SuperNode authentication (no ``--insecure``)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        startup_timeout_s: float = 60.0,
        torch_threads: int = 1,
        tls_hosts: Sequence[str] = DEFAULT_TLS_HOSTS,
    ) -> None:
        super().__init__(
            run_dir, num_cpus=1, startup_timeout_s=startup_timeout_s, torch_threads=torch_threads
        )
        self.tls_hosts = tuple(tls_hosts)
        self.tls_dir = self.flwr_home / "tls"
        self.tls: TlsFiles | None = None

    def prepare(self) -> None:
        """Folders (no Ray here: RAY_TMPDIR stays unused) and this launch's CA + server certificate."""
        super().prepare()
        self.tls = write_tls_files(self.tls_dir, self.tls_hosts)

    def security_flags(self) -> list[str]:  # noqa: D102 - see the base class
        tls = self._tls()
        return [
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
            "--enable-supernode-auth",
        ]

    def trust_line(self) -> str:  # noqa: D102
        return f'root-certificates = "{self._tls().ca_cert.resolve()}"'

    def _tls(self) -> TlsFiles:
        if self.tls is None:
            raise FederatedRunError("the SuperLink's TLS files are not written yet (start() first)")
        return self.tls

    def ssl_context(self):
        """A client TLS context that trusts only this launch's CA."""
        import ssl

        return ssl.create_default_context(cafile=str(self._tls().ca_cert))

    def health_url(self) -> str:
        """The SuperLink's health endpoint (HTTPS)."""
        return f"https://127.0.0.1:{self.port}/health"

    def health_ok(self) -> bool:  # noqa: D102
        import httpx

        return httpx.get(self.health_url(), timeout=1.0, verify=self.ssl_context()).is_success
