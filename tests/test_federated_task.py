"""Client/server logic on the tiny SmolVLA: payload keys, seeded evaluation, FedProx, an in-process run."""

from __future__ import annotations

import json

import pytest
import torch
from _fixtures_federated import TINY_CONFIG, InProcessGrid, make_datasets, one_torch_thread  # noqa: F401

from zk0_pipelines.federated import dataset_view, task, wire
from zk0_pipelines.federated import recorder as rec
from zk0_pipelines.federated.run_config import parse_run_config


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("federated-task")
    return {"train": make_datasets(base, 2), "eval": make_datasets(base, 1, prefix="eval", seed0=10)}


@pytest.fixture(scope="module")
def client(roots):
    from zk0_pipelines.federated.runtime import get_client_runtime

    spec = parse_run_config({"chunk-size": 10}).policy_spec()
    runtime = get_client_runtime(roots["train"][0], spec)
    stats = dataset_view.normalized_stats(runtime.meta.stats)
    pre, _ = runtime.processors(dataset_view.stats_to_json(stats))
    return runtime, pre


def test_payload_is_exactly_the_trainable_parameters(client):
    from zk0_pipelines.policy import trainable_state

    runtime, _ = client
    record = wire.encode_state(trainable_state(runtime.policy), "float32")
    trainable = {n for n, p in runtime.policy.named_parameters() if p.requires_grad}
    frozen = {n for n, p in runtime.policy.named_parameters() if not p.requires_grad}
    assert set(record) == trainable
    assert frozen and not (set(record) & frozen)
    numel = sum(p.numel() for p in runtime.policy.parameters() if p.requires_grad)
    assert 4 * numel < wire.payload_bytes(record) < 4 * numel + 256 * len(trainable)


def test_server_and_client_builds_share_frozen_weights(client):
    from zk0_pipelines.policy import build_policy, frozen_fingerprint

    runtime, _ = client
    spec = parse_run_config({"chunk-size": 10}).policy_spec()
    server_policy = build_policy(
        spec, task.PolicyMeta(features=json.loads(json.dumps(runtime.meta.features)))
    )
    assert frozen_fingerprint(server_policy) == runtime.fingerprint
    other = build_policy(parse_run_config({"chunk-size": 10, "seed": 1}).policy_spec(), runtime.meta)
    with pytest.raises(ValueError, match="frozen weights"):
        task.check_fingerprint(runtime.fingerprint, frozen_fingerprint(other), where="client x")


def test_same_weights_give_the_same_eval_loss(client):
    runtime, pre = client
    kwargs = {"batch_size": 4, "max_batches": 3}
    rng_before = torch.get_rng_state()
    first = task.evaluate_loss(runtime.policy, pre, runtime.dataset, seed=0, **kwargs)
    torch.rand(5)  # the caller's RNG moving must not matter
    second = task.evaluate_loss(runtime.policy, pre, runtime.dataset, seed=0, **kwargs)
    assert first == second
    assert first[1] == 12
    assert task.evaluate_loss(runtime.policy, pre, runtime.dataset, seed=1, **kwargs)[0] != first[0]
    torch.set_rng_state(rng_before)
    task.evaluate_loss(runtime.policy, pre, runtime.dataset, seed=0, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng_before)  # evaluation leaves the global RNG alone


