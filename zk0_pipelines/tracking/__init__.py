"""Lineage and publishing: DVC data snapshots, MLflow runs + registry, Hugging Face Hub releases.

Heavy libraries (mlflow, huggingface_hub, matplotlib) are imported lazily inside the functions that
need them, so importing this package is cheap.
"""

from zk0_pipelines.tracking.dvc import DvcError, DvcRepo, Snapshot, dvc_executable
from zk0_pipelines.tracking.hub_release import HubReleaseError, build_model_card, release_folder
from zk0_pipelines.tracking.lineage import config_hash, git_commit, library_versions
from zk0_pipelines.tracking.mlflow_registry import CHALLENGER, CHAMPION, ModelRegistry, ModelVersionInfo
from zk0_pipelines.tracking.mlflow_store import (
    MlflowStoreUnavailable,
    default_artifact_root,
    default_tracking_uri,
)
from zk0_pipelines.tracking.round_plots import plot_round_metrics
from zk0_pipelines.tracking.secrets import scrub

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DvcError",
    "DvcRepo",
    "HubReleaseError",
    "MlflowStoreUnavailable",
    "ModelRegistry",
    "ModelVersionInfo",
    "Snapshot",
    "build_model_card",
    "config_hash",
    "default_artifact_root",
    "default_tracking_uri",
    "dvc_executable",
    "git_commit",
    "library_versions",
    "plot_round_metrics",
    "release_folder",
    "scrub",
]
