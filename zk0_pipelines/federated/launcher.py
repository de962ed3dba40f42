"""Run the federated app in Flower's simulation runtime (or on a local deployment), the non-deprecated way.

``run_federated`` validates the run config, reaps what earlier killed launches in the run folder left running
(``launch_records``), starts a private SuperLink (``superlink.SimulationSuperLink``: ``flower-superlink
--simulation`` on 127.0.0.1, a free port, in-memory state, runtime dependency installation off), writes the
app folder (``app_folder``: a ``pyproject.toml`` naming this package's components and carrying this run's
config), submits it with ``flwr run <app> <connection> --federation-config num-supernodes=N ... --stream``,
streams the Flower/Ray log lines into Python logging (and ``<run_dir>/logs/flwr-run.log``), then stops every
process it started, by PID, also on failure or timeout.

``FLWR_HOME`` and ``RAY_TMPDIR`` are per-launch sub-folders of the ones ``configure_local_env`` sets (inside
the checkout), removed after a successful run; Ray gets at most ``num_cpus`` CPUs and a capped object store.

Crash safety: a launch whose launcher was killed (even with SIGKILL) is reaped by the next ``run_federated``
on the same folder (``launch_records`` doc); a launch whose launcher is still alive makes it refuse the
folder. A new launch uses a new port, Flower home and Ray folder, and ``resume = true`` continues from the
last complete checkpoint.

``run_federated(..., federation="local-deployment")`` runs the same app on Flower's deployment runtime
instead (``deployment.LocalDeployment``: TLS, SuperNode authentication, one SuperNode process per dataset),
with the same launch records, reaping and run-folder layout.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zk0_pipelines.federated.app_folder import write_app_folder
from zk0_pipelines.federated.deployment import LocalDeployment
from zk0_pipelines.federated.launch_records import FederatedRunError, reap_stale_launches
from zk0_pipelines.federated.run_config import RunConfig, parse_run_config
from zk0_pipelines.federated.superlink import (
    COMPLETED_STOP_GRACE_S,
    SERVER_COMPLETED,
    SIMULATION_CPUS,
    STOP_GRACE_S,
    SimulationSuperLink,
    SuperLinkProcess,
)

log = logging.getLogger(__name__)

LAUNCHER_KEYS = ("train-datasets", "eval-datasets", "output-dir")
FEDERATIONS = ("simulation", "local-deployment")  # run_federated's runtimes


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


def run_federated(
    train_roots: list[Path],
    eval_roots: list[Path],
    run_dir: Path,
    config: Mapping[str, Any],
    *,
    timeout_s: float = 3600.0,
    num_cpus: int = SIMULATION_CPUS,
    object_store_bytes: int = 512 * 1024**2,
    torch_threads: int = 1,
    federation: str = "simulation",
) -> FederatedResult:
    """Run federated training in Flower simulation with one SuperNode per training dataset.

    ``federation = "local-deployment"`` runs the same app on Flower's deployment runtime instead: a TLS,
    node-authenticated SuperLink and one ``flower-supernode`` process per training dataset, each given only
    its own dataset path (``deployment.LocalDeployment``); the run folder has the same layout.

    ``config`` holds run-config keys (see ``run_config.RunConfig``) except ``train-datasets``,
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
    sim: SuperLinkProcess
    if federation == "local-deployment":
        sim = LocalDeployment(run_dir, list(train_roots), torch_threads=torch_threads)
    else:
        sim = SimulationSuperLink(
            run_dir, num_cpus=num_cpus, object_store_bytes=object_store_bytes, torch_threads=torch_threads
        )
    ok = False
    try:
        sim.start()
        timings["superlink-start-s"] = time.perf_counter() - t0
        app_dir = sim.flwr_home / "app"
        write_app_folder(app_dir, cfg)
        t1 = time.perf_counter()
        run_id, status = sim.run_app(app_dir, len(train_roots), timeout_s, done=CompletionCheck(run_dir))
        timings["run-s"] = time.perf_counter() - t1
        metrics = _read_metrics(run_dir)
        if status not in ("finished:completed", SERVER_COMPLETED) or metrics.get("status") != "completed":
            raise FederatedRunError(
                f"federated run {run_id} ended with status {status!r} (metrics.json status "
                f"{metrics.get('status')!r}, error {metrics.get('error')!r}); last log lines:\n"
                + "\n".join(sim.tail)
            )
        ok = True
    finally:
        sim.stop(grace_s=COMPLETED_STOP_GRACE_S if ok else STOP_GRACE_S)
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


class CompletionCheck:
    """True (when called) once the ServerApp recorded the run as completed in ``metrics.json``; the file is
    parsed again only when it changed, as it is polled several times a second."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "metrics.json"
        self._stamp: tuple[int, int, int] | None = None
        self._done = False

    def __call__(self) -> bool:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return False
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # the recorder replaces the file
        if stamp != self._stamp:
            self._stamp = stamp
            self._done = _read_metrics(self.path.parent).get("status") == "completed"
        return self._done


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return {"status": "missing", "error": f"{path} was not written"}
    return json.loads(path.read_text())
