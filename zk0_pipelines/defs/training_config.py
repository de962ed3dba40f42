"""The Dagster Launchpad config of ``federated_model``, derived from the federated ``RunConfig``.

One field per run-config key (snake_case, same default, the key's description with its choices and
bounds), except the keys the lineage fills (``LINEAGE_KEYS``), plus ``federation`` (the Flower runtime).
Dagster config fields are plain ``int``/``float``/``str``/``bool``; ``run_config()`` validates the values
through ``RunConfig``, so a bad value fails naming its kebab-case key.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import dagster as dg
import pydantic
from pydantic import Field
from pydantic.fields import FieldInfo

from zk0_pipelines.federated.launcher import FEDERATIONS
from zk0_pipelines.federated.run_config import RunConfig, describe, kebab, parse_run_config

#: Run-config keys the lineage sets, never the Launchpad: the snapshot's datasets, the run folder (and
#: whether to resume it), and the policy of the deployment's ``PolicyResource``.
LINEAGE_KEYS: tuple[str, ...] = (
    "train-datasets",
    "eval-datasets",
    "output-dir",
    "resume",
    "policy-source",
    "pretrained-path",
    "pretrained-revision",
)


def _plain_type(field: FieldInfo) -> type:
    """The Dagster-compatible type of a run-config field (a ``Literal`` of strings → ``str``)."""
    annotation = field.annotation
    if typing.get_origin(annotation) is Literal:
        return str
    if annotation in (int, float, str, bool):
        return annotation
    raise TypeError(f"run-config field type {annotation!r} has no Dagster config type")


class _LaunchpadConfig(dg.Config):
    """Base of ``FederatedTrainingConfig``: the runtime choice and the kebab-case run config."""

    federation: str = Field(
        default="simulation",
        description=(
            "Flower runtime: 'simulation' (one process, Ray) or 'local-deployment' (a TLS, "
            "node-authenticated SuperLink and one SuperNode process per training dataset on 127.0.0.1) "
            f"(one of {', '.join(FEDERATIONS)})"
        ),
    )

    def run_config(self) -> dict[str, Any]:
        """The Flower run config (kebab-case keys, validated by ``RunConfig``; not the runtime choice)."""
        values = {kebab(name): value for name, value in self.model_dump(exclude={"federation"}).items()}
        parse_run_config(values)  # ValueError naming the key
        return values


def _launchpad_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, field in RunConfig.model_fields.items():
        if kebab(name) in LINEAGE_KEYS:
            continue
        fields[name] = (_plain_type(field), Field(default=field.default, description=describe(name)))
    return fields


FederatedTrainingConfig = pydantic.create_model(
    "FederatedTrainingConfig",
    __base__=_LaunchpadConfig,
    __doc__=(
        "Run knobs of a federated training run: every run-config key except those the lineage fills "
        f"({', '.join(LINEAGE_KEYS)}), with the run config's defaults (the offline demo's)."
    ),
    **_launchpad_fields(),
)
