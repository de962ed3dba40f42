"""Helpers of the UI end-to-end test: an isolated project root, a real ``dagster dev`` and a browser.

``dagster dev`` is started in a session of its own with SIGINT restored (a background process otherwise
ignores it) and always stopped with ``kill -INT -- -PGID``, then SIGKILL after a grace period.
The browser is Debian's chromium driven by Playwright (never a downloaded browser).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from _fixtures_lineage import synthetic_source

from zk0_pipelines import env_settings

CHECKOUT = Path(__file__).resolve().parents[1]
CHROMIUM = env_settings.CHROMIUM.text() or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-crash-reporter",
    "--disable-breakpad",
]
LOCATION = "zk0_pipelines"
REPOSITORY = "__repository__"
TRAIN_IDS = ("ui_client_a", "ui_client_b")
EVAL_ID = "ui_heldout"
# Variables that would point the child processes at the checkout's own state instead of the tmp root.
_INHERITED_STATE = (
    "DAGSTER_HOME",
    "MLFLOW_TRACKING_URI",
    "HF_HOME",
    "HF_LEROBOT_HOME",
    "FLWR_HOME",
    "MPLCONFIGDIR",
    "ZK0_ROOT",
    "ZK0_DATASET_REGISTRY",
    "ZK0_DROP_FOLDER",
    "ZK0_DEPLOYMENT",
    "ZK0_HUB_SEARCH",
    "ZK0_NIGHTLY_FORCE",
    "ZK0_SENSOR_INTERVAL_S",
)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_tiny_registry(path: Path) -> Path:
    """Two tiny synthetic training datasets and one held-out eval dataset."""
    registry = {
        "datasets": [
            {"id": TRAIN_IDS[0], "role": "train", "source": synthetic_source(1, "pick the cube", "reach")},
            {"id": TRAIN_IDS[1], "role": "train", "source": synthetic_source(2, "stack the blocks", "push")},
            {"id": EVAL_ID, "role": "eval", "source": synthetic_source(9, "pick the cube", "reach")},
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(registry, sort_keys=False))
    return path


@dataclass
class Project:
    """An isolated project root: its own data/, .zk0/, DVC repo, MLflow store and Dagster instance."""

    root: Path
    dagster_home: Path
    registry: Path
    drop_folder: Path
    env: dict[str, str]

    @contextmanager
    def activated(self) -> Iterator[None]:
        """Point this process at the project (for in-process Dagster and MLflow reads), then restore."""
        keys = ("ZK0_ROOT", "DAGSTER_HOME", "ZK0_DATASET_REGISTRY", "ZK0_DROP_FOLDER", "MLFLOW_TRACKING_URI")
        saved = {k: os.environ.get(k) for k in keys}
        for key in keys:
            if key in self.env:
                os.environ[key] = self.env[key]
            else:
                os.environ.pop(key, None)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def make_project(base: Path) -> Project:
    """Create the project root under ``base`` with a fresh DAGSTER_HOME (the checkout's dagster.yaml)."""
    root = base / "ws"
    dagster_home = root / "dagster_home"
    dagster_home.mkdir(parents=True)
    shutil.copy2(CHECKOUT / "dagster_home" / "dagster.yaml", dagster_home / "dagster.yaml")
    registry = write_tiny_registry(root / "configs" / "registry.yaml")
    drop = root / ".zk0" / "drop"
    drop.mkdir(parents=True)
    tmp = root / ".zk0" / "tmp"
    tmp.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED_STATE}
    # Ray's socket paths must stay under 107 bytes: the checkout's gitignored .zk0/ray (what every other
    # test uses) is short; a pytest tmp path is not. The launcher adds a per-launch sub-folder and
    # removes it after the run.
    ray_tmp = Path(os.environ.get("RAY_TMPDIR", CHECKOUT / ".zk0" / "ray"))
    ray_tmp.mkdir(parents=True, exist_ok=True)
    dvc = CHECKOUT / ".tools" / "dvc" / "bin" / "dvc"
    env.update(
        {
            "ZK0_ROOT": str(root),
            "ZK0_DEPLOYMENT": "offline",
            "DAGSTER_HOME": str(dagster_home),
            "ZK0_DATASET_REGISTRY": str(registry),
            "ZK0_DROP_FOLDER": str(drop),
            "ZK0_SENSOR_INTERVAL_S": "5",  # the sensors' tick, not their logic, is what 30 s would test
            "RAY_TMPDIR": str(ray_tmp),
            "TMPDIR": str(tmp),
            "HF_HUB_OFFLINE": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DVC_NO_ANALYTICS": "1",
            "DO_NOT_TRACK": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "DAGSTER_DISABLE_TELEMETRY": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if "ZK0_DVC" not in env and dvc.exists():
        env["ZK0_DVC"] = str(dvc)
    return Project(root, dagster_home, registry, drop, env)


def _child_setup() -> None:
    """In the ``dagster dev`` child before exec: default SIGINT, and the normal time-sharing scheduler even if
    pytest was made real-time (tests/conftest.py ``reset_realtime_scheduling``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def wait_for[T](what: str, probe: Callable[[], T | None], timeout_s: float, interval_s: float = 2.0) -> T:
    """Call ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class DagsterDev:
    """A running ``dagster dev`` (webserver + daemon) for a project, on 127.0.0.1."""

    project: Project
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None
    _log: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """Base URL of the webserver."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start ``dagster dev -w <checkout>/workspace.yaml`` in a new session with SIGINT restored."""
        dagster = Path(sys.executable).with_name("dagster")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                str(dagster),
                "dev",
                "-w",
                str(CHECKOUT / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            cwd=self.project.root,
            env=self.project.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_child_setup,
        )

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the dagster dev log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def graphql(self, query: str, variables: dict[str, Any] | None = None, timeout_s: float = 30) -> dict:
        """POST a GraphQL query; return ``data`` (raise with the errors and the log tail otherwise)."""
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def wait_ready(self, timeout_s: float = 180) -> None:
        """Wait until the webserver answers and the code location has loaded."""
        query = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
            name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""

        def probe() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"dagster dev exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                data = self.graphql(query, timeout_s=5)
            except (OSError, urllib.error.URLError, AssertionError, ValueError):
                return False
            entries = data["workspaceOrError"].get("locationEntries") or []
            for entry in entries:
                loaded = entry["locationOrLoadError"]
                if entry["name"] == LOCATION and loaded and loaded["__typename"] == "PythonError":
                    raise AssertionError(f"code location failed to load: {loaded['message']}")
                if entry["name"] == LOCATION and entry["loadStatus"] == "LOADED" and loaded:
                    return True
            return False

        try:
            wait_for("the Dagster webserver and code location", probe, timeout_s, interval_s=1.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- dagster dev log ---\n{self.log_tail()}") from None

    def stop(self, grace_s: float = 45) -> None:
        """``kill -INT -- -PGID``, then SIGKILL the group if any of it is still there after ``grace_s``."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGINT)
        # dagster dev waits for its webserver, daemon and code server; run workers share the group too.
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self.proc.poll() is None or _group_alive(pgid)):
            time.sleep(0.5)
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def dagster_dev(project: Project, log_path: Path, timeout_s: float = 180) -> Iterator[DagsterDev]:
    """Run ``dagster dev`` for the project for the duration of the block; always stop it."""
    server = DagsterDev(project, free_port(), log_path)
    try:
        server.start()
        server.wait_ready(timeout_s)
        yield server
    finally:
        server.stop()


@contextmanager
def chromium_page(folder: Path) -> Iterator[Any]:
    """A Playwright page in Debian's chromium; its profile, HOME and caches all live under ``folder``."""
    from playwright.sync_api import sync_playwright

    profile, home = folder / "profile", folder / "home"
    profile.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    # Debian's wrapper and crashpad write under $HOME/.config/chromium: keep that inside the tmp folder.
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
    }
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            env=env,
            viewport={"width": 1600, "height": 1000},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(120_000)  # a loaded 2-core machine renders slowly
            yield page
        finally:
            context.close()
