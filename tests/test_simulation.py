"""The SO-101 simulator: scripted-expert datasets through the pipeline, and closed-loop rollouts.

One module-scoped lineage run on simulated labs (record → validate → snapshot → 2 Flower rounds →
register → rollouts per round → release → the release folder rolled out) feeds most tests here.
Needs offscreen OpenGL (Mesa, ``make system-deps``): skipped when missing, failed when CI requires it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml

from zk0_pipelines import env_settings
from zk0_pipelines.datasets.sim_env import SimLab, simulator_unavailable

_reason = simulator_unavailable()
if _reason:
    if env_settings.REQUIRE_SIMULATOR.flag():  # CI installs Mesa: missing there is a failure, not a skip
        pytest.fail(_reason, pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

from zk0_pipelines.definitions import build_definitions, build_resources  # noqa: E402
from zk0_pipelines.defs.resources import DatasetRegistryResource, MlflowResource  # noqa: E402

EVAL_LAB = {"cube_rgba": [0.6, 0.3, 0.6, 1.0], "region": [[0.16, -0.08], [0.28, 0.08]], "rollout_steps": 8}


def _sim_registry(path: Path) -> Path:
    def lab(seed: int, episodes: int, **lab: object) -> dict:
        return {"kind": "simulation", "seed": seed, "episodes": episodes, "lab": lab}

    registry = {
        "datasets": [
            {"id": "lab_red", "role": "train", "source": lab(1, 1, cube_rgba=[0.8, 0.2, 0.2, 1.0])},
            {
                "id": "lab_blue",
                "role": "train",
                "source": lab(2, 1, cube_rgba=[0.2, 0.3, 0.9, 1.0], light=0.6, cube_half_size=0.018),
            },
            {"id": "lab_heldout", "role": "eval", "source": lab(9, 1, **EVAL_LAB)},
        ]
    }
    path.write_text(yaml.safe_dump(registry, sort_keys=False))
    return path


@dataclass
class SimRun:
    workspace: Path
    summary: object
    instance: dg.DagsterInstance
    tracking_uri: str


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimRun]:
    from zk0_pipelines.demo import run_lineage

    workspace = tmp_path_factory.mktemp("sim") / "workspace"
    workspace.mkdir()
    with pytest.MonkeyPatch.context() as mp, dg.instance_for_test() as instance:
        mp.setenv("ZK0_ROOT", str(workspace))
        resources = build_resources("offline")
        resources["dataset_registry"] = DatasetRegistryResource(
            registry_path=str(_sim_registry(workspace / "registry.yaml"))
        )
        resources["mlflow"] = MlflowResource(promote_rule="higher_success_rate")
        summary = run_lineage(
            build_definitions(resources),
            instance,
            training_config={"num_server_rounds": 2, "local_steps": 1, "batch_size": 2, "chunk_size": 4},
        )
        yield SimRun(workspace, summary, instance, resources["mlflow"].registry().tracking_uri)


def test_scripted_expert_succeeds_over_20_seeded_episodes() -> None:
    from zk0_pipelines.datasets.sim_expert import expert_success_rate

    result = expert_success_rate(SimLab(cube_half_size=0.018, light=0.6), episodes=20, seed=5)
    print(f"scripted expert: {result}")
    assert result["episodes"] == 20
    assert result["success_rate"] >= 0.9, result


def test_simulated_labs_are_validated_and_trained_on(sim_run: SimRun) -> None:
    summary = sim_run.summary
    assert summary.ok, "\n".join(summary.lines())
    assert summary.ingest == {"lab_red": "validated", "lab_blue": "validated", "lab_heldout": "validated"}
    info = json.loads((sim_run.workspace / "data" / "lab_red" / "meta" / "info.json").read_text())
    assert info["robot_type"] == "so101_follower" and info["fps"] == 10
    assert {"observation.images.top", "observation.images.wrist"} <= set(info["features"])
    revisions = {d["id"]: d["resolved_revision"] for d in summary.snapshot["datasets"]}
    assert all(r.startswith("simulation:") for r in revisions.values())


def test_rollout_success_rate_is_logged_per_round_with_videos(sim_run: SimRun) -> None:
    from mlflow import MlflowClient

    rollout, registered = sim_run.summary.rollout, sim_run.summary.registered
    assert [row["round"] for row in rollout["rounds"]] == [1, 2]
    final = rollout["final"]
    assert (
        0.0 <= final["success_rate_ci_low"] <= final["success_rate"] <= final["success_rate_ci_high"] <= 1.0
    )
    assert final["episodes"] == 2 and 1 <= final["episode_length"] <= EVAL_LAB["rollout_steps"]

    client = MlflowClient(sim_run.tracking_uri)
    history = client.get_metric_history(registered["run_id"], "eval_success_rate")
    assert sorted(m.step for m in history) == [1, 2]
    assert {m.step: m.value for m in history}[2] == final["success_rate"]
    assert client.get_metric_history(registered["run_id"], "eval_success_rate/lab_heldout")
    for server_round in (1, 2):
        names = [
            a.path for a in client.list_artifacts(registered["run_id"], f"rollouts/round-00{server_round}")
        ]
        assert any(n.endswith(".mp4") for n in names), names
    video = Path(rollout["videos"][0])
    assert video.stat().st_size > 0

    version = client.get_model_version(registered["model_name"], registered["version"])
    assert float(version.tags["success_rate"]) == final["success_rate"]
    assert version.tags["zk0.promotion.rule"] == "higher_success_rate"
    assert version.tags["zk0.promotion.decision"] == rollout["decision"]
    assert rollout["promoted"] and "no champion yet" in rollout["decision"]
    assert client.get_model_version_by_alias(registered["model_name"], "champion").version == version.version


def test_release_folder_acts_like_the_final_checkpoint(sim_run: SimRun) -> None:
    event = sim_run.instance.get_latest_materialization_event(dg.AssetKey("release_rollout_evaluation"))
    metadata = event.asset_materialization.metadata
    assert metadata["matches_checkpoint"].value is True
    assert metadata["success_rate"].value == sim_run.summary.rollout["final"]["success_rate"]


def test_rollout_evaluation_is_deterministic(sim_run: SimRun) -> None:
    from zk0_pipelines.evaluation.rollout import EvalLab, evaluate_policy
    from zk0_pipelines.policy.export import load_policy_folder

    policy, pre, post = load_policy_folder(Path(sim_run.summary.federated["final_checkpoint"]))
    labs = [EvalLab("lab_heldout", SimLab(**EVAL_LAB), "pick up the cube and place it on the green target")]

    def run(seed: int) -> list[tuple]:
        result = evaluate_policy(policy, pre, post, labs, episodes=1, seed=seed, max_steps=6)
        return [(e["seed"], e["success"], e["length"], e["final_joints"]) for e in result["episodes"]]

    first = run(seed=3)
    assert run(seed=3) == first
    assert run(seed=4) != first  # another seed: another cube position, other joints at the end
