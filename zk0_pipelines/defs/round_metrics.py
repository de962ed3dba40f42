"""Flatten the federated run's metrics.json records into flat, snake_case rows for tables and MLflow."""

from pathlib import Path
from typing import Any


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


EVAL_METRICS = {"eval_loss": "eval_loss", "action_mse": "eval_action_mse"}
"""Registry metric name (``mlflow_registry.promotion_metric``) → flattened round column."""


def eval_columns_first(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with ``round``, the server-eval columns (overall, then per dataset) first, the rest after."""
    head = ["round", "eval_loss", "eval_action_mse"]
    per_dataset = sorted(k for k in row if k.startswith(("eval_loss/", "eval_action_mse/")))
    order = [k for k in head if k in row] + per_dataset
    return {**{k: row[k] for k in order}, **{k: v for k, v in row.items() if k not in order}}


def summarize_server_eval(rows: list[dict[str, Any]], selection_metric: str = "eval_loss") -> dict[str, Any]:
    """Final values and best rounds of the evaluated rounds (flattened rows with ``eval_loss``).

    ``best_round`` is chosen by ``selection_metric`` (``eval_loss`` or ``action_mse``: the registry's
    promotion metric); the best round of each metric is reported too. Lowest value wins, the earliest
    round on ties. Values a run did not compute are None.
    """
    if selection_metric not in EVAL_METRICS:
        raise ValueError(f"selection metric must be one of {sorted(EVAL_METRICS)}, got {selection_metric!r}")
    evaluated = [r for r in rows if r.get("eval_loss") is not None]
    if not evaluated:
        raise ValueError("no evaluated round (no eval_loss in any round)")
    out: dict[str, Any] = {"selection_metric": selection_metric}
    for name, column in EVAL_METRICS.items():
        found = [(float(r[column]), int(r["round"])) for r in evaluated if r.get(column) is not None]
        best = min(found) if found else None
        out[f"final_{name}"] = float(evaluated[-1][column]) if evaluated[-1].get(column) is not None else None
        out[f"best_{name}_round"] = best[1] if best else None
        out[f"best_{name}"] = best[0] if best else None
    if out[f"best_{selection_metric}_round"] is None:
        raise ValueError(f"selection metric {selection_metric!r} was not computed in any evaluated round")
    out["best_round"] = out[f"best_{selection_metric}_round"]
    return out