def test_local_training_metrics_and_proximal_term(client):
    from zk0_pipelines.policy import load_trainable_state, trainable_state

    runtime, pre = client
    start = trainable_state(runtime.policy)
    kwargs = {"batch_size": 2, "learning_rate": 1e-3, "seed": 3}
    one = task.train_local(runtime.policy, pre, runtime.dataset, steps=1, **kwargs)
    drift_after_one_step = wire.l2_norm(wire.sub_state(trainable_state(runtime.policy), start))
    load_trainable_state(runtime.policy, start)
    mu = 5.0
    prox = task.train_local(runtime.policy, pre, runtime.dataset, steps=2, proximal_mu=mu, **kwargs)
    load_trainable_state(runtime.policy, start)

    metrics = one.to_metrics()
    assert set(metrics) >= {"train-loss", "grad-norm", "proximal-term", "num-examples", "step-time-s"}
    assert metrics["num-examples"] == len(runtime.dataset) == 20
    assert one.proximal_term == 0.0 and one.client_update_norm == pytest.approx(drift_after_one_step)
    # same seed => same first step; the term is 0 at step 1 and (mu/2)*||w1 - w0||^2 at step 2
    expected = (0.0 + mu / 2 * drift_after_one_step**2) / 2
    assert prox.proximal_term == pytest.approx(expected, rel=1e-4)
    assert prox.proximal_term > 0


def test_in_process_federation_fedprox_bfloat16(roots, tmp_path):
    from zk0_pipelines.federated.client_app import app as client_app
    from zk0_pipelines.federated.server_app import run_server
    from zk0_pipelines.policy import load_policy_folder

    values = dict(
        TINY_CONFIG,
        **{
            "strategy": "fedprox",
            "proximal-mu": 0.1,
            "wire-dtype": "bfloat16",
            "train-datasets": ",".join(map(str, roots["train"])),
            "eval-datasets": ",".join(map(str, roots["eval"])),
            "output-dir": str(tmp_path / "out"),
        },
    )
    cfg = parse_run_config(values)
    grid = InProcessGrid(client_app, [{"partition-id": 0}, {"partition-id": 1}], cfg.to_dict())
    run_server(grid, cfg, tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / rec.METRICS_FILE).read_text())

    assert metrics["status"] == "completed"
    assert grid.sent == {"query": 2, "train": 4}
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    for entry in metrics["rounds"][1:]:
        assert entry["train"]["proximal-term"] > 0
        assert entry["update-norm"] > 0
        state_dir = rec.checkpoint_dir(tmp_path / "out", entry["round"]) / rec.TRAINING_STATE_DIR
        assert json.loads((state_dir / rec.ROUND_FILE).read_text())["strategy"] == "fedprox"
    bf16_bytes = metrics["rounds"][1]["payload-bytes-down-per-client"]
    assert bf16_bytes == metrics["policy"]["payload-bytes-float32"] // 2
    assert {(c["round"], c["partition-id"]) for c in metrics["clients"]} == {(1, 0), (1, 1), (2, 0), (2, 1)}
    assert metrics["norm-stats"]["stats"]["action"]["count"] == [40.0]  # 2 clients x 20 frames

    policy, pre, _ = load_policy_folder(tmp_path / "out" / rec.FINAL_DIR)
    evaluator_ds = task.open_dataset(roots["eval"][0], policy)
    loss, _ = task.evaluate_loss(policy, pre, evaluator_ds, batch_size=cfg.batch_size, seed=cfg.seed)
    assert loss == pytest.approx(metrics["rounds"][-1]["server-eval"]["eval-loss"], rel=1e-5)


def test_bad_client_dataset_fails_the_run_with_its_name(roots, tmp_path):
    from zk0_pipelines.federated.client_app import app as client_app
    from zk0_pipelines.federated.server_app import run_server
    from zk0_pipelines.federated.strategy import ClientFailure

    missing = tmp_path / "no-such-dataset"
    values = dict(
        TINY_CONFIG,
        **{"train-datasets": f"{roots['train'][0]},{missing}", "output-dir": str(tmp_path / "out")},
    )
    cfg = parse_run_config(values)
    grid = InProcessGrid(client_app, [{"partition-id": 0}, {"partition-id": 1}], cfg.to_dict())
    with pytest.raises(ClientFailure, match="no-such-dataset"):
        run_server(grid, cfg, tmp_path / "out")
    assert json.loads((tmp_path / "out" / rec.METRICS_FILE).read_text())["status"] == "failed"


