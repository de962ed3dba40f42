"""Lineage of a trained model: the Git commit, a hash of its config and the versions of the libraries."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

LINEAGE_LIBRARIES = ("torch", "lerobot", "flwr", "dagster", "mlflow", "transformers", "huggingface_hub")


def git_commit(root: Path | str) -> str:
    """The ``HEAD`` commit of the Git repo at ``root`` (``+dirty`` appended when the tree has changes).

    ``"unknown"`` when ``root`` is not a Git repo, has no commit yet, or Git is missing.
    """
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
        if head.returncode != 0:
            return "unknown"
        sha = head.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return f"{sha}+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys, compact separators)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def library_versions(names: Iterable[str] = LINEAGE_LIBRARIES) -> dict[str, str]:
    """Installed versions of the libraries that shape a model (``"not-installed"`` when absent)."""
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not-installed"
    return out
