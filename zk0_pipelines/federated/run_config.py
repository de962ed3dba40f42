"""The typed, validated run configuration of the federated app (Flower run config, kebab-case keys).

One table (``FIELDS``) defines every key, its type, default and constraint. The same parser runs in the
launcher (before anything starts), at ServerApp start and in every ClientApp, so an unknown key or a bad
value fails with a ``ValueError`` that names the key before any round runs.

The defaults here are the single source of truth; ``pyproject_app_config()`` renders them as the
``[tool.flwr.app.config]`` table (the project's pyproject.toml mirrors it for ``flwr run`` from the repo).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STRATEGIES = ("fedavg", "fedprox")
POLICY_SOURCES = ("tiny", "pretrained")
WIRE_DTYPES = ("float32", "bfloat16")
DEVICES = ("cpu", "cuda", "mps")
LR_SCHEDULES = ("constant", "cosine", "step")
MU_SCHEDULES = ("constant", "linear", "step")
DP_MODES = ("none", "central-client-clip", "central-server-clip")


@dataclass(frozen=True)
class Field:
    """One run-config key: Python attribute, type, default, and a check returning an error text or None."""

    key: str
    attr: str
    kind: type
    default: Any
    check: Callable[[Any], str | None] | None = None
    help: str = ""


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low}"


def _greater(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v > low else f"must be > {low}"


def _unit_interval(open_low: bool) -> Callable[[Any], str | None]:
    def check(v: float) -> str | None:
        ok = (0.0 < v <= 1.0) if open_low else (0.0 <= v <= 1.0)
        return None if ok else f"must be in {'(0, 1]' if open_low else '[0, 1]'}"

    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _paths(v: str) -> str | None:
    return None if all(part.strip() for part in v.split(",")) or not v.strip() else "has an empty path entry"


def _faults(v: str) -> str | None:
    from zk0_pipelines.federated.faults import parse_faults

    try:
        parse_faults(v)
    except ValueError as exc:
        return str(exc)
    return None


FIELDS: tuple[Field, ...] = (
    Field("num-server-rounds", "num_server_rounds", int, 2, _at_least(1), "federated rounds"),
    Field("strategy", "strategy", str, "fedavg", _one_of(STRATEGIES), "server strategy"),
    Field("proximal-mu", "proximal_mu", float, 0.0, _at_least(0.0), "FedProx mu (fedprox only)"),
    Field(
        "mu-schedule", "mu_schedule", str, "constant", _one_of(MU_SCHEDULES), "server FedProx mu per round"
    ),
    Field("mu-final", "mu_final", float, 0.0, _at_least(0.0), "linear: mu reached in the last round"),
    Field("mu-step-rounds", "mu_step_rounds", int, 1, _at_least(1), "step: rounds between mu changes"),
    Field("mu-step-factor", "mu_step_factor", float, 0.5, _greater(0.0), "step: mu multiplier"),
    Field("local-steps", "local_steps", int, 4, _at_least(1), "optimizer steps per client and round"),
    Field("batch-size", "batch_size", int, 2, _at_least(1), "client batch size (also server eval)"),
    Field("learning-rate", "learning_rate", float, 1e-4, _greater(0.0), "base client AdamW learning rate"),
    Field("lr-schedule", "lr_schedule", str, "constant", _one_of(LR_SCHEDULES), "server LR per round"),
    Field("lr-min", "lr_min", float, 0.0, _at_least(0.0), "cosine: LR approached in the last round"),
    Field("lr-step-rounds", "lr_step_rounds", int, 1, _at_least(1), "step: rounds between LR decays"),
    Field("lr-step-gamma", "lr_step_gamma", float, 0.5, _unit_interval(True), "step: LR decay factor"),
    Field("weight-decay", "weight_decay", float, 1e-10, _at_least(0.0), "client AdamW weight decay"),
    Field("grad-clip-norm", "grad_clip_norm", float, 10.0, _at_least(0.0), "0 disables clipping"),
    Field("seed", "seed", int, 0, _at_least(0), "policy init, sampling, flow-matching noise"),
    Field("min-available-clients", "min_available_clients", int, 2, _at_least(1), "nodes needed to start"),
    Field("min-replies", "min_replies", int, 0, _at_least(0), "accepted replies/round; 0 = min-avail."),
    Field("max-update-norm-ratio", "max_update_norm_ratio", float, 10.0, _at_least(0.0), "0 disables"),
    Field("fraction-train", "fraction_train", float, 1.0, _unit_interval(True), "clients sampled per round"),
    Field("fraction-evaluate", "fraction_evaluate", float, 0.0, _unit_interval(False), "client-side eval"),
    Field("eval-every", "eval_every", int, 1, _at_least(0), "server eval period in rounds; 0 = never"),
    Field("eval-max-batches", "eval_max_batches", int, 0, _at_least(0), "per eval dataset; 0 = all"),
    Field("train-datasets", "train_datasets", str, "", _paths, "comma-separated client dataset roots"),
    Field("eval-datasets", "eval_datasets", str, "", _paths, "comma-separated server eval dataset roots"),
    Field("output-dir", "output_dir", str, "", None, "checkpoints + metrics.json; empty = runs dir"),
    Field("policy-source", "policy_source", str, "tiny", _one_of(POLICY_SOURCES), "tiny | pretrained"),
    Field("pretrained-path", "pretrained_path", str, "lerobot/smolvla_base", None, "pretrained only"),
    Field("pretrained-revision", "pretrained_revision", str, "", None, "pinned revision; empty = unpinned"),
    Field("chunk-size", "chunk_size", int, 10, _at_least(1), "action chunk length"),
    Field("device", "device", str, "cpu", _one_of(DEVICES), "torch device of clients and server"),
    Field("wire-dtype", "wire_dtype", str, "float32", _one_of(WIRE_DTYPES), "dtype of arrays on the wire"),
    Field("round-timeout-s", "round_timeout_s", float, 3600.0, _greater(0.0), "wait for client replies"),
    Field("quorum-timeout-s", "quorum_timeout_s", float, 600.0, _greater(0.0), "wait for the quorum"),
    Field("resume", "resume", bool, False, None, "continue from the last checkpoint in output-dir"),
    Field("inject-faults", "inject_faults", str, "", _faults, "TESTS ONLY: kind:partition@round,..."),
    Field("dp", "dp", str, "none", _one_of(DP_MODES), "central DP: none | client- or server-side clipping"),
    Field("dp-noise-multiplier", "dp_noise_multiplier", float, 1.0, _greater(0.0), "sigma (noise / clip)"),
    Field("dp-clipping-norm", "dp_clipping_norm", float, 1.0, _greater(0.0), "L2 clip of each update"),
    Field("dp-delta", "dp_delta", float, 1e-5, _unit_interval(True), "delta of the reported (eps, delta)"),
    Field("dp-target-epsilon", "dp_target_epsilon", float, 0.0, _at_least(0.0), "stop before; 0 = none"),
    Field("lora-rank", "lora_rank", int, 0, _at_least(0), "> 0: train/send only LoRA adapters"),
)
KEYS: tuple[str, ...] = tuple(f.key for f in FIELDS)
_BY_KEY = {f.key: f for f in FIELDS}


@dataclass(frozen=True)
class RunConfig:
    """Validated run configuration; build it with :func:`parse_run_config` (attribute = key in snake_case)."""

    num_server_rounds: int
    strategy: str
    proximal_mu: float
    mu_schedule: str
    mu_final: float
    mu_step_rounds: int
    mu_step_factor: float
    local_steps: int
    batch_size: int
    learning_rate: float
    lr_schedule: str
    lr_min: float
    lr_step_rounds: int
    lr_step_gamma: float
    weight_decay: float
    grad_clip_norm: float
    seed: int
    min_available_clients: int
    min_replies: int
    max_update_norm_ratio: float
    fraction_train: float
    fraction_evaluate: float
    eval_every: int
    eval_max_batches: int
    train_datasets: str
    eval_datasets: str
    output_dir: str
    policy_source: str
    pretrained_path: str
    pretrained_revision: str
    chunk_size: int
    device: str
    wire_dtype: str
    round_timeout_s: float
    quorum_timeout_s: float
    resume: bool
    inject_faults: str
    dp: str
    dp_noise_multiplier: float
    dp_clipping_norm: float
    dp_delta: float
    dp_target_epsilon: float
    lora_rank: int

    @property
    def train_paths(self) -> list[Path]:
        """Client dataset roots (simulation: index = partition-id)."""
        return split_paths(self.train_datasets)

    @property
    def eval_paths(self) -> list[Path]:
        """Server-side evaluation dataset roots."""
        return split_paths(self.eval_datasets)

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case dict (a Flower ``UserConfig``), every key present."""
        return {f.key: getattr(self, f.attr) for f in FIELDS}

    def policy_spec(self):
        """The ``PolicySpec`` every participant builds (same spec ⇒ identical frozen weights)."""
        from zk0_pipelines.policy import PolicySpec

        return PolicySpec(
            source=self.policy_source,
            pretrained_path=self.pretrained_path,
            revision=self.pretrained_revision or None,
            device=self.device,
            chunk_size=self.chunk_size,
            n_action_steps=self.chunk_size,
            seed=self.seed,
            lora_rank=self.lora_rank,
        )

    @property
    def quorum(self) -> int:
        """Accepted client replies a round needs (``min-replies``, or ``min-available-clients`` when 0)."""
        return self.min_replies or self.min_available_clients

    def learning_rate_at(self, global_round: int) -> float:
        """The client learning rate of ``global_round`` (1-based) under ``lr-schedule`` (server-side).

        ``constant``: ``learning-rate``. ``cosine``: from ``learning-rate`` in round 1 towards ``lr-min``,
        ``lr-min + (lr - lr-min) * (1 + cos(pi * (r - 1) / R)) / 2`` for ``R = num-server-rounds``.
        ``step``: ``learning-rate * lr-step-gamma ** ((r - 1) // lr-step-rounds)``.
        """
        done = max(0, global_round - 1)
        if self.lr_schedule == "cosine":
            progress = min(1.0, done / self.num_server_rounds)
            span = self.learning_rate - self.lr_min
            return self.lr_min + span * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.lr_schedule == "step":
            return self.learning_rate * self.lr_step_gamma ** (done // self.lr_step_rounds)
        return self.learning_rate

    def proximal_mu_at(self, global_round: int) -> float:
        """The FedProx ``proximal-mu`` of ``global_round`` (1-based) under ``mu-schedule`` (server-side).

        0 with strategy ``fedavg``. ``constant``: ``proximal-mu``. ``linear``: from ``proximal-mu`` in round
        1 to ``mu-final`` in round ``num-server-rounds``. ``step``: ``proximal-mu * mu-step-factor **
        ((r - 1) // mu-step-rounds)`` (a factor > 1 raises mu over the run, < 1 lowers it).
        """
        if self.strategy != "fedprox":
            return 0.0
        done = max(0, global_round - 1)
        if self.mu_schedule == "linear":
            progress = min(1.0, done / max(1, self.num_server_rounds - 1))
            return self.proximal_mu + (self.mu_final - self.proximal_mu) * progress
        if self.mu_schedule == "step":
            return self.proximal_mu * self.mu_step_factor ** (done // self.mu_step_rounds)
        return self.proximal_mu

    def should_evaluate(self, server_round: int) -> bool:
        """Server eval schedule: round 0 (baseline), every ``eval-every`` rounds, and the last round."""
        if self.eval_every == 0 or not self.eval_datasets:
            return False
        return (
            server_round == 0 or server_round % self.eval_every == 0 or server_round == self.num_server_rounds
        )


def split_paths(value: str) -> list[Path]:
    """Split a comma-separated list of paths (empty string → empty list)."""
    return [Path(part.strip()) for part in value.split(",") if part.strip()]


def _coerce(field: Field, value: Any) -> Any:
    kind = field.kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"run config key '{field.key}' must be a boolean, got {value!r}")
    if isinstance(value, bool):
        raise ValueError(f"run config key '{field.key}' must be {kind.__name__}, got boolean {value!r}")
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"run config key '{field.key}' must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, int | float):
            return float(value)
        raise ValueError(f"run config key '{field.key}' must be a number, got {value!r}")
    if isinstance(value, str):
        return value
    if field.key in ("train-datasets", "eval-datasets") and isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    raise ValueError(f"run config key '{field.key}' must be a string, got {value!r}")


def parse_run_config(values: Mapping[str, Any], *, fill_defaults: bool = True) -> RunConfig:
    """Validate ``values`` (kebab-case keys) into a :class:`RunConfig`.

    Unknown keys, wrong types and out-of-range values raise ``ValueError`` naming the key. Missing keys take
    the defaults of ``FIELDS`` (unless ``fill_defaults=False``, then they are errors too).
    """
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown run config key(s) {unknown}; known keys: {', '.join(KEYS)}")
    parsed: dict[str, Any] = {}
    for field in FIELDS:
        if field.key not in values:
            if not fill_defaults:
                raise ValueError(f"run config key '{field.key}' is missing")
            parsed[field.attr] = field.default
            continue
        value = _coerce(field, values[field.key])
        if field.check is not None and (problem := field.check(value)) is not None:
            raise ValueError(f"run config key '{field.key}' {problem}, got {value!r}")
        parsed[field.attr] = value
    cfg = RunConfig(**parsed)
    if cfg.strategy == "fedavg" and cfg.proximal_mu != 0.0:
        raise ValueError(
            f"run config key 'proximal-mu' is {cfg.proximal_mu} but strategy is 'fedavg'; "
            "set strategy = 'fedprox' or proximal-mu = 0"
        )
    if cfg.strategy == "fedprox" and cfg.proximal_mu == 0.0:
        raise ValueError("run config key 'proximal-mu' must be > 0 with strategy 'fedprox' (0 equals FedAvg)")
    if cfg.mu_schedule != "constant" and cfg.strategy != "fedprox":
        raise ValueError(
            f"run config key 'mu-schedule' is '{cfg.mu_schedule}' but strategy is '{cfg.strategy}' "
            "(a proximal-mu schedule needs strategy = 'fedprox')"
        )
    if cfg.lr_schedule == "cosine" and cfg.lr_min >= cfg.learning_rate:
        raise ValueError(
            f"run config key 'lr-min' ({cfg.lr_min}) must be < 'learning-rate' ({cfg.learning_rate}) "
            "with lr-schedule 'cosine'"
        )
    if cfg.dp != "none" and cfg.wire_dtype != "float32":
        raise ValueError(
            f"run config key 'wire-dtype' is '{cfg.wire_dtype}' but dp is '{cfg.dp}': central DP clips and "
            "noises float32 weights (Flower's clipping works on numpy arrays, which have no bfloat16)"
        )
    if cfg.dp != "none" and cfg.dp_delta >= 1.0:
        raise ValueError(f"run config key 'dp-delta' must be < 1 with dp '{cfg.dp}', got {cfg.dp_delta}")
    return cfg


def replace(cfg: RunConfig, **changes: Any) -> RunConfig:
    """Copy of ``cfg`` with kebab-case ``changes`` applied, re-validated."""
    values = cfg.to_dict()
    values.update(changes)
    return parse_run_config(values)


def defaults() -> dict[str, Any]:
    """The default values, kebab-case."""
    return {f.key: f.default for f in FIELDS}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def pyproject_app_config(values: Mapping[str, Any] | None = None) -> str:
    """Render ``[tool.flwr.app.config]`` for ``values`` (validated; defaults fill the rest)."""
    cfg = parse_run_config(values or {})
    lines = ["[tool.flwr.app.config]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in cfg.to_dict().items()]
    return "\n".join(lines) + "\n"


__all__ = [
    "FIELDS",
    "KEYS",
    "RunConfig",
    "defaults",
    "parse_run_config",
    "pyproject_app_config",
    "replace",
    "split_paths",
]