def _in_process_run(roots, out, **changes):
    from zk0_pipelines.federated.client_app import app as client_app
    from zk0_pipelines.federated.server_app import run_server

    values = dict(
        TINY_CONFIG,
        **{
            "train-datasets": ",".join(map(str, roots["train"])),
            "eval-datasets": ",".join(map(str, roots["eval"])),
            "output-dir": str(out),
            **changes,
        },
    )
    cfg = parse_run_config(values)
    grid = InProcessGrid(client_app, [{"partition-id": 0}, {"partition-id": 1}], cfg.to_dict())
    run_server(grid, cfg, out)
    return json.loads((out / rec.METRICS_FILE).read_text()), grid


def test_resume_continues_from_the_last_checkpoint(roots, tmp_path):
    straight, straight_grid = _in_process_run(roots, tmp_path / "straight", **{"fraction-evaluate": 1.0})
    assert straight_grid.sent == {"query": 2, "train": 4, "evaluate": 4}  # client-side eval too
    client_evals = [c for c in straight["clients"] if c["phase"] == "evaluate"]
    assert len(client_evals) == 4 and all(c["eval-loss"] > 0 for c in client_evals)
    _in_process_run(roots, tmp_path / "resumed", **{"num-server-rounds": 1})
    resumed, grid = _in_process_run(roots, tmp_path / "resumed", **{"resume": True})

    assert grid.sent == {"query": 2, "train": 2}  # only round 2 was trained again
    assert resumed["resumed-from-round"] == 1
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2]
    assert {(c["round"], c["partition-id"]) for c in resumed["clients"]} == {(1, 0), (1, 1), (2, 0), (2, 1)}
    # same seeds per global round and the float32 master restored: the resumed round 2 equals the straight one
    assert (
        resumed["rounds"][2]["server-eval"]["eval-loss"] == straight["rounds"][2]["server-eval"]["eval-loss"]
    )
    assert rec.latest_checkpoint(tmp_path / "resumed")[0] == 2


FAULTY = {
    "min-replies": 1,
    "lr-schedule": "cosine",
    "learning-rate": 1e-3,
    "strategy": "fedprox",
    "proximal-mu": 0.01,
    "mu-schedule": "step",
    "mu-step-factor": 4.0,  # mu 0.01 in round 1, 0.04 in round 2
    "inject-faults": "nan:0@1,raise:1@2",  # round 1: client 0 sends NaN; round 2: client 1 crashes
}


@pytest.fixture(scope="module")
def faulty_run(roots, tmp_path_factory):
    """Two clients, quorum 1, injected faults, cosine LR, stepped FedProx mu; the clients' own run config
    says lr 0.5 and mu 0.5."""
    from zk0_pipelines.federated.client_app import app as client_app
    from zk0_pipelines.federated.server_app import run_server

    out = tmp_path_factory.mktemp("faulty") / "out"
    values = dict(
        TINY_CONFIG,
        **FAULTY,
        **{
            "train-datasets": ",".join(map(str, roots["train"])),
            "eval-datasets": ",".join(map(str, roots["eval"])),
            "output-dir": str(out),
        },
    )
    cfg = parse_run_config(values)
    # must be ignored: the server's scheduled LR and mu win
    client_config = dict(cfg.to_dict(), **{"learning-rate": 0.5, "proximal-mu": 0.5})
    grid = InProcessGrid(client_app, [{"partition-id": 0}, {"partition-id": 1}], client_config)
    run_server(grid, cfg, out)
    return cfg, out, json.loads((out / rec.METRICS_FILE).read_text())


