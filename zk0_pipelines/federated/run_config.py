"""The typed, validated run configuration of the federated app (Flower run config, kebab-case keys).

``RunConfig`` (a frozen pydantic model) defines every key: its type, default, constraint and meaning; the
attribute is the key in snake_case. The same parser runs in the launcher (before anything starts), at
ServerApp start and in every ClientApp, so an unknown key or a bad value fails with a ``ValueError`` that
names the key before any round runs.

Everything else is derived from it: the Dagster Launchpad config (``defs/training_config.py``), the
``[tool.flwr.app.config]`` table (``pyproject_app_config``), the README's key table and ``zk0 config``.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    model_validator,
)


def kebab(name: str) -> str:
    """A Python attribute name as its run-config key (``local_steps`` → ``local-steps``)."""
    return name.replace("_", "-")


def _integral(value: Any) -> Any:
    """Ints as they are; integral floats (Flower's TOML/CLI may give ``2.0``) as ints; never a bool."""
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


def _as_text(value: Any) -> Any:
    """A path given for a text key, as its string."""
    return str(value) if isinstance(value, Path) else value


def _path_list(value: Any) -> Any:
    """A list of paths, as the comma-separated string the run config carries."""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return _as_text(value)


def _no_empty_entry(value: str) -> str:
    if value.strip() and not all(part.strip() for part in value.split(",")):
        raise ValueError("has an empty path entry")
    return value


def _valid_faults(value: str) -> str:
    from zk0_pipelines.federated.faults import parse_faults

    parse_faults(value)  # ValueError naming the bad entry
    return value


Int = Annotated[int, BeforeValidator(_integral)]
Text = Annotated[str, BeforeValidator(_as_text)]
Paths = Annotated[str, BeforeValidator(_path_list), AfterValidator(_no_empty_entry)]
Faults = Annotated[str, AfterValidator(_valid_faults)]

#: Keys the Dagster lineage fills (dataset snapshot, run folder, policy resource); not on the Launchpad.
LINEAGE_FILLED = "filled by the Dagster lineage"


class RunConfig(BaseModel):
    """Validated run configuration; build it from kebab-case keys with :func:`parse_run_config`."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        alias_generator=kebab,
        populate_by_name=True,
    )

    num_server_rounds: Int = Field(2, ge=1, description="federated rounds")
    strategy: Literal["fedavg", "fedprox"] = Field("fedavg", description="server strategy")
    proximal_mu: float = Field(0.0, ge=0.0, description="FedProx mu (fedprox only)")
    mu_schedule: Literal["constant", "linear", "step"] = Field(
        "constant", description="server FedProx mu per round"
    )
    mu_final: float = Field(0.0, ge=0.0, description="linear: mu reached in the last round")
    mu_step_rounds: Int = Field(1, ge=1, description="step: rounds between mu changes")
    mu_step_factor: float = Field(0.5, gt=0.0, description="step: mu multiplier")
    local_steps: Int = Field(2, ge=1, description="optimizer steps per client and round")
    batch_size: Int = Field(2, ge=1, description="client batch size (also server eval)")
    learning_rate: float = Field(1e-4, gt=0.0, description="base client AdamW learning rate")
    lr_schedule: Literal["constant", "cosine", "step"] = Field("constant", description="server LR per round")
    lr_min: float = Field(0.0, ge=0.0, description="cosine: LR approached in the last round")
    lr_step_rounds: Int = Field(1, ge=1, description="step: rounds between LR decays")
    lr_step_gamma: float = Field(0.5, gt=0.0, le=1.0, description="step: LR decay factor")
    weight_decay: float = Field(1e-10, ge=0.0, description="client AdamW weight decay")
    grad_clip_norm: float = Field(10.0, ge=0.0, description="gradient clipping norm; 0 disables")
    seed: Int = Field(0, ge=0, description="policy init, sampling, flow-matching noise")
    min_available_clients: Int = Field(1, ge=1, description="nodes needed to start")
    min_replies: Int = Field(0, ge=0, description="accepted replies per round; 0 = min-available-clients")
    max_update_norm_ratio: float = Field(
        10.0,
        ge=0.0,
        description="refuse an update whose norm exceeds this multiple of the others' median; 0 disables",
    )
    fraction_train: float = Field(1.0, gt=0.0, le=1.0, description="share of clients sampled per round")
    fraction_evaluate: float = Field(0.0, ge=0.0, le=1.0, description="share of clients evaluating")
    eval_every: Int = Field(1, ge=0, description="server eval period in rounds; 0 = never")
    eval_max_batches: Int = Field(0, ge=0, description="eval batches per eval dataset; 0 = all")
    train_datasets: Paths = Field("", description=f"comma-separated client dataset roots ({LINEAGE_FILLED})")
    eval_datasets: Paths = Field(
        "", description=f"comma-separated server eval dataset roots ({LINEAGE_FILLED})"
    )
    output_dir: Text = Field(
        "", description=f"checkpoints + metrics.json; empty = runs dir ({LINEAGE_FILLED})"
    )
    policy_source: Literal["tiny", "pretrained"] = Field(
        "tiny", description=f"tiny offline SmolVLA or a pretrained one ({LINEAGE_FILLED}: policy resource)"
    )
    pretrained_path: Text = Field(
        "lerobot/smolvla_base", description=f"pretrained only ({LINEAGE_FILLED}: policy resource)"
    )
    pretrained_revision: Text = Field(
        "", description=f"pinned revision; empty = unpinned ({LINEAGE_FILLED}: policy resource)"
    )
    chunk_size: Int = Field(10, ge=1, description="action chunk length")
    device: Literal["cpu", "cuda", "mps"] = Field("cpu", description="torch device of clients and server")
    wire_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of arrays on the wire")
    round_timeout_s: float = Field(3600.0, gt=0.0, description="seconds to wait for client replies")
    quorum_timeout_s: float = Field(600.0, gt=0.0, description="seconds to wait for the quorum")
    resume: StrictBool = Field(
        False, description=f"continue from the last checkpoint in output-dir ({LINEAGE_FILLED}: run folder)"
    )
    inject_faults: Faults = Field("", description="TESTS ONLY: kind:partition@round,...")
    dp: Literal["none", "central-client-clip", "central-server-clip"] = Field(
        "none", description="central DP: none, or clipping on the client or the server side"
    )
    dp_noise_multiplier: float = Field(1.0, gt=0.0, description="DP noise multiplier sigma (noise / clip)")
    dp_clipping_norm: float = Field(1.0, gt=0.0, description="DP: L2 clip of each update")
    dp_delta: float = Field(1e-5, gt=0.0, le=1.0, description="delta of the reported (epsilon, delta)")
    dp_target_epsilon: float = Field(
        0.0, ge=0.0, description="DP: stop before epsilon exceeds this; 0 = no target"
    )
    lora_rank: Int = Field(0, ge=0, description="> 0: train and send only rank-r LoRA adapters")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> RunConfig:
        if self.strategy == "fedavg" and self.proximal_mu != 0.0:
            raise ValueError(
                f"run config key 'proximal-mu' is {self.proximal_mu} but strategy is 'fedavg'; "
                "set strategy = 'fedprox' or proximal-mu = 0"
            )
        if self.strategy == "fedprox" and self.proximal_mu == 0.0:
            raise ValueError(
                "run config key 'proximal-mu' must be > 0 with strategy 'fedprox' (0 equals FedAvg)"
            )
        if self.mu_schedule != "constant" and self.strategy != "fedprox":
            raise ValueError(
                f"run config key 'mu-schedule' is '{self.mu_schedule}' but strategy is '{self.strategy}' "
                "(a proximal-mu schedule needs strategy = 'fedprox')"
            )
        if self.lr_schedule == "cosine" and self.lr_min >= self.learning_rate:
            raise ValueError(
                f"run config key 'lr-min' ({self.lr_min}) must be < 'learning-rate' ({self.learning_rate}) "
                "with lr-schedule 'cosine'"
            )
        if self.dp != "none" and self.wire_dtype != "float32":
            raise ValueError(
                f"run config key 'wire-dtype' is '{self.wire_dtype}' but dp is '{self.dp}': central DP "
                "clips and noises float32 weights (Flower's clipping works on numpy arrays, which have no "
                "bfloat16)"
            )
        if self.dp != "none" and self.dp_delta >= 1.0:
            raise ValueError(
                f"run config key 'dp-delta' must be < 1 with dp '{self.dp}', got {self.dp_delta}"
            )
        return self

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
        return self.model_dump(by_alias=True)

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


KEYS: tuple[str, ...] = tuple(kebab(name) for name in RunConfig.model_fields)


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="))


def describe(name: str) -> str:
    """The description of field ``name`` (snake_case) with its choices or bounds."""
    field = RunConfig.model_fields[name]
    notes = []
    if typing.get_origin(field.annotation) is Literal:
        notes.append("one of " + ", ".join(map(str, typing.get_args(field.annotation))))
    for meta in field.metadata:
        notes += [
            f"{sign} {getattr(meta, attr)}" for attr, sign in _BOUNDS if getattr(meta, attr, None) is not None
        ]
    return f"{field.description} ({'; '.join(notes)})" if notes else str(field.description)


def split_paths(value: str) -> list[Path]:
    """Split a comma-separated list of paths (empty string → empty list)."""
    return [Path(part.strip()) for part in value.split(",") if part.strip()]


_TYPE_ERRORS = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be a boolean",
}
_BOUND_ERRORS = dict(zip(("greater_than_equal", "greater_than", "less_than_equal"), _BOUNDS, strict=True))


def _error_text(error: Mapping[str, Any]) -> str:
    """One pydantic error as a sentence naming the run-config key."""
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:  # a cross-field rule: its message names the keys
        return message
    key = kebab(str(error["loc"][0]))
    if error["type"] == "literal_error":
        choices = typing.get_args(RunConfig.model_fields[key.replace("-", "_")].annotation)
        message = f"must be one of {', '.join(choices)}"
    elif error["type"] in _BOUND_ERRORS:
        attr, sign = _BOUND_ERRORS[error["type"]]
        message = f"must be {sign} {error['ctx'][attr]}"
    elif error["type"] in _TYPE_ERRORS:
        message = _TYPE_ERRORS[error["type"]]
    elif not message.startswith(("must", "has")):
        message = f"is invalid: {message}"
    return f"run config key '{key}' {message}, got {error['input']!r}"


def parse_run_config(values: Mapping[str, Any], *, fill_defaults: bool = True) -> RunConfig:
    """Validate ``values`` (kebab-case keys) into a :class:`RunConfig`.

    Unknown keys, wrong types and out-of-range values raise ``ValueError`` naming the key. Missing keys take
    the defaults of ``RunConfig`` (unless ``fill_defaults=False``, then they are errors too).
    """
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown run config key(s) {unknown}; known keys: {', '.join(KEYS)}")
    if not fill_defaults and (missing := [k for k in KEYS if k not in values]):
        raise ValueError(f"run config key '{missing[0]}' is missing")
    try:
        return RunConfig.model_validate(dict(values))
    except ValidationError as exc:
        raise ValueError("; ".join(_error_text(e) for e in exc.errors(include_url=False))) from None


def replace(cfg: RunConfig, **changes: Any) -> RunConfig:
    """Copy of ``cfg`` with kebab-case ``changes`` applied, re-validated."""
    values = cfg.to_dict()
    values.update(changes)
    return parse_run_config(values)


def defaults() -> dict[str, Any]:
    """The default values, kebab-case."""
    return {kebab(name): field.default for name, field in RunConfig.model_fields.items()}


def pyproject_app_config(values: Mapping[str, Any] | None = None) -> str:
    """Render ``[tool.flwr.app.config]`` for ``values`` (validated; defaults fill the rest)."""
    cfg = parse_run_config(values or {})
    return tomli_w.dumps({"tool": {"flwr": {"app": {"config": cfg.to_dict()}}}})


__all__ = [
    "KEYS",
    "LINEAGE_FILLED",
    "RunConfig",
    "defaults",
    "describe",
    "kebab",
    "parse_run_config",
    "pyproject_app_config",
    "replace",
    "split_paths",
]
