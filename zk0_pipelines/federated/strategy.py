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
4. Aggregation (``aggregate`` module, not Flower's ``aggregate_arrayrecords``, which deserialises every
   reply and builds temporaries): one fused, zero-copy pass over the replies' bytes computes every
   reply's update norm (validation) and ``w_global + sum_k (n_k / n) * update_k`` in float32. ``float32``
   wire: replies carry weights (update = reply - w_global); ``bfloat16`` wire: replies carry bf16 updates,
   averaged into the server's float32 master copy (see ``wire``). Payload bytes per round are reported.
5. Proximal-mu schedule (FedProx): ``RunConfig.proximal_mu_at`` of each global round is sent as
   ``proximal-mu`` in the train ``ConfigRecord``; clients add the proximal term with that value.
6. Reply polling: ``start`` wraps Flower's grids (pull every 3 s / 0.1 s) in ``polling.PollingGrid``.
7. Under central DP (``privacy`` module wraps this strategy) replies are weighted uniformly
   (``uniform_weights``), and ``last_num_accepted`` tells the wrapper how many updates were averaged.

Accepted replies are aggregated in a fixed client order (partition id, dataset), not in arrival order or
by node id (random per launch), so float sums, and hence a resumed run, are bit-reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.superlink.grid import InMemoryGrid
from flwr.superlink.grid.http_grid import HttpGrid

from zk0_pipelines.federated import aggregate, validation, wire
from zk0_pipelines.federated.polling import PollingGrid

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


def polling(grid: Grid) -> Grid:
    """Flower's deployment / simulation grids wrapped in a ``PollingGrid``; other (test) grids as they are."""
    return PollingGrid(grid) if isinstance(grid, HttpGrid | InMemoryGrid) else grid


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
        proximal_mu_at: Callable[[int], float] | None = None,
        clients: Mapping[int, Mapping[str, Any]] | None = None,
        uniform_weights: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        aggregate.retain_freed_memory()  # this is the ServerApp process: reuse each round's buffers
        self.wire_dtype = wire_dtype
        self.observer = observer
        self.round_offset = round_offset
        self.quorum = quorum
        self.max_update_norm_ratio = max_update_norm_ratio
        self.learning_rate_at = learning_rate_at
        self.proximal_mu_at = proximal_mu_at
        self.clients = dict(clients or {})
        self.uniform_weights = uniform_weights
        self.last_num_accepted = 0
        self._master: ArrayRecord | None = None
        self._sampled: dict[str, list[int]] = {"train": [], "evaluate": []}
        self._sent: dict[str, list[Message]] = {"train": [], "evaluate": []}

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any) -> Any:
        """Flower's ``start`` over a :class:`~zk0_pipelines.federated.polling.PollingGrid`: replies are seen
        within milliseconds instead of after Flower's pull interval (deployment 3 s, simulation 0.1 s)."""
        return super().start(polling(grid), initial_arrays, *args, **kwargs)

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

    def _reply_node(self, phase: str, msg: Message) -> int:
        """The sampled node a reply answers for (deployment: the SuperLink itself signs the error reply
        of a node that stopped sending heartbeats, so its source is the SuperLink, not the node)."""
        src = int(msg.metadata.src_node_id)
        if src not in self._sampled[phase]:
            for sent in self._sent[phase]:
                if sent.metadata.message_id == msg.metadata.reply_to_message_id:
                    return int(sent.metadata.dst_node_id)
        return src

    def _dropped(self, phase: str, replies: list[Message]) -> list[dict[str, Any]]:
        """Error replies and sampled nodes that did not reply."""
        dropped = [self._entry(self._reply_node(phase, m), m.error.reason) for m in replies if m.has_error()]
        replied = {self._reply_node(phase, m) for m in replies}
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
        """Encode the global weights, tag the global round and its scheduled LR/mu, report payload size."""
        self._master = arrays
        global_round = self.round_offset + server_round
        config["global-round"] = global_round
        payload: dict[str, Any] = {}
        if self.learning_rate_at is not None:
            config["learning-rate"] = payload["learning-rate"] = float(self.learning_rate_at(global_round))
        if self.proximal_mu_at is not None and hasattr(self, "proximal_mu"):
            # FedProx.configure_train puts self.proximal_mu into the config as "proximal-mu"
            self.proximal_mu = payload["proximal-mu"] = float(self.proximal_mu_at(global_round))
        wire_arrays = self._to_wire(arrays)
        messages = list(super().configure_train(server_round, wire_arrays, config, grid))
        self._sampled["train"] = [int(m.metadata.dst_node_id) for m in messages]
        self._sent["train"] = messages
        payload.update(
            {"payload-bytes-down-per-client": wire.payload_bytes(wire_arrays), "num-sampled": len(messages)}
        )
        self.observer("configure-train", global_round, payload)
        return messages

    def _reference(self) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
        """Zero-copy flat float32 views of the global weights sent this round, and their shapes."""
        if self._master is None:
            raise RuntimeError("aggregate_train before configure_train: no global weights to check against")
        views = {name: wire.array_view(name, array) for name, array in self._master.items()}
        return views, {name: tuple(array.shape) for name, array in self._master.items()}

    def _aggregate(
        self, reference: dict[str, torch.Tensor], checks: list[validation.ReplyCheck]
    ) -> tuple[aggregate.OutputState, aggregate.PassResult]:
        """One fused pass: ``reference + sum_i w_i update_i`` over ``checks`` (in order) and their norms."""
        weights = [1.0 if self.uniform_weights else c.weight for c in checks]
        total = math.fsum(weights)
        out = aggregate.OutputState({name: tuple(self._master[name].shape) for name in reference})
        result = aggregate.fused_pass(
            reference,
            [c.views for c in checks],
            [w / total for w in weights],
            replies_are_updates=self.wire_dtype == "bfloat16",
            out=out,
        )
        return out, result

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop failed clients, validate replies, check the quorum, aggregate (see ``aggregate`` module).

        The structurally valid replies are aggregated optimistically in the same pass that computes their
        update norms; if the norms then reject one (NaN/Inf, outlier), the pass is redone over the accepted
        replies only, so the result never depends on a rejected reply.
        """
        replies = list(replies)
        global_round = self.round_offset + server_round
        dropped = self._dropped("train", replies)
        content = sorted((m for m in replies if not m.has_error()), key=_order_key)
        reference, shapes = self._reference()
        checks = [
            validation.check_reply(m.content, shapes, self.wire_dtype, self.weighted_by_key) for m in content
        ]
        candidates = [i for i, c in enumerate(checks) if c.ok]
        out, result = None, None
        if candidates:
            out, result = self._aggregate(reference, [checks[i] for i in candidates])
            for i, squared in zip(candidates, result.squared_norms, strict=True):
                checks[i] = validation.check_norms(checks[i], squared)
        reasons = {i: str(c.reason) for i, c in enumerate(checks) if not c.ok}
        norms = {i: float(c.norm) for i, c in enumerate(checks) if c.ok and c.norm is not None}
        reasons.update(validation.norm_outliers(norms, self.max_update_norm_ratio))
        accepted_idx = [i for i in range(len(content)) if i not in reasons]
        accepted = [content[i] for i in accepted_idx]
        rejected = [
            self._entry(content[i].metadata.src_node_id, r, content[i]) for i, r in sorted(reasons.items())
        ]
        for i, msg in enumerate(content):
            row = _client_row(msg)
            row.update(
                {"status": "rejected", "reason": reasons[i]} if i in reasons else {"status": "accepted"}
            )
            if checks[i].norm is not None:
                row["received-update-norm"] = float(checks[i].norm)
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
        if len(accepted) < self.quorum or not accepted:
            self.observer("aggregate-train", global_round, {**summary, "metrics": None})
            self._check_quorum("train", global_round, len(accepted), dropped, rejected)
            return None, None
        if accepted_idx != candidates:  # a reply was rejected by its norm: aggregate without it
            out, result = self._aggregate(reference, [checks[i] for i in accepted_idx])
        assert out is not None and result is not None
        arrays = out.seal()
        if not result.finite:
            raise FloatingPointError(f"train round {global_round}: the aggregated model is not finite")
        self.last_num_accepted = len(accepted)
        metrics = self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
        self.observer("aggregate-train", global_round, {**summary, "metrics": dict(metrics or {})})
        return arrays, metrics

    # -- evaluate ----------------------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Client-side evaluation of the global weights (only when fraction-evaluate > 0)."""
        config["global-round"] = self.round_offset + server_round
        messages = list(super().configure_evaluate(server_round, self._to_wire(arrays), config, grid))
        self._sampled["evaluate"] = [int(m.metadata.dst_node_id) for m in messages]
        self._sent["evaluate"] = messages
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
    """FedProx (sends each round's scheduled ``proximal-mu``; clients add the proximal term)."""


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
        "proximal_mu_at": cfg.proximal_mu_at,
        "clients": clients,
        "uniform_weights": cfg.dp != "none",
    }
    if cfg.strategy == "fedprox":
        return ZkFedProx(proximal_mu=cfg.proximal_mu, **kwargs)
    return ZkFedAvg(**kwargs)


def sample_size(cfg, num_nodes: int) -> int:
    """Clients sampled per train round (Flower's FedAvg rule with ``make_strategy``'s minimum)."""
    sample_min = min(max(cfg.quorum, cfg.min_available_clients), num_nodes)
    return min(num_nodes, max(int(num_nodes * cfg.fraction_train), sample_min))
