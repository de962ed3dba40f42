"""The whole demo lineage, materialised through the Dagster jobs in-process on tiny data.

One module-scoped run feeds every test here: the lineage itself, the release folder acting in lerobot,
the registry reviewed through a real ``mlflow server`` process, and registration retried alone after
the store was unreachable.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml
from _fixtures_lineage import LINEAGE, synthetic_source

from zk0_pipelines.datasets.validation import CHECK_NAMES
from zk0_pipelines.definitions import build_definitions, build_resources, defs
from zk0_pipelines.defs.resources import DatasetRegistryResource, MlflowResource

TRAIN_IDS = ("client_a", "client_b", "client_c")
CLIP = 0.01  # DP clipping norm: below the tiny policy's local update norm, so clipping acts


def test_definitions_load_and_connect_every_stage() -> None:
    with dg.instance_for_test():  # loading consults the current instance's definitions-state storage
        dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert set(LINEAGE) <= keys
    for upstream, downstream in zip(LINEAGE, LINEAGE[1:], strict=False):
        parents = {p.to_user_string() for p in graph.get(dg.AssetKey(downstream)).parent_keys}
        assert upstream in parents, f"{downstream} does not depend on {upstream}"
    checks = {k.name for k in graph.asset_check_keys if k.asset_key == dg.AssetKey("validated_dataset")}
    assert checks == set(CHECK_NAMES)
    assert {j.name for j in defs.resolve_all_job_defs()} >= {
        "ingest_datasets",
        "federated_training",
        "release",
    }


def _corrupt_local_dataset(root: Path) -> Path:
    """A real SO-100 dataset whose top-camera video was cut in half (an interrupted copy)."""
    from zk0_pipelines.datasets.synthetic import SyntheticSpec, write_synthetic_so100

    write_synthetic_so100(
        root, "lab/broken", SyntheticSpec(seed=4, task="wave", episodes=1, frames_per_episode=20)
    )
    video = next((root / "videos" / "observation.images.top").rglob("*.mp4"))
    os.truncate(video, video.stat().st_size // 2)
    return root


def _tiny_registry(path: Path) -> Path:
    registry = {
        "datasets": [
            {"id": "client_a", "role": "train", "source": synthetic_source(1, "pick the cube", "reach")},
            {"id": "client_b", "role": "train", "source": synthetic_source(2, "stack the blocks", "push")},
            {"id": "client_c", "role": "train", "source": synthetic_source(3, "sort the pens", "sweep")},
            {"id": "heldout", "role": "eval", "source": synthetic_source(9, "pick the cube", "reach")},
            {
                "id": "broken",
                "role": "train",
                "source": {
                    "kind": "local",
                    "path": str(_corrupt_local_dataset(path.parent / "src" / "broken")),
                },
            },
        ]
    }
    path.write_text(yaml.safe_dump(registry, sort_keys=False))
    return path


@dataclass
class DemoRun:
    workspace: Path
    resources: dict
    summary: object
    instance: dg.DagsterInstance


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    """The lineage in a separate project root: data/, .zk0/ and the DVC repo never touch the checkout."""
    from zk0_pipelines.demo import run_lineage

    workspace = tmp_path_factory.mktemp("lineage") / "workspace"
    workspace.mkdir()
    with pytest.MonkeyPatch.context() as mp, dg.instance_for_test() as instance:
        mp.setenv("ZK0_ROOT", str(workspace))
        resources = build_resources("offline")
        resources["dataset_registry"] = DatasetRegistryResource(
            registry_path=str(_tiny_registry(workspace / "registry.yaml"))
        )
        summary = run_lineage(
            build_definitions(resources),
            instance,
            training_config={"num_server_rounds": 2, "local_steps": 1, "batch_size": 2, "chunk_size": 10},
        )
        yield DemoRun(workspace, resources, summary, instance)


def test_demo_lineage_registers_a_version_tagged_with_the_dvc_md5(demo_run: DemoRun) -> None:
    from mlflow import MlflowClient

    summary, workspace = demo_run.summary, demo_run.workspace
    assert summary.ok, "\n".join(summary.lines())
    assert summary.ingest == {**{i: "validated" for i in (*TRAIN_IDS, "heldout")}, "broken": "quarantined"}
    instance = demo_run.instance
    assert set(instance.get_dynamic_partitions("so100_datasets")) == set(summary.ingest)
    check_evals = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("validated_dataset"), name) for name in CHECK_NAMES]
    )
    assert len(check_evals) == len(CHECK_NAMES)
    failed = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("validated_dataset"), "video_decode"), limit=10
    )
    assert any(e.status.value == "FAILED" for e in failed)

    # The corrupt dataset is quarantined: kept on disk with its report, excluded from training.
    (attempt,) = (workspace / ".zk0" / "quarantine" / "broken").iterdir()
    report = json.loads((attempt / "report.json").read_text())
    assert (
        "observation.images.top" in json.dumps(report)
        and (attempt / "dataset" / "meta" / "info.json").is_file()
    )
    assert not (workspace / "data" / "broken").exists()
    assert "broken" in summary.snapshot["excluded"]
    assert "broken" not in {d["id"] for d in summary.snapshot["datasets"]}

    # data.dvc pins data/ and the registered version carries that md5.
    md5 = yaml.safe_load((workspace / "data.dvc").read_text())["outs"][0]["md5"]
    assert summary.snapshot["dvc_md5"] == md5
    registered = summary.registered
    client = MlflowClient(demo_run.resources["mlflow"].registry().tracking_uri)
    version = client.get_model_version(registered["model_name"], registered["version"])
    assert version.tags["dvc_md5"] == md5
    assert version.tags["datasets.train"] == ",".join(TRAIN_IDS)
    assert version.tags["datasets.eval"] == "heldout"
    assert version.tags["revision.client_a"].startswith("synthetic:")
    assert "config_hash" in version.tags and "git_commit" in version.tags
    assert (
        client.get_model_version_by_alias(registered["model_name"], "challenger").version == version.version
    )
    history = client.get_metric_history(registered["run_id"], "eval_loss")
    assert sorted(m.step for m in history) == [0, 1, 2]  # round 0: the initial global model
    mse = client.get_metric_history(registered["run_id"], "eval_action_mse")
    assert sorted(m.step for m in mse) == [0, 1, 2]
    assert all(math.isfinite(m.value) and m.value > 0 for m in mse)
    # the version's tag is the final round's server-side action MSE
    assert float(version.tags["action_mse"]) == pytest.approx({m.step: m.value for m in mse}[2], rel=1e-6)


def test_release_folder_loads_in_lerobot_and_acts(demo_run: DemoRun) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from zk0_pipelines.policy.export import load_policy_folder

    folder = Path(demo_run.summary.release["folder"])
    card = (folder / "README.md").read_text()
    assert card.startswith("---") and "library_name: lerobot" in card
    assert json.loads((folder / "config.json").read_text())["type"] == "smolvla"
    policy, preprocessor, postprocessor = load_policy_folder(folder)
    policy.reset()
    dataset = LeRobotDataset("heldout", root=demo_run.workspace / "data" / "heldout", video_backend="pyav")
    frame = dataset[0]
    observation = {k: v for k, v in frame.items() if k.startswith("observation.")}
    observation["task"] = frame["task"]
    action = postprocessor(policy.select_action(preprocessor(observation)))
    assert tuple(action.shape) == (1, 6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def test_registry_review_through_a_real_mlflow_server(demo_run: DemoRun, tmp_path: Path) -> None:
    """Start `mlflow server` on the run's sqlite store and review the version over its REST API."""
    from zk0_pipelines.tracking.mlflow_store import default_artifact_root, default_tracking_uri

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZK0_ROOT", str(demo_run.workspace))
        store, artifacts = default_tracking_uri(), default_artifact_root()
    port = _free_port()
    log = (tmp_path / "mlflow-server.log").open("wb")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--backend-store-uri",
            store,
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a loaded 2-core machine can take minutes to start it
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=10)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp_path / "mlflow-server.log").read_text()[-3000:]) from None
                time.sleep(1)
        registered = demo_run.summary.registered
        name = registered["model_name"]
        api = f"{base}/api/2.0/mlflow"
        version = _get(f"{api}/model-versions/get?name={name}&version={registered['version']}")[
            "model_version"
        ]
        tags = {t["key"]: t["value"] for t in version["tags"]}
        assert tags["dvc_md5"] == demo_run.summary.snapshot["dvc_md5"]
        assert tags["datasets.train"] == ",".join(TRAIN_IDS)
        assert "challenger" in version.get("aliases", [])
        by_alias = _get(f"{api}/registered-models/alias?name={name}&alias=champion")["model_version"]
        assert by_alias["version"] == str(registered["version"])
        history = _get(f"{api}/metrics/get-history?run_id={registered['run_id']}&metric_key=eval_loss")
        assert sorted(int(m["step"]) for m in history["metrics"]) == [0, 1, 2]
        clients = _get(f"{api}/runs/get?run_id={registered['run_id']}")["run"]["data"]["metrics"]
        assert {m["key"] for m in clients} >= {f"client/{c}/train_loss" for c in TRAIN_IDS}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def test_registration_can_be_retried_alone_after_the_store_was_unreachable(
    demo_run: DemoRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZK0_ROOT", str(demo_run.workspace))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    only_registration = [dg.AssetKey("registered_model")]
    unreachable = f"http://127.0.0.1:{_free_port()}"
    broken = build_definitions({**demo_run.resources, "mlflow": MlflowResource(tracking_uri=unreachable)})
    failed = broken.resolve_job_def("federated_training").execute_in_process(
        instance=demo_run.instance, asset_selection=only_registration, raise_on_error=False
    )
    assert not failed.success
    failure = next(e for e in failed.all_events if e.is_step_failure)
    message = failure.step_failure_data.user_failure_data.description
    assert unreachable in message and "checkpoint is kept" in message
    # The trained checkpoint is still on disk, and registration alone succeeds once the store is back.
    checkpoint = Path(demo_run.summary.federated["final_checkpoint"])
    assert (checkpoint / "model.safetensors").is_file()
    retried = (
        build_definitions(demo_run.resources)
        .resolve_job_def("federated_training")
        .execute_in_process(instance=demo_run.instance, asset_selection=only_registration)
    )
    assert retried.success
    again = retried.output_for_node("registered_model")
    assert int(again["version"]) == int(demo_run.summary.registered["version"]) + 1
    assert again["tags"]["dvc_md5"] == demo_run.summary.snapshot["dvc_md5"]


def test_reproduce_rebuilds_the_registered_version_bit_identically(
    demo_run: DemoRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zk0_pipelines.reproduce import reproduce_version

    monkeypatch.setenv("ZK0_ROOT", str(demo_run.workspace))
    data_before = yaml.safe_load((demo_run.workspace / "data.dvc").read_text())
    registered = demo_run.summary.registered
    report = reproduce_version(
        registered["model_name"],
        registered["version"],
        tracking_uri=demo_run.resources["mlflow"].registry().tracking_uri,
    )
    assert report.lines()[0] == "identical", "\n".join(report.lines())
    assert report.original_sha256 == report.reproduced_sha256 and report.diverged_rounds == []
    # The data was restored into the reproduction's own workspace; the user's data/ is untouched.
    assert Path(report.workspace, "project", "data", "client_a", "meta", "info.json").is_file()
    assert yaml.safe_load((demo_run.workspace / "data.dvc").read_text()) == data_before


def test_a_dp_lora_run_goes_through_the_assets_and_registers_its_epsilon(
    demo_run: DemoRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Central DP (client-side clipping) with LoRA adapters on the demo data: ε per round in MLflow, on the
    version's tags and in the model card; a target ε between rounds 2 and 3 stops the run after round 2;
    only adapters travel and the exported folder is a plain SmolVLA."""
    from mlflow import MlflowClient

    from zk0_pipelines.federated.privacy import EpsilonAccountant, PrivacySpec
    from zk0_pipelines.policy.export import load_policy_folder
    from zk0_pipelines.policy.lora import has_lora

    monkeypatch.setenv("ZK0_ROOT", str(demo_run.workspace))
    spec = PrivacySpec("central-client-clip", 2.0, CLIP, 1e-4, 0.0, len(TRAIN_IDS), len(TRAIN_IDS))
    eps = EpsilonAccountant(spec).epsilon_after
    dp = {"dp": spec.mode, "dp_noise_multiplier": 2.0, "dp_clipping_norm": CLIP, "dp_delta": 1e-4}
    config = {"num_server_rounds": 3, "local_steps": 1, "learning_rate": 1e-3, "lora_rank": 4, **dp}
    result = (
        build_definitions(demo_run.resources)
        .resolve_job_def("federated_training")
        .execute_in_process(
            instance=demo_run.instance,
            run_config={
                "ops": {"federated_model": {"config": {**config, "dp_target_epsilon": (eps(2) + eps(3)) / 2}}}
            },
        )
    )
    assert result.success
    registered = result.output_for_node("registered_model")
    client = MlflowClient(demo_run.resources["mlflow"].registry().tracking_uri)
    history = {m.step: m.value for m in client.get_metric_history(registered["run_id"], "dp_epsilon")}
    assert history == pytest.approx({1: eps(1), 2: eps(2)}, rel=1e-9)  # round 3 would exceed the target
    version = client.get_model_version(registered["model_name"], registered["version"])
    assert float(version.tags["privacy.epsilon"]) == pytest.approx(eps(2), rel=1e-9)
    assert float(version.tags["privacy.delta"]) == 1e-4
    assert "client-side fixed clipping" in version.tags["privacy.mechanism"]
    federated = result.output_for_node("federated_model")
    card = (Path(federated["final_checkpoint"]) / "README.md").read_text()
    assert f"ε = {eps(2):.4g} at δ = 0.0001" in card
    assert [r["round"] for r in federated["rounds"]] == [0, 1, 2]
    received = [c["received_update_norm"] for c in federated["clients"] if "received_update_norm" in c]
    trained = [c["client_update_norm"] for c in federated["clients"] if "client_update_norm" in c]
    assert len(received) == 2 * len(TRAIN_IDS) and max(received) <= CLIP * (1 + 1e-5)  # clipped
    assert max(trained) > CLIP  # ... by the clients' fixedclipping_mod: local training moved further
    full = demo_run.summary.federated["rounds"][1]["payload_bytes_down_per_client"]
    assert federated["rounds"][1]["payload_bytes_down_per_client"] < 0.1 * full  # adapters only
    policy, _, _ = load_policy_folder(Path(federated["final_checkpoint"]))
    assert not has_lora(policy)
