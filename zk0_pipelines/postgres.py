"""A private PostgreSQL server for the PostgreSQL profile (Dagster storage + MLflow registry) and its tests.

Debian's ``postgresql`` package provides the binaries (``/usr/lib/postgresql/<ver>/bin``); this module
runs them on a data folder and a unix socket under ``.zk0/postgres/`` and a private TCP port on 127.0.0.1.
PostgreSQL refuses to run as root: when root, every server command runs as the package's ``postgres``
user (``runuser``), which must be able to traverse the path to the folder.

Authentication is ``trust`` for the socket and 127.0.0.1 only: a single-machine development and test
server. A shared deployment uses ``deploy/`` (passwords, a real PostgreSQL service).

    python -m zk0_pipelines.postgres start|stop|status|url [--port N] [--db NAME]
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from zk0_pipelines import env_settings, settings

DEFAULT_PORT = int(env_settings.PG_PORT.default or 0)
SERVER_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries, or the server did not start."""


def bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<ver>/bin`` with ``initdb`` and ``pg_ctl`` (or ``ZK0_PG_BIN``)."""
    given = env_settings.PG_BIN.raw()
    candidates = [Path(given)] if given else []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        candidates += [v / "bin" for v in reversed(versions)]
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise PostgresUnavailable(
        "PostgreSQL server binaries not found under /usr/lib/postgresql/<ver>/bin: "
        "run `make postgres-install` (apt-get install postgresql) or set ZK0_PG_BIN"
    )


@dataclass
class LocalPostgres:
    """One server: data in ``root/data``, socket in ``root/socket``, listening on 127.0.0.1:``port``."""

    root: Path
    port: int = DEFAULT_PORT

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def _as_server_user(self, args: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return args
        return ["runuser", "-u", SERVER_USER, "--", *args]

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            self._as_server_user(args), capture_output=True, text=True, check=check, cwd=self.root
        )

    def _prepare_folders(self) -> None:
        for folder in (self.root, self.socket_dir):
            folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam(SERVER_USER)
            for folder in (self.root, self.socket_dir):
                os.chown(folder, user.pw_uid, user.pw_gid)
            probe = self._run(["test", "-x", str(self.root)], check=False)
            if probe.returncode != 0:
                raise PostgresUnavailable(
                    f"user {SERVER_USER!r} cannot reach {self.root}: every parent folder must be "
                    "traversable (o+x)"
                )

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def init(self) -> None:
        """``initdb`` the data folder once (trust auth, UTF-8)."""
        self._prepare_folders()
        if self.initialized():
            return
        result = self._run(
            [str(bin_dir() / "initdb"), "-D", str(self.data_dir), "-U", SERVER_USER, "--auth=trust",
             "-E", "UTF8", "--no-instructions"],
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise PostgresUnavailable(f"initdb {self.data_dir} failed: {result.stderr.strip()[-2000:]}")

    def running(self) -> bool:
        result = self._run([str(bin_dir() / "pg_ctl"), "status", "-D", str(self.data_dir)], check=False)
        return result.returncode == 0

    def start(self, timeout_s: float = 60.0) -> None:
        """Initialise if needed and start the server (no-op when it already runs)."""
        self.init()
        if self.running():
            return
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1"
        result = self._run(
            [str(bin_dir() / "pg_ctl"), "start", "-D", str(self.data_dir), "-l", str(self.log_path),
             "-o", options, "-w", "-t", str(int(timeout_s))],
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise PostgresUnavailable(
                f"PostgreSQL on port {self.port} did not start: {result.stderr.strip()}\n{tail}"
            )

    def stop(self) -> None:
        """Stop the server (fast shutdown) if it runs."""
        if self.initialized() and self.running():
            self._run([str(bin_dir() / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast", "-w"])

    def destroy(self) -> None:
        """Stop and delete the data folder (tests)."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, name: str) -> str:
        """Create database ``name`` unless it exists; return its URL."""
        import psycopg2

        conn = psycopg2.connect(self.dsn("postgres"))
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def dsn(self, database: str) -> str:
        """libpq's ``postgresql://postgres@127.0.0.1:<port>/<database>`` (trust auth: no password)."""
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    def url(self, database: str) -> str:
        """The SQLAlchemy URL (Dagster, MLflow): the psycopg2 driver named, as SQLAlchemy 2.1 would
        otherwise pick psycopg 3, which is not installed."""
        return self.dsn(database).replace("postgresql://", "postgresql+psycopg2://", 1)


def default_server() -> LocalPostgres:
    """The checkout's server: ``.zk0/postgres`` on ``ZK0_PG_PORT`` (default 55432)."""
    return LocalPostgres(settings.state_dir() / "postgres", env_settings.PG_PORT.integer())


def main(argv: list[str] | None = None) -> int:
    """``start`` (and create the dagster + mlflow databases), ``stop``, ``status``, ``url``."""
    parser = argparse.ArgumentParser(prog="python -m zk0_pipelines.postgres", description=__doc__)
    parser.add_argument("command", choices=["start", "stop", "status", "url"])
    parser.add_argument("--db", default="dagster")
    args = parser.parse_args(argv)
    server = default_server()
    if args.command == "start":
        started = time.monotonic()
        server.start()
        for db in ("dagster", "mlflow"):
            server.create_database(db)
        print(
            f"postgres: up on 127.0.0.1:{server.port} ({time.monotonic() - started:.1f} s), "
            f"data {server.data_dir}"
        )
    elif args.command == "stop":
        server.stop()
        print("postgres: stopped")
    elif args.command == "status":
        up = server.initialized() and server.running()
        print(f"postgres: {'running' if up else 'not running'} (port {server.port}, data {server.data_dir})")
        return 0 if up else 3
    else:
        print(server.url(args.db))
    return 0


if __name__ == "__main__":
    sys.exit(main())
