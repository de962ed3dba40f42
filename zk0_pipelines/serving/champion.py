"""Which folder to serve: the model version holding an alias (``champion``) in the MLflow registry.

The folder is the release written by ``hub_release`` (``.zk0/releases/<name>-v<version>``) when it exists,
otherwise the version's registered artifacts, downloaded once to ``.zk0/serving/<name>-v<version>``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from zk0_pipelines import settings
from zk0_pipelines.policy.export import CONFIG_FILE, WEIGHTS_FILE
from zk0_pipelines.tracking.mlflow_registry import CHAMPION, ModelRegistry


class NoServableModel(LookupError):
    """The registry has no version under the requested alias, or its folder is not a policy folder."""


@dataclass(frozen=True)
class ServedModel:
    """A registered version and the local lerobot folder it is served from."""

    name: str
    version: str
    alias: str
    folder: Path
    origin: str  # "release" or "registry"

    def label(self) -> str:
        """``<name> v<version> (<alias>)`` for logs and metadata."""
        return f"{self.name} v{self.version} ({self.alias})"


def release_folder_of(name: str, version: str) -> Path:
    """Where ``hub_release`` writes the folder of ``name`` v``version``."""
    return settings.state_dir() / "releases" / f"{name}-v{version}"


def _is_policy_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def resolve_served_model(
    registry: ModelRegistry, model_name: str, alias: str = CHAMPION, cache_dir: Path | None = None
) -> ServedModel:
    """Resolve ``model_name@alias`` through the registry to a local lerobot folder (see module doc).

    Raises:
        NoServableModel: no version holds the alias, or its folder lacks config.json/model.safetensors.
    """
    from mlflow.exceptions import MlflowException

    try:
        mv = registry.client.get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise  # the store itself failed: not a missing alias
        raise NoServableModel(
            f"registry {registry.tracking_uri}: model {model_name!r} has no version with alias {alias!r}"
        ) from exc
    version = str(mv.version)
    release = release_folder_of(model_name, version)
    if _is_policy_folder(release):
        return ServedModel(model_name, version, alias, release.resolve(), "release")
    target = (cache_dir or settings.state_dir() / "serving") / f"{model_name}-v{version}"
    if not _is_policy_folder(target):
        if target.exists():
            shutil.rmtree(target)  # an interrupted download of our own
        staging = target.with_name(target.name + ".partial")
        if staging.exists():
            shutil.rmtree(staging)
        downloaded = registry.download_version(model_name, version, staging)
        downloaded.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    if not _is_policy_folder(target):
        raise NoServableModel(
            f"{model_name} v{version} ({alias}): registered folder {mv.source} has no {CONFIG_FILE} "
            f"and {WEIGHTS_FILE}"
        )
    return ServedModel(model_name, version, alias, target.resolve(), "registry")
