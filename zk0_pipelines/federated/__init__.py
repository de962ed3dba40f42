"""Federated SmolVLA fine-tuning with Flower 1.41 (Message API): apps, run config, simulation launcher.

Light to import: the names below are resolved lazily, so importing this package (e.g. from Dagster
definitions) does not import torch, lerobot or flwr.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FederatedResult": "launcher",
    "FederatedRunError": "launcher",
    "run_federated": "launcher",
    "RunConfig": "run_config",
    "parse_run_config": "run_config",
    "pyproject_app_config": "run_config",
    "KEYS": "run_config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
