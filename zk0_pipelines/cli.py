"""``zk0`` command line: the demo lineage, the Dagster UI and the MLflow UI."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from zk0_pipelines import settings


def _dagster_home() -> Path:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(settings.repo_root() / "dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    return home


def run_demo() -> int:
    """Ingest every registry dataset, train federated, register and release, recorded in dagster_home.

    Prints a short progress view; Dagster's, Flower's and the libraries' output goes to a log file."""
    _dagster_home()
    settings.configure_local_env()
    from zk0_pipelines.demo_console import RoundWatcher, logs_to_file

    log_path = settings.state_dir() / "logs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.log"
    print(f"demo: Dagster, Flower and library logs go to {log_path}", flush=True)
    started = time.monotonic()
    with logs_to_file(log_path) as terminal:

        def show(line: str) -> None:
            print(line, file=terminal, flush=True)

        import dagster as dg

        from zk0_pipelines.definitions import defs
        from zk0_pipelines.demo import run_lineage

        with dg.DagsterInstance.get() as instance, RoundWatcher(settings.runs_dir(), show):
            summary = run_lineage(defs, instance, progress=show)
    print(f"demo: finished in {time.monotonic() - started:.0f} s (logs: {log_path})")
    for line in summary.lines():
        print(line)
    return 0 if summary.ok else 1


def run_dagster_ui(port: int) -> int:
    """Start ``dagster dev`` (webserver + daemon) on 127.0.0.1 with the checkout's instance."""
    _dagster_home()
    settings.configure_local_env()
    dagster = Path(sys.executable).with_name("dagster")
    os.execv(
        str(dagster),
        [
            str(dagster),
            "dev",
            "-w",
            str(settings.repo_root() / "workspace.yaml"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
    )


def run_mlflow_ui(port: int) -> int:
    """Start a real MLflow server on the checkout's sqlite store and artifact folder."""
    settings.configure_local_env()
    from zk0_pipelines.tracking.mlflow_registry import default_artifact_root, default_tracking_uri

    mlflow = Path(sys.executable).with_name("mlflow")
    os.execv(
        str(mlflow),
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            default_tracking_uri(),
            "--artifacts-destination",
            str(default_artifact_root()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
    )


def run_reproduce(model_name: str, version: str) -> int:
    """Re-train a registered version from its DVC pin and recorded config; print ``identical`` or not."""
    settings.configure_local_env()
    from zk0_pipelines.reproduce import reproduce_version

    report = reproduce_version(model_name, version)
    for line in report.lines():
        print(line)
    return 0 if report.identical else 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zk0`` console script."""
    parser = argparse.ArgumentParser(prog="zk0", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the offline demo lineage end to end")
    ui = sub.add_parser("ui", help="Dagster webserver + daemon")
    ui.add_argument("--port", type=int, default=3000)
    ml = sub.add_parser("mlflow-ui", help="MLflow server for registry review")
    ml.add_argument("--port", type=int, default=5000)
    rep = sub.add_parser("reproduce", help="rebuild a registered model version and compare its weights")
    rep.add_argument("version", help="model version number in the registry")
    rep.add_argument("--model", default="zk0-smolvla-so100", help="registered model name")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo()
    if args.command == "reproduce":
        return run_reproduce(args.model, args.version)
    if args.command == "ui":
        return run_dagster_ui(args.port)
    return run_mlflow_ui(args.port)


if __name__ == "__main__":
    raise SystemExit(main())
