"""The one ``Definitions`` object of the code location (workspace.yaml loads this module).

``ZK0_DEPLOYMENT`` picks the resources: ``offline`` (default: synthetic datasets, tiny SmolVLA, sqlite
MLflow, Hub dry run) or ``production`` (Hub datasets at pinned revisions, ``lerobot/smolvla_base``,
real Hub push with ``HF_TOKEN``). Assets never change between the two.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from zk0_pipelines import env_settings, settings
from zk0_pipelines.defs import (
    ingest_assets,
    release_assets,
    rollout_assets,
    serving_assets,
    training_assets,
)
from zk0_pipelines.defs.automation import (
    new_so100_datasets,
    nightly_federated_training,
    validated_datasets_changed,
)
from zk0_pipelines.defs.jobs import federated_training, ingest_datasets, release
from zk0_pipelines.defs.reproduction import reproduce_model
from zk0_pipelines.defs.resources import (
    DatasetDiscoveryResource,
    DatasetRegistryResource,
    DvcResource,
    HfHubPublisherResource,
    HubPublisherResource,
    MlflowResource,
    PolicyResource,
    TrainingTriggerResource,
)
from zk0_pipelines.defs.serving_assets import serve_champion

settings.configure_local_env()


def build_resources(deployment: str | None = None) -> dict[str, Any]:
    """Resources for a deployment name (``offline`` or ``production``)."""
    deployment = deployment or env_settings.DEPLOYMENT.text()
    mlflow = MlflowResource(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None)
    # Asset values (small dicts of paths and metrics) persist in the instance's storage folder, so a
    # job can read what an earlier run materialised (release after training, UI re-executions).
    io_manager = dg.FilesystemIOManager()
    shared = {
        "mlflow": mlflow,
        "io_manager": io_manager,
        "dataset_discovery": DatasetDiscoveryResource(
            drop_folder=env_settings.DROP_FOLDER.text(),
            hub_search=env_settings.HUB_SEARCH.raw(),
        ),
        "training_trigger": TrainingTriggerResource(nightly_force=env_settings.NIGHTLY_FORCE.flag()),
    }
    if deployment == "offline":
        return {
            "dataset_registry": DatasetRegistryResource(
                registry_path=env_settings.DATASET_REGISTRY.raw() or "configs/datasets.demo.yaml"
            ),
            "dvc": DvcResource(),
            "policy": PolicyResource(source="tiny"),
            "hub": HubPublisherResource(),
            **shared,
        }
    if deployment == "production":
        return {
            "dataset_registry": DatasetRegistryResource(
                registry_path=env_settings.DATASET_REGISTRY.raw() or "configs/datasets.so100.yaml"
            ),
            "dvc": DvcResource(remote_url=env_settings.DVC_REMOTE.raw()),
            "policy": PolicyResource(
                source="pretrained",
                pretrained_path="lerobot/smolvla_base",
                revision=env_settings.SMOLVLA_REVISION.raw(),
            ),
            "hub": HfHubPublisherResource(repo_id=env_settings.HUB_REPO_ID.raw()),
            **shared,
        }
    raise ValueError(f"ZK0_DEPLOYMENT must be 'offline' or 'production', got {deployment!r}")


def build_definitions(resources: dict[str, Any] | None = None) -> dg.Definitions:
    """Assemble assets, checks, jobs and resources; ``resources`` defaults to ``build_resources()``."""
    return dg.Definitions(
        assets=dg.load_assets_from_modules(
            [ingest_assets, training_assets, release_assets, rollout_assets, serving_assets]
        ),
        jobs=[ingest_datasets, federated_training, release, reproduce_model, serve_champion],
        sensors=[new_so100_datasets, validated_datasets_changed],
        schedules=[nightly_federated_training],
        resources=resources if resources is not None else build_resources(),
    )


defs = build_definitions()
