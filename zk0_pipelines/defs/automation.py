"""Automation: discover new SO-100 datasets, re-train when the validated set changes, nightly runs."""

import json

import dagster as dg

from zk0_pipelines import env_settings
from zk0_pipelines.datasets.admission import admitted_datasets, data_fingerprint
from zk0_pipelines.defs.jobs import federated_training, ingest_datasets
from zk0_pipelines.defs.partitions import SO100_DATASETS
from zk0_pipelines.defs.resources import (
    DatasetDiscoveryResource,
    DatasetRegistryResource,
    TrainingTriggerResource,
)

FINGERPRINT_TAG = "zk0/data_fingerprint"


@dg.sensor(
    job=ingest_datasets,
    minimum_interval_seconds=env_settings.SENSOR_INTERVAL_S.integer(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="New SO-100/SO-101 datasets (drop folder, Hub search) → a partition and an ingest run each.",
)
def new_so100_datasets(
    context: dg.SensorEvaluationContext,
    dataset_discovery: DatasetDiscoveryResource,
    dataset_registry: DatasetRegistryResource,
) -> dg.SensorResult | dg.SkipReason:
    """Cursor: ``{dataset_id: fingerprint}`` of everything already requested."""
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    fresh = [d for d in dataset_discovery.discover() if seen.get(d.dataset_id) != d.fingerprint]
    if not fresh:
        return dg.SkipReason(f"no new dataset ({len(seen)} already seen)")
    dataset_registry.record(fresh)
    known = set(context.instance.get_dynamic_partitions(SO100_DATASETS.name))
    to_add = sorted({d.dataset_id for d in fresh} - known)
    seen.update({d.dataset_id: d.fingerprint for d in fresh})
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"ingest:{d.dataset_id}:{d.fingerprint}",
                partition_key=d.dataset_id,
                tags={"zk0/discovered_by": "new_so100_datasets", "zk0/source": d.source["kind"]},
            )
            for d in fresh
        ],
        dynamic_partitions_requests=[SO100_DATASETS.build_add_request(to_add)] if to_add else [],
        cursor=json.dumps(seen, sort_keys=True),
    )


_ACTIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _ingest_in_flight(instance: dg.DagsterInstance) -> bool:
    runs = instance.get_run_records(dg.RunsFilter(job_name=ingest_datasets.name, statuses=_ACTIVE), limit=1)
    return bool(runs)


def training_in_flight(instance: dg.DagsterInstance, fingerprint: str) -> str | None:
    """Why a new training of the set ``fingerprint`` would be a duplicate (a queued/running one), or None."""
    records = instance.get_run_records(
        dg.RunsFilter(
            job_name=federated_training.name, statuses=_ACTIVE, tags={FINGERPRINT_TAG: fingerprint}
        ),
        limit=1,
    )
    if not records:
        return None
    run = records[0].dagster_run
    return (
        f"federated_training run {run.run_id} for this dataset set ({fingerprint}) is already "
        f"{run.status.value.lower()}"
    )


def last_trained_fingerprint(instance: dg.DagsterInstance) -> str | None:
    """The data fingerprint of the latest registered model version (however its run was launched)."""
    event = instance.get_latest_materialization_event(dg.AssetKey("registered_model"))
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("data_fingerprint")
    return None if value is None else str(value.value)


@dg.sensor(
    job=federated_training,
    minimum_interval_seconds=env_settings.SENSOR_INTERVAL_S.integer(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Re-train once when the set of validated datasets changes (one admitted or quarantined), after "
        "pending ingest runs finish: one run per new set, keyed by the set's fingerprint."
    ),
)
def validated_datasets_changed(context: dg.SensorEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    """Cursor: the fingerprint of the admitted set that training was last requested for."""
    admitted = admitted_datasets()
    if not any(d.role == "train" for d in admitted) or not any(d.role == "eval" for d in admitted):
        return dg.SkipReason("need at least one validated training and one validated eval dataset")
    if _ingest_in_flight(context.instance):
        return dg.SkipReason("ingest runs are still in flight: waiting for the set to settle")
    fingerprint = data_fingerprint(admitted)
    if fingerprint in (context.cursor, last_trained_fingerprint(context.instance)):
        return dg.SkipReason(f"validated set unchanged ({fingerprint})")
    duplicate = training_in_flight(context.instance, fingerprint)
    if duplicate:
        return dg.SkipReason(duplicate)
    context.update_cursor(fingerprint)
    return dg.RunRequest(
        run_key=f"train:{fingerprint}",
        tags={FINGERPRINT_TAG: fingerprint, "zk0/trigger": "validated_datasets_changed"},
    )


@dg.schedule(
    job=federated_training,
    cron_schedule="0 2 * * *",
    execution_timezone=env_settings.NIGHTLY_TIMEZONE.text(),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Nightly federated run; skipped when nothing changed since the last successful run.",
)
def nightly_federated_training(
    context: dg.ScheduleEvaluationContext, training_trigger: TrainingTriggerResource
) -> dg.RunRequest | dg.SkipReason:
    """Skip unless the admitted dataset set differs from the last successful training run's (or forced)."""
    admitted = admitted_datasets()
    if not any(d.role == "train" for d in admitted):
        return dg.SkipReason("no validated training dataset")
    fingerprint = data_fingerprint(admitted)
    tags = {FINGERPRINT_TAG: fingerprint, "zk0/trigger": "nightly_federated_training"}
    duplicate = training_in_flight(context.instance, fingerprint)
    if duplicate:
        return dg.SkipReason(duplicate)
    if training_trigger.nightly_force:
        return dg.RunRequest(tags={**tags, "zk0/forced": "true"})
    if last_trained_fingerprint(context.instance) == fingerprint:
        return dg.SkipReason(
            f"nothing changed since the last registered model (data fingerprint {fingerprint})"
        )
    return dg.RunRequest(tags=tags)
