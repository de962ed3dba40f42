"""MLflow tracking of federated runs and the model registry (aliases ``challenger`` / ``champion``).

Default store: ``sqlite:///<repo>/.zk0/mlflow/mlflow.db`` with artifacts in
``<repo>/.zk0/mlflow/artifacts``. A LeRobot policy folder is registered with
``MlflowClient.create_model_version(source=<artifact URI of the folder>)``: ``register_model("runs:/...")``
expects an MLflow-flavoured model, which a plain LeRobot folder is not.

Credentials never reach the store: params/tags whose key names a credential, or whose value carries one,
are dropped (their keys are listed in the ``zk0.withheld_keys`` tag), and checkpoint text files that
contain a credential value are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from zk0_pipelines.settings import state_dir
from zk0_pipelines.tracking.secrets import is_secret_key, looks_like_secret_value, scrub, scrub_mapping

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
#: Version tag naming the held-out datasets its eval metrics were computed on (set by the lineage).
EVAL_SET_TAG = "datasets.eval"
EVAL_LOSS_TAG = "eval_loss"
ACTION_MSE_TAG = "action_mse"
SUCCESS_RATE_TAG = "success_rate"
PromoteRule = Literal["lower_eval_loss", "lower_action_mse", "higher_success_rate", "always", "never"]
PROMOTE_RULES: tuple[str, ...] = (
    "lower_eval_loss",
    "lower_action_mse",
    "higher_success_rate",
    "always",
    "never",
)
#: the metric each rule compares (``always``/``never`` report the eval loss); the success rate comes from
#: the simulator rollouts, after registration (:meth:`ModelRegistry.decide_on_success_rate`)
RULE_METRIC = {
    "lower_eval_loss": EVAL_LOSS_TAG,
    "lower_action_mse": ACTION_MSE_TAG,
    "higher_success_rate": SUCCESS_RATE_TAG,
}
DEFAULT_BUSY_TIMEOUT_S = 20.0
#: MLflow's SQLAlchemy store sets this per session on sqlite; ``busy_timeout_s`` rewrites it
_MLFLOW_BUSY_PRAGMA = re.compile(r"^\s*PRAGMA\s+busy_timeout\s*=\s*\d+\s*;?\s*$", re.IGNORECASE)

MAX_PARAM_VALUE_LEN = 500
MAX_KEY_LEN = 250
MAX_TAG_VALUE_LEN = 5000
_BATCH_METRICS = 1000
_BATCH_PARAMS = 100
_BATCH_TAGS = 100
_TEXT_SUFFIXES = {".json", ".md", ".txt", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".py", ".csv"}
_TEXT_SCAN_MAX_BYTES = 5 * 1024 * 1024
_METRIC_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
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


@dataclass
class ModelVersionInfo:
    """What ``register_version`` did."""

    name: str
    version: str
    aliases: list[str]
    promoted: bool
    champion_eval_loss: float | None
    decision: str
    source: str = ""
    champion_action_mse: float | None = None
    run_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-friendly form (for Dagster metadata)."""
        return {
            "name": self.name,
            "version": self.version,
            "aliases": list(self.aliases),
            "promoted": self.promoted,
            "champion_eval_loss": self.champion_eval_loss,
            "champion_action_mse": self.champion_action_mse,
            "decision": self.decision,
            "source": self.source,
            "run_id": self.run_id,
        }


# ------------------------------------------------------------------------------------------------
# Defaults and lineage helpers
# ------------------------------------------------------------------------------------------------
def promotion_metric(rule: str) -> str:
    """The metric a promotion rule compares: ``action_mse``, ``success_rate`` or (default) ``eval_loss``."""
    if rule not in PROMOTE_RULES:
        raise ValueError(f"promote_rule must be one of {'|'.join(PROMOTE_RULES)}, got {rule!r}")
    return RULE_METRIC.get(rule, EVAL_LOSS_TAG)


def default_store_dir() -> Path:
    """``<repo>/.zk0/mlflow``: the project's local MLflow store."""
    return state_dir() / "mlflow"


