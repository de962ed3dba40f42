"""Registry and release: MLflow model version with its lineage, then the Hugging Face Hub folder."""

import shutil
from pathlib import Path
from typing import Any

import dagster as dg

from zk0_pipelines import settings
from zk0_pipelines.defs.resources import HubPublisherResource, MlflowResource
from zk0_pipelines.serving.pyfunc import log_pyfunc_flavor
from zk0_pipelines.tracking.hub_release import build_model_card
from zk0_pipelines.tracking.lineage import config_hash, git_commit, library_versions
from zk0_pipelines.tracking.mlflow_store import MlflowStoreUnavailable
from zk0_pipelines.tracking.reproduction_records import ReproductionRecord, log_reproduction_record


def dataset_lineage_tags(datasets: list[dict[str, Any]]) -> dict[str, str]:
    """``cameras.<id>`` (``laptop=top,phone=wrist``) and ``converted.<id>`` (``v2.1->v3.0 by …``) tags."""
    tags: dict[str, str] = {}
    for d in datasets:
        if d.get("cameras"):
            pairs = (f"{s.split('.')[-1]}={t.split('.')[-1]}" for s, t in d["cameras"].items())
            tags[f"cameras.{d['id']}"] = ",".join(pairs)
        if d.get("conversion"):
            c = d["conversion"]
            tags[f"converted.{d['id']}"] = (
                f"{c['source_version']}->{c['target_version']} by {c['converter']} ({c['converter_version']})"
            )
    return tags


def lineage_tags(federated_model: dict[str, Any]) -> dict[str, str]:
    """The tags that tie a model version to the exact data, code and config it was trained with."""
    datasets = federated_model["datasets"]
    tags = {
        "dvc_md5": federated_model["dvc_md5"],
        "datasets.train": ",".join(d["id"] for d in datasets if d["role"] == "train"),
        "datasets.eval": ",".join(d["id"] for d in datasets if d["role"] == "eval"),
        "git_commit": git_commit(settings.repo_root()),
        "config_hash": config_hash(federated_model["config"]),
    }
    tags.update({f"revision.{d['id']}": str(d["resolved_revision"]) for d in datasets})
    tags.update(dataset_lineage_tags(datasets))
    tags.update({f"version.{k}": v for k, v in library_versions().items()})
    tags.update(privacy_tags(federated_model))
    return tags


def privacy_tags(federated_model: dict[str, Any]) -> dict[str, str]:
    """``privacy.*`` tags: the DP mechanism and, with DP on, σ, C, δ and the ε the run spent."""
    from zk0_pipelines.federated.privacy import ACCOUNTANT, MECHANISMS

    config = federated_model["config"]
    mode = str(config.get("dp", "none"))
    if mode == "none":
        return {"privacy.mechanism": "none"}
    spent = [r["dp_epsilon"] for r in federated_model["rounds"] if r.get("dp_epsilon") is not None]
    return {
        "privacy.mechanism": MECHANISMS[mode],
        "privacy.epsilon": repr(float(spent[-1])) if spent else "none",
        "privacy.delta": repr(float(config["dp-delta"])),
        "privacy.noise_multiplier": repr(float(config["dp-noise-multiplier"])),
        "privacy.clipping_norm": repr(float(config["dp-clipping-norm"])),
        "privacy.accountant": ACCOUNTANT,
    }


@dg.asset(
    group_name="registry",
    kinds={"mlflow"},
    description=(
        "An MLflow model version of the federated run: params, per-round and per-client metrics, plots, "
        "checkpoint; tags carry the DVC md5, dataset revisions, git commit, config hash, eval loss and "
        "action MSE; alias challenger, champion only when it beats the current champion by the promotion "
        "rule (server eval loss by default)."
    ),
)
def registered_model(
    context: dg.AssetExecutionContext,
    federated_model: dict[str, Any],
    server_evaluation: dict[str, Any],
    mlflow: MlflowResource,
) -> dict[str, Any]:
    """Log the run to MLflow and register the final checkpoint as a model version."""
    try:
        return _register(context, federated_model, server_evaluation, mlflow)
    except MlflowStoreUnavailable as exc:
        raise dg.Failure(
            description=(
                f"{exc}. The trained checkpoint is kept at {federated_model['final_checkpoint']}; "
                "re-materialise registered_model alone once the store is reachable."
            ),
            metadata={"final_checkpoint": dg.MetadataValue.path(federated_model["final_checkpoint"])},
        ) from exc


