"""Serving the champion: MLflow pyfunc on ``models:/<name>@champion`` and lerobot's gRPC policy server."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import grpc
import numpy as np
import pytest
import torch
from _fixtures_policy import (  # noqa: F401  (fixtures are registered by import)
    TASK,
    fixture_scratch_tempdir,
    fixture_so100_meta,
    fixture_so100_root,
    observation_frame,
)
from _fixtures_ui import free_port

from zk0_pipelines.datasets.so100 import SO100_JOINTS
from zk0_pipelines.defs.resources import MlflowResource
from zk0_pipelines.defs.serving_assets import champion_policy_server
from zk0_pipelines.federated.task import predict_raw_chunk
from zk0_pipelines.policy import PolicySpec, build_policy, build_processors, export_policy_folder
from zk0_pipelines.policy.export import load_policy_folder
from zk0_pipelines.serving.champion import resolve_served_model
from zk0_pipelines.serving.process import stop_server_process
from zk0_pipelines.serving.pyfunc import log_pyfunc_flavor
from zk0_pipelines.serving.robot_protocol import request_action_chunk, robot_features
from zk0_pipelines.tracking.mlflow_registry import ModelRegistry

NAME = "zk0-serving-test"
CHUNK = 10


@pytest.fixture(scope="module")
def store(so100_meta, tmp_path_factory) -> dict:
    """v1 = champion, v2 = challenger only; both the same tiny SmolVLA folder with its MLmodel."""
    base = tmp_path_factory.mktemp("serving")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZK0_ROOT", str(base / "root"))  # releases, serving cache, pid files
        policy = build_policy(PolicySpec(seed=3, chunk_size=CHUNK, n_action_steps=CHUNK), so100_meta)
        pre, post = build_processors(policy, so100_meta.stats)
        folder = export_policy_folder(policy, pre, post, base / "model", card_markdown="# test\n")
        uri = f"sqlite:///{base / 'mlflow.db'}"
        registry = ModelRegistry(uri, experiment="serving")
        versions = []
        for rule in ("always", "never"):
            run_id = registry.log_federated_run(
                run_name=f"run-{rule}", params={}, round_metrics=[{"round": 1}], checkpoint_dir=folder
            )
            log_pyfunc_flavor(registry.client, run_id)
            versions.append(registry.register_version(NAME, run_id, eval_loss=1.0, promote_rule=rule))
        assert [v.promoted for v in versions] == [True, False]
        yield {"uri": uri, "registry": registry, "folder": folder, "base": base}


def _robot_observation(root: Path) -> dict:
    """A raw SO-100 robot observation: one float per joint, HWC uint8 per camera, the task."""
    frame = observation_frame(root, index=2)
    raw = {name: float(v) for name, v in zip(SO100_JOINTS, frame["observation.state"].tolist(), strict=True)}
    for key, image in frame.items():
        if key.startswith("observation.images."):
            hwc = (image.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
            raw[key.removeprefix("observation.images.")] = hwc
    raw["task"] = TASK
    return raw


def test_champion_resolves_to_its_version_and_release_folder(store) -> None:
    served = resolve_served_model(store["registry"], NAME, cache_dir=store["base"] / "cache")
    assert (served.version, served.alias, served.origin) == ("1", "champion", "registry")
    assert (served.folder / "config.json").is_file() and (served.folder / "MLmodel").is_file()


def test_pyfunc_champion_predicts_the_policy_chunk(store, so100_root, monkeypatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    raw = _robot_observation(so100_root)
    observation = {
        "observation.state": np.array([raw[j] for j in SO100_JOINTS], dtype=np.float32),
        **{f"observation.images.{k}": v for k, v in raw.items() if isinstance(v, np.ndarray)},
        "task": TASK,
    }
    actions = model.predict(observation, params={"seed": 7})
    assert actions.shape == (CHUNK, len(SO100_JOINTS)) and np.isfinite(actions).all()

    policy, pre, post = load_policy_folder(store["folder"])
    frame = observation_frame(so100_root, index=2)
    batch = pre({k: v.unsqueeze(0) if torch.is_tensor(v) else v for k, v in frame.items()})
    noise = torch.randn((1, CHUNK, policy.config.max_action_dim), generator=torch.Generator().manual_seed(7))
    expected = predict_raw_chunk(policy, post, batch, noise)[0].numpy()
    np.testing.assert_allclose(actions, expected, atol=2e-2)  # uint8 round trip of the images

    with pytest.raises(KeyError, match="observation.state"):
        model.predict({k: v for k, v in observation.items() if k != "observation.state"})


def test_dagster_serves_the_champion_to_a_robot_client(store, so100_root) -> None:
    port = free_port()
    resources = {"mlflow": MlflowResource(tracking_uri=store["uri"], model_name=NAME)}
    run_config = {"ops": {"champion_policy_server": {"config": {"port": port}}}}
    try:
        result = dg.materialize([champion_policy_server], resources=resources, run_config=run_config)
        assert result.success
        info = result.output_for_node("champion_policy_server")
        assert (info["address"], info["version"]) == (f"127.0.0.1:{port}", "1")

        features = robot_features(Path(info["folder"]))
        chunk = request_action_chunk(
            info["address"],
            _robot_observation(so100_root),
            features,
            model=f"models:/{NAME}@champion",
            actions_per_chunk=5,
        )
        assert [a.get_timestep() for a in chunk] == [0, 1, 2, 3, 4]
        assert all(tuple(a.get_action().shape) == (len(SO100_JOINTS),) for a in chunk)
        assert all(torch.isfinite(a.get_action()).all() for a in chunk)

        with pytest.raises(grpc.RpcError) as refused:
            request_action_chunk(
                info["address"],
                _robot_observation(so100_root),
                features,
                model="some/other-model",
                actions_per_chunk=5,
                timeout_s=30,
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"{NAME} v1 (champion)" in refused.value.details()
    finally:
        stopped = stop_server_process(port)
    assert stopped
