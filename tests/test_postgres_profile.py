"""The PostgreSQL profile: Dagster storage and run queue, MLflow registry, on a real PostgreSQL server."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from _fixtures_postgres import fixture_postgres  # noqa: F401  (fixture registered by import)
from _fixtures_tracking import fake_checkpoint
from dagster._core.remote_origin import InProcessCodeLocationOrigin, RemoteRepositoryOrigin
from dagster._core.run_coordinator import SubmitRunContext
from dagster._core.test_utils import create_run_for_test, create_test_daemon_workspace_context
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.load_target import EmptyWorkspaceTarget
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

from zk0_pipelines.datasets.admission import write_provenance
from zk0_pipelines.defs.automation import (
    FINGERPRINT_TAG,
    last_trained_fingerprint,
    nightly_federated_training,
    validated_datasets_changed,
)
from zk0_pipelines.defs.jobs import federated_training, ingest_datasets
from zk0_pipelines.defs.resources import TrainingTriggerResource
from zk0_pipelines.settings import REPO_ROOT
from zk0_pipelines.tracking.mlflow_registry import CHAMPION, ModelRegistry

PROFILE = REPO_ROOT / "dagster_home" / "postgres" / "dagster.yaml"
S = dg.DagsterRunStatus


def _profile(url: str) -> dict[str, Any]:
    """The committed PostgreSQL instance config with its storage pointed at ``url``."""
    config = yaml.safe_load(PROFILE.read_text())
    config["storage"]["postgres"]["postgres_url"] = url
    return config


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "workspace"
    for dataset_id, role in (("a", "train"), ("held", "eval")):
        (root / "data" / dataset_id / "meta").mkdir(parents=True)
        write_provenance(
            root / "data" / dataset_id, {"dataset_id": dataset_id, "role": role, "resolved_revision": "r1"}
        )
    monkeypatch.setenv("ZK0_ROOT", str(root))
    return root


def test_dagster_instance_state_lives_in_postgres(postgres, tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROFILE, home / "dagster.yaml")
    monkeypatch.setenv("ZK0_DAGSTER_PG_URL", postgres.create_database("dagster_state"))

    @dg.asset
    def tiny() -> int:
        return 1

    with dg.DagsterInstance.from_config(str(home)) as instance:
        kinds = {
            type(s).__name__
            for s in (instance.run_storage, instance.event_log_storage, instance.schedule_storage)
        }
        assert kinds == {"PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"}
        result = dg.materialize([tiny], instance=instance)
        instance.report_runless_asset_event(
            dg.AssetMaterialization("registered_model", metadata={"data_fingerprint": "f00d"})
        )
    shutil.rmtree(home / "storage", ignore_errors=True)  # only compute logs live on disk
    with dg.DagsterInstance.from_config(str(home)) as reopened:
        assert reopened.get_run_by_id(result.run_id).status == S.SUCCESS
        assert last_trained_fingerprint(reopened) == "f00d"


def _submit(instance: dg.DagsterInstance, job: Any, tags: dict[str, str]) -> str:
    """What a sensor/schedule daemon or the UI does with a run request: create the run, queue it."""
    location = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name="zk0_pipelines.definitions"), location_name="zk0-pipelines"
    )
    run = create_run_for_test(
        instance,
        job_name=job.name,
        status=S.NOT_STARTED,
        tags={**job.tags, **tags},
        remote_job_origin=RemoteRepositoryOrigin(location, "__repository__").get_job_origin(job.name),
    )
    instance.run_coordinator.submit_run(SubmitRunContext(run, workspace=None))
    return run.run_id


def _statuses(instance: dg.DagsterInstance, run_ids: list[str]) -> list[S]:
    return [instance.get_run_by_id(r).status for r in run_ids]


def _one_running_one_queued(instance: dg.DagsterInstance, run_ids: list[str]) -> bool:
    return sorted(s.value for s in _statuses(instance, run_ids)) == ["QUEUED", "STARTING"]


def test_one_training_per_dataset_set_and_bounded_ingests(postgres, workspace: Path) -> None:
    overrides = {
        **_profile(postgres.create_database("dagster_queue")),
        "run_launcher": {"module": "dagster._core.test_utils", "class": "MockedRunLauncher"},
    }
    trigger = TrainingTriggerResource()
    with (
        dg.instance_for_test(overrides=overrides) as instance,
        create_test_daemon_workspace_context(EmptyWorkspaceTarget(), instance) as context,
    ):
        daemon = QueuedRunCoordinatorDaemon(interval_seconds=1)

        def step() -> None:
            list(daemon.run_iteration(context))

        # The nightly tick and the sensor fire at once, before either run exists: two requests.
        with dg.build_schedule_context(instance=instance, resources={"training_trigger": trigger}) as ctx:
            nightly = nightly_federated_training(ctx)
        with dg.build_sensor_context(instance=instance) as ctx:
            sensed = validated_datasets_changed(ctx)
        assert isinstance(nightly, dg.RunRequest) and isinstance(sensed, dg.RunRequest)
        fingerprint = sensed.tags[FINGERPRINT_TAG]
        trainings = [_submit(instance, federated_training, r.tags) for r in (nightly, sensed)]
        step()
        assert _one_running_one_queued(instance, trainings)

        # Later ticks see the queued/running training of this set and skip with the reason.
        with dg.build_sensor_context(instance=instance, cursor="an older set") as ctx:
            again = validated_datasets_changed(ctx)
        forcing = {"training_trigger": TrainingTriggerResource(nightly_force=True)}
        with dg.build_schedule_context(instance=instance, resources=forcing) as ctx:
            forced = nightly_federated_training(ctx)
        for skip in (again, forced):
            assert isinstance(skip, dg.SkipReason)
            assert f"for this dataset set ({fingerprint}) is already" in skip.skip_message

        ingests = [_submit(instance, ingest_datasets, {"dagster/partition": f"d{i}"}) for i in range(4)]
        step()
        assert _statuses(instance, ingests).count(S.STARTING) == 3  # the ingest limit (4 runs in all)

        # Another set may train beside it; the queued duplicate waits until the first one ends.
        other = _submit(instance, federated_training, {FINGERPRINT_TAG: "another-set"})
        for run_id in [r for r in ingests if instance.get_run_by_id(r).status == S.STARTING]:
            instance.report_run_canceled(instance.get_run_by_id(run_id))
        step()
        assert instance.get_run_by_id(other).status == S.STARTING
        assert _one_running_one_queued(instance, trainings)
        assert _statuses(instance, ingests).count(S.STARTING) == 1  # the fourth, queued until now
        running = next(r for r in trainings if instance.get_run_by_id(r).status == S.STARTING)
        instance.report_run_canceled(instance.get_run_by_id(running))
        step()
        assert _statuses(instance, trainings).count(S.STARTING) == 1
        assert instance.run_launcher.did_run_launch(next(r for r in trainings if r != running))


def test_mlflow_registry_on_postgres_keeps_every_version_and_one_champion(postgres, tmp_path: Path) -> None:
    url = postgres.create_database("mlflow_registry")
    artifacts = tmp_path / "artifacts"
    barrier = threading.Barrier(3)
    results: dict[int, Any] = {}

    def train_and_register(i: int) -> None:
        registry = ModelRegistry(url, experiment="concurrent", artifact_location=artifacts)
        checkpoint = fake_checkpoint(tmp_path / f"ckpt{i}", seed=i)
        run_id = registry.log_federated_run(
            f"run{i}", {"i": i}, [{"round": 1, "loss": 1.0}], checkpoint_dir=checkpoint
        )
        barrier.wait(timeout=120)
        results[i] = registry.register_version("concurrent-model", run_id, eval_loss=1.0 - i / 10)

    threads = [threading.Thread(target=train_and_register, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == [0, 1, 2], "a registration failed"
    client = ModelRegistry(url, experiment="concurrent", artifact_location=artifacts).client
    versions = client.search_model_versions("name='concurrent-model'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    assert sorted(r.version for r in results.values()) == ["1", "2", "3"]
    holders = [v for v in versions if CHAMPION in (client.get_model_version(v.name, v.version).aliases or [])]
    assert len(holders) == 1
    # Promotion is serialised (an advisory lock in PostgreSQL): the best of the three is the champion,
    # whatever order the registrations ran in, and the last registered version is the challenger.
    champion = client.get_model_version_by_alias("concurrent-model", CHAMPION)
    assert str(champion.version) == str(holders[0].version) == results[2].version  # eval_loss 0.8, lowest
    assert str(client.get_model_version_by_alias("concurrent-model", "challenger").version) == "3"


def test_deployment_files_carry_the_same_run_queue_rules() -> None:
    rules = yaml.safe_load(PROFILE.read_text())["run_coordinator"]["config"]
    compose = yaml.safe_load((REPO_ROOT / "deploy" / "dagster.yaml").read_text())["run_coordinator"]["config"]
    helm = yaml.safe_load((REPO_ROOT / "deploy" / "helm" / "dagster-values.yaml").read_text())
    queue = helm["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert compose == rules
    assert (queue["maxConcurrentRuns"], queue["tagConcurrencyLimits"]) == (
        rules["max_concurrent_runs"],
        rules["tag_concurrency_limits"],
    )