def default_tracking_uri() -> str:
    """``sqlite:///<repo>/.zk0/mlflow/mlflow.db`` (env ``MLFLOW_TRACKING_URI`` is *not* consulted here)."""
    return f"sqlite:///{default_store_dir() / 'mlflow.db'}"


def default_artifact_root() -> Path:
    """``<repo>/.zk0/mlflow/artifacts``."""
    return default_store_dir() / "artifacts"


def git_commit(root: Path | str) -> str:
    """The ``HEAD`` commit of the Git repo at ``root`` (``+dirty`` appended when the tree has changes).

    ``"unknown"`` when ``root`` is not a Git repo, has no commit yet, or Git is missing.
    """
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
        if head.returncode != 0:
            return "unknown"
        sha = head.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return f"{sha}+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys, compact separators)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


LINEAGE_LIBRARIES = ("torch", "lerobot", "flwr", "dagster", "mlflow", "transformers", "huggingface_hub")


def library_versions(names: Iterable[str] = LINEAGE_LIBRARIES) -> dict[str, str]:
    """Installed versions of the libraries that shape a model (``"not-installed"`` when absent)."""
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not-installed"
    return out


def plot_round_metrics(
    round_metrics: Sequence[Mapping[str, Any]],
    out_png: Path,
    keys: Sequence[str] | None = None,
    title: str = "Federated training",
) -> Path:
    """Plot per-round metrics (x = ``round``) to a PNG with matplotlib's Agg backend.

    ``keys`` defaults to every numeric key containing ``loss`` (or every numeric key if none does).
    Raises ValueError when there is nothing to plot or a requested key is absent from every round.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [r for r in round_metrics if "round" in r]
    if not rows:
        raise ValueError("plot_round_metrics: no rows with a 'round' key")
    numeric = sorted(
        {k for r in rows for k, v in r.items() if k != "round" and _is_number(v)},
    )
    if keys is None:
        keys = [k for k in numeric if "loss" in k] or numeric
    missing = [k for k in keys if k not in numeric]
    if missing:
        raise ValueError(f"plot_round_metrics: key(s) {missing} not found in any round; have {numeric}")
    if not keys:
        raise ValueError("plot_round_metrics: no numeric metric to plot")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        for key in keys:
            pts = sorted((int(r["round"]), float(r[key])) for r in rows if _is_number(r.get(key)))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set_xlabel("round")
        ax.set_ylabel("value")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_png, format="png")
    finally:
        plt.close(fig)
    return out_png


# ------------------------------------------------------------------------------------------------
# Internals
# ------------------------------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) or _is_numpy_number(value)


def _is_numpy_number(value: Any) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, np.integer | np.floating) or (isinstance(value, np.ndarray) and value.ndim == 0)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    suffix = f"...[+{len(text) - limit} chars]"
    return text[: limit - len(suffix)] + suffix


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return str(value)


def _metric_key(name: str) -> str:
    return _truncate(_METRIC_KEY_BAD_CHARS.sub("_", str(name)), MAX_KEY_LEN)


def _is_unavailable(exc: BaseException) -> bool:
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
        raw = os.environ.get("ZK0_MLFLOW_BUSY_TIMEOUT_S", "").strip()
        try:
            given = float(raw) if raw else DEFAULT_BUSY_TIMEOUT_S
        except ValueError as exc:
            raise ValueError(f"ZK0_MLFLOW_BUSY_TIMEOUT_S must be a number of seconds, got {raw!r}") from exc
    if not math.isfinite(given) or given < 0:
        raise ValueError(f"sqlite busy timeout must be >= 0 seconds, got {given!r}")
    return float(given)


def _sqlite_file(uri: str) -> str | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return str(Path(path).resolve()) if path and path != ":memory:" else None


def _set_busy_timeout(uri: str, seconds: float) -> None:
    """Apply ``seconds`` as the busy timeout of every connection MLflow opens to the sqlite store ``uri``."""
    path = _sqlite_file(uri)
    ms = int(round(seconds * 1000))
    if path is None or (not _BUSY_HOOKS and ms == int(DEFAULT_BUSY_TIMEOUT_S * 1000)):
        return  # MLflow's own behaviour until some store asks for another timeout
    with _BUSY_LOCK:
        _BUSY_TIMEOUT_MS[path] = ms
        if not _BUSY_HOOKS:
            _install_busy_hooks()
            _BUSY_HOOKS.append(True)


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
    path = _sqlite_file(registry_uri)
    if path is None:
        yield
        return
    import fcntl

    with open(f"{path}.promotion.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


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


def _scrub_obj(value: Any) -> Any:
    """JSON-ready copy of ``value`` with credential-named keys dropped and credential values masked."""
    if isinstance(value, Mapping):
        return {str(k): _scrub_obj(v) for k, v in value.items() if not is_secret_key(str(k))}
    if isinstance(value, list | tuple):
        return [_scrub_obj(v) for v in value]
    if _is_number(value) or value is None or isinstance(value, bool):
        return value.item() if hasattr(value, "item") else value
    return scrub(value)


def _secret_files(folder: Path, extra: Sequence[str | None]) -> list[Path]:
    bad: list[Path] = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in _TEXT_SUFFIXES:
            continue
        if path.stat().st_size > _TEXT_SCAN_MAX_BYTES:
            continue
        text = path.read_text(errors="replace")
        if looks_like_secret_value(text, extra):
            bad.append(path)
    return bad


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------
class ModelRegistry:
    """Log federated runs to MLflow and manage registered versions with challenger/champion aliases."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "zk0-federated",
        registry_uri: str | None = None,
        artifact_location: str | Path | None = None,
        busy_timeout_s: float | None = None,
    ):
        """Bind to a store; ``busy_timeout_s`` (sqlite only, default env ``ZK0_MLFLOW_BUSY_TIMEOUT_S`` or
        20 s) is how long a call waits for a locked database before MlflowStoreUnavailable."""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.registry_uri = registry_uri or self.tracking_uri
        self.busy_timeout_s = busy_timeout_seconds(busy_timeout_s)
        for uri in {self.tracking_uri, self.registry_uri}:
            _set_busy_timeout(uri, self.busy_timeout_s)
        self.experiment_name = experiment
        self.artifact_location = self._artifact_location(artifact_location)
        self._client = None
        self._experiment_id: str | None = None

    # -- store ----------------------------------------------------------------------------------
    def _artifact_location(self, given: str | Path | None) -> str | None:
        if given is not None:
            given_s = str(given)
            return given_s if "://" in given_s else Path(given_s).resolve().as_uri()
        if self.tracking_uri == default_tracking_uri() or self.tracking_uri.startswith("postgresql"):
            return default_artifact_root().resolve().as_uri()  # a database store: artifacts on disk
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            return (db.parent / "artifacts").resolve().as_uri()
        return None  # a tracking server decides

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn store-unavailable errors (locked sqlite, refused connection) into MlflowStoreUnavailable."""
        try:
            yield
        except MlflowStoreUnavailable:
            raise
        except Exception as exc:
            if _is_unavailable(exc):
                raise MlflowStoreUnavailable(self.tracking_uri, exc) from exc
            raise

    @property
    def client(self):
        """The ``MlflowClient`` (created lazily; an unusable sqlite path raises MlflowStoreUnavailable)."""
        if self._client is None:
            from mlflow import MlflowClient

            for uri in {self.tracking_uri, self.registry_uri}:
                if uri.startswith("sqlite:///"):
                    db = Path(uri.removeprefix("sqlite:///"))
                    try:
                        db.parent.mkdir(parents=True, exist_ok=True)
                    except OSError as exc:
                        raise MlflowStoreUnavailable(uri, exc) from exc
            with self._guard():
                try:
                    self._client = MlflowClient(
                        tracking_uri=self.tracking_uri, registry_uri=self.registry_uri
                    )
                except Exception as exc:
                    raise MlflowStoreUnavailable(self.tracking_uri, exc) from exc
        return self._client

    def experiment_id(self) -> str:
        """Get or create the experiment (with the project's artifact location)."""
        if self._experiment_id is not None:
            return self._experiment_id
        from mlflow.exceptions import MlflowException

        with self._guard():
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                try:
                    if self.artifact_location and self.artifact_location.startswith("file://"):
                        Path(self.artifact_location.removeprefix("file://")).mkdir(
                            parents=True, exist_ok=True
                        )
                    self._experiment_id = self.client.create_experiment(
                        self.experiment_name, artifact_location=self.artifact_location
                    )
                except MlflowException as exc:
                    if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                        raise
                    exp = self.client.get_experiment_by_name(self.experiment_name)  # a concurrent creator
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    raise ValueError(
                        f"MLflow experiment {self.experiment_name!r} is deleted in {self.tracking_uri}; "
                        "restore it or choose another name"
                    )
                self._experiment_id = exp.experiment_id
        assert self._experiment_id is not None
        return self._experiment_id

    # -- runs -----------------------------------------------------------------------------------
    def log_federated_run(
        self,
        run_name: str,
        params: Mapping[str, Any],
        round_metrics: Sequence[Mapping[str, Any]],
        client_metrics: Sequence[Mapping[str, Any]] = (),
        plots: Mapping[str, Path] | None = None,
        checkpoint_dir: Path | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> str:
        """Log one federated run and return its run id.

        - ``params``: flattened (``a.b``), values longer than 500 chars truncated; credential keys/values
          dropped.
        - ``round_metrics``: rows with ``round`` + numeric metrics, logged with ``step=round``.
        - ``client_metrics``: rows with ``round``, ``client`` + numeric metrics, logged as
          ``client/<id>/<metric>`` with ``step=round``.
        - ``plots``: ``{name: png}`` logged under ``plots/``; ``checkpoint_dir`` logged under ``model``.
        """
        from mlflow.entities import Metric, Param, RunTag

        checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if checkpoint_dir is not None:
            if not checkpoint_dir.is_dir():
                raise FileNotFoundError(f"checkpoint folder {checkpoint_dir} does not exist")
            leaking = _secret_files(checkpoint_dir, ())
            if leaking:
                raise ValueError(
                    f"refusing to log checkpoint {checkpoint_dir}: credential found in "
                    f"{[str(p.relative_to(checkpoint_dir)) for p in leaking]}"
                )
        for name, png in (plots or {}).items():
            if not Path(png).is_file():
                raise FileNotFoundError(f"plot {name!r}: file {png} does not exist")

        flat_params = {str(k): _as_text(v) for k, v in _flatten(params).items()}
        kept_params, dropped_params = scrub_mapping(flat_params)
        flat_tags = {str(k): _as_text(v) for k, v in _flatten(dict(tags or {})).items()}
        kept_tags, dropped_tags = scrub_mapping(flat_tags)
        withheld = sorted({scrub(k) for k in dropped_params + dropped_tags})

        param_objs = [
            Param(_truncate(k, MAX_KEY_LEN), _truncate(v, MAX_PARAM_VALUE_LEN))
            for k, v in kept_params.items()
        ]
        tag_objs = [
            RunTag(_truncate(k, MAX_KEY_LEN), _truncate(v, MAX_TAG_VALUE_LEN)) for k, v in kept_tags.items()
        ]
        if withheld:
            tag_objs.append(RunTag("zk0.withheld_keys", ",".join(withheld)))
            log.warning("mlflow: withheld %d param/tag key(s) that look like credentials", len(withheld))

        now_ms = int(time.time() * 1000)
        metrics = self._round_metric_objs(round_metrics, Metric, now_ms)
        metrics += self._client_metric_objs(client_metrics, Metric, now_ms)

        with self._guard():
            run = self.client.create_run(self.experiment_id(), run_name=scrub(run_name))
            run_id = run.info.run_id
            try:
                for i in range(0, len(param_objs), _BATCH_PARAMS):
                    self.client.log_batch(run_id, params=param_objs[i : i + _BATCH_PARAMS])
                for i in range(0, len(tag_objs), _BATCH_TAGS):
                    self.client.log_batch(run_id, tags=tag_objs[i : i + _BATCH_TAGS])
                for i in range(0, len(metrics), _BATCH_METRICS):
                    self.client.log_batch(run_id, metrics=metrics[i : i + _BATCH_METRICS])
                if round_metrics:
                    self.client.log_dict(run_id, _scrub_obj(list(round_metrics)), "metrics/rounds.json")
                if client_metrics:
                    self.client.log_dict(run_id, _scrub_obj(list(client_metrics)), "metrics/clients.json")
                for _name, png in (plots or {}).items():
                    self.client.log_artifact(run_id, str(png), artifact_path="plots")
                if checkpoint_dir is not None:
                    self.client.log_artifacts(run_id, str(checkpoint_dir), artifact_path="model")
            except BaseException:
                with suppress(Exception):  # the store may be the thing that failed
                    self.client.set_terminated(run_id, status="FAILED")
                raise
            self.client.set_terminated(run_id, status="FINISHED")
        log.info("mlflow: logged run %s (%s) in %s", run_id, run_name, self.tracking_uri)
        return run_id

    @staticmethod
    def _round_metric_objs(rows: Sequence[Mapping[str, Any]], metric_cls, now_ms: int) -> list:
        out = []
        for i, row in enumerate(rows):
            if "round" not in row:
                raise ValueError(f"round_metrics[{i}] has no 'round' key: {sorted(row)}")
            step = int(row["round"])
            for key, value in row.items():
                if key == "round" or not _is_number(value):
                    continue
                out.append(metric_cls(_metric_key(key), float(value), now_ms, step))
        return out

    @staticmethod
    def _client_metric_objs(rows: Sequence[Mapping[str, Any]], metric_cls, now_ms: int) -> list:
        out = []
        for i, row in enumerate(rows):
            for required in ("round", "client"):
                if required not in row:
                    raise ValueError(f"client_metrics[{i}] has no {required!r} key: {sorted(row)}")
            step = int(row["round"])
            client = str(row["client"]).replace("/", "_")
            for key, value in row.items():
                if key in ("round", "client") or not _is_number(value):
                    continue
                out.append(metric_cls(_metric_key(f"client/{client}/{key}"), float(value), now_ms, step))
        return out

    # -- registry -------------------------------------------------------------------------------
    def _ensure_registered_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            try:
                self.client.create_registered_model(name)
            except MlflowException as exc2:
                if getattr(exc2, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise

    def champion(self, model_name: str):
        """The ``champion`` ModelVersion of ``model_name``, or None."""
        from mlflow.exceptions import MlflowException

        with self._guard():
            try:
                return self.client.get_model_version_by_alias(model_name, CHAMPION)
            except MlflowException as exc:
                if _is_unavailable(exc):
                    raise
                return None

    def register_version(
        self,
        model_name: str,
        run_id: str,
        artifact_path: str = "model",
        tags: Mapping[str, Any] | None = None,
        eval_loss: float | None = None,
        promote_rule: PromoteRule = "lower_eval_loss",
        action_mse: float | None = None,
    ) -> ModelVersionInfo:
        """Register ``runs/<run_id>/<artifact_path>`` as a new version of ``model_name``.

        The new version gets alias ``challenger``. It also becomes ``champion`` when ``promote_rule``
        is ``"always"``, or ``"lower_eval_loss"`` (``"lower_action_mse"``) and there is no champion or
        ``eval_loss`` (``action_mse``, the raw-unit action-chunk MSE) is strictly below the champion's
        tag of the same name, both computed on the same held-out datasets (tag ``datasets.eval``; a
        champion evaluated on other datasets is not compared). The decision and the numbers are stored as
        version tags (``zk0.promotion.decision``, ``zk0.promotion.metric``,
        ``zk0.promotion.champion_eval_loss``, ``zk0.promotion.champion_action_mse``, ``eval_loss``,
        ``action_mse``).
        """
        metric = promotion_metric(promote_rule)
        loss = float(eval_loss) if eval_loss is not None else None
        mse = float(action_mse) if action_mse is not None else None
        flat_tags = {str(k): _as_text(v) for k, v in _flatten(dict(tags or {})).items()}
        kept_tags, dropped = scrub_mapping(flat_tags)
        version_tags = {
            _truncate(k, MAX_KEY_LEN): _truncate(v, MAX_TAG_VALUE_LEN) for k, v in kept_tags.items()
        }
        if dropped:
            version_tags["zk0.withheld_keys"] = ",".join(scrub(k) for k in dropped)
        version_tags[EVAL_LOSS_TAG] = repr(loss) if loss is not None else "none"
        version_tags[ACTION_MSE_TAG] = repr(mse) if mse is not None else "none"

        with self._guard():
            run = self.client.get_run(run_id)
            if not self.client.list_artifacts(run_id, artifact_path):
                raise FileNotFoundError(
                    f"run {run_id} has no artifacts under {artifact_path!r}: log the checkpoint first"
                )
            source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path.strip('/')}"
            self._ensure_registered_model(model_name)
        with self._guard(), promotion_lock(self.registry_uri, model_name):
            current = self.champion(model_name)
            champ = {
                key: _tag_float(current.tags.get(key)) if current is not None else None
                for key in (EVAL_LOSS_TAG, ACTION_MSE_TAG)
            }
            new = {EVAL_LOSS_TAG: loss, ACTION_MSE_TAG: mse}
            if promote_rule == "higher_success_rate":
                promoted, decision = (
                    False,
                    "kept as challenger until rollout_evaluation compares success rates",
                )
            elif promote_rule in ("lower_eval_loss", "lower_action_mse") and (
                other_eval := _other_eval_set(current, version_tags)
            ):
                promoted, decision = False, other_eval
            else:
                promoted, decision = _decide(promote_rule, metric, new[metric], current, champ[metric])
            version_tags["zk0.promotion.rule"] = promote_rule
            version_tags["zk0.promotion.metric"] = metric
            version_tags["zk0.promotion.decision"] = decision
            for key, value in champ.items():
                version_tags[f"zk0.promotion.champion_{key}"] = repr(value) if value is not None else "none"
            if current is not None:
                version_tags["zk0.promotion.champion_version"] = str(current.version)

            mv = self.client.create_model_version(model_name, source=source, run_id=run_id, tags=version_tags)
            self.client.set_registered_model_alias(model_name, CHALLENGER, mv.version)
            if promoted:
                self.client.set_registered_model_alias(model_name, CHAMPION, mv.version)
            final = self.client.get_model_version(model_name, mv.version)
        log.info("mlflow: %s v%s registered (%s)", model_name, mv.version, decision)
        return ModelVersionInfo(
            name=model_name,
            version=str(mv.version),
            aliases=sorted(final.aliases or []),
            promoted=promoted,
            champion_eval_loss=champ[EVAL_LOSS_TAG],
            champion_action_mse=champ[ACTION_MSE_TAG],
            decision=decision,
            source=source,
            run_id=run_id,
            tags=dict(final.tags or {}),
        )

    def decide_on_success_rate(
        self, model_name: str, version: str, success_rate: float, extra_tags: Mapping[str, Any] | None = None
    ) -> tuple[bool, str]:
        """Tag ``version`` with its rollout success rate and promote it when it beats the champion's.

        Higher wins (strictly); no champion, or a champion without a recorded success rate, is beaten by
        any finite rate. Tags ``success_rate``, ``zk0.promotion.decision`` and
        ``zk0.promotion.champion_success_rate``; returns ``(promoted, decision)``.
        """
        rate = float(success_rate)
        with self._guard():
            current = self.champion(model_name)
            if current is not None and str(current.version) == str(version):
                current = None  # already the champion (e.g. promoted by another rule): nothing to beat
            champ_rate = _tag_float(current.tags.get(SUCCESS_RATE_TAG)) if current is not None else None
            promoted, decision = _decide_higher(SUCCESS_RATE_TAG, rate, current, champ_rate)
            tags = {SUCCESS_RATE_TAG: repr(rate), "zk0.promotion.decision": decision}
            tags["zk0.promotion.champion_success_rate"] = (
                repr(champ_rate) if champ_rate is not None else "none"
            )
            tags.update({str(k): _as_text(v) for k, v in (extra_tags or {}).items()})
            for key, value in tags.items():
                self.client.set_model_version_tag(model_name, str(version), key, value)
            if promoted:
                self.client.set_registered_model_alias(model_name, CHAMPION, str(version))
        log.info("mlflow: %s v%s %s", model_name, version, decision)
        return promoted, decision

    def log_rollout(
        self,
        run_id: str,
        rows: Sequence[Mapping[str, Any]],
        videos: Sequence[tuple[Path, str]] = (),
    ) -> None:
        """Log rollout metrics (rows with ``round``, at ``step=round``) and (mp4, artifact folder) pairs."""
        from mlflow.entities import Metric

        metrics = self._round_metric_objs(rows, Metric, int(time.time() * 1000))
        with self._guard():
            for i in range(0, len(metrics), _BATCH_METRICS):
                self.client.log_batch(run_id, metrics=metrics[i : i + _BATCH_METRICS])
            for video, artifact_path in videos:
                self.client.log_artifact(run_id, str(video), artifact_path=artifact_path)

    def download_version(self, model_name: str, alias_or_version: str, dst: Path) -> Path:
        """Download the folder of a registered version (by alias, e.g. ``champion``, or version number)."""
        import mlflow.artifacts

        with self._guard():
            if str(alias_or_version).isdigit():
                mv = self.client.get_model_version(model_name, str(alias_or_version))
            else:
                mv = self.client.get_model_version_by_alias(model_name, str(alias_or_version))
            dst = Path(dst)
            dst.mkdir(parents=True, exist_ok=True)
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=mv.source, dst_path=str(dst), tracking_uri=self.tracking_uri
            )
        return Path(local)


def _tag_float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except ValueError:
        return None
    return out if math.isfinite(out) else None


def _decide_higher(metric: str, value: float, current, champ_value: float | None) -> tuple[bool, str]:
    """Promotion decision where a higher ``metric`` wins (the rollout success rate)."""
    if not math.isfinite(value):
        return False, f"kept as challenger: {metric} is {value!r}"
    if current is None:
        return True, f"promoted: no champion yet ({metric}={value:.6g})"
    if champ_value is None:
        return True, f"promoted: champion v{current.version} has no recorded {metric} ({metric}={value:.6g})"
    if value > champ_value:
        return True, f"promoted: {metric} {value:.6g} > champion v{current.version} {champ_value:.6g}"
    return False, f"kept as challenger: {metric} {value:.6g} <= champion v{current.version} {champ_value:.6g}"


def _other_eval_set(current, version_tags: Mapping[str, str]) -> str | None:
    """Why the champion cannot be compared (it was evaluated on other held-out datasets), or None.

    A metric of another eval set says nothing about which model is better; ``always``/``never`` rules and
    versions without a recorded eval set are not affected.
    """
    if current is None:
        return None
    mine, theirs = version_tags.get(EVAL_SET_TAG), (current.tags or {}).get(EVAL_SET_TAG)
    if not mine or not theirs or mine == theirs:
        return None
    return (
        f"kept as challenger: champion v{current.version} was evaluated on {theirs!r}, this version on "
        f"{mine!r}; their metrics are not comparable (promote by hand after review)"
    )


def _decide(
    rule: str, metric: str, value: float | None, current, champ_value: float | None
) -> tuple[bool, str]:
    """Promotion decision for ``rule``; ``metric`` names the compared value (``eval_loss``/``action_mse``)."""
    if rule == "always":
        return True, "promoted: rule=always"
    if rule == "never":
        return False, "kept as challenger: rule=never"
    if value is None or not math.isfinite(value):
        return False, f"kept as challenger: {metric} is {value!r}"
    if current is None:
        return True, f"promoted: no champion yet ({metric}={value:.6g})"
    if champ_value is None:
        return True, f"promoted: champion v{current.version} has no recorded {metric} ({metric}={value:.6g})"
    if value < champ_value:
        return True, f"promoted: {metric} {value:.6g} < champion v{current.version} {champ_value:.6g}"
    return (
        False,
        f"kept as challenger: {metric} {value:.6g} >= champion v{current.version} {champ_value:.6g}",
    )
