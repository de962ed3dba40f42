"""Wire formats, FedProx term, stats serialisation and the strategy's aggregation (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from zk0_pipelines.federated import aggregate, dataset_view, wire
from zk0_pipelines.federated.polling import PollingGrid
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


def test_norm_of_a_state_difference():
    a = {"p": torch.tensor([1.0, 1.0])}
    b = {"p": torch.tensor([4.0, 5.0])}
    assert wire.l2_norm(wire.sub_state(b, a)) == pytest.approx(5.0)


def test_stats_json_round_trip_is_exact():
    stats = {
        "action": {"mean": np.array([0.1, 1 / 3]), "count": np.array([20])},
        "observation.images.top": {"std": np.full((3, 1, 1), 0.2)},
    }
    back = dataset_view.stats_from_json(dataset_view.stats_to_json(stats))
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


def test_float32_strategy_averages_weights_by_examples(request_message):
    strategy = make_strategy(parse_run_config({}), lambda *a: None, num_nodes=2)
    assert isinstance(strategy, ZkFedAvg)
    strategy._master = wire.encode_state({"p": torch.tensor([2.0])}, "float32")
    weights = [{"p": torch.tensor([1.0])}, {"p": torch.tensor([3.0])}]
    arrays, _ = strategy.aggregate_train(1, _replies(request_message, weights, [3, 1], "float32"))
    assert wire.decode_state(arrays)["p"].item() == pytest.approx(1.5)


def test_fedprox_strategy_sends_mu():
    strategy = make_strategy(
        parse_run_config({"strategy": "fedprox", "proximal-mu": 0.3, "min-available-clients": 2}),
        lambda *a: None,
        num_nodes=3,
    )
    assert strategy.proximal_mu == 0.3
    assert strategy.min_available_nodes == 2 and strategy.min_train_nodes == 2


def _random_state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (7, 5), "b": (3,), "s": (), "big": (4, 33)}
    return {k: scale * torch.randn(shape, generator=g) for k, shape in shapes.items()}


@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16"])
def test_fused_pass_is_the_weighted_mean_update_and_its_norms(wire_dtype):
    master = _random_state(0)
    updates = [_random_state(1 + i, 1e-2) for i in range(3)]
    weights = [0.2, 0.5, 0.3]
    reply_states = (
        updates if wire_dtype == "bfloat16" else [{k: master[k] + u[k] for k in u} for u in updates]
    )
    records = [wire.encode_state(r, wire_dtype) for r in reply_states]
    views = [{k: wire.array_view(k, a) for k, a in rec.items()} for rec in records]
    reference = {k: wire.array_view(k, a) for k, a in wire.encode_state(master).items()}
    shapes = {k: tuple(v.shape) for k, v in master.items()}

    outputs = []
    for block in (5, 1 << 18):  # the block size must not change a single bit
        out = aggregate.OutputState(shapes)
        result = aggregate.fused_pass(
            reference, views, weights, replies_are_updates=wire_dtype == "bfloat16", out=out, block=block
        )
        outputs.append(wire.decode_state(out.seal()))
        assert result.finite
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in master)

    sent = [wire.decode_state(rec) for rec in records]  # what the server received, as float32
    for k in master:
        got_updates = [s[k].double() - (0 if wire_dtype == "bfloat16" else master[k].double()) for s in sent]
        expected = master[k].double() + sum(w * u for w, u in zip(weights, got_updates, strict=True))
        assert torch.allclose(outputs[0][k].double(), expected, rtol=0, atol=1e-6)
        for index, u in enumerate(got_updates):
            assert result.squared_norms[index][k] == pytest.approx(float((u**2).sum()), rel=1e-4, abs=1e-12)


def test_the_aggregate_is_a_plain_numpy_array_record(request_message):
    strategy = make_strategy(parse_run_config({}), lambda *a: None, num_nodes=2)
    master = _random_state(0)
    strategy._master = wire.encode_state(master, "float32")
    arrays, _ = strategy.aggregate_train(1, _replies(request_message, [master, master], [1, 1], "float32"))
    for name, array in arrays.items():  # what numpy.save writes: Flower's own Array.numpy() reads it
        np.testing.assert_array_equal(array.numpy(), master[name].numpy())
        assert array.data == wire.encode_state({name: master[name]})[name].data


class _SlowGrid:
    """push/pull of a grid whose replies become available after ``ready_after`` pulls."""

    def __init__(self, ready_after: int) -> None:
        self.ready_after, self.pulls = ready_after, 0

    def push_messages(self, messages):
        return [f"id-{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.pulls < self.ready_after:
            return []

        class _Reply:
            def __init__(self, mid: str) -> None:
                self.metadata = type("M", (), {"reply_to_message_id": mid})()

        return [_Reply(m) for m in message_ids]


def test_polling_grid_returns_replies_as_soon_as_they_are_pulled():
    import time

    inner = _SlowGrid(ready_after=4)
    grid = PollingGrid(inner, min_interval=0.001, max_interval=0.004)
    t0 = time.monotonic()
    replies = list(grid.send_and_receive(["a", "b"], timeout=10))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["id-0", "id-1"]
    assert inner.pulls == 4 and time.monotonic() - t0 < 1.0  # Flower's HttpGrid sleeps 3 s per pull
    never = _SlowGrid(ready_after=10**9)
    t0 = time.monotonic()
    assert list(PollingGrid(never, max_interval=0.01).send_and_receive(["a"], timeout=0.1)) == []
    assert 0.1 <= time.monotonic() - t0 < 1.0
