"""Flower's FedAvg / FedProx with the additions the pipeline needs.

1. Per-client records: every reply's metrics (and the client's dataset) are handed to a callback before
   Flower aggregates them (Flower's ``Result`` keeps only the weighted averages).
2. Quorum: a client that fails (error reply, or no reply within ``round-timeout-s``) is dropped from the
   round; a reply that fails validation (``validation`` module: NaN/Inf, shape, dtype, key set, update-norm
   outlier) is rejected. The round is aggregated over the accepted replies as long as at least ``quorum``
   of them remain; otherwise ``QuorumFailure`` names the dropped and rejected clients (dataset, node id,
   reason) and the run fails. Dropped and rejected clients are recorded per round.
3. Server schedule: the learning rate of each global round (``RunConfig.learning_rate_at``) is computed
   here and sent in the train ``ConfigRecord`` as ``learning-rate``; clients train with that value.
4. Wire dtype: ``float32`` uses Flower's own weighted averaging of the returned weights; ``bfloat16``
   sends bf16 weights down and averages the clients' bf16 *updates* into the server's float32 master copy
   (see ``wire``). Payload bytes per round are reported to the callback either way.

Accepted replies are aggregated in a fixed client order (partition id, dataset), not in arrival order or
by node id (random per launch), so float sums, and hence a resumed run, are bit-reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from zk0_pipelines.federated import validation, wire

INFO_KEY = "client-info"

#: callback(kind, server_round, payload dict)
Observer = Callable[[str, int, dict[str, Any]], None]


class ClientFailure(RuntimeError):
    """A client replied with an error; the message names the node and carries the client's error text."""


class QuorumFailure(ClientFailure):
    """Too few accepted replies in a round; the message names the dropped/rejected clients."""


def _client_row(msg: Message) -> dict[str, Any]:
    content = msg.content
    row: dict[str, Any] = {"node-id": int(msg.metadata.src_node_id)}
    if INFO_KEY in content:
        row.update(dict(content[INFO_KEY]))
    for record in content.metric_records.values():
        row.update(dict(record))
    return row


def _order_key(msg: Message) -> tuple[int, str, int]:
    info = msg.content.get(INFO_KEY, {})
    return (int(info.get("partition-id", -1)), str(info.get("dataset", "")), int(msg.metadata.src_node_id))


def describe(entry: Mapping[str, Any]) -> str:
    """``<dataset name> (node <id>): <reason>`` for a dropped/rejected client record."""
    dataset = entry.get("dataset")
    name = Path(str(dataset)).name if dataset else "unknown dataset"
    return f"{name} (node {entry['node-id']}): {entry['reason']}"


