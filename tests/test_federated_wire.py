"""Wire formats, FedProx term, stats serialisation and the strategy's aggregation (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from zk0_pipelines.federated import wire
from zk0_pipelines.federated.run_config import parse_run_config
from zk0_pipelines.federated.strategy import ZkFedAvg, make_strategy


def test_proximal_term_on_known_weights():
    w = {
        "a": torch.tensor([1.0, 2.0], requires_grad=True),
        "b": torch.tensor([[0.0, 1.0]], requires_grad=True),
    }
    g = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[0.0, -1.0]])}
    term = wire.proximal_term(w, g, mu=0.5)
    # ||w - g||^2 = 1 + 4 + 0 + 4 = 9 ; (mu / 2) * 9 = 2.25
    assert term.item() == pytest.approx(2.25)
    term.backward()
    assert torch.allclose(w["a"].grad, 0.5 * (w["a"] - g["a"]).detach())
    assert torch.allclose(w["b"].grad, torch.tensor([[0.0, 1.0]]))
    assert wire.proximal_term(w, {k: v.detach() for k, v in w.items()}, mu=3.0).item() == 0.0
    with pytest.raises(ValueError, match="differ"):
        wire.proximal_term(w, {"a": g["a"]}, mu=1.0)


def test_float32_wire_is_exact_and_bfloat16_halves_the_bytes():
    gen = torch.Generator().manual_seed(0)
    state = {"x.weight": torch.randn(64, 32, generator=gen), "x.bias": torch.randn(32, generator=gen)}
    f32 = wire.encode_state(state, "float32")
    assert set(f32) == set(state)
    back = wire.decode_state(f32)
    assert all(torch.equal(back[k], state[k]) for k in state)
    bf16 = wire.encode_state(state, "bfloat16")
    raw = sum(t.numel() for t in state.values())
    assert wire.payload_bytes(bf16) == 2 * raw
    assert wire.payload_bytes(f32) > 4 * raw  # npy headers
    approx = wire.decode_state(bf16)
    assert all(approx[k].dtype == torch.float32 and approx[k].shape == state[k].shape for k in state)
    assert all(torch.allclose(approx[k], state[k], rtol=1e-2, atol=1e-2) for k in state)
    with pytest.raises(ValueError, match="wire dtype"):
        wire.encode_state(state, "int8")


def test_weighted_mean_and_norms():
    a = {"p": torch.tensor([1.0, 1.0])}
    b = {"p": torch.tensor([4.0, 5.0])}
    mean = wire.weighted_mean([a, b], [1.0, 2.0])
    assert torch.allclose(mean["p"], torch.tensor([3.0, 11.0 / 3.0]))
    assert wire.l2_norm(wire.sub_state(b, a)) == pytest.approx(5.0)


def test_stats_json_round_trip_is_exact():
    stats = {
        "action": {"mean": np.array([0.1, 1 / 3]), "count": np.array([20])},
        "observation.images.top": {"std": np.full((3, 1, 1), 0.2)},
    }
    back = wire.stats_from_json(wire.stats_to_json(stats))
    assert set(back) == set(stats)
    for feature, values in stats.items():
        for name, value in values.items():
            np.testing.assert_array_equal(back[feature][name], value)
            assert back[feature][name].shape == value.shape


def _replies(request: Message, updates: list[dict], weights: list[int], dtype: str) -> list[Message]:
    return [
        Message(
            RecordDict(
                {
                    "arrays": wire.encode_state(u, dtype),
                    "metrics": MetricRecord({"num-examples": w, "train-loss": float(i)}),
                    "client-info": ConfigRecord({"dataset": f"/d/{i}", "partition-id": i}),
                }
            ),
            reply_to=request,
        )
        for i, (u, w) in enumerate(zip(updates, weights, strict=True))
    ]


@pytest.fixture()
def request_message():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    return Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=7, message_type="train")


def test_bfloat16_strategy_adds_weighted_mean_update_to_float32_master(request_message):
    seen: list[tuple[str, int, dict]] = []
    cfg = parse_run_config({"wire-dtype": "bfloat16"})
    strategy = make_strategy(cfg, lambda kind, rnd, payload: seen.append((kind, rnd, payload)), num_nodes=2)
    master = {"p": torch.tensor([1000.0, -2.0, 0.5])}
    strategy._master = wire.encode_state(master, "float32")
    updates = [{"p": torch.tensor([0.5, 0.25, 0.0])}, {"p": torch.tensor([-0.25, 0.5, 1.0])}]
    arrays, metrics = strategy.aggregate_train(1, _replies(request_message, updates, [1, 3], "bfloat16"))
    new = wire.decode_state(arrays)["p"]
    # weights 1:3 -> mean update [-0.0625, 0.4375, 0.75]; 1000 - 0.0625 does not exist in bf16, but the
    # float32 master keeps the small update
    assert torch.equal(new, torch.tensor([1000.0 - 0.0625, -2.0 + 0.4375, 0.5 + 0.75]))
    assert metrics["train-loss"] == pytest.approx(0.75)
    clients = [p for kind, _, p in seen if kind == "client-train"]
    assert [c["dataset"] for c in clients] == ["/d/0", "/d/1"]
    assert [c["num-examples"] for c in clients] == [1, 3]


def test_float32_strategy_uses_flower_fedavg(request_message):
    strategy = make_strategy(parse_run_config({}), lambda *a: None, num_nodes=2)
    assert isinstance(strategy, ZkFedAvg)
    strategy._master = wire.encode_state({"p": torch.tensor([2.0])}, "float32")
    weights = [{"p": torch.tensor([1.0])}, {"p": torch.tensor([3.0])}]
    arrays, _ = strategy.aggregate_train(1, _replies(request_message, weights, [3, 1], "float32"))
    assert wire.decode_state(arrays)["p"].item() == pytest.approx(1.5)


def test_fedprox_strategy_sends_mu():
    strategy = make_strategy(
        parse_run_config({"strategy": "fedprox", "proximal-mu": 0.3}), lambda *a: None, num_nodes=3
    )
    assert strategy.proximal_mu == 0.3
    assert strategy.min_available_nodes == 2 and strategy.min_train_nodes == 2
