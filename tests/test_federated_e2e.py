"""End to end: Flower simulation (private SuperLink + ``flwr run``) with 3 tiny datasets x 2 rounds."""

from __future__ import annotations

import json

import psutil
import pytest
import torch
from _fixtures_federated import TINY_CONFIG, make_datasets

from zk0_pipelines.federated import recorder as rec
from zk0_pipelines.federated import task
from zk0_pipelines.federated.launcher import run_federated

LEROBOT_FILES = ("config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    base = tmp_path_factory.mktemp("federated-e2e")
    train = make_datasets(base / "data", 3)
    evals = make_datasets(base / "data", 1, prefix="eval", seed0=10)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    res = run_federated(train, evals, base / "run", dict(TINY_CONFIG), timeout_s=900)
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    return res, train, evals, leftovers


def test_simulation_writes_checkpoints_metrics_and_final(result):
    res, train, _, leftovers = result
    assert not leftovers, f"processes left running: {[p.cmdline() for p in leftovers]}"
    metrics = json.loads(res.metrics_path.read_text())
    assert metrics["status"] == "completed"
    assert [r["round"] for r in res.rounds] == [0, 1, 2]
    for entry in res.rounds[1:]:
        folder = rec.checkpoint_dir(res.run_dir, entry["round"])
        assert all((folder / rec.PRETRAINED_DIR / name).is_file() for name in LEROBOT_FILES)
        state_dir = folder / rec.TRAINING_STATE_DIR
        info = json.loads((state_dir / rec.ROUND_FILE).read_text())
        assert info["round"] == entry["round"] and info["run-config"]["strategy"] == "fedavg"
        assert (state_dir / rec.TRAINABLE_FILE).is_file() and (state_dir / "rng_state.safetensors").is_file()
        assert entry["num-replies"] == 3 and entry["update-norm"] > 0
        assert entry["payload-bytes-up-total"] == 3 * entry["payload-bytes-down-per-client"]
        assert entry["server-eval"]["eval-loss"] > 0
    per_client = {(c["round"], c["partition-id"]) for c in res.clients if c["phase"] == "train"}
    assert per_client == {(r, p) for r in (1, 2) for p in range(3)}
    for row in res.clients:
        assert row["dataset"] == str(train[row["partition-id"]].resolve())
        assert row["num-examples"] == 20 and row["train-loss"] > 0 and row["step-time-s"] > 0
    assert all((res.final_checkpoint / name).is_file() for name in LEROBOT_FILES)
    assert res.config["num-server-rounds"] == 2
    assert (res.run_dir / "logs" / "flwr-run.log").stat().st_size > 0


def test_final_model_reproduces_the_server_eval(result):
    from zk0_pipelines.policy import load_policy_folder

    res, _, evals, _ = result
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        policy, pre, _ = load_policy_folder(res.final_checkpoint)
        dataset = task.open_dataset(evals[0], policy)
        cfg = res.config
        first = task.evaluate_loss(policy, pre, dataset, batch_size=cfg["batch-size"], seed=cfg["seed"])
        second = task.evaluate_loss(policy, pre, dataset, batch_size=cfg["batch-size"], seed=cfg["seed"])
    finally:
        torch.set_num_threads(threads)
    assert first == second
    assert first[0] == pytest.approx(res.rounds[-1]["server-eval"]["eval-loss"], rel=1e-5)
