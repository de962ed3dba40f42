"""Flower's FedAvg / FedProx with three additions the pipeline needs.

1. Per-client records: every reply's metrics (and the client's dataset) are handed to a callback before
   Flower aggregates them (Flower's ``Result`` keeps only the weighted averages).
2. Strictness: a client that fails makes the round fail with its error (Flower would log it and carry on
   with fewer clients, which hides a broken dataset or a fingerprint mismatch).
3. Wire dtype: ``float32`` uses Flower's own weighted averaging of the returned weights; ``bfloat16``
   sends bf16 weights down and averages the clients' bf16 *updates* into the server's float32 master copy
   (see ``wire``). Payload bytes per round are reported to the callback either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from zk0_pipelines.federated import wire

INFO_KEY = "client-info"

#: callback(kind, server_round, payload dict)
Observer = Callable[[str, int, dict[str, Any]], None]


class ClientFailure(RuntimeError):
    """A client replied with an error; the message names the node and carries the client's error text."""


def _raise_on_errors(kind: str, server_round: int, replies: list[Message]) -> None:
    failed = [m for m in replies if m.has_error()]
    if failed:
        details = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed)
        raise ClientFailure(f"{len(failed)} client(s) failed in {kind} round {server_round}: {details}")


def _client_row(msg: Message) -> dict[str, Any]:
    content = msg.content
    row: dict[str, Any] = {"node-id": int(msg.metadata.src_node_id)}
    if INFO_KEY in content:
        row.update(dict(content[INFO_KEY]))
    for record in content.metric_records.values():
        row.update(dict(record))
    return row


class _ZkStrategyMixin:
    """Mixin over Flower's FedAvg/FedProx (see module doc)."""

    def __init__(self, *, wire_dtype: str, observer: Observer, round_offset: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.wire_dtype = wire_dtype
        self.observer = observer
        self.round_offset = round_offset
        self._master: ArrayRecord | None = None

    def _to_wire(self, arrays: ArrayRecord) -> ArrayRecord:
        if self.wire_dtype == "float32":
            return arrays
        return wire.encode_state(wire.decode_state(arrays), self.wire_dtype)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Encode the global weights for the wire, tag the global round, report payload size."""
        self._master = arrays
        config["global-round"] = self.round_offset + server_round
        wire_arrays = self._to_wire(arrays)
        messages = list(super().configure_train(server_round, wire_arrays, config, grid))
        self.observer(
            "configure-train",
            self.round_offset + server_round,
            {"payload-bytes-down-per-client": wire.payload_bytes(wire_arrays), "num-sampled": len(messages)},
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fail on client errors, record per-client metrics, aggregate (Flower FedAvg or bf16 updates)."""
        replies = list(replies)
        global_round = self.round_offset + server_round
        _raise_on_errors("train", global_round, replies)
        up = sum(wire.payload_bytes(rec) for m in replies for rec in m.content.array_records.values())
        for msg in replies:
            self.observer("client-train", global_round, _client_row(msg))
        if self.wire_dtype == "float32":
            arrays, metrics = super().aggregate_train(server_round, replies)
        else:
            arrays, metrics = self._aggregate_updates(replies)
        self.observer(
            "aggregate-train",
            global_round,
            {"payload-bytes-up-total": up, "num-replies": len(replies), "metrics": dict(metrics or {})},
        )
        return arrays, metrics

    def _aggregate_updates(self, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid or self._master is None:
            return None, None
        contents = [m.content for m in valid]
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        updates = [wire.decode_state(next(iter(c.array_records.values()))) for c in contents]
        mean_update = wire.weighted_mean(updates, weights)
        master = wire.decode_state(self._master)
        new_state = {k: master[k] + mean_update[k] for k in master}
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return wire.encode_state(new_state, "float32"), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Client-side evaluation of the global weights (only when fraction-evaluate > 0)."""
        config["global-round"] = self.round_offset + server_round
        return super().configure_evaluate(server_round, self._to_wire(arrays), config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Fail on client errors, record per-client eval metrics, then Flower's weighted mean."""
        replies = list(replies)
        global_round = self.round_offset + server_round
        _raise_on_errors("evaluate", global_round, replies)
        for msg in replies:
            self.observer("client-evaluate", global_round, _client_row(msg))
        return super().aggregate_evaluate(server_round, replies)


class ZkFedAvg(_ZkStrategyMixin, FedAvg):
    """FedAvg weighted by ``num-examples`` (client dataset frames), with the mixin's additions."""


class ZkFedProx(_ZkStrategyMixin, FedProx):
    """FedProx (sends ``proximal-mu``; clients add the proximal term), with the mixin's additions."""


def make_strategy(cfg, observer: Observer, *, num_nodes: int, round_offset: int = 0) -> FedAvg:
    """FedAvg or FedProx from a ``RunConfig`` (quorum = ``min-available-clients``)."""
    quorum = cfg.min_available_clients
    kwargs: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": min(quorum, num_nodes) if cfg.fraction_train > 0 else 0,
        "min_evaluate_nodes": min(quorum, num_nodes) if cfg.fraction_evaluate > 0 else 0,
        "min_available_nodes": quorum,
        "weighted_by_key": "num-examples",
        "wire_dtype": cfg.wire_dtype,
        "observer": observer,
        "round_offset": round_offset,
    }
    if cfg.strategy == "fedprox":
        return ZkFedProx(proximal_mu=cfg.proximal_mu, **kwargs)
    return ZkFedAvg(**kwargs)
