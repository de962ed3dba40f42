"""The whole demo lineage, materialised through the Dagster jobs in-process on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml

from zk0_pipelines.datasets.validation import CHECK_NAMES
from zk0_pipelines.definitions import build_definitions, build_resources, defs
from zk0_pipelines.defs.resources import DatasetRegistryResource

LINEAGE = [
    "so100_dataset",
    "validated_dataset",
    "dataset_snapshot",
    "federated_model",
    "server_evaluation",
    "registered_model",
    "hub_release",
]


def test_definitions_load_and_connect_every_stage() -> None:
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert set(LINEAGE) <= keys
    for upstream, downstream in zip(LINEAGE, LINEAGE[1:], strict=False):
        parents = {p.to_user_string() for p in graph.get(dg.AssetKey(downstream)).parent_keys}
        assert upstream in parents, f"{downstream} does not depend on {upstream}"
    checks = {k.name for k in graph.asset_check_keys if k.asset_key == dg.AssetKey("validated_dataset")}
    assert checks == set(CHECK_NAMES)
    assert {j.name for j in defs.resolve_all_job_defs()} >= {"ingest_datasets", "federated_training", "release"}


def _tiny_registry(path: Path) -> Path:
    def synthetic(seed: int, task: str, motion: str) -> dict:
        return {"kind": "synthetic", "seed": seed, "task": task, "motion": motion,
                "episodes": 1, "frames_per_episode": 20}

    registry = {
        "datasets": [
            {"id": "client_a", "role": "train", "source": synthetic(1, "pick the cube", "reach")},
            {"id": "client_b", "role": "train", "source": synthetic(2, "stack the blocks", "push")},
            {"id": "client_c", "role": "train", "source": synthetic(3, "sort the pens", "sweep")},
            {"id": "heldout", "role": "eval", "source": synthetic(9, "pick the cube", "reach")},
        ]
    }
    path.write_text(yaml.safe_dump(registry, sort_keys=False))
    return path


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A separate project root: data/, .zk0/ and the DVC repo live here, never in the checkout."""
    root = tmp_path / "workspace"
    root.mkdir()
    monkeypatch.setenv("ZK0_ROOT", str(root))
    return root


def test_demo_lineage_end_to_end(workspace: Path) -> None:
    from mlflow import MlflowClient

    from zk0_pipelines.demo import run_lineage
    from zk0_pipelines.policy.export import load_policy_folder

    resources = build_resources("offline")
    resources["dataset_registry"] = DatasetRegistryResource(
        registry_path=str(_tiny_registry(workspace / "registry.yaml"))
    )
    tiny_defs = build_definitions(resources)
    with dg.instance_for_test() as instance:
        summary = run_lineage(
            tiny_defs,
            instance,
            training_config={"num_server_rounds": 2, "local_steps": 1, "batch_size": 2, "chunk_size": 10},
        )
        assert summary.ok, "\n".join(summary.lines())
        assert summary.ingest == {i: "validated" for i in ("client_a", "client_b", "client_c", "heldout")}
        assert set(instance.get_dynamic_partitions("so100_datasets")) == set(summary.ingest)
        check_evals = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("validated_dataset"), name) for name in CHECK_NAMES]
        )
        assert len(check_evals) == len(CHECK_NAMES)

    # data.dvc pins data/ and the registered version carries that md5.
    dvc_file = yaml.safe_load((workspace / "data.dvc").read_text())
    md5 = dvc_file["outs"][0]["md5"]
    assert summary.snapshot["dvc_md5"] == md5
    registered = summary.registered
    client = MlflowClient(resources["mlflow"].registry().tracking_uri)
    version = client.get_model_version(registered["model_name"], registered["version"])
    assert version.tags["dvc_md5"] == md5
    assert version.tags["datasets.train"] == "client_a,client_b,client_c"
    assert version.tags["datasets.eval"] == "heldout"
    assert "config_hash" in version.tags and "git_commit" in version.tags
    assert client.get_model_version_by_alias(registered["model_name"], "challenger").version == version.version
    run = client.get_run(registered["run_id"])
    rounds = client.get_metric_history(run.info.run_id, "eval_loss")
    assert sorted(m.step for m in rounds) == [0, 1, 2]  # round 0: the initial model

    # The release folder loads in lerobot and acts.
    folder = Path(summary.release["folder"])
    assert (folder / "README.md").read_text().startswith("---")
    policy, preprocessor, postprocessor = load_policy_folder(folder)
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset("heldout", root=workspace / "data" / "heldout", video_backend="pyav")
    frame = dataset[0]
    observation = {k: v for k, v in frame.items() if k.startswith("observation.")}
    observation["task"] = frame["task"]
    action = postprocessor(policy.select_action(preprocessor(observation)))
    assert tuple(action.shape) == (1, 6)
    assert json.loads((folder / "config.json").read_text())["type"] == "smolvla"
