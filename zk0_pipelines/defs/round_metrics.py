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