class _ZkStrategyMixin:
    """Mixin over Flower's FedAvg/FedProx (see module doc)."""

    def __init__(
        self,
        *,
        wire_dtype: str,
        observer: Observer,
        round_offset: int = 0,
        quorum: int = 1,
        max_update_norm_ratio: float = 0.0,
        learning_rate_at: Callable[[int], float] | None = None,
        clients: Mapping[int, Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.wire_dtype = wire_dtype
        self.observer = observer
        self.round_offset = round_offset
        self.quorum = quorum
        self.max_update_norm_ratio = max_update_norm_ratio
        self.learning_rate_at = learning_rate_at
        self.clients = dict(clients or {})
        self._master: ArrayRecord | None = None
        self._sampled: dict[str, list[int]] = {"train": [], "evaluate": []}

    def _to_wire(self, arrays: ArrayRecord) -> ArrayRecord:
        if self.wire_dtype == "float32":
            return arrays
        return wire.encode_state(wire.decode_state(arrays), self.wire_dtype)

    def _entry(self, node_id: int, reason: str, msg: Message | None = None) -> dict[str, Any]:
        known = dict(self.clients.get(node_id, {}))
        if msg is not None and not msg.has_error() and INFO_KEY in msg.content:
            info = msg.content[INFO_KEY]
            known.update({k: info[k] for k in ("dataset", "partition-id") if k in info})
        return {
            "node-id": int(node_id),
            "dataset": known.get("dataset"),
            "partition-id": known.get("partition-id"),
            "reason": reason,
        }

    def _dropped(self, phase: str, replies: list[Message]) -> list[dict[str, Any]]:
        """Error replies and sampled nodes that did not reply."""
        dropped = [self._entry(m.metadata.src_node_id, m.error.reason) for m in replies if m.has_error()]
        replied = {int(m.metadata.src_node_id) for m in replies}
        dropped += [
            self._entry(node, "no reply within round-timeout-s")
            for node in self._sampled[phase]
            if node not in replied
        ]
        return dropped

    def _check_quorum(
        self, phase: str, global_round: int, accepted: int, dropped: list[dict], rejected: list[dict]
    ) -> None:
        if accepted >= self.quorum:
            return
        parts = [f"dropped: {'; '.join(map(describe, dropped))}"] if dropped else []
        parts += [f"rejected: {'; '.join(map(describe, rejected))}"] if rejected else []
        raise QuorumFailure(
            f"{phase} round {global_round}: {accepted} of {len(self._sampled[phase])} sampled client(s) "
            f"accepted, below the quorum of {self.quorum} (min-replies / min-available-clients); "
            + " | ".join(parts or ["no replies"])
        )

    # -- train -------------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Encode the global weights, tag the global round and its scheduled LR, report payload size."""
        self._master = arrays
        global_round = self.round_offset + server_round
        config["global-round"] = global_round
        payload: dict[str, Any] = {}
        if self.learning_rate_at is not None:
            config["learning-rate"] = payload["learning-rate"] = float(self.learning_rate_at(global_round))
        wire_arrays = self._to_wire(arrays)
        messages = list(super().configure_train(server_round, wire_arrays, config, grid))
        self._sampled["train"] = [int(m.metadata.dst_node_id) for m in messages]
        payload.update(
            {"payload-bytes-down-per-client": wire.payload_bytes(wire_arrays), "num-sampled": len(messages)}
        )
        self.observer("configure-train", global_round, payload)
        return messages

    def _validate(self, replies: list[Message]) -> dict[int, str]:
        """Rejection reasons of content replies, by index in ``replies`` (``validation`` module)."""
        if self._master is None:
            raise RuntimeError("aggregate_train before configure_train: no global weights to check against")
        reference = wire.decode_state(self._master)
        checks = {
            i: validation.check_reply(m.content, reference, self.wire_dtype, self.weighted_by_key)
            for i, m in enumerate(replies)
        }
        reasons = {i: str(c.reason) for i, c in checks.items() if not c.ok}
        norms = {i: c.norm for i, c in checks.items() if c.ok and c.norm is not None}
        reasons.update(validation.norm_outliers(norms, self.max_update_norm_ratio))
        return reasons

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop failed clients, validate replies, check the quorum, aggregate (Flower FedAvg or bf16)."""
        replies = list(replies)
        global_round = self.round_offset + server_round
        dropped = self._dropped("train", replies)
        content = [m for m in replies if not m.has_error()]
        reasons = self._validate(content)
        accepted = [m for i, m in enumerate(content) if i not in reasons]
        rejected = [self._entry(content[i].metadata.src_node_id, r, content[i]) for i, r in reasons.items()]
        for i, msg in enumerate(content):
            row = _client_row(msg)
            row.update(
                {"status": "rejected", "reason": reasons[i]} if i in reasons else {"status": "accepted"}
            )
            self.observer("client-train", global_round, row)
        for entry in dropped:
            self.observer("client-train", global_round, {**entry, "status": "dropped"})
        up = sum(wire.payload_bytes(rec) for m in content for rec in m.content.array_records.values())
        summary = {
            "payload-bytes-up-total": up,
            "num-replies": len(content),
            "num-accepted": len(accepted),
            "num-dropped": len(dropped),
            "num-rejected": len(rejected),
            "dropped": dropped,
            "rejected": rejected,
        }
        if len(accepted) < self.quorum:
            self.observer("aggregate-train", global_round, {**summary, "metrics": None})
            self._check_quorum("train", global_round, len(accepted), dropped, rejected)
        accepted.sort(key=_order_key)
        if self.wire_dtype == "float32":
            arrays, metrics = super().aggregate_train(server_round, accepted)
        else:
            arrays, metrics = self._aggregate_updates(accepted)
        if arrays is not None and not validation.all_finite({k: a.numpy() for k, a in arrays.items()}):
            raise FloatingPointError(f"train round {global_round}: the aggregated model is not finite")
        self.observer("aggregate-train", global_round, {**summary, "metrics": dict(metrics or {})})
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

    # -- evaluate ----------------------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Client-side evaluation of the global weights (only when fraction-evaluate > 0)."""
        config["global-round"] = self.round_offset + server_round
        messages = list(super().configure_evaluate(server_round, self._to_wire(arrays), config, grid))
        self._sampled["evaluate"] = [int(m.metadata.dst_node_id) for m in messages]
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Drop failed clients (quorum as in training), record per-client eval metrics, weighted mean."""
        replies = list(replies)
        global_round = self.round_offset + server_round
        dropped = self._dropped("evaluate", replies)
        content = sorted((m for m in replies if not m.has_error()), key=_order_key)
        for msg in content:
            self.observer("client-evaluate", global_round, _client_row(msg))
        if dropped:
            self.observer("evaluate-dropped", global_round, {"evaluate-dropped": dropped})
        if self._sampled["evaluate"]:
            self._check_quorum("evaluate", global_round, len(content), dropped, [])
        return super().aggregate_evaluate(server_round, content)


class ZkFedAvg(_ZkStrategyMixin, FedAvg):
    """FedAvg weighted by ``num-examples`` (client dataset frames), with the mixin's additions."""


class ZkFedProx(_ZkStrategyMixin, FedProx):
    """FedProx (sends ``proximal-mu``; clients add the proximal term), with the mixin's additions."""


def make_strategy(
    cfg,
    observer: Observer,
    *,
    num_nodes: int,
    round_offset: int = 0,
    clients: Mapping[int, Mapping[str, Any]] | None = None,
) -> FedAvg:
    """FedAvg or FedProx from a ``RunConfig``.

    ``min-available-clients`` nodes must be connected; each round samples at least ``quorum`` of them and
    needs ``quorum`` accepted replies. ``clients`` maps node id -> ``{"dataset", "partition-id"}`` (from the
    query round) so failures can be named.
    """
    quorum = cfg.quorum
    sample_min = min(max(quorum, cfg.min_available_clients), num_nodes)
    kwargs: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": sample_min if cfg.fraction_train > 0 else 0,
        "min_evaluate_nodes": sample_min if cfg.fraction_evaluate > 0 else 0,
        "min_available_nodes": cfg.min_available_clients,
        "weighted_by_key": "num-examples",
        "wire_dtype": cfg.wire_dtype,
        "observer": observer,
        "round_offset": round_offset,
        "quorum": quorum,
        "max_update_norm_ratio": cfg.max_update_norm_ratio,
        "learning_rate_at": cfg.learning_rate_at,
        "clients": clients,
    }
    if cfg.strategy == "fedprox":
        return ZkFedProx(proximal_mu=cfg.proximal_mu, **kwargs)
    return ZkFedAvg(**kwargs)
