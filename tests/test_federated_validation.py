"""Quorum, update validation, LR schedule and fault-injection parsing at the strategy level (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _fixtures_federated import FakeGrid, task_identity  # noqa: F401
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from zk0_pipelines.federated import validation, wire
from zk0_pipelines.federated.faults import faults_for, parse_faults
from zk0_pipelines.federated.run_config import parse_run_config
from zk0_pipelines.federated.strategy import QuorumFailure, make_strategy

MASTER = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([[0.5, -0.5]])}


def _clients(n: int) -> dict[int, dict]:
    return {101 + i: {"dataset": f"/data/client-{i}", "partition-id": i} for i in range(n)}


def _start(n: int, seen: list | None = None, **config):
    """A strategy over ``n`` nodes (101..), after configure_train of round 1; returns (strategy, messages)."""
    cfg = parse_run_config({"min-available-clients": min(n, 2), **config})
    observer = (lambda kind, rnd, payload: seen.append((kind, rnd, payload))) if seen is not None else None
    strategy = make_strategy(cfg, observer or (lambda *a: None), num_nodes=n, clients=_clients(n))
    messages = list(
        strategy.configure_train(1, wire.encode_state(MASTER), ConfigRecord(), FakeGrid(list(_clients(n))))
    )
    return strategy, {int(m.metadata.dst_node_id): m for m in messages}


def _reply(request: Message, record: ArrayRecord, *, examples: float = 10) -> Message:
    pid = int(request.metadata.dst_node_id) - 101
    content = RecordDict(
        {
            "arrays": record,
            "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0}),
            "client-info": ConfigRecord({"dataset": f"/data/client-{pid}", "partition-id": pid}),
        }
    )
    return Message(content, reply_to=request)


def _shifted(delta: float) -> ArrayRecord:
    return wire.encode_state({k: v + delta for k, v in MASTER.items()})


def _error(request: Message, reason: str) -> Message:
    return Message(Error(code=0, reason=reason), reply_to=request)


def test_a_failing_client_is_dropped_while_the_quorum_holds():
    seen: list = []
    strategy, requests = _start(3, seen)  # quorum = min-available-clients = 2
    replies = [
        _reply(requests[101], _shifted(1.0)),
        _reply(requests[102], _shifted(3.0)),
        _error(requests[103], "RuntimeError: client crashed"),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert torch.equal(wire.decode_state(arrays)["a"], MASTER["a"] + 2.0)
    assert metrics["train-loss"] == pytest.approx(1.0)
    summary = next(p for kind, _, p in seen if kind == "aggregate-train")
    assert summary["num-accepted"] == 2 and summary["num-dropped"] == 1 and summary["num-rejected"] == 0
    assert summary["dropped"] == [
        {
            "node-id": 103,
            "dataset": "/data/client-2",
            "partition-id": 2,
            "reason": "RuntimeError: client crashed",
        }
    ]
    rows = [p for kind, _, p in seen if kind == "client-train"]
    assert sorted((r["node-id"], r["status"]) for r in rows) == [
        (101, "accepted"),
        (102, "accepted"),
        (103, "dropped"),
    ]


def test_below_quorum_the_round_fails_naming_the_clients():
    seen: list = []
    strategy, requests = _start(3, seen, **{"min-replies": 2})
    replies = [_reply(requests[101], _shifted(1.0)), _error(requests[102], "ValueError: broken frames")]
    # node 103 never replies (timeout)
    with pytest.raises(QuorumFailure) as info:
        strategy.aggregate_train(1, replies)
    message = str(info.value)
    assert "1 of 3" in message and "quorum of 2" in message
    assert "client-1 (node 102): ValueError: broken frames" in message
    assert "client-2 (node 103): no reply within round-timeout-s" in message
    summary = next(p for kind, _, p in seen if kind == "aggregate-train")
    assert {e["node-id"] for e in summary["dropped"]} == {102, 103} and summary["metrics"] is None


def _corrupt(kind: str) -> tuple[ArrayRecord, float]:
    good = {k: v + 2.0 for k, v in MASTER.items()}
    arrays = {k: Array(v.numpy()) for k, v in good.items()}
    examples = 10.0
    if kind == "nan":
        arrays["a"] = Array(np.array([1.0, math.nan, 3.0], dtype=np.float32))
    elif kind == "inf":
        arrays["b"] = Array(np.array([[math.inf, 0.0]], dtype=np.float32))
    elif kind == "shape":
        arrays["a"] = Array(np.zeros((4,), dtype=np.float32))
    elif kind == "dtype":
        arrays["a"] = Array(good["a"].numpy().astype(np.float64))
    elif kind == "missing-key":
        del arrays["b"]
    elif kind == "extra-key":
        arrays["c"] = Array(np.zeros((1,), dtype=np.float32))
    elif kind == "weight":
        examples = 0.0
    elif kind == "outlier":
        arrays = {k: Array((v + 1e4).numpy()) for k, v in MASTER.items()}
    return ArrayRecord(arrays), examples


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("nan", "NaN/Inf values in 'a'"),
        ("inf", "NaN/Inf values in 'b'"),
        ("shape", "wrong shape for 'a'"),
        ("dtype", "wrong dtype for 'a': float64"),
        ("missing-key", "wrong key set: missing ['b']"),
        ("extra-key", "unexpected ['c']"),
        ("weight", "'num-examples' must be a positive number"),
        ("outlier", "x the median update norm of the other clients"),
    ],
)
def test_an_invalid_update_is_rejected_and_the_model_stays_finite(kind, reason):
    seen: list = []
    strategy, requests = _start(3, seen)
    record, examples = _corrupt(kind)
    replies = [
        _reply(requests[101], _shifted(1.0)),
        _reply(requests[102], _shifted(3.0)),
        _reply(requests[103], record, examples=examples),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    new = wire.decode_state(arrays)
    assert validation.all_finite(new)
    assert all(torch.equal(new[k], MASTER[k] + 2.0) for k in MASTER)  # the mean of the two valid clients
    summary = next(p for kind_, _, p in seen if kind_ == "aggregate-train")
    assert [(e["node-id"], e["dataset"]) for e in summary["rejected"]] == [(103, "/data/client-2")]
    assert reason in summary["rejected"][0]["reason"]
    row = next(p for kind_, _, p in seen if kind_ == "client-train" and p["node-id"] == 103)
    assert row["status"] == "rejected" and reason in row["reason"]


def test_rejections_count_against_the_quorum():
    strategy, requests = _start(2)  # quorum 2
    record, _ = _corrupt("nan")
    with pytest.raises(QuorumFailure, match=r"rejected: client-1 \(node 102\): non-finite update"):
        strategy.aggregate_train(1, [_reply(requests[101], _shifted(1.0)), _reply(requests[102], record)])


def test_norm_rule_needs_three_replies_and_can_be_disabled():
    norms = {0: 1.0, 1: 1.2, 2: 0.9, 3: 50.0}
    assert set(validation.norm_outliers(norms, 10.0)) == {3}
    assert validation.norm_outliers(norms, 0.0) == {}
    assert validation.norm_outliers({0: 1.0, 1: 50.0}, 10.0) == {}  # two replies: no robust median
    assert validation.norm_outliers({0: 1.0, 1: 1.0, 2: 9.9}, 10.0) == {}


def test_bfloat16_wire_expects_bfloat16_updates():
    strategy, requests = _start(2, **{"wire-dtype": "bfloat16", "min-replies": 1})
    update = {k: torch.full_like(v, 0.5) for k, v in MASTER.items()}
    replies = [
        _reply(requests[101], wire.encode_state(update, "bfloat16")),
        _reply(requests[102], wire.encode_state(update, "float32")),  # wrong wire encoding
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert torch.equal(wire.decode_state(arrays)["a"], MASTER["a"] + 0.5)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, [1e-3, 1e-3, 1e-3, 1e-3]),
        ({"lr-schedule": "cosine"}, [1e-3, 1e-3 * (1 + math.cos(math.pi / 4)) / 2, 0.5e-3, 1e-3 * 0.1464466]),
        ({"lr-schedule": "cosine", "lr-min": 1e-4}, [1e-3, None, 1e-4 + 0.9e-3 / 2, None]),
        ({"lr-schedule": "step", "lr-step-rounds": 2, "lr-step-gamma": 0.1}, [1e-3, 1e-3, 1e-4, 1e-4]),
    ],
)
def test_learning_rate_schedule(values, expected):
    cfg = parse_run_config({"learning-rate": 1e-3, "num-server-rounds": 4, **values})
    for rnd, want in enumerate(expected, start=1):
        if want is not None:
            assert cfg.learning_rate_at(rnd) == pytest.approx(want, rel=1e-6)


def test_the_scheduled_learning_rate_is_in_the_train_config():
    seen: list = []
    strategy, requests = _start(2, seen, **{"lr-schedule": "step", "learning-rate": 0.01})
    assert all(m.content["config"]["learning-rate"] == 0.01 for m in requests.values())
    strategy.round_offset = 1  # global round 2 (e.g. a resumed run)
    again = strategy.configure_train(1, wire.encode_state(MASTER), ConfigRecord(), FakeGrid([101, 102]))
    assert {m.content["config"]["learning-rate"] for m in again} == {0.005}
    assert [p["learning-rate"] for kind, _, p in seen if kind == "configure-train"] == [0.01, 0.005]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, [0.1, 0.1, 0.1, 0.1]),
        ({"mu-schedule": "linear", "mu-final": 0.4}, [0.1, 0.2, 0.3, 0.4]),
        ({"mu-schedule": "step", "mu-step-rounds": 2, "mu-step-factor": 3.0}, [0.1, 0.1, 0.3, 0.3]),
    ],
)
def test_proximal_mu_schedule(values, expected):
    cfg = parse_run_config({"strategy": "fedprox", "proximal-mu": 0.1, "num-server-rounds": 4, **values})
    assert [cfg.proximal_mu_at(r) for r in range(1, 5)] == pytest.approx(expected, rel=1e-12)
    assert parse_run_config({}).proximal_mu_at(3) == 0.0  # fedavg: no proximal term


def test_the_scheduled_proximal_mu_is_in_the_train_config():
    seen: list = []
    values = {"strategy": "fedprox", "proximal-mu": 0.2, "mu-schedule": "step", "mu-step-factor": 0.25}
    strategy, requests = _start(2, seen, **values)
    assert {m.content["config"]["proximal-mu"] for m in requests.values()} == {0.2}
    strategy.round_offset = 1  # global round 2 (e.g. a resumed run)
    again = strategy.configure_train(1, wire.encode_state(MASTER), ConfigRecord(), FakeGrid([101, 102]))
    assert {m.content["config"]["proximal-mu"] for m in again} == {0.05}  # 0.2 * 0.25 is exact
    assert [p["proximal-mu"] for kind, _, p in seen if kind == "configure-train"] == [
        0.2,
        pytest.approx(0.05),
    ]


def test_mu_schedule_keys_are_validated():
    with pytest.raises(ValueError, match="'mu-schedule'"):
        parse_run_config({"mu-schedule": "linear"})  # fedavg has no mu to schedule
    with pytest.raises(ValueError, match="'mu-schedule'"):
        parse_run_config({"strategy": "fedprox", "proximal-mu": 0.1, "mu-schedule": "cosine"})
    with pytest.raises(ValueError, match="'mu-step-factor'"):
        parse_run_config({"strategy": "fedprox", "proximal-mu": 0.1, "mu-step-factor": 0.0})


def test_learning_rate_keys_are_validated():
    with pytest.raises(ValueError, match="'lr-schedule'"):
        parse_run_config({"lr-schedule": "linear"})
    with pytest.raises(ValueError, match="'lr-min'"):
        parse_run_config({"lr-schedule": "cosine", "lr-min": 1e-4, "learning-rate": 1e-4})
    with pytest.raises(ValueError, match="'lr-step-gamma'"):
        parse_run_config({"lr-step-gamma": 1.5})


def test_fault_injection_entries():
    assert [(f.kind, f.partition_id, f.round) for f in parse_faults("raise:1@2, nan:0@*")] == [
        ("raise", 1, 2),
        ("nan", 0, None),
    ]
    assert faults_for("raise:1@2,nan:1@*", 1, 2) == {"raise", "nan"}
    assert faults_for("raise:1@2", 1, 3) == set()
    assert faults_for("raise:1@2", -1, 2) == set()  # deployment clients are never matched
    assert parse_faults("") == []
    for bad in ("explode:1@2", "raise:x@2", "raise:1@0", "raise:1"):
        with pytest.raises(ValueError, match="'inject-faults'"):
            parse_run_config({"inject-faults": bad})


@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16"])
def test_a_non_finite_global_model_never_yields_an_aggregate(wire_dtype):
    broken = {k: v.clone() for k, v in MASTER.items()}
    broken["b"][0, 1] = math.inf
    cfg = parse_run_config({"min-available-clients": 2, "wire-dtype": wire_dtype})
    strategy = make_strategy(cfg, lambda *a: None, num_nodes=2, clients=_clients(2))
    requests = {
        int(m.metadata.dst_node_id): m
        for m in strategy.configure_train(1, wire.encode_state(broken), ConfigRecord(), FakeGrid([101, 102]))
    }
    update = {k: torch.full_like(v, 0.5) for k, v in MASTER.items()}
    payload = update if wire_dtype == "bfloat16" else {k: MASTER[k] + 0.5 for k in MASTER}
    replies = [_reply(requests[n], wire.encode_state(payload, wire_dtype)) for n in (101, 102)]
    # float32 wire: every update (reply - inf) is non-finite, so both replies are rejected;
    # bfloat16 wire: the updates are fine, the sum with the broken master is caught
    expected = QuorumFailure if wire_dtype == "float32" else FloatingPointError
    with pytest.raises(expected):
        strategy.aggregate_train(1, replies)
