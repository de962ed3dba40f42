"""Closed-loop evaluation in the SO-101 simulator: per-round checkpoints, then the release folder."""

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import Field

from zk0_pipelines.defs.resources import MlflowResource
from zk0_pipelines.federated.recorder import CHECKPOINTS_DIR, PRETRAINED_DIR, ROUND_FILE, TRAINING_STATE_DIR

_SUMMARY_KEYS = (
    "success_rate",
    "success_rate_ci_low",
    "success_rate_ci_high",
    "episode_return",
    "episode_length",
)


class RolloutEvaluationConfig(dg.Config):
    """How many seeded episodes, how long, and which rounds the rollout evaluation covers."""

    episodes_per_lab: int = Field(default=2, ge=1, description="seeded episodes in each held-out lab")
    max_steps: int = Field(
        default=0, ge=0, description="control steps per episode (0 = the lab's rollout_steps)"
    )
    every_n_rounds: int = Field(
        default=1, ge=0, description="evaluate rounds divisible by N, and always the last (0 = the last only)"
    )
    seed: int = 0
    videos_per_lab: int = Field(default=1, ge=0, description="episodes per lab and round saved as mp4")


def _round_checkpoints(run_dir: Path) -> dict[int, Path]:
    """Complete per-round lerobot folders of a federated run, by round."""
    found = {}
    for folder in sorted((run_dir / CHECKPOINTS_DIR).glob("round-*")):
        suffix = folder.name.removeprefix("round-")
        if suffix.isdigit() and (folder / TRAINING_STATE_DIR / ROUND_FILE).is_file():
            found[int(suffix)] = folder / PRETRAINED_DIR
    return found


def _rounds_to_evaluate(available: list[int], every: int) -> list[int]:
    if not available:
        return []
    chosen = {r for r in available if every and r % every == 0}
    return sorted(chosen | {max(available)})


def _metric_row(server_round: int, result: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"round": server_round}
    row.update({f"eval_{k}": result["overall"][k] for k in _SUMMARY_KEYS})
    for lab_id, summary in result["labs"].items():
        row[f"eval_success_rate/{lab_id}"] = summary["success_rate"]
    return row


def _require_simulator() -> None:
    from zk0_pipelines.datasets.sim_env import simulator_unavailable

    reason = simulator_unavailable()
    if reason:
        raise dg.Failure(f"rollout evaluation: {reason}")


