"""Central DP at the strategy level (no model): clipping bounds every update, the aggregate's noise has
standard deviation σ·C/n, ε matches dp-accounting's own computation, the target ε caps the rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _fixtures_federated import FakeGrid, task_identity  # noqa: F401
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from zk0_pipelines.federated import privacy, wire
from zk0_pipelines.federated.client_app import dp_clipping_mod
from zk0_pipelines.federated.run_config import parse_run_config
from zk0_pipelines.federated.strategy import make_strategy, sample_size

SIZE = 4096
MASTER = {"a": torch.linspace(-1.0, 1.0, SIZE), "b": torch.zeros(8, 16)}
SIGMA, CLIP = 0.7, 0.5


def _update(pid: int, scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + pid)
    return {k: scale * torch.randn(v.shape, generator=gen) for k, v in MASTER.items()}


def _reply(request: Message, state: dict[str, torch.Tensor], examples: float) -> Message:
    pid = int(request.metadata.dst_node_id) - 101
    content = RecordDict(
        {
            "arrays": wire.encode_state(state),
            "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0}),
            "client-info": ConfigRecord({"dataset": f"/data/client-{pid}", "partition-id": pid}),
        }
    )
    return Message(content, reply_to=request)


def _dp_round(mode: str, n: int, seen: list, sigma: float = SIGMA, scale: float = 3.0):
    """One DP round over ``n`` clients whose updates have norm ≫ C; returns (aggregate, clipped mean)."""
    cfg = parse_run_config(
        {
            "min-available-clients": n,
            "dp": mode,
            "dp-noise-multiplier": sigma,
            "dp-clipping-norm": CLIP,
            "max-update-norm-ratio": 0.0,
        }
    )
    nodes = list(range(101, 101 + n))
    inner = make_strategy(cfg, lambda *a: seen.append(a), num_nodes=n)
    spec = privacy.PrivacySpec.from_run_config(cfg, sample_size=sample_size(cfg, n), population=n)
    strategy = privacy.wrap_strategy(inner, spec, lambda *a: seen.append(a))
    requests = list(strategy.configure_train(1, wire.encode_state(MASTER), ConfigRecord(), FakeGrid(nodes)))
    replies, clipped = [], []
    for i, request in enumerate(sorted(requests, key=lambda m: m.metadata.dst_node_id)):
        update = _update(i, scale)
        factor = min(1.0, CLIP / wire.l2_norm(update))
        clipped.append({k: v * factor for k, v in update.items()})
        sent = {k: MASTER[k] + v for k, v in update.items()}
        if mode == "central-client-clip":
            assert request.content["config"]["clipping_norm"] == CLIP
            sent = _through_client_mod(request, sent, examples=10.0 * (i + 1))
        replies.append(_reply(request, sent, examples=10.0 * (i + 1)))
    arrays, _ = strategy.aggregate_train(1, replies)
    mean = {k: MASTER[k] + sum(c[k] for c in clipped) / n for k in MASTER}  # uniform weights under DP
    return wire.decode_state(arrays), mean


def _through_client_mod(request: Message, weights: dict[str, torch.Tensor], examples: float) -> dict:
    """The client's reply as it leaves ``dp_clipping_mod`` (Flower's ``fixedclipping_mod``)."""
    request = Message(request.content, dst_node_id=1, message_type=MessageType.TRAIN)
    out = dp_clipping_mod(request, Context(1, 1, {}, {}, {}), lambda m, c: _reply(m, weights, examples))
    assert not out.has_error(), out.error
    return wire.decode_state(out.content["arrays"])


@pytest.mark.parametrize("mode", ["central-client-clip", "central-server-clip"])
def test_each_update_is_clipped_before_aggregation(mode):
    """With σ ≈ 0 the aggregate is the uniform mean of the clipped updates: every update norm ≤ C."""
    seen: list = []
    aggregate, mean = _dp_round(mode, 3, seen, sigma=1e-12)
    for key in MASTER:
        torch.testing.assert_close(aggregate[key], mean[key], atol=1e-5, rtol=0)
    rows = [p for kind, _, p in seen if kind == "client-train"]
    assert [r["status"] for r in rows] == ["accepted"] * 3


def test_the_client_mod_bounds_the_update_norm():
    cfg = parse_run_config(
        {"min-available-clients": 1, "dp": "central-client-clip", "dp-clipping-norm": CLIP}
    )
    strategy = privacy.wrap_strategy(
        make_strategy(cfg, lambda *a: None, num_nodes=1),
        privacy.PrivacySpec.from_run_config(cfg, sample_size=1, population=1),
        lambda *a: None,
    )
    (request,) = strategy.configure_train(1, wire.encode_state(MASTER), ConfigRecord(), FakeGrid([101]))
    for scale in (0.0001, 5.0):
        update = _update(0, scale)
        sent = _through_client_mod(request, {k: MASTER[k] + v for k, v in update.items()}, 1.0)
        norm = wire.l2_norm(wire.sub_state(sent, MASTER))
        assert norm <= CLIP * (1 + 1e-5)
        assert norm == pytest.approx(min(CLIP, wire.l2_norm(update)), rel=1e-4)


@pytest.mark.parametrize("mode", ["central-client-clip", "central-server-clip"])
def test_the_noise_standard_deviation_is_sigma_c_over_n(mode):
    """Pooled over seeded runs, aggregate - clipped mean ~ N(0, (σC/n)²) per coordinate."""
    n = 3
    noise = []
    for seed in range(4):
        np.random.seed(seed)
        seen: list = []
        aggregate, mean = _dp_round(mode, n, seen)
        noise += [(aggregate[k] - mean[k]).flatten().double() for k in MASTER]
        (privacy_record,) = [p for kind, _, p in seen if kind == "privacy"]
        assert privacy_record["dp-noise-stdv"] == pytest.approx(SIGMA * CLIP / n)
    samples = torch.cat(noise)
    expected = SIGMA * CLIP / n
    count = samples.numel()
    # standard errors of the sample std and mean of `count` Gaussian draws; 4 of them is a loose bound
    assert abs(samples.std().item() - expected) < 4 * expected / (2 * count) ** 0.5
    assert abs(samples.mean().item()) < 4 * expected / count**0.5


@pytest.mark.parametrize(("sample", "population"), [(3, 3), (2, 5)])
def test_epsilon_after_r_rounds_equals_dp_accounting(sample, population):
    from dp_accounting import dp_event
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    spec = privacy.PrivacySpec("central-server-clip", 1.1, 1.0, 1e-5, 0.0, sample, population)
    accountant = privacy.EpsilonAccountant(spec)
    spent = [accountant.compose() for _ in range(5)]
    assert spent == sorted(spent) and spent[0] > 0
    gaussian = dp_event.GaussianDpEvent(1.1)
    if sample == population:
        reference, event = RdpAccountant(), gaussian
    else:
        reference = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        event = dp_event.SampledWithoutReplacementDpEvent(population, sample, gaussian)
    reference.compose(event, 5)
    assert spent[-1] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)


def test_the_target_epsilon_caps_the_rounds():
    spec = privacy.PrivacySpec("central-client-clip", 1.0, 1.0, 1e-5, 0.0, 2, 2)
    eps = privacy.EpsilonAccountant(spec).epsilon_after
    target = (eps(3) + eps(4)) / 2
    capped = privacy.PrivacySpec("central-client-clip", 1.0, 1.0, 1e-5, target, 2, 2)
    assert privacy.rounds_within_budget(capped, 10) == 3
    assert privacy.rounds_within_budget(capped, 2) == 2
    assert privacy.rounds_within_budget(capped, 10, start=2) == 1
    assert privacy.rounds_within_budget(spec, 10) == 10  # no target


def test_dp_keys_are_validated():
    with pytest.raises(ValueError, match="'dp' must be one of"):
        parse_run_config({"dp": "local"})
    with pytest.raises(ValueError, match="'dp-clipping-norm' must be > 0"):
        parse_run_config({"dp": "central-server-clip", "dp-clipping-norm": 0.0})
    with pytest.raises(ValueError, match="'wire-dtype' is 'bfloat16' but dp"):
        parse_run_config({"dp": "central-client-clip", "wire-dtype": "bfloat16"})
    with pytest.raises(ValueError, match="'dp-delta' must be < 1"):
        parse_run_config({"dp": "central-client-clip", "dp-delta": 1.0})
