"""Sensors and schedule: new datasets in the drop folder, re-training on a changed set, nightly skip."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from zk0_pipelines.datasets.admission import write_provenance
from zk0_pipelines.datasets.synthetic import SyntheticSpec, write_synthetic_so100
from zk0_pipelines.defs.automation import (
    new_so100_datasets,
    nightly_federated_training,
    validated_datasets_changed,
)
from zk0_pipelines.defs.resources import (
    DatasetDiscoveryResource,
    DatasetRegistryResource,
    TrainingTriggerResource,
)


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "workspace"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "registry.yaml").write_text("datasets: []\n")
    monkeypatch.setenv("ZK0_ROOT", str(root))
    return root


@pytest.fixture(scope="module")
def so100_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small synthetic SO-100 dataset, written once and copied into drop folders per test."""
    root = tmp_path_factory.mktemp("source") / "lab_pick"
    write_synthetic_so100(
        root, "lab/pick", SyntheticSpec(seed=5, task="pick", episodes=1, frames_per_episode=10)
    )
    return root


def _resources(settle_seconds: float = 0.0) -> dict:
    return {
        "dataset_discovery": DatasetDiscoveryResource(drop_folder=".zk0/drop", settle_seconds=settle_seconds),
        "dataset_registry": DatasetRegistryResource(registry_path="configs/registry.yaml"),
    }


def _drop(so100_source: Path, workspace: Path, name: str = "lab_pick") -> Path:
    import shutil

    dest = workspace / ".zk0" / "drop" / name
    shutil.copytree(so100_source, dest)
    old = time.time() - 60
    for p in dest.rglob("*"):
        os.utime(p, (old, old))
    return dest


def test_drop_folder_dataset_becomes_partition_and_ingest_run_once(
    workspace: Path, so100_source: Path
) -> None:
    _drop(so100_source, workspace)
    with (
        dg.instance_for_test() as instance,
        dg.build_sensor_context(instance=instance, resources=_resources()) as ctx,
    ):
        result = new_so100_datasets(ctx)
        assert isinstance(result, dg.SensorResult)
        assert [r.partition_key for r in result.run_requests] == ["drop-lab_pick"]
        assert result.dynamic_partitions_requests[0].partition_keys == ["drop-lab_pick"]
        cursor = result.cursor
        assert json.loads(cursor).keys() == {"drop-lab_pick"}
        # The discovered dataset now resolves through the registry resource (no hand-edited file).
        entry = _resources()["dataset_registry"].load().get("drop-lab_pick")
        assert entry.source.kind == "local" and entry.role == "train"

        # Second tick with the cursor: nothing again. A "restart" is a fresh context with the stored cursor.
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources=_resources()) as restarted:
            again = new_so100_datasets(restarted)
        assert isinstance(again, dg.SkipReason)


def test_half_copied_folder_is_not_ingested(workspace: Path, so100_source: Path) -> None:
    dest = _drop(so100_source, workspace)
    (dest / "meta" / "info.json").touch()  # still being written: newer than the settle window
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, resources=_resources(30.0)) as ctx:
            result = new_so100_datasets(ctx)
        assert isinstance(result, dg.SkipReason)
        partial = workspace / ".zk0" / "drop" / "partial"
        (partial / "meta").mkdir(parents=True)  # no info.json at all
        with dg.build_sensor_context(instance=instance, resources=_resources(0.0)) as ctx:
            result = new_so100_datasets(ctx)
        assert isinstance(result, dg.SensorResult)
        assert [r.partition_key for r in result.run_requests] == ["drop-lab_pick"]


def _admit(workspace: Path, dataset_id: str, role: str, revision: str) -> None:
    root = workspace / "data" / dataset_id
    (root / "meta").mkdir(parents=True, exist_ok=True)
    write_provenance(root, {"dataset_id": dataset_id, "role": role, "resolved_revision": revision})


def _sense(sensor: Any, instance: dg.DagsterInstance, **kwargs: Any) -> Any:
    """One sensor tick in a context that is closed afterwards."""
    with dg.build_sensor_context(instance=instance, **kwargs) as ctx:
        return sensor(ctx)


def test_retraining_requested_once_per_new_validated_set(workspace: Path) -> None:
    _admit(workspace, "a", "train", "r1")
    _admit(workspace, "held", "eval", "r1")
    with dg.instance_for_test() as instance:
        first = _sense(validated_datasets_changed, instance)
        assert isinstance(first, dg.RunRequest)
        cursor = first.tags["zk0/data_fingerprint"]
        same = _sense(validated_datasets_changed, instance, cursor=cursor)
        assert isinstance(same, dg.SkipReason)
        _admit(workspace, "b", "train", "r7")
        changed = _sense(validated_datasets_changed, instance, cursor=cursor)
        assert isinstance(changed, dg.RunRequest)
        assert changed.run_key == f"train:{changed.tags['zk0/data_fingerprint']}" != f"train:{cursor}"


def _registered(instance: dg.DagsterInstance, fingerprint: str) -> None:
    instance.report_runless_asset_event(
        dg.AssetMaterialization("registered_model", metadata={"data_fingerprint": fingerprint})
    )


def _tick(instance: dg.DagsterInstance, trigger: TrainingTriggerResource) -> dg.RunRequest | dg.SkipReason:
    """One nightly tick, its context closed afterwards (else the instance it opens stays current)."""
    with dg.build_schedule_context(instance=instance, resources={"training_trigger": trigger}) as ctx:
        return nightly_federated_training(ctx)


def test_nightly_schedule_skips_when_nothing_changed_unless_forced(workspace: Path) -> None:
    _admit(workspace, "a", "train", "r1")
    _admit(workspace, "held", "eval", "r1")
    trigger = TrainingTriggerResource()
    with dg.instance_for_test() as instance:
        first = _tick(instance, trigger)
        assert isinstance(first, dg.RunRequest)
        _registered(instance, first.tags["zk0/data_fingerprint"])
        skipped = _tick(instance, trigger)
        assert isinstance(skipped, dg.SkipReason) and "nothing changed" in skipped.skip_message
        forced = _tick(instance, TrainingTriggerResource(nightly_force=True))
        assert isinstance(forced, dg.RunRequest) and forced.tags["zk0/forced"] == "true"
        _admit(workspace, "b", "train", "r2")
        assert isinstance(_tick(instance, trigger), dg.RunRequest)
    assert nightly_federated_training.cron_schedule == "0 2 * * *"
