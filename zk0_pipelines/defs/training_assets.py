"""Training: DVC snapshot of the validated datasets → Flower federated run → server evaluation."""

import base64
import json
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from zk0_pipelines import settings
from zk0_pipelines.datasets.admission import admitted_datasets, data_fingerprint
from zk0_pipelines.defs.ingest_assets import validated_dataset
from zk0_pipelines.defs.resources import (
    DatasetRegistryResource,
    DvcResource,
    MlflowResource,
    PolicyResource,
)
from zk0_pipelines.defs.training_config import FederatedTrainingConfig
from zk0_pipelines.federated.launcher import run_federated
from zk0_pipelines.tracking.lineage import config_hash
from zk0_pipelines.tracking.promotion import promotion_metric
from zk0_pipelines.tracking.reproduction_records import round_weight_hashes
from zk0_pipelines.tracking.round_metrics import (
    EVAL_METRICS,
    eval_columns_first,
    flatten_client,
    flatten_round,
    summarize_server_eval,
)
from zk0_pipelines.tracking.round_plots import plot_round_metrics


@dg.asset(
    group_name="training",
    kinds={"dvc"},
    deps=[validated_dataset],
    description=(
        "data/ pinned by data.dvc: `dvc add data` + `dvc push` to the configured remote. Its md5 is the "
        "lineage key that training, MLflow and the registry carry. Unchanged data makes no new snapshot."
    ),
)
def dataset_snapshot(
    context: dg.AssetExecutionContext, dataset_registry: DatasetRegistryResource, dvc: DvcResource
) -> dict[str, Any]:
    """Snapshot the validated datasets that the registry names; list what is excluded and why."""
    registry = dataset_registry.load()
    included = admitted_datasets()
    admitted_ids = {d.dataset_id for d in included}
    excluded = {e.id: _exclusion_reason(e.id) for e in registry.entries if e.id not in admitted_ids}
    if not any(d.role == "train" for d in included):
        raise dg.Failure(
            "no validated training dataset in data/: ingest the registry's datasets first "
            f"(registry {dataset_registry.registry_path}; excluded: {excluded or 'none'})"
        )
    snap = dvc.repo().snapshot("data")
    datasets = [
        {
            "id": d.dataset_id,
            "role": d.role,
            "path": str(d.path),
            "resolved_revision": d.provenance.get("resolved_revision"),
            "source": d.provenance.get("source", {}),
            "cameras": (d.provenance.get("cameras") or {}).get("rename"),
            "conversion": d.provenance.get("conversion"),
        }
        for d in included
    ]
    context.add_output_metadata(
        {
            "dvc_md5": snap.md5,
            "data_fingerprint": data_fingerprint(included),
            "changed": snap.changed,
            "nfiles": snap.nfiles,
            "size_bytes": snap.size,
            "datasets": dg.MetadataValue.md(
                pd.DataFrame(datasets)
                .drop(columns=["source", "cameras", "conversion"])
                .to_markdown(index=False)
            ),
            "excluded": dg.MetadataValue.json(excluded),
        }
    )
    return {
        "dvc_md5": snap.md5,
        "data_fingerprint": data_fingerprint(included),
        "changed": snap.changed,
        "datasets": datasets,
        "excluded": excluded,
    }


def _exclusion_reason(dataset_id: str) -> str:
    quarantined = settings.quarantine_dir() / dataset_id
    if quarantined.exists():
        return _quarantine_reason(quarantined)
    return "not ingested yet"


def _quarantine_reason(quarantined: Path) -> str:
    """``quarantined (<latest attempt>): <why>``: the refusal, or the checks that failed, from its report."""
    attempts = sorted(p for p in quarantined.iterdir() if (p / "report.json").is_file())
    if not attempts:
        return f"quarantined ({quarantined})"
    try:
        report = json.loads((attempts[-1] / "report.json").read_text())
        failed = [c for c in report.get("checks", []) if not c.get("passed")]
    except (OSError, ValueError, AttributeError):
        return f"quarantined ({attempts[-1]}): report.json unreadable"
    refused = [c["message"] for c in failed if (c.get("details") or {}).get("refused")]
    why = refused[0] if refused else "failed checks " + ", ".join(c.get("name", "?") for c in failed)
    return f"quarantined ({attempts[-1]}): {why}"


def federated_run_dir(dvc_md5: str, run_config: dict[str, Any], dagster_run_id: str) -> tuple[Path, bool]:
    """Where a federated run for this data and config lives, and whether to resume it.

    The folder is keyed by the DVC md5 and the config hash, so re-materialising after a crash (even a
    SIGKILL) finds the interrupted run and resumes from its last checkpoint. A completed run with the same
    key is never overwritten: the new run gets a folder of its own.
    """
    key = f"{dvc_md5.removesuffix('.dir')[:12]}-{config_hash(run_config)[:12]}"
    run_dir = settings.runs_dir() / key
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        return run_dir, False
    status = json.loads(metrics.read_text()).get("status")
    if status == "completed":
        return settings.runs_dir() / f"{key}-{dagster_run_id[:8]}", False
    return run_dir, True


