"""Federated SmolVLA fine-tuning with Flower 1.41 (Message API): apps, run config, simulation launcher.

Light to import: the names below are resolved lazily, so importing this package (e.g. from Dagster
definitions) does not import torch, lerobot or flwr.
"""

from __future__ import annotations

from zk0_pipelines._lazy import lazy_exports

_EXPORTS = {
    "FederatedResult": "launcher",
    "FederatedRunError": "launch_records",
    "run_federated": "launcher",
    "RunConfig": "run_config",
    "parse_run_config": "run_config",
    "pyproject_app_config": "run_config",
    "KEYS": "run_config",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
