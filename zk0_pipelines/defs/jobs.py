"""Jobs: ingest (per dataset partition), federated training (snapshot → registered model), release."""

from __future__ import annotations

import dagster as dg

#: run tag naming the job, the key of the run queue's tag_concurrency_limits (dagster_home/*/dagster.yaml)
JOB_TAG = "zk0/job"

ingest_datasets = dg.define_asset_job(
    name="ingest_datasets",
    selection=dg.AssetSelection.assets("so100_dataset", "validated_dataset"),
    description="Fetch one dataset at its pinned revision, validate it, admit it to data/ or quarantine it.",
    tags={JOB_TAG: "ingest_datasets"},
)

federated_training = dg.define_asset_job(
    name="federated_training",
    selection=dg.AssetSelection.assets(
        "dataset_snapshot", "federated_model", "server_evaluation", "registered_model", "rollout_evaluation"
    ),
    description=(
        "DVC snapshot of data/ → Flower federated run → server evaluation → MLflow model version → "
        "rollouts in the simulator (skipped without a simulated eval lab)."
    ),
    tags={JOB_TAG: "federated_training"},
)

release = dg.define_asset_job(
    name="release",
    selection=dg.AssetSelection.assets("hub_release", "release_rollout_evaluation"),
    description="Publish the latest registered model (pushed only if it is the champion and a token is set).",
)
