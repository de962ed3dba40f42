"""Dagster resources: typed, configurable, each with a real and an offline implementation.

The offline implementations are what the embedded default and the tests use; production swaps them in
``zk0_pipelines.definitions`` without touching any asset.
"""

import os
from pathlib import Path
from typing import Any

import dagster as dg

from zk0_pipelines import settings
from zk0_pipelines.datasets.discovery import (
    DiscoveredDataset,
    record_discovered,
    scan_drop_folder,
    search_hub,
)
from zk0_pipelines.datasets.registry import DatasetRegistry, load_registry
from zk0_pipelines.policy.factory import PolicySpec
from zk0_pipelines.tracking.dvc import DvcRepo
from zk0_pipelines.tracking.hub_release import release_folder
from zk0_pipelines.tracking.mlflow_registry import ModelRegistry
from zk0_pipelines.tracking.mlflow_store import default_tracking_uri


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else settings.repo_root() / p


class DatasetRegistryResource(dg.ConfigurableResource):
    """The YAML registry of client (train) and held-out (eval) datasets, plus what the sensors discovered.

    Entries of ``registry_path`` win over discovered entries with the same id.
    """

    registry_path: str = "configs/datasets.demo.yaml"
    discovered_path: str = ".zk0/discovered_datasets.yaml"

    def load(self) -> DatasetRegistry:
        """Parse and validate the registry file and the discovered-datasets file."""
        registry = load_registry(_resolve(self.registry_path))
        discovered_file = _resolve(self.discovered_path)
        if not discovered_file.is_file():
            return registry
        known = set(registry.ids)
        extra = [e for e in load_registry(discovered_file).entries if e.id not in known]
        return DatasetRegistry(entries=[*registry.entries, *extra], path=registry.path)

    def record(self, datasets: list[DiscoveredDataset]) -> None:
        """Persist newly discovered datasets so every later run resolves their partitions."""
        record_discovered(_resolve(self.discovered_path), datasets)


class DatasetDiscoveryResource(dg.ConfigurableResource):
    """Where new SO-100/SO-101 datasets appear: a local drop folder and (optionally) a Hub search.

    Offline default: the drop folder only. ``hub_search`` (e.g. ``"so100"``) turns the Hub source on.
    """

    drop_folder: str | None = ".zk0/drop"
    settle_seconds: float = 10.0
    hub_search: str | None = None
    hub_tags: list[str] = ["LeRobot"]
    allow: list[str] = []
    deny: list[str] = []
    min_episodes: int = 1

    def discover(self) -> list[DiscoveredDataset]:
        """Every complete SO-100/SO-101 dataset the configured sources see now."""
        found: list[DiscoveredDataset] = []
        if self.drop_folder:
            found += scan_drop_folder(
                _resolve(self.drop_folder), settle_seconds=self.settle_seconds, min_episodes=self.min_episodes
            )
        if self.hub_search:
            found += search_hub(
                search=self.hub_search,
                tags=self.hub_tags,
                allow=self.allow,
                deny=self.deny,
                min_episodes=self.min_episodes,
            )
        return found


class TrainingTriggerResource(dg.ConfigurableResource):
    """Knobs of the automatic training triggers (sensor and nightly schedule)."""

    nightly_force: bool = False


class DvcResource(dg.ConfigurableResource):
    """DVC, called as a CLI from its own tool environment, pinning ``data/``."""

    remote_url: str | None = None

    def repo(self) -> DvcRepo:
        """The DVC repository at the project root, initialised with its default remote if needed."""
        repo = DvcRepo(settings.repo_root())
        repo.ensure_initialized(self.remote_url)
        return repo


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking + model registry. Default: sqlite store and artifacts under ``.zk0/mlflow``."""

    tracking_uri: str | None = None
    experiment: str = "zk0-federated"
    model_name: str = "zk0-smolvla-so100"
    promote_rule: str = "lower_eval_loss"

    def registry(self) -> ModelRegistry:
        """A client bound to the configured store."""
        return ModelRegistry(self.tracking_uri or default_tracking_uri(), experiment=self.experiment)


class PolicyResource(dg.ConfigurableResource):
    """Where SmolVLA comes from: a tiny offline build, or ``lerobot/smolvla_base`` at a pinned revision."""

    source: str = "tiny"
    pretrained_path: str = "lerobot/smolvla_base"
    revision: str | None = None

    def spec(self, *, seed: int, chunk_size: int) -> PolicySpec:
        """The policy spec every client and the server build the same model from."""
        return PolicySpec(
            source=self.source,  # type: ignore[arg-type]
            pretrained_path=self.pretrained_path,
            revision=self.revision,
            chunk_size=chunk_size,
            n_action_steps=chunk_size,
            seed=seed,
        )


class HubPublisherResource(dg.ConfigurableResource):
    """Publishes a lerobot-loadable folder to the Hugging Face Hub.

    The base implementation is the offline one: a dry run that only reports the folder.
    """

    repo_id: str | None = None

    def publish(self, folder: Path, tag: str) -> dict[str, Any]:
        """Dry run: nothing leaves the machine."""
        return release_folder(folder, self.repo_id, token=None, tag=tag, dry_run=True)


class HfHubPublisherResource(HubPublisherResource):
    """Real push: ``create_repo`` + ``upload_folder`` + a revision tag, with the token from ``HF_TOKEN``.

    Without a token or repo it falls back to a dry run. The token is read at call time and never stored
    in config, logs or metadata.
    """

    token_env_var: str = "HF_TOKEN"
    endpoint: str | None = None

    def publish(self, folder: Path, tag: str) -> dict[str, Any]:
        """Push the folder (or dry-run it when no token/repo is configured)."""
        token = os.environ.get(self.token_env_var) or None
        # dry_run=None: release_folder decides (no token/repo, or HF_HUB_OFFLINE → dry run).
        return release_folder(
            folder, self.repo_id, token=token, tag=tag, dry_run=None, endpoint=self.endpoint
        )
