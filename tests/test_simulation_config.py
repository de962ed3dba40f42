"""Simulation sources in the registry, rollout statistics, the success-rate promotion rule (no GL)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from zk0_pipelines import settings
from zk0_pipelines.datasets.registry import load_registry
from zk0_pipelines.evaluation.rollout import episode_seeds, mean_interval, wilson_interval
from zk0_pipelines.tracking.promotion import decide_higher, promotion_metric


def test_sim_registry_parses_into_distinct_labs() -> None:
    registry = load_registry(settings.repo_root() / "configs" / "datasets.sim.yaml")
    assert registry.eval_ids == ["sim_lab_eval"] and len(registry.train_ids) == 3
    specs = [registry.get(i).source.simulation_spec() for i in registry.ids]
    assert len({s.fingerprint() for s in specs}) == len(specs)
    assert len({s.lab for s in specs}) == len(specs)  # non-IID: every lab differs
    assert registry.get("sim_lab_eval").source.describe() == "simulation:seed=99"


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("{kind: simulation, seed: 1, lab: {light: 9}}", "light must be in [0.2, 2.0]"),
        ("{kind: simulation, seed: 1, lab: {colour: red}}", "unexpected keyword argument 'colour'"),
        ("{kind: simulation, seed: 1, lab: {cube_half_size: 0.05}}", "the jaws open 40 mm"),
        ("{kind: simulation, seed: 1, motion: reach}", "motion do not apply to a 'simulation' source"),
        ("{kind: simulation, task: t}", "a 'simulation' source needs seed"),
    ],
)
def test_bad_simulation_sources_name_the_line(tmp_path: Path, source: str, needle: str) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(f"datasets:\n  - id: lab\n    role: train\n    source: {source}\n")
    with pytest.raises(ValueError, match=rf"{path}:4: ") as info:
        load_registry(path)
    assert needle in str(info.value)


def test_wilson_interval_and_mean_interval() -> None:
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.25 < high < 0.35  # never the degenerate [0, 0] of the normal interval
    low, high = wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and 0.65 < low < 0.75
    low, high = wilson_interval(5, 10)
    assert low < 0.5 < high and abs((0.5 - low) - (high - 0.5)) < 1e-9
    assert mean_interval([3.0]) == (3.0, 3.0, 3.0)
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and lo < 2.0 < hi
    assert not set(episode_seeds(0, 5)) & {k for k in range(1000 * 50)}  # disjoint from expert seeds


def test_higher_success_rate_rule() -> None:
    assert promotion_metric("higher_success_rate") == "success_rate"
    champion = SimpleNamespace(version="3")
    assert decide_higher("success_rate", 0.4, None, None)[0]
    assert decide_higher("success_rate", 0.0, champion, None)[0]
    assert decide_higher("success_rate", 0.6, champion, 0.5) == (
        True,
        "promoted: success_rate 0.6 > champion v3 0.5",
    )
    assert not decide_higher("success_rate", 0.5, champion, 0.5)[0]
    assert not decide_higher("success_rate", float("nan"), None, None)[0]