@dg.asset(
    group_name="training",
    kinds={"flower", "pytorch"},
    description=(
        "SmolVLA fine-tuned with Flower (Message API): one client per validated training dataset, "
        "FedAvg/FedProx, only trainable parameters on the wire, a checkpoint per round."
    ),
)
def federated_model(
    context: dg.AssetExecutionContext,
    config: FederatedTrainingConfig,
    dataset_snapshot: dict[str, Any],
    policy: PolicyResource,
) -> dict[str, Any]:
    """Run the federated training on the snapshot's datasets and return where its outputs are."""
    train = [Path(d["path"]) for d in dataset_snapshot["datasets"] if d["role"] == "train"]
    evals = [Path(d["path"]) for d in dataset_snapshot["datasets"] if d["role"] == "eval"]
    if not evals:
        raise dg.Failure("no validated held-out eval dataset in the snapshot: server evaluation needs one")
    run_config = config.run_config()
    run_config.update(
        {
            "policy-source": policy.source,
            "pretrained-path": policy.pretrained_path,
            **({"pretrained-revision": policy.revision} if policy.revision else {}),
        }
    )
    run_dir, resume = federated_run_dir(dataset_snapshot["dvc_md5"], run_config, context.run.run_id)
    if resume:
        context.log.info(f"resuming the interrupted federated run in {run_dir} from its last checkpoint")
    result = run_federated(
        train, evals, run_dir, {**run_config, "resume": resume}, federation=config.federation
    )
    round_rows = [flatten_round(r) for r in result.rounds]
    client_rows = [flatten_client(c) for c in result.clients]
    rounds = pd.DataFrame(round_rows)
    context.add_output_metadata(
        {
            "run_dir": dg.MetadataValue.path(str(result.run_dir)),
            "final_checkpoint": dg.MetadataValue.path(str(result.final_checkpoint)),
            "num_clients": len(train),
            "federation": config.federation,
            "rounds": dg.MetadataValue.md(rounds.to_markdown(index=False)),
            "dvc_md5": dataset_snapshot["dvc_md5"],
        }
    )
    return {
        "run_dir": str(result.run_dir),
        "final_checkpoint": str(result.final_checkpoint),
        "rounds": round_rows,
        "clients": client_rows,
        "config": result.config,
        "round_weights": round_weight_hashes(result.run_dir),
        "dvc_md5": dataset_snapshot["dvc_md5"],
        "data_fingerprint": dataset_snapshot["data_fingerprint"],
        "datasets": dataset_snapshot["datasets"],
    }


@dg.asset(
    group_name="training",
    kinds={"pytorch"},
    description=(
        "Server-side evaluation on the held-out datasets after each round: seeded flow-matching loss and "
        "the action MSE (raw units) of predicted action chunks, per dataset and overall; curves and the "
        "best round by the registry's promotion metric."
    ),
)
def server_evaluation(
    context: dg.AssetExecutionContext, federated_model: dict[str, Any], mlflow: MlflowResource
) -> dict[str, Any]:
    """Summarise the per-round server evaluation (table, best rounds) and plot the curves."""
    rounds = [eval_columns_first(r) for r in federated_model["rounds"] if r.get("eval_loss") is not None]
    if not rounds:
        raise dg.Failure(
            "the federated run produced no server evaluation: check eval-every and eval datasets"
        )
    try:
        metric = promotion_metric(mlflow.promote_rule)
        # the success rate comes from the simulator rollouts (rollout_evaluation): rank rounds by loss here
        summary = summarize_server_eval(rounds, metric if metric in EVAL_METRICS else "eval_loss")
    except ValueError as exc:
        raise dg.Failure(f"server evaluation: {exc} (promote_rule={mlflow.promote_rule!r})") from exc
    run_dir = Path(federated_model["run_dir"])
    plot = plot_round_metrics(federated_model["rounds"], run_dir / "server_eval.png")
    plots = {"loss": plot}
    mse_keys = sorted({k for r in rounds for k in r if k.startswith("eval_action_mse")})
    if mse_keys:
        plots["action_mse"] = plot_round_metrics(
            rounds, run_dir / "server_eval_action_mse.png", keys=mse_keys, title="Action MSE (raw units)"
        )
    metadata: dict[str, Any] = {
        key: (int(value) if key.endswith("round") else float(value))
        for key, value in summary.items()
        if value is not None and key != "selection_metric"
    }
    context.add_output_metadata(
        {
            **metadata,
            "selection_metric": summary["selection_metric"],
            "curve": dg.MetadataValue.md(pd.DataFrame(rounds).to_markdown(index=False)),
            "plot": dg.MetadataValue.md(_inline_png(plot)),
            **(
                {"plot_action_mse": dg.MetadataValue.md(_inline_png(plots["action_mse"]))}
                if "action_mse" in plots
                else {}
            ),
        }
    )
    return {
        **summary,
        "rounds": rounds,
        "plot": str(plot),
        "plots": {f"{Path(path).name}": str(path) for path in plots.values()},
    }


def _inline_png(path: Path) -> str:
    return f"![{path.name}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"