def _register(
    context: dg.AssetExecutionContext,
    federated_model: dict[str, Any],
    server_evaluation: dict[str, Any],
    mlflow: MlflowResource,
) -> dict[str, Any]:
    registry = mlflow.registry()
    tags = lineage_tags(federated_model)
    run_id = registry.log_federated_run(
        run_name=f"federated-{context.run.run_id[:8]}",
        params=federated_model["config"],
        round_metrics=federated_model["rounds"],
        client_metrics=federated_model["clients"],
        plots={
            name: Path(path)
            for name, path in server_evaluation.get(
                "plots", {"server_eval.png": server_evaluation["plot"]}
            ).items()
        },
        checkpoint_dir=Path(federated_model["final_checkpoint"]),
        tags={**tags, "dagster_run_id": context.run.run_id},
    )
    record = ReproductionRecord(federated_model["config"], federated_model["round_weights"])
    log_reproduction_record(registry.client, run_id, record)  # what `zk0 reproduce` needs
    log_pyfunc_flavor(registry.client, run_id)  # models:/<name>@champion loads with mlflow.pyfunc
    version = registry.register_version(
        mlflow.model_name,
        run_id,
        tags=tags,
        eval_loss=server_evaluation["final_eval_loss"],
        promote_rule=mlflow.promote_rule,
        action_mse=server_evaluation.get("final_action_mse"),
    )
    context.add_output_metadata(
        {
            "model_name": version.name,
            "version": int(version.version),
            "aliases": ", ".join(version.aliases),
            "promoted": version.promoted,
            "decision": version.decision,
            "promote_rule": mlflow.promote_rule,
            "eval_loss": float(server_evaluation["final_eval_loss"]),
            **(
                {"action_mse": float(server_evaluation["final_action_mse"])}
                if server_evaluation.get("final_action_mse") is not None
                else {}
            ),
            "mlflow_run_id": run_id,
            "mlflow_tracking_uri": registry.tracking_uri,
            "dvc_md5": tags["dvc_md5"],
            "data_fingerprint": federated_model["data_fingerprint"],
        }
    )
    return {
        "model_name": version.name,
        "version": str(version.version),
        "aliases": list(version.aliases),
        "promoted": version.promoted,
        "decision": version.decision,
        "run_id": run_id,
        "tags": tags,
    }


@dg.asset(
    group_name="release",
    kinds={"huggingface"},
    description=(
        "A lerobot-loadable folder (config, safetensors, pre/post-processors) with a model card, pushed to "
        "the Hugging Face Hub for the champion when a token and repo are configured; otherwise a dry run."
    ),
)
def hub_release(
    context: dg.AssetExecutionContext,
    registered_model: dict[str, Any],
    federated_model: dict[str, Any],
    server_evaluation: dict[str, Any],
    hub: HubPublisherResource,
) -> dict[str, Any]:
    """Write the release folder with its model card and publish it (or dry-run)."""
    name, version = registered_model["model_name"], registered_model["version"]
    folder = settings.state_dir() / "releases" / f"{name}-v{version}"
    if folder.exists():
        shutil.rmtree(folder)  # our own output of an earlier attempt at this same version
    shutil.copytree(federated_model["final_checkpoint"], folder)
    shutil.copy2(server_evaluation["plot"], folder / "server_eval.png")
    clients = sorted({str(c["client"]) for c in federated_model["clients"]})
    card = build_model_card(
        model_name=name,
        repo_id=hub.repo_id,
        metrics_table=server_evaluation["rounds"],
        rounds=len(federated_model["rounds"]),
        clients=clients,
        datasets=[
            {
                "id": d["id"],
                "role": d["role"],
                "revision": d["resolved_revision"],
                **({"repo_id": d["source"]["repo_id"]} if d.get("source", {}).get("repo_id") else {}),
            }
            for d in federated_model["datasets"]
        ],
        dvc_md5=federated_model["dvc_md5"],
        loss_plot="server_eval.png",
        lineage={"mlflow_model": f"{name}/{version}", **registered_model["tags"]},
    )
    (folder / "README.md").write_text(card)
    is_champion = "champion" in registered_model["aliases"]
    if is_champion:
        outcome = hub.publish(folder, tag=f"v{version}")
    else:
        outcome = {"dry_run": True, "skipped": "not the champion: only the champion is pushed"}
    context.add_output_metadata(
        {
            "folder": dg.MetadataValue.path(str(folder)),
            "champion": is_champion,
            "dry_run": bool(outcome.get("dry_run", False)),
            "outcome": dg.MetadataValue.json({k: str(v) for k, v in outcome.items()}),
        }
    )
    return {"folder": str(folder), "champion": is_champion, **{k: str(v) for k, v in outcome.items()}}
