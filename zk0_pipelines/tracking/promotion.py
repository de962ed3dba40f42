"""The promotion rule: when a newly registered version becomes ``champion``, and the reason recorded.

Pure functions over the candidate's metrics and the current champion (an MLflow ``ModelVersion`` or
anything with ``version`` and ``tags``); :class:`~zk0_pipelines.tracking.mlflow_registry.ModelRegistry`
applies them under the promotion lock.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from typing import Any, Literal

#: Version tag naming the held-out datasets its eval metrics were computed on (set by the lineage).
EVAL_SET_TAG = "datasets.eval"
EVAL_LOSS_TAG = "eval_loss"
ACTION_MSE_TAG = "action_mse"
SUCCESS_RATE_TAG = "success_rate"
PromoteRule = Literal["lower_eval_loss", "lower_action_mse", "higher_success_rate", "always", "never"]
PROMOTE_RULES: tuple[str, ...] = typing.get_args(PromoteRule)
#: the metric each rule compares (``always``/``never`` report the eval loss); the success rate comes from
#: the simulator rollouts, after registration (``ModelRegistry.decide_on_success_rate``)
RULE_METRIC = {
    "lower_eval_loss": EVAL_LOSS_TAG,
    "lower_action_mse": ACTION_MSE_TAG,
    "higher_success_rate": SUCCESS_RATE_TAG,
}


def promotion_metric(rule: str) -> str:
    """The metric a promotion rule compares: ``action_mse``, ``success_rate`` or (default) ``eval_loss``."""
    if rule not in PROMOTE_RULES:
        raise ValueError(f"promote_rule must be one of {'|'.join(PROMOTE_RULES)}, got {rule!r}")
    return RULE_METRIC.get(rule, EVAL_LOSS_TAG)


def tag_float(value: str | None) -> float | None:
    """A finite float read from a version tag, else None (absent, ``"none"``, NaN, not a number)."""
    if value is None:
        return None
    try:
        out = float(value)
    except ValueError:
        return None
    return out if math.isfinite(out) else None


def champion_metrics(current: Any) -> dict[str, float | None]:
    """The champion's recorded eval loss and action MSE (None without a champion or a usable tag)."""
    return {
        key: tag_float(current.tags.get(key)) if current is not None else None
        for key in (EVAL_LOSS_TAG, ACTION_MSE_TAG)
    }


def decide_registration(
    rule: str,
    new: Mapping[str, float | None],
    current: Any,
    champ: Mapping[str, float | None],
    version_tags: Mapping[str, str],
) -> tuple[bool, str]:
    """``(promoted, decision)`` for a new version with metrics ``new`` against the champion ``current``.

    ``higher_success_rate`` waits for the rollouts; a champion evaluated on other held-out datasets is not
    compared (:func:`other_eval_set`); otherwise :func:`decide_lower` on the rule's metric.
    """
    metric = promotion_metric(rule)
    if rule == "higher_success_rate":
        return False, "kept as challenger until rollout_evaluation compares success rates"
    if rule in ("lower_eval_loss", "lower_action_mse") and (other := other_eval_set(current, version_tags)):
        return False, other
    return decide_lower(rule, metric, new[metric], current, champ[metric])


def decide_higher(metric: str, value: float, current: Any, champ_value: float | None) -> tuple[bool, str]:
    """Promotion decision where a higher ``metric`` wins (the rollout success rate)."""
    if not math.isfinite(value):
        return False, f"kept as challenger: {metric} is {value!r}"
    if current is None:
        return True, f"promoted: no champion yet ({metric}={value:.6g})"
    if champ_value is None:
        return True, f"promoted: champion v{current.version} has no recorded {metric} ({metric}={value:.6g})"
    if value > champ_value:
        return True, f"promoted: {metric} {value:.6g} > champion v{current.version} {champ_value:.6g}"
    return False, f"kept as challenger: {metric} {value:.6g} <= champion v{current.version} {champ_value:.6g}"


def other_eval_set(current: Any, version_tags: Mapping[str, str]) -> str | None:
    """Why the champion cannot be compared (it was evaluated on other held-out datasets), or None.

    A metric of another eval set says nothing about which model is better; ``always``/``never`` rules and
    versions without a recorded eval set are not affected.
    """
    if current is None:
        return None
    mine, theirs = version_tags.get(EVAL_SET_TAG), (current.tags or {}).get(EVAL_SET_TAG)
    if not mine or not theirs or mine == theirs:
        return None
    return (
        f"kept as challenger: champion v{current.version} was evaluated on {theirs!r}, this version on "
        f"{mine!r}; their metrics are not comparable (promote by hand after review)"
    )


def decide_lower(
    rule: str, metric: str, value: float | None, current: Any, champ_value: float | None
) -> tuple[bool, str]:
    """Promotion decision for ``rule`` where a lower ``metric`` (``eval_loss``/``action_mse``) wins."""
    if rule == "always":
        return True, "promoted: rule=always"
    if rule == "never":
        return False, "kept as challenger: rule=never"
    if value is None or not math.isfinite(value):
        return False, f"kept as challenger: {metric} is {value!r}"
    if current is None:
        return True, f"promoted: no champion yet ({metric}={value:.6g})"
    if champ_value is None:
        return True, f"promoted: champion v{current.version} has no recorded {metric} ({metric}={value:.6g})"
    if value < champ_value:
        return True, f"promoted: {metric} {value:.6g} < champion v{current.version} {champ_value:.6g}"
    return (
        False,
        f"kept as challenger: {metric} {value:.6g} >= champion v{current.version} {champ_value:.6g}",
    )
