"""The MLflow model registry of federated runs: run logging and versions aliased ``challenger``/``champion``.

A LeRobot policy folder is registered with ``MlflowClient.create_model_version(source=<artifact URI of the
folder>)``: ``register_model("runs:/...")`` expects an MLflow-flavoured model, which a plain LeRobot folder
is not. Where the store lives and its locking: :mod:`~zk0_pipelines.tracking.mlflow_store`; when a
version is promoted: :mod:`~zk0_pipelines.tracking.promotion`.

Credentials never reach the store: params/tags whose key names a credential, or whose value carries one,
are dropped (their keys are listed in the ``zk0.withheld_keys`` tag), and checkpoint text files that
contain a credential value are refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zk0_pipelines.tracking.mlflow_store import (
    MlflowStoreUnavailable,
    busy_timeout_seconds,
    default_artifact_root,
    default_tracking_uri,
    is_unavailable,
    promotion_lock,
    set_busy_timeout,
)
from zk0_pipelines.tracking.promotion import (
    ACTION_MSE_TAG,
    EVAL_LOSS_TAG,
    SUCCESS_RATE_TAG,
    PromoteRule,
    champion_metrics,
    decide_higher,
    decide_registration,
    promotion_metric,
    tag_float,
)
from zk0_pipelines.tracking.round_metrics import is_number
from zk0_pipelines.tracking.secrets import is_secret_key, looks_like_secret_value, scrub, scrub_mapping

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"

MAX_PARAM_VALUE_LEN = 500
MAX_KEY_LEN = 250
MAX_TAG_VALUE_LEN = 5000
_BATCH_METRICS = 1000
_BATCH_PARAMS = 100
_BATCH_TAGS = 100
_TEXT_SUFFIXES = {".json", ".md", ".txt", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".py", ".csv"}
_TEXT_SCAN_MAX_BYTES = 5 * 1024 * 1024
_METRIC_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


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
# Internals
# ------------------------------------------------------------------------------------------------
def _flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    """Nested params/tags as ``a.b`` keys (lerobot's ``flatten_dict``)."""
    from lerobot.utils.utils import flatten_dict

    return flatten_dict(dict(data), sep=".")


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


def _scrub_obj(value: Any) -> Any:
    """JSON-ready copy of ``value`` with credential-named keys dropped and credential values masked."""
    if isinstance(value, Mapping):
        return {str(k): _scrub_obj(v) for k, v in value.items() if not is_secret_key(str(k))}
    if isinstance(value, list | tuple):
        return [_scrub_obj(v) for v in value]
    if is_number(value) or value is None or isinstance(value, bool):
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
            set_busy_timeout(uri, self.busy_timeout_s)
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
            if is_unavailable(exc):
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
                if key == "round" or not is_number(value):
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
                if key in ("round", "client") or not is_number(value):
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
                if is_unavailable(exc):
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
            champ = champion_metrics(current)
            new = {EVAL_LOSS_TAG: loss, ACTION_MSE_TAG: mse}
            promoted, decision = decide_registration(promote_rule, new, current, champ, version_tags)
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
            champ_rate = tag_float(current.tags.get(SUCCESS_RATE_TAG)) if current is not None else None
            promoted, decision = decide_higher(SUCCESS_RATE_TAG, rate, current, champ_rate)
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
