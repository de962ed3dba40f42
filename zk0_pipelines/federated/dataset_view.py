"""What a client tells the server about its dataset, read from ``meta/`` without the training stack.

The query round needs a dataset's features, statistics and frame count. Importing ``lerobot.datasets``
for them imports torch, torchvision and transformers (most of a client's start-up), so this module reads
``meta/info.json`` and ``meta/stats.json`` the way lerobot's ``load_info`` / ``load_stats`` do (feature
shapes as tuples, statistics as numpy arrays) with the standard library and numpy only; the training
stack is imported after the reply (``prewarm``). The features and statistics are those the policy sees
(``policy_view``): the dataset's cameras renamed to the policy's inputs and only the normalised features.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NORMALIZED_PREFIXES = ("observation.",)
NORMALIZED_KEYS = ("action",)


@dataclass(frozen=True)
class MetaFiles:
    """A local LeRobot v3 dataset's ``meta/info.json`` and ``meta/stats.json``, as lerobot reads them."""

    root: Path
    features: dict[str, dict[str, Any]]
    stats: dict[str, dict[str, np.ndarray]]
    total_frames: int
    fps: int


def _numpy_stats(raw: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    return {
        feature: {name: np.atleast_1d(np.array(value)) for name, value in values.items()}
        for feature, values in raw.items()
    }


def info_file(root: Path) -> Path:
    """``root/meta/info.json``; ``FileNotFoundError`` naming the dataset when the folder is not one."""
    path = Path(root) / "meta" / "info.json"
    if not path.is_file():
        raise FileNotFoundError(f"dataset {root} has no meta/info.json (not a LeRobot v3 dataset folder)")
    return path


def read_meta(root: Path) -> MetaFiles:
    """Read ``root/meta``; a clear error naming the file when it is missing or not a dataset's."""
    root = Path(root)
    info_path = info_file(root)
    info = json.loads(info_path.read_text(encoding="utf-8"))
    stats_path = root / "meta" / "stats.json"
    if not stats_path.is_file():
        raise FileNotFoundError(f"dataset {root} has no meta/stats.json (normalisation statistics)")
    try:
        features = {
            key: {**spec, "shape": tuple(spec["shape"])} if "shape" in spec else dict(spec)
            for key, spec in info["features"].items()
        }
        total_frames, fps = int(info["total_frames"]), int(info["fps"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"dataset {root}: {info_path.name} lacks a valid {exc} entry") from exc
    stats = _numpy_stats(json.loads(stats_path.read_text(encoding="utf-8")))
    return MetaFiles(root=root, features=features, stats=stats, total_frames=total_frames, fps=fps)


def normalized_stats(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """The features the policy normalises (``observation.*``, ``action``) out of a dataset's stats."""
    return {
        key: {name: np.asarray(v) for name, v in value.items()}
        for key, value in stats.items()
        if key in NORMALIZED_KEYS or key.startswith(NORMALIZED_PREFIXES)
    }


def policy_view(root: Path, meta) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], Any]:
    """``(features, normalised stats, camera map)`` of a dataset as the policy sees it.

    ``meta`` is anything with ``features`` and ``stats`` (:class:`MetaFiles`, lerobot's
    ``LeRobotDatasetMetadata``). The camera map (:func:`zk0_pipelines.datasets.cameras.dataset_camera_map`:
    the one recorded at ingest, else the automatic rule) renames the dataset's cameras to the policy's
    image inputs and leaves unused cameras out, in the features and the statistics alike.
    """
    from zk0_pipelines.datasets.cameras import dataset_camera_map

    cameras = dataset_camera_map(Path(root), meta.features)
    features = cameras.policy_features(meta.features)
    stats = normalized_stats(cameras.policy_stats(meta.stats))
    return features, stats, cameras


def stats_to_json(stats: Mapping[str, Mapping[str, np.ndarray]]) -> str:
    """Serialize lerobot ``meta.stats``-style stats (feature -> stat -> array) to JSON (exact float64)."""
    payload = {
        feature: {name: np.asarray(value, dtype=np.float64).tolist() for name, value in sorted(fs.items())}
        for feature, fs in sorted(stats.items())
    }
    return json.dumps(payload, sort_keys=True)


def stats_from_json(text: str) -> dict[str, dict[str, np.ndarray]]:
    """Inverse of :func:`stats_to_json` (arrays as float64 numpy, like lerobot's ``cast_stats_to_numpy``)."""
    raw = json.loads(text)
    return {
        feature: {name: np.asarray(v, dtype=np.float64) for name, v in fs.items()}
        for feature, fs in raw.items()
    }
