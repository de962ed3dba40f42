"""The MLflow store itself: where it lives, when it is unavailable, sqlite's busy timeout, the promotion lock.

Default store: ``sqlite:///<repo>/.zk0/mlflow/mlflow.db`` with artifacts in ``<repo>/.zk0/mlflow/artifacts``.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zk0_pipelines import env_settings
from zk0_pipelines.settings import state_dir
from zk0_pipelines.tracking.secrets import scrub

DEFAULT_BUSY_TIMEOUT_S = 20.0
#: MLflow's SQLAlchemy store sets this per session on sqlite; ``busy_timeout_s`` rewrites it
_MLFLOW_BUSY_PRAGMA = re.compile(r"^\s*PRAGMA\s+busy_timeout\s*=\s*\d+\s*;?\s*$", re.IGNORECASE)
_UNAVAILABLE_HINTS = (
    "database is locked",
    "unable to open database",
    "max retries exceeded",
    "connection refused",
    "failed to establish a new connection",
    "name or service not known",
    "temporarily_unavailable",
    "readonly database",
    "disk i/o error",
)


class MlflowStoreUnavailable(RuntimeError):
    """The tracking/registry store cannot be reached (locked sqlite, server down, bad path)."""

    def __init__(self, uri: str, cause: BaseException | str):
        self.uri = scrub(uri)
        reason = scrub(f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else cause)
        super().__init__(
            f"MLflow store {self.uri} is unavailable ({reason.splitlines()[0] if reason else 'unknown'}); "
            "the checkpoint stays on disk, retry once the store is back"
        )


def default_store_dir() -> Path:
    """``<repo>/.zk0/mlflow``: the project's local MLflow store."""
    return state_dir() / "mlflow"


def default_tracking_uri() -> str:
    """``sqlite:///<repo>/.zk0/mlflow/mlflow.db`` (env ``MLFLOW_TRACKING_URI`` is *not* consulted here)."""
    return f"sqlite:///{default_store_dir() / 'mlflow.db'}"


def default_artifact_root() -> Path:
    """``<repo>/.zk0/mlflow/artifacts``."""
    return default_store_dir() / "artifacts"


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception in its chain) says the store cannot be reached."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for item in chain:
        code = str(getattr(item, "error_code", ""))
        if code == "TEMPORARILY_UNAVAILABLE":
            return True
        name = type(item).__name__
        if name in {"OperationalError", "ConnectionError", "MaxRetryError", "NewConnectionError"}:
            return True
        text = str(item).lower()
        if any(hint in text for hint in _UNAVAILABLE_HINTS):
            return True
    return False


# sqlite busy timeout: MLflow's SQLAlchemy store runs ``PRAGMA busy_timeout = 20000`` in every session
# (a locked store blocks each call for 20 s). For the sqlite files in _BUSY_TIMEOUT_MS that statement is
# rewritten to the configured value, and new connections get it too (MLflow's schema checks run outside
# sessions). Process-wide, like MLflow's own engine cache, keyed by the resolved database file.
_BUSY_TIMEOUT_MS: dict[str, int] = {}
_BUSY_HOOKS: list[bool] = []
_BUSY_LOCK = threading.Lock()


def busy_timeout_seconds(given: float | None = None) -> float:
    """The sqlite busy timeout: ``given``, else env ``ZK0_MLFLOW_BUSY_TIMEOUT_S``, else MLflow's 20 s."""
    if given is None:
        given = env_settings.MLFLOW_BUSY_TIMEOUT_S.number()
        if given is None:
            given = DEFAULT_BUSY_TIMEOUT_S
    if not math.isfinite(given) or given < 0:
        raise ValueError(f"sqlite busy timeout must be >= 0 seconds, got {given!r}")
    return float(given)


def sqlite_file(uri: str) -> str | None:
    """The resolved database file of a ``sqlite:///`` URI (None for other stores and ``:memory:``)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return str(Path(path).resolve()) if path and path != ":memory:" else None


def set_busy_timeout(uri: str, seconds: float) -> None:
    """Apply ``seconds`` as the busy timeout of every connection MLflow opens to the sqlite store ``uri``."""
    path = sqlite_file(uri)
    ms = int(round(seconds * 1000))
    if path is None or (not _BUSY_HOOKS and ms == int(DEFAULT_BUSY_TIMEOUT_S * 1000)):
        return  # MLflow's own behaviour until some store asks for another timeout
    with _BUSY_LOCK:
        _BUSY_TIMEOUT_MS[path] = ms
        if not _BUSY_HOOKS:
            _install_busy_hooks()
            _BUSY_HOOKS.append(True)


def _install_busy_hooks() -> None:
    """SQLAlchemy hooks (all engines) that apply ``_BUSY_TIMEOUT_MS`` to the sqlite files listed there."""
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def on_connect(dbapi_connection, _record) -> None:
        if not isinstance(dbapi_connection, sqlite3.Connection):
            return
        rows = dbapi_connection.execute("PRAGMA database_list").fetchall()
        main = next((row[2] for row in rows if row[1] == "main"), "")
        ms = _BUSY_TIMEOUT_MS.get(str(Path(main).resolve())) if main else None
        if ms is not None:
            dbapi_connection.execute(f"PRAGMA busy_timeout = {ms}")

    def before_cursor_execute(conn, _cursor, statement, parameters, _context, _executemany):
        if _MLFLOW_BUSY_PRAGMA.match(statement) and conn.engine.url.get_backend_name() == "sqlite":
            database = conn.engine.url.database
            ms = _BUSY_TIMEOUT_MS.get(str(Path(database).resolve())) if database else None
            if ms is not None:
                statement = f"PRAGMA busy_timeout = {ms};"
        return statement, parameters

    event.listen(Engine, "connect", on_connect)
    event.listen(Engine, "before_cursor_execute", before_cursor_execute, retval=True)


@contextmanager
def promotion_lock(registry_uri: str, model_name: str) -> Iterator[None]:
    """Serialise read-champion → decide → create version → set aliases across concurrent registrations.

    PostgreSQL store: a session advisory lock taken in the store itself (every host); sqlite store: an
    exclusive ``flock`` on a file beside the database (this machine). A tracking server (http) has no
    lock of its own: there, the run queue's one-training-per-set rule is the guard.
    """
    if registry_uri.startswith("postgresql"):
        import sqlalchemy

        key = int.from_bytes(hashlib.sha256(f"zk0.promotion:{model_name}".encode()).digest()[:8], "big")
        key -= 1 << 63 if key >= 1 << 63 else 0  # PostgreSQL's bigint
        engine = sqlalchemy.create_engine(registry_uri, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
        return
    path = sqlite_file(registry_uri)
    if path is None:
        yield
        return
    import fcntl

    with open(f"{path}.promotion.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield
