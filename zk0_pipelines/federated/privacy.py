"""Central differential privacy: Flower's fixed-clipping DP wrappers around our strategy, and ε accounting.

Mechanism (run-config ``dp``): each round every accepted client update ``Δ_k = w_k - w_global`` is clipped to
L2 norm ``dp-clipping-norm`` (C), the clipped updates are averaged with *uniform* weights over the ``n``
accepted replies, and Gaussian noise of standard deviation ``σ·C/n`` (σ = ``dp-noise-multiplier``) is added
to every coordinate of the average. ``central-client-clip``: clients clip (Flower's ``fixedclipping_mod``;
the clipping norm travels in the train config as ``clipping_norm``); ``central-server-clip``: the server
clips each reply on arrival. The unit of privacy is one client (one lab's whole dataset).

The wrappers subclass Flower's ``DifferentialPrivacy{Client,Server}SideFixedClipping`` (their configure
step, clipping, config key) and wrap ``ZkFedAvg``/``ZkFedProx``, so reply validation, dropped-client
records, the quorum and the fused aggregation still run. Two deliberate differences from Flower's own
``aggregate_train``: a failed client does not void the round (the inner strategy drops it and enforces the
quorum, as without DP), and the noise is calibrated to the number of *accepted* replies, not sampled ones.

ε accounting (:class:`EpsilonAccountant`) uses Google's ``dp-accounting`` RDP accountant (the backend of
Flower's own ``RdpAccountant``): one Gaussian release per round, ``GaussianDpEvent(σ)`` when every
client is sampled (add/remove-one-client neighbours), ``SampledWithoutReplacementDpEvent(N, m, …)`` when
``m`` of ``N`` clients are sampled (replace-one-client neighbours, the relation dp-accounting supports for
that sampling). ``dp-target-epsilon`` caps the number of rounds up front (:func:`rounds_within_budget`):
σ, m and N are fixed per run, so ε after ``r`` rounds is known before round 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv

MECHANISMS = {
    "central-client-clip": "central DP, Gaussian mechanism, client-side fixed clipping (Flower)",
    "central-server-clip": "central DP, Gaussian mechanism, server-side fixed clipping (Flower)",
}
ACCOUNTANT = "dp-accounting RDP"


@dataclass(frozen=True)
class PrivacySpec:
    """The DP parameters of a run: mode, σ, C, δ, ε target (0 = none), clients sampled / population."""

    mode: str
    noise_multiplier: float
    clipping_norm: float
    delta: float
    target_epsilon: float
    sample_size: int
    population: int

    @classmethod
    def from_run_config(cls, cfg, *, sample_size: int, population: int) -> PrivacySpec:
        """From a ``RunConfig`` with ``dp`` != none and the round's sample size over the connected nodes."""
        return cls(
            mode=cfg.dp,
            noise_multiplier=cfg.dp_noise_multiplier,
            clipping_norm=cfg.dp_clipping_norm,
            delta=cfg.dp_delta,
            target_epsilon=cfg.dp_target_epsilon,
            sample_size=sample_size,
            population=population,
        )


class EpsilonAccountant:
    """(ε, δ) after each round's release, from dp-accounting's RDP accountant (module doc)."""

    def __init__(self, spec: PrivacySpec) -> None:
        self.spec = spec
        self.rounds = 0

    def _event(self):
        from dp_accounting import dp_event

        gaussian = dp_event.GaussianDpEvent(self.spec.noise_multiplier)
        if self.spec.sample_size >= self.spec.population:
            return gaussian
        return dp_event.SampledWithoutReplacementDpEvent(
            self.spec.population, self.spec.sample_size, gaussian
        )

    def _relation(self):
        from dp_accounting.privacy_accountant import NeighboringRelation

        full = self.spec.sample_size >= self.spec.population
        return NeighboringRelation.ADD_OR_REMOVE_ONE if full else NeighboringRelation.REPLACE_ONE

    def epsilon_after(self, rounds: int) -> float:
        """ε at ``spec.delta`` after ``rounds`` releases (0 rounds: 0)."""
        from dp_accounting.rdp import RdpAccountant

        if rounds <= 0:
            return 0.0
        accountant = RdpAccountant(neighboring_relation=self._relation())
        accountant.compose(self._event(), rounds)
        return float(accountant.get_epsilon(self.spec.delta))

    def compose(self) -> float:
        """Record one more release; returns the cumulative ε."""
        self.rounds += 1
        return self.epsilon_after(self.rounds)


def rounds_within_budget(spec: PrivacySpec, wanted: int, start: int = 0) -> int:
    """How many of the ``wanted`` rounds after ``start`` done rounds keep ε ≤ ``target_epsilon`` (0: all)."""
    if spec.target_epsilon <= 0:
        return wanted
    accountant = EpsilonAccountant(spec)
    allowed = 0
    while allowed < wanted and accountant.epsilon_after(start + allowed + 1) <= spec.target_epsilon:
        allowed += 1
    return allowed


#: callback(kind, global round, payload): the strategy's observer
Observer = Callable[[str, int, dict[str, Any]], None]


class _ZkDpMixin:
    """Aggregation under DP over a ``_ZkStrategyMixin`` strategy (module doc)."""

    strategy: Any
    clipping_norm: float
    noise_multiplier: float

    def _setup(self, spec: PrivacySpec, observer: Observer, round_offset: int) -> None:
        self.spec = spec
        self.observer = observer
        self.round_offset = round_offset
        self.accountant = None  # Flower's built-in accountant: unused (ours is EpsilonAccountant)
        self.epsilon = EpsilonAccountant(spec)
        self.epsilon.rounds = round_offset

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any) -> Any:
        """Flower's ``start`` over the inner strategy's polling grid."""
        from zk0_pipelines.federated.strategy import polling

        return super().start(polling(grid), initial_arrays, *args, **kwargs)  # type: ignore[misc]

    def _clip_replies(self, replies: list[Message]) -> None:
        """Server-side clipping hook (no-op when clients clip)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip (server mode), aggregate + validate with the inner strategy, add noise σ·C/n, account ε."""
        replies = list(replies)
        self._clip_replies([m for m in replies if not m.has_error()])
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        accepted = int(self.strategy.last_num_accepted)
        stdv = compute_stdv(self.noise_multiplier, self.clipping_norm, accepted)
        arrays = add_noise(arrays, stdv)
        epsilon = self.epsilon.compose()
        self.observer(
            "privacy",
            self.round_offset + server_round,
            {"dp-epsilon": epsilon, "dp-delta": self.spec.delta, "dp-noise-stdv": stdv},
        )
        return arrays, metrics


def add_noise(arrays: ArrayRecord, stdv: float) -> ArrayRecord:
    """``arrays`` + i.i.d. N(0, stdv²) per coordinate (numpy's global RNG, seeded by the ServerApp)."""
    out = {}
    for name, array in arrays.items():
        values = array.numpy()
        noisy = values + np.random.normal(0.0, stdv, values.shape).astype(values.dtype)
        out[name] = Array(noisy)
    return ArrayRecord(out)


class ZkDpClientSideFixedClipping(_ZkDpMixin, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping wrapper over our strategy (clients run ``fixedclipping_mod``)."""

    def __init__(self, strategy, spec: PrivacySpec, observer: Observer, round_offset: int = 0) -> None:
        super().__init__(strategy, spec.noise_multiplier, spec.clipping_norm, spec.sample_size)
        self._setup(spec, observer, round_offset)


class ZkDpServerSideFixedClipping(_ZkDpMixin, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping wrapper over our strategy (float32 wire: replies are weights)."""

    def __init__(self, strategy, spec: PrivacySpec, observer: Observer, round_offset: int = 0) -> None:
        super().__init__(strategy, spec.noise_multiplier, spec.clipping_norm, spec.sample_size)
        self._setup(spec, observer, round_offset)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Keep the global weights the replies are clipped against (Flower's wrapper does the same)."""
        self.current_arrays = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def _clip_replies(self, replies: list[Message]) -> None:
        current = {name: array.numpy() for name, array in self.current_arrays.items()}
        for reply in replies:
            for name, record in list(reply.content.array_records.items()):
                keys = list(record.keys())
                if set(keys) != set(current):
                    continue  # malformed: the inner strategy's validation rejects and records it
                values = [record[key].numpy() for key in keys]
                reference = [current[key] for key in keys]
                pairs = zip(values, reference, strict=True)
                if any(v.shape != r.shape or v.dtype != r.dtype for v, r in pairs):
                    continue
                compute_clip_model_update(param1=values, param2=reference, clipping_norm=self.clipping_norm)
                reply.content[name] = ArrayRecord(
                    {key: Array(np.ascontiguousarray(v)) for key, v in zip(keys, values, strict=True)}
                )


def wrap_strategy(strategy, spec: PrivacySpec, observer: Observer, round_offset: int = 0):
    """The DP wrapper of ``spec.mode`` around ``strategy``."""
    if spec.mode == "central-client-clip":
        return ZkDpClientSideFixedClipping(strategy, spec, observer, round_offset)
    if spec.mode == "central-server-clip":
        return ZkDpServerSideFixedClipping(strategy, spec, observer, round_offset)
    raise ValueError(f"run config key 'dp' has no DP wrapper for {spec.mode!r}")
