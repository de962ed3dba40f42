"""Discovery of new SO-100/SO-101 LeRobot datasets: a local drop folder and a Hugging Face Hub search.

Both sources return :class:`DiscoveredDataset` records; a record's ``fingerprint`` changes when the
dataset changes (new files in the drop folder, a new commit on the Hub), so a sensor can key its cursor
and run keys on it. Discovered datasets are written to a registry file of their own
(``.zk0/discovered_datasets.yaml``) that the pipeline reads beside the user's registry: nobody edits a
file by hand for a new dataset to be trained on.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zk0_pipelines.datasets.cameras import CameraMappingError, resolve_cameras
from zk0_pipelines.datasets.registry import DatasetEntry, DatasetSource, slugify
from zk0_pipelines.datasets.so100 import is_so100_family


@dataclass(frozen=True)
class DiscoveredDataset:
    """A dataset found by a discovery source, ready to become a registry entry."""

    dataset_id: str
    source: dict[str, Any]
    fingerprint: str
    role: str = "train"
    cameras: dict[str, str] | None = None

    def entry(self) -> DatasetEntry:
        """The registry entry for this dataset."""
        return DatasetEntry(
            id=self.dataset_id, role=self.role, source=DatasetSource(**self.source), cameras=self.cameras
        )


def discovered_cameras(info: dict[str, Any]) -> dict[str, str] | None:
    """The camera map the automatic rule chooses for a discovered dataset (written into its entry).

    None when the cameras already carry the policy's names or cannot be mapped (the ingest then
    quarantines the dataset with a report saying how to map them).
    """
    try:
        cameras = resolve_cameras(info.get("features") or {})
    except CameraMappingError:
        return None
    return None if cameras.is_identity else cameras.rename


def _info(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def scan_drop_folder(
    folder: Path, *, settle_seconds: float = 10.0, min_episodes: int = 1, now: float | None = None
) -> list[DiscoveredDataset]:
    """LeRobot datasets copied into ``folder`` that look complete.

    A sub-folder counts once ``meta/info.json`` parses, names an SO-100/SO-101 robot, declares at least
    ``min_episodes`` episodes, and no file under it changed in the last ``settle_seconds`` (a copy still
    in progress is left for a later tick).
    """
    now = time.time() if now is None else now
    found: list[DiscoveredDataset] = []
    if not folder.is_dir():
        return found
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        info = _info(child / "meta" / "info.json")
        if info is None or not is_so100_family(info.get("robot_type")):
            continue
        if int(info.get("total_episodes") or 0) < min_episodes:
            continue
        files = [p for p in child.rglob("*") if p.is_file()]
        newest = max(p.stat().st_mtime for p in files)
        if now - newest < settle_seconds:
            continue
        listing = sorted(
            (p.relative_to(child).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files
        )
        fingerprint = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
        found.append(
            DiscoveredDataset(
                dataset_id=slugify(f"drop-{child.name}"),
                source={"kind": "local", "path": str(child.resolve())},
                fingerprint=fingerprint,
                cameras=discovered_cameras(info),
            )
        )
    return found


def search_hub(
    *,
    search: str = "so100",
    tags: Iterable[str] = ("LeRobot",),
    allow: Iterable[str] = (),
    deny: Iterable[str] = (),
    min_episodes: int = 1,
    limit: int = 50,
    api: Any = None,
) -> list[DiscoveredDataset]:
    """LeRobot datasets on the Hub for SO-100/SO-101 arms, pinned at the commit seen now.

    Candidates come from ``HfApi.list_datasets(search=..., filter=tags)``; each one's ``meta/info.json``
    is read at that exact commit and must name an SO-100/SO-101 robot with at least ``min_episodes``.
    ``allow`` (if given) and ``deny`` are lists of repo ids.
    """
    from huggingface_hub import HfApi, hf_hub_download

    api = api or HfApi()
    allow, deny = set(allow), set(deny)
    found: list[DiscoveredDataset] = []
    for ds in api.list_datasets(search=search, filter=list(tags), limit=limit):
        repo_id, sha = ds.id, ds.sha
        if (allow and repo_id not in allow) or repo_id in deny:
            continue
        if not sha:
            sha = api.dataset_info(repo_id).sha
        info_path = hf_hub_download(repo_id, "meta/info.json", repo_type="dataset", revision=sha)
        info = _info(Path(info_path))
        if info is None or not is_so100_family(info.get("robot_type")):
            continue
        if int(info.get("total_episodes") or 0) < min_episodes:
            continue
        found.append(
            DiscoveredDataset(
                dataset_id=slugify(repo_id.replace("/", "-")),
                source={"kind": "hub", "repo_id": repo_id, "revision": sha},
                fingerprint=sha[:16],
                cameras=discovered_cameras(info),
            )
        )
    return found


def read_discovered(path: Path) -> list[dict[str, Any]]:
    """The raw entries of the discovered-datasets registry file (empty if it does not exist)."""
    if not path.is_file():
        return []
    data = yaml.safe_load(path.read_text()) or {}
    return list(data.get("datasets", []))


def record_discovered(path: Path, datasets: Iterable[DiscoveredDataset]) -> None:
    """Add or update entries in the discovered-datasets registry file (written atomically)."""
    entries = {e["id"]: e for e in read_discovered(path)}
    for d in datasets:
        d.entry()  # validates the source before anything is written
        entries[d.dataset_id] = {"id": d.dataset_id, "role": d.role, "source": d.source}
        if d.cameras:
            entries[d.dataset_id]["cameras"] = dict(d.cameras)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"version": 1, "datasets": list(entries.values())}, sort_keys=False))
    tmp.replace(path)
