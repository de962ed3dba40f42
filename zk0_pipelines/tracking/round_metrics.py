"""Per-round metrics of a federated run: flat rows from ``metrics.json`` records, best rounds, summary.

``metrics.json`` (written by the ServerApp) nests the server evaluation and the train aggregates of a round
under ``server-eval`` / ``train`` with kebab-case names; tables, plots and MLflow use the flat, snake_case
rows of :func:`flatten_round`. :func:`best_rounds` is the one rule for the best round of each eval metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

EVAL_METRICS = {"eval_loss": "eval_loss", "action_mse": "eval_action_mse"}
"""Registry metric name (``promotion.promotion_metric``) → flattened round column."""


def is_number(value: Any) -> bool:
    """A real number (Python or numpy scalar, not a bool): what is logged and plotted as a metric."""
    if isinstance(value, int | float):
        return not isinstance(value, bool)
    return isinstance(value, np.integer | np.floating) or (isinstance(value, np.ndarray) and value.ndim == 0)


def _key(name: str) -> str:
    return name.replace("-", "_")


def flatten_round(record: dict[str, Any]) -> dict[str, Any]:
    """One row per round: round, server eval (overall and per dataset), train aggregates, wire and time."""
    row: dict[str, Any] = {"round": int(record["round"])}
    for section in ("server-eval", "train"):
        for name, value in (record.get(section) or {}).items():
            if isinstance(value, (int, float)):
                row[_key(name)] = value
    for name, value in record.items():
        if name not in ("round", "server-eval", "train") and isinstance(value, (int, float)):
            row[_key(name)] = value
    return row


def flatten_client(record: dict[str, Any]) -> dict[str, Any]:
    """One row per client and round, the client named by its dataset id (the folder name)."""
    row: dict[str, Any] = {
        "round": int(record["round"]),
        "client": Path(str(record.get("dataset", record.get("partition-id", "?")))).name,
    }
    for name, value in record.items():
        if name not in ("round", "node-id", "partition-id") and isinstance(value, (int, float)):
            row[_key(name)] = value
    return row


def eval_columns_first(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with ``round``, the server-eval columns (overall, then per dataset) first, the rest after."""
    head = ["round", "eval_loss", "eval_action_mse"]
    per_dataset = sorted(k for k in row if k.startswith(("eval_loss/", "eval_action_mse/")))
    order = [k for k in head if k in row] + per_dataset
    return {**{k: row[k] for k in order}, **{k: v for k, v in row.items() if k not in order}}


def best_rounds(rows: list[dict[str, Any]]) -> dict[str, tuple[float, int] | None]:
    """``{metric: (lowest value, its round)}`` for each of :data:`EVAL_METRICS` over flattened rows.

    Lowest value wins, the earliest round on ties; None when no row has the metric.
    """
    out: dict[str, tuple[float, int] | None] = {}
    for name, column in EVAL_METRICS.items():
        found = [(r[column], int(r["round"])) for r in rows if r.get(column) is not None]
        out[name] = min(found) if found else None
    return out


def summarize_server_eval(rows: list[dict[str, Any]], selection_metric: str = "eval_loss") -> dict[str, Any]:
    """Final values and best rounds of the evaluated rounds (flattened rows with ``eval_loss``).

    ``best_round`` is chosen by ``selection_metric`` (``eval_loss`` or ``action_mse``: the registry's
    promotion metric); the best round of each metric is reported too (:func:`best_rounds`). Values a run
    did not compute are None.
    """
    if selection_metric not in EVAL_METRICS:
        raise ValueError(f"selection metric must be one of {sorted(EVAL_METRICS)}, got {selection_metric!r}")
    evaluated = [r for r in rows if r.get("eval_loss") is not None]
    if not evaluated:
        raise ValueError("no evaluated round (no eval_loss in any round)")
    out: dict[str, Any] = {"selection_metric": selection_metric}
    best = best_rounds(evaluated)
    for name, column in EVAL_METRICS.items():
        last = evaluated[-1].get(column)
        out[f"final_{name}"] = float(last) if last is not None else None
        out[f"best_{name}_round"] = best[name][1] if best[name] else None
        out[f"best_{name}"] = float(best[name][0]) if best[name] else None
    if out[f"best_{selection_metric}_round"] is None:
        raise ValueError(f"selection metric {selection_metric!r} was not computed in any evaluated round")
    out["best_round"] = out[f"best_{selection_metric}_round"]
    return out
