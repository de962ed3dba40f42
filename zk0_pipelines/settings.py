"""Paths and process environment shared by every stage.

Everything the pipeline writes lives inside the checkout, under gitignored folders:

- ``data/``          validated LeRobot datasets, one folder per dataset id, pinned by ``data.dvc``
- ``.zk0/``          runtime state: staging, quarantine, caches, MLflow store, DVC remote, run outputs
- ``dagster_home/``  Dagster instance (its yaml is committed, its storage is not)
"""

from __future__ import annotations

import os
from pathlib import Path

from zk0_pipelines import env_settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_root() -> Path:
    """Return the project root (overridable with ``ZK0_ROOT`` for tests and reproduction workspaces)."""
    return Path(env_settings.ROOT.text() or REPO_ROOT).resolve()


def state_dir() -> Path:
    """Runtime state folder (gitignored)."""
    return repo_root() / ".zk0"


def data_dir() -> Path:
    """The DVC-tracked folder of validated datasets."""
    return repo_root() / "data"


def staging_dir() -> Path:
    """Where datasets are fetched before validation."""
    return state_dir() / "staging"


def quarantine_dir() -> Path:
    """Where datasets that failed validation are kept, with their report."""
    return state_dir() / "quarantine"


def cache_dir() -> Path:
    """Caches: the tiny offline VLM, Hugging Face cache."""
    return state_dir() / "cache"


def runs_dir() -> Path:
    """Outputs of federated runs (checkpoints, metrics)."""
    return state_dir() / "runs"


def configure_local_env() -> None:
    """Point every library's scratch and cache folders inside the checkout.

    Only sets variables that the user has not set, so a production deployment keeps its own.
    """
    root = state_dir()
    defaults = {
        "HF_HOME": root / "cache" / "huggingface",
        "HF_LEROBOT_HOME": root / "cache" / "lerobot",
        "RAY_TMPDIR": root / "ray",
        "FLWR_HOME": root / "flwr",
        "MPLCONFIGDIR": root / "cache" / "matplotlib",
    }
    for key, path in defaults.items():
        if key not in os.environ:
            Path(path).mkdir(parents=True, exist_ok=True)
            os.environ[key] = str(path)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # else every flwr process posts a usage event
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