def test_a_crashing_client_is_dropped_and_the_run_completes(faulty_run, roots):
    _, _, metrics = faulty_run
    assert metrics["status"] == "completed"
    second = metrics["rounds"][2]
    assert second["num-accepted"] == 1 and second["num-dropped"] == 1 and second["num-rejected"] == 0
    (dropped,) = second["dropped"]
    assert dropped["partition-id"] == 1 and dropped["node-id"] == 101
    assert dropped["dataset"] == str(roots["train"][1]) and "InjectedFault" in dropped["reason"]
    statuses = {(c["round"], c["partition-id"]): c["status"] for c in metrics["clients"]}
    assert statuses == {(1, 0): "rejected", (1, 1): "accepted", (2, 0): "accepted", (2, 1): "dropped"}


def test_a_nan_update_is_rejected_and_the_global_model_stays_finite(faulty_run):
    from safetensors.torch import load_file

    _, out, metrics = faulty_run
    first = metrics["rounds"][1]
    assert first["num-accepted"] == 1 and first["num-rejected"] == 1
    (rejected,) = first["rejected"]
    assert rejected["partition-id"] == 0 and rejected["node-id"] == 100
    assert "NaN/Inf" in rejected["reason"]
    for entry in metrics["rounds"][1:]:
        assert 0 < entry["update-norm"] < float("inf")
        assert entry["server-eval"]["eval-loss"] < float("inf")
        state = load_file(
            rec.checkpoint_dir(out, entry["round"]) / rec.TRAINING_STATE_DIR / rec.TRAINABLE_FILE
        )
        assert all(bool(torch.isfinite(t).all()) for t in state.values())
    final = load_file(out / rec.FINAL_DIR / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in final.values())


def test_the_scheduled_learning_rate_reaches_the_clients(faulty_run):
    cfg, _, metrics = faulty_run
    expected = {r: cfg.learning_rate_at(r) for r in (1, 2)}
    assert expected[1] == 1e-3 and expected[2] == pytest.approx(0.5e-3)  # cosine over 2 rounds
    assert {r["round"]: r["learning-rate"] for r in metrics["rounds"][1:]} == expected
    trained = [c for c in metrics["clients"] if c["status"] != "dropped"]
    assert len(trained) == 3
    for row in trained:  # the rate the client's optimizer stepped with
        assert row["lr"] == pytest.approx(expected[row["round"]], rel=1e-12)


def test_the_scheduled_proximal_mu_reaches_the_clients(faulty_run):
    cfg, _, metrics = faulty_run
    expected = {r: cfg.proximal_mu_at(r) for r in (1, 2)}
    assert expected == {1: 0.01, 2: pytest.approx(0.04)}
    assert {r["round"]: r["proximal-mu"] for r in metrics["rounds"][1:]} == expected
    trained = [c for c in metrics["clients"] if c["status"] != "dropped"]
    assert len(trained) == 3
    for row in trained:  # the mu the client's proximal term was computed with
        assert row["proximal-mu"] == pytest.approx(expected[row["round"]], rel=1e-12)
        assert row["proximal-term"] > 0  # w moved away from the global weights after the first step


def test_below_the_quorum_the_run_fails_naming_the_clients(roots, tmp_path):
    from zk0_pipelines.federated.client_app import app as client_app
    from zk0_pipelines.federated.server_app import run_server
    from zk0_pipelines.federated.strategy import QuorumFailure

    values = dict(
        TINY_CONFIG,
        **{
            "inject-faults": "raise:1@1",
            "train-datasets": ",".join(map(str, roots["train"])),
            "output-dir": str(tmp_path / "out"),
        },
    )
    cfg = parse_run_config(values)  # quorum = min-available-clients = 2
    grid = InProcessGrid(client_app, [{"partition-id": 0}, {"partition-id": 1}], cfg.to_dict())
    name = roots["train"][1].name
    with pytest.raises(QuorumFailure, match=rf"{name} \(node 101\): InjectedFault"):
        run_server(grid, cfg, tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / rec.METRICS_FILE).read_text())
    assert metrics["status"] == "failed" and f"{name} (node 101)" in metrics["error"]
    assert metrics["rounds"][1]["dropped"][0]["partition-id"] == 1
    assert rec.latest_checkpoint(tmp_path / "out") is None
