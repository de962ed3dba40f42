"""``zk0`` command line: the demo lineage, the Dagster UI and the MLflow UI, configuration tables."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from zk0_pipelines import env_settings, settings


def _use_postgres() -> None:
    """``ZK0_STORAGE=postgres``: start the checkout's PostgreSQL (unless URLs are given) and point Dagster
    (``dagster_home/postgres``) and MLflow at it."""
    if env_settings.STORAGE.text() != "postgres":
        return
    os.environ.setdefault("DAGSTER_HOME", str(settings.repo_root() / "dagster_home" / "postgres"))
    if env_settings.DAGSTER_PG_URL.raw() and os.environ.get("MLFLOW_TRACKING_URI"):
        return
    from zk0_pipelines.postgres import default_server

    server = default_server()
    server.start()
    os.environ.setdefault(env_settings.DAGSTER_PG_URL.name, server.create_database("dagster"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", server.create_database("mlflow"))


def _dagster_home() -> Path:
    _use_postgres()
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


def _database_store(uri: str) -> str | None:
    """``uri`` when it names a database MLflow can serve (not an http tracking server)."""
    return uri if uri.startswith(("sqlite:", "postgresql")) else None


def run_mlflow_ui(port: int) -> int:
    """Start a real MLflow server on the checkout's store (sqlite, or PostgreSQL with
    ``ZK0_STORAGE=postgres``) and artifact folder."""
    settings.configure_local_env()
    _use_postgres()
    from zk0_pipelines.tracking.mlflow_store import default_artifact_root, default_tracking_uri

    mlflow = Path(sys.executable).with_name("mlflow")
    os.execv(
        str(mlflow),
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            _database_store(os.environ.get("MLFLOW_TRACKING_URI", "")) or default_tracking_uri(),
            "--artifacts-destination",
            str(default_artifact_root()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            # one worker: a review UI; uvicorn's supervisor kills slow workers on a loaded 2-core host
            "--workers",
            "1",
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


def run_validate_command(args: argparse.Namespace) -> int:
    """``zk0 validate``: the ingest's dataset checks for a dataset owner (see ``validate_command``)."""
    from zk0_pipelines.datasets.validate_command import run_validate

    return run_validate(args.paths, args.json, args.cameras)


def run_serve(args: argparse.Namespace) -> int:
    """Serve the model version holding ``args.alias`` (or ``args.folder``) with lerobot's policy server."""
    settings.configure_local_env()
    _use_postgres()
    from zk0_pipelines.serving.champion import ServedModel, resolve_served_model
    from zk0_pipelines.serving.process import serving_dir

    if args.folder:
        folder = Path(args.folder).resolve()
        served = ServedModel(args.model, args.version or "local", args.alias, folder, "folder")
    else:
        from zk0_pipelines.tracking.mlflow_registry import ModelRegistry

        registry = ModelRegistry(os.environ.get("MLFLOW_TRACKING_URI") or None)
        served = resolve_served_model(registry, args.model, args.alias)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"zk0 serve: WARNING binding {args.host}: lerobot's protocol is pickle over plaintext gRPC, "
            "anyone who reaches this port can run code here",
            file=sys.stderr,
        )
    os.chdir(serving_dir())  # lerobot's server writes a logs/ folder in the working directory
    from zk0_pipelines.serving.policy_server import serve

    serve(served, host=args.host, port=args.port, device=args.device)
    return 0


def run_config_command(args: argparse.Namespace) -> int:
    """``zk0 config``: print the run-config keys (or ``ZK0_*`` settings, or the Flower app table), or
    rewrite / check the committed tables generated from them."""
    from zk0_pipelines import config_tables
    from zk0_pipelines.federated.run_config import pyproject_app_config

    if args.write:
        changed = config_tables.write_generated(settings.REPO_ROOT)
        print(f"zk0 config: rewrote {', '.join(changed)}" if changed else "zk0 config: up to date")
        return 0
    if args.check:
        stale = config_tables.stale_files(settings.REPO_ROOT)
        if stale:
            print(f"zk0 config: {', '.join(stale)} differ from the code; run `zk0 config --write`")
        return 1 if stale else 0
    if args.env:
        print(env_settings.render_table(), end="")
    elif args.pyproject:
        print(pyproject_app_config(), end="")
    else:
        print(config_tables.run_config_table(), end="")
    return 0


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
    val = sub.add_parser("validate", help="check LeRobot dataset folders as the ingest does (read only)")
    val.add_argument("paths", nargs="+", metavar="PATH", help="dataset folder(s) (LeRobot v3.0 or v2.1)")
    val.add_argument("--json", metavar="FILE", help="also write every report as JSON to FILE")
    val.add_argument("--cameras", metavar="MAP", help="camera mapping, e.g. laptop=top,phone=wrist")
    srv = sub.add_parser(
        "serve", help="serve the registry's champion to robots (lerobot async inference, loopback)"
    )
    srv.add_argument("--model", default="zk0-smolvla-so100", help="registered model name")
    srv.add_argument("--alias", default="champion", help="registry alias to serve")
    srv.add_argument("--folder", help="serve this lerobot folder instead of resolving the alias")
    srv.add_argument("--version", help="version label of --folder")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (insecure protocol: keep loopback)")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--device", default="cpu")
    conf = sub.add_parser("config", help="run-config keys, defaults and meaning (also ZK0_* settings)")
    shown = conf.add_mutually_exclusive_group()
    shown.add_argument("--env", action="store_true", help="list the ZK0_* environment settings")
    shown.add_argument("--pyproject", action="store_true", help="print the [tool.flwr.app.config] table")
    shown.add_argument(
        "--write", action="store_true", help="rewrite pyproject.toml's app config and the README tables"
    )
    shown.add_argument("--check", action="store_true", help="exit 1 when those differ from the code")
    args = parser.parse_args(argv)
    if args.command == "config":
        return run_config_command(args)
    if args.command == "validate":
        return run_validate_command(args)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "demo":
        return run_demo()
    if args.command == "reproduce":
        return run_reproduce(args.model, args.version)
    if args.command == "ui":
        return run_dagster_ui(args.port)
    return run_mlflow_ui(args.port)


if __name__ == "__main__":
    raise SystemExit(main())