@dg.asset(
    group_name="registry",
    kinds={"mujoco", "mlflow"},
    description=(
        "Closed-loop evaluation in the SO-101 MuJoCo simulator: the per-round checkpoints act (select_action "
        "through the policy's processors) for seeded episodes in each held-out simulated lab; success rate "
        "(Wilson 95 % CI), return and length per round as MLflow metrics with rollout videos; promotes by "
        "success rate under promote_rule=higher_success_rate. Skipped when no eval dataset is simulated."
    ),
)
def rollout_evaluation(
    context: dg.AssetExecutionContext,
    config: RolloutEvaluationConfig,
    federated_model: dict[str, Any],
    registered_model: dict[str, Any],
    mlflow: MlflowResource,
) -> dict[str, Any]:
    """Roll out every N-th round's checkpoint and the final one; log to the registered model's run."""
    from zk0_pipelines.evaluation.rollout import eval_labs_from_datasets, evaluate_policy_folder

    labs = eval_labs_from_datasets(federated_model["datasets"])
    if not labs:
        reason = "no held-out dataset of kind 'simulation': nothing to roll out in"
        context.add_output_metadata({"skipped": reason})
        return {"skipped": reason}
    _require_simulator()
    run_dir = Path(federated_model["run_dir"])
    checkpoints = _round_checkpoints(run_dir)
    rounds = _rounds_to_evaluate(sorted(checkpoints), config.every_n_rounds)
    if not rounds:
        raise dg.Failure(
            f"rollout evaluation: no complete round checkpoint under {run_dir / CHECKPOINTS_DIR}"
        )
    settings = {
        "episodes": config.episodes_per_lab,
        "seed": config.seed,
        "max_steps": config.max_steps or None,
        "videos_per_lab": config.videos_per_lab,
    }
    rows, videos, per_round = [], {}, {}
    for server_round in rounds:
        video_dir = run_dir / "rollouts" / f"round-{server_round:03d}"
        result = evaluate_policy_folder(checkpoints[server_round], labs, video_dir=video_dir, **settings)
        per_round[server_round] = result
        rows.append(_metric_row(server_round, result))
        for episode in result["episodes"]:
            if episode["video"]:
                videos[episode["video"]] = f"rollouts/round-{server_round:03d}"
        context.log.info(f"round {server_round}: success rate {result['overall']['success_rate']:.3f}")
    final = per_round[rounds[-1]]["overall"]
    registry = mlflow.registry()
    registry.log_rollout(registered_model["run_id"], rows, [(Path(v), p) for v, p in videos.items()])
    name, version = registered_model["model_name"], registered_model["version"]
    ci = f"[{final['success_rate_ci_low']:.3f}, {final['success_rate_ci_high']:.3f}]"
    extra = {"success_rate_ci95": ci, "rollout.episodes_per_lab": config.episodes_per_lab}
    if mlflow.promote_rule == "higher_success_rate":
        promoted, decision = registry.decide_on_success_rate(name, version, final["success_rate"], extra)
    else:
        promoted, decision = False, f"promotion by {mlflow.promote_rule} (registered_model decided)"
        for key, value in {"success_rate": repr(float(final["success_rate"])), **extra}.items():
            registry.client.set_model_version_tag(name, version, key, str(value))
    context.add_output_metadata(
        {
            "success_rate": float(final["success_rate"]),
            "success_rate_ci95": ci,
            "episode_length": float(final["episode_length"]),
            "seconds_per_episode": float(final["seconds_per_episode"]),
            "labs": ", ".join(lab.lab_id for lab in labs),
            "rounds": dg.MetadataValue.md(pd.DataFrame(rows).to_markdown(index=False)),
            "decision": decision,
            **{f"video {Path(v).parent.name}/{Path(v).name}": dg.MetadataValue.path(v) for v in videos},
        }
    )
    return {
        "rounds": rows,
        "final_round": rounds[-1],
        "final": final,
        "final_episodes": per_round[rounds[-1]]["episodes"],
        "labs": [{"lab_id": lab.lab_id, "lab": lab.lab.to_dict(), "task": lab.task} for lab in labs],
        "settings": settings,
        "videos": sorted(videos),
        "promoted": promoted,
        "decision": decision,
    }


@dg.asset(
    group_name="release",
    kinds={"mujoco"},
    description=(
        "The release folder (what users load) rolled out with the same seeds as the final round's "
        "checkpoint: the same weights must give the same episodes, so an export bug fails here."
    ),
)
def release_rollout_evaluation(
    context: dg.AssetExecutionContext, hub_release: dict[str, Any], rollout_evaluation: dict[str, Any]
) -> dict[str, Any]:
    """Evaluate the exported release folder and compare it episode by episode with the checkpoint's."""
    from zk0_pipelines.evaluation.rollout import evaluate_policy_folder

    if rollout_evaluation.get("skipped"):
        context.add_output_metadata({"skipped": rollout_evaluation["skipped"]})
        return {"skipped": rollout_evaluation["skipped"]}
    _require_simulator()
    folder = Path(hub_release["folder"])
    labs = _labs_of(rollout_evaluation)
    settings = {**rollout_evaluation["settings"], "videos_per_lab": 0}
    result = evaluate_policy_folder(folder, labs, **settings)
    expected = [
        (e["lab_id"], e["seed"], e["success"], e["length"]) for e in rollout_evaluation["final_episodes"]
    ]
    got = [(e["lab_id"], e["seed"], e["success"], e["length"]) for e in result["episodes"]]
    context.add_output_metadata(
        {
            "folder": dg.MetadataValue.path(str(folder)),
            "success_rate": float(result["overall"]["success_rate"]),
            "checkpoint_success_rate": float(rollout_evaluation["final"]["success_rate"]),
            "matches_checkpoint": got == expected,
        }
    )
    if got != expected:
        raise dg.Failure(
            f"the release folder {folder} does not act like the final checkpoint (round "
            f"{rollout_evaluation['final_round']}): episodes (lab, seed, success, length) {got} != {expected}"
        )
    return {"folder": str(folder), "overall": result["overall"], "matches_checkpoint": True}


def _labs_of(rollout_evaluation: dict[str, Any]) -> list:
    from zk0_pipelines.datasets.sim_env import SimLab
    from zk0_pipelines.evaluation.rollout import EvalLab

    return [EvalLab(d["lab_id"], SimLab(**d["lab"]), d["task"]) for d in rollout_evaluation["labs"]]
