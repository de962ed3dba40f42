"""End to end: Flower simulation (private SuperLink + ``flwr run``) with 3 tiny datasets x 2 rounds.

Also: a launch SIGKILLed mid-round 2 resumes from the round-1 checkpoint to the same final weights, bit for
bit, as the uninterrupted run, and what the killed launch left running is reaped.
"""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest
import torch
from _fixtures_federated import TINY_CONFIG, make_datasets, start_launcher_subprocess, wait_until

from zk0_pipelines.federated import launch_records, task
from zk0_pipelines.federated import recorder as rec
from zk0_pipelines.federated.launcher import run_federated

LEROBOT_FILES = ("config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("federated-e2e")


@pytest.fixture(scope="module")
def datasets(base):
    return make_datasets(base / "data", 3), make_datasets(base / "data", 1, prefix="eval", seed0=10)


@pytest.fixture(scope="module")
def result(base, datasets):
    """The uninterrupted run (also the reference of the SIGKILL/resume test)."""
    train, evals = datasets
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    res = run_federated(train, evals, base / "run", dict(TINY_CONFIG), timeout_s=900)
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    leftovers += launch_records.launch_processes(res.extra["launch-id"])
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
        assert entry["num-replies"] == entry["num-accepted"] == 3 and entry["update-norm"] > 0
        assert entry["dropped"] == entry["rejected"] == [] and entry["learning-rate"] == 1e-4
        assert entry["payload-bytes-up-total"] == 3 * entry["payload-bytes-down-per-client"]
        assert entry["server-eval"]["eval-loss"] > 0
    per_client = {(c["round"], c["partition-id"]) for c in res.clients if c["phase"] == "train"}
    assert per_client == {(r, p) for r in (1, 2) for p in range(3)}
    for row in res.clients:
        assert row["dataset"] == str(train[row["partition-id"]].resolve())
        assert row["num-examples"] == 20 and row["train-loss"] > 0 and row["step-time-s"] > 0
        assert row["status"] == "accepted" and row["lr"] == 1e-4
        assert row["torch-threads"] == 1  # the launch's OMP_NUM_THREADS reached the Ray actor
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


def _round_two_started(run_dir):
    if rec.latest_checkpoint(run_dir) is None or not (run_dir / rec.METRICS_FILE).is_file():
        return False
    rounds = json.loads((run_dir / rec.METRICS_FILE).read_text())["rounds"]
    return any(r["round"] == 2 and "num-sampled" in r for r in rounds)


def test_a_run_killed_mid_round_resumes_to_the_same_weights(base, datasets, result):
    from safetensors.torch import load_file

    train, evals = datasets
    reference = result[0]
    run_dir = base / "killed"
    # client 0 stalls in round 2, so the run is certainly inside round 2 when it is killed
    proc = start_launcher_subprocess(
        train, evals, run_dir, dict(TINY_CONFIG, **{"inject-faults": "stall:0@2"})
    )
    try:
        wait_until(
            lambda: _round_two_started(run_dir), proc, 600, "round 2 to start", base / "killed.launcher.log"
        )
        assert rec.latest_checkpoint(run_dir)[0] == 1
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    (record_path,) = (run_dir / "logs").glob("launch-*.json")
    killed = json.loads(record_path.read_text())
    assert killed["status"] == "running"
    orphans = launch_records.launch_processes(killed["launch-id"])
    try:
        # the SuperLink and `flwr run` lead sessions of their own: the SIGKILL did not reach them
        assert orphans, "expected the killed launch to leave its SuperLink running"
        resumed = run_federated(train, evals, run_dir, dict(TINY_CONFIG, resume=True), timeout_s=900)
    finally:
        launch_records.kill_processes(launch_records.launch_processes(killed["launch-id"]))

    assert resumed.extra["reaped-launches"] == [killed["launch-id"]]
    assert json.loads(record_path.read_text())["status"] == "reaped"
    assert not launch_records.launch_processes(killed["launch-id"])
    assert not launch_records.launch_processes(resumed.extra["launch-id"])
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in orphans)
    assert not os.path.exists(killed["flwr-home"])

    metrics = json.loads(resumed.metrics_path.read_text())
    assert metrics["status"] == "completed" and metrics["resumed-from-round"] == 1
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2]
    assert {(c["round"], c["partition-id"]) for c in resumed.clients} == {
        (r, p) for r in (1, 2) for p in range(3)
    }
    for name in ("model.safetensors",):
        ours = load_file(resumed.final_checkpoint / name)
        theirs = load_file(reference.final_checkpoint / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), "resumed final weights differ"
    state = rec.TRAINING_STATE_DIR + "/" + rec.TRAINABLE_FILE
    ours = load_file(rec.checkpoint_dir(run_dir, 2) / state)
    theirs = load_file(rec.checkpoint_dir(reference.run_dir, 2) / state)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
