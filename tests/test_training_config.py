"""The Launchpad config of ``federated_model`` is derived from ``RunConfig`` and builds in Dagster."""

from __future__ import annotations

import dagster as dg
import pytest

from zk0_pipelines.defs.training_config import LINEAGE_KEYS, FederatedTrainingConfig
from zk0_pipelines.federated.run_config import KEYS, defaults, kebab


def _launchpad_keys() -> list[str]:
    return [kebab(name) for name in FederatedTrainingConfig.model_fields if name != "federation"]


def test_every_key_but_the_lineage_s_with_the_same_default():
    assert _launchpad_keys() == [k for k in KEYS if k not in LINEAGE_KEYS]
    assert set(LINEAGE_KEYS) < set(KEYS)
    expected = {k: v for k, v in defaults().items() if k not in LINEAGE_KEYS}
    assert FederatedTrainingConfig().run_config() == expected


def test_run_config_validates_through_run_config():
    assert FederatedTrainingConfig(local_steps=5).run_config()["local-steps"] == 5
    with pytest.raises(ValueError, match="'local-steps'"):
        FederatedTrainingConfig(local_steps=0).run_config()
    with pytest.raises(ValueError, match="'strategy'"):
        FederatedTrainingConfig(strategy="fedsgd").run_config()


def test_dagster_schema_shows_every_field_with_default_and_description():
    fields = FederatedTrainingConfig.to_config_schema().as_field().config_type.fields
    assert list(fields) == ["federation", *(k.replace("-", "_") for k in _launchpad_keys())]
    for name, field in fields.items():
        assert field.description, name
        assert not field.is_required, name
    assert fields["local_steps"].default_value == 2
    assert "one of fedavg, fedprox" in fields["strategy"].description


def test_the_training_job_resolves_the_config_schema():
    from zk0_pipelines.definitions import defs

    job = defs.resolve_job_def("federated_training")
    ops = job.run_config_schema.config_type.fields["ops"].config_type.fields
    config = ops["federated_model"].config_type.fields["config"].config_type.fields
    assert set(config) == set(FederatedTrainingConfig.model_fields)
    run_config = {"ops": {"federated_model": {"config": {"local_steps": 3, "dp": "central-client-clip"}}}}
    assert dg.validate_run_config(job, run_config)["ops"]["federated_model"]["config"]["local_steps"] == 3
