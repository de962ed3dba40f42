"""Datasets as the community records them: other camera names, 3 cameras, SO-101, LeRobot v2.1.

Every dataset is written with lerobot's own writer (``LeRobotDataset.create``); the v2.1 folder is a
v3.0 dataset re-laid out by hand into the v2.1 files (``meta/episodes.jsonl``, ``meta/tasks.jsonl``,
``meta/episodes_stats.jsonl``, one parquet and one mp4 per episode and camera, each mp4 encoded by
lerobot from that episode alone).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOP = "observation.images.top"
WRIST = "observation.images.wrist"
V21_DATA = "data/chunk-000/episode_{:06d}.parquet"
V21_VIDEO = "videos/chunk-000/{}/episode_{:06d}.mp4"


def community_episodes(
    cameras: dict[str, str],
    *,
    seed: int = 3,
    episodes: int = 2,
    frames: int = 20,
    extra: tuple[str, ...] = (),
    motion: str = "reach",
) -> tuple[int, list, dict]:
    """``(fps, episodes, features)`` of synthetic episodes whose top/wrist cameras are renamed by ``cameras``.

    ``extra`` adds more cameras (a mirrored top view each); a camera left out of ``cameras`` is not recorded.
    """
    from zk0_pipelines.datasets.so100 import so100_features
    from zk0_pipelines.datasets.synthetic import SyntheticSpec, synthesize_episodes

    spec = SyntheticSpec(
        seed=seed, task=f"{motion} the cube", motion=motion, episodes=episodes, frames_per_episode=frames
    )
    eps = synthesize_episodes(spec)
    base = so100_features(spec.image_hw)
    features = {k: v for k, v in base.items() if k not in (TOP, WRIST)}
    for ep in eps:
        images = {cameras[key]: ep.images[key] for key in (TOP, WRIST) if key in cameras}
        images.update({name: np.ascontiguousarray(ep.images[TOP][:, :, ::-1]) for name in extra})
        ep.images = images
    for name in (*cameras.values(), *extra):
        features[name] = dict(base[TOP])
    return spec.fps, eps, features


def write_community(
    root: Path, cameras: dict[str, str], *, robot_type: str = "so100_follower", **kwargs
) -> Path:
    """A v3.0 SO-100/101 dataset of :func:`community_episodes` written by lerobot at ``root``."""
    from zk0_pipelines.datasets.synthetic import write_so100_episodes

    fps, eps, features = community_episodes(cameras, **kwargs)
    return write_so100_episodes(
        root, f"community/{root.name}", fps, eps, features=features, robot_type=robot_type
    )


def relayout_v21(v30: Path, dest: Path, per_episode: list[Path]) -> Path:
    """Write the v2.1 layout of the v3.0 dataset ``v30`` at ``dest``.

    ``per_episode[i]`` is a one-episode v3.0 dataset of episode ``i`` (same frames): its mp4 files
    become the v2.1 per-episode videos.
    """
    info = json.loads((v30 / "meta" / "info.json").read_text())
    video_keys = [k for k, ft in info["features"].items() if ft["dtype"] == "video"]
    episodes = pq.read_table(next((v30 / "meta" / "episodes").rglob("*.parquet"))).to_pylist()
    data = pq.read_table(next((v30 / "data").rglob("*.parquet")))
    tasks = pq.read_table(v30 / "meta" / "tasks.parquet").to_pandas()
    (dest / "meta").mkdir(parents=True)
    info.update(
        codebase_version="v2.1",
        data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        video_path="videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        total_chunks=1,
        total_videos=len(episodes) * len(video_keys),
        chunks_size=1000,
    )
    for key in ("data_files_size_in_mb", "video_files_size_in_mb"):
        info.pop(key, None)
    (dest / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    with open(dest / "meta" / "tasks.jsonl", "w") as f:
        for task, row in tasks.iterrows():
            f.write(json.dumps({"task_index": int(row["task_index"]), "task": task}) + "\n")
    with (
        open(dest / "meta" / "episodes.jsonl", "w") as f,
        open(dest / "meta" / "episodes_stats.jsonl", "w") as g,
    ):
        for row in episodes:
            index = row["episode_index"]
            f.write(
                json.dumps({"episode_index": index, "tasks": row["tasks"], "length": row["length"]}) + "\n"
            )
            stats: dict[str, dict] = {}
            for column, value in row.items():
                if column.startswith("stats/"):
                    _, feature, name = column.split("/")
                    stats.setdefault(feature, {})[name] = value
            g.write(json.dumps({"episode_index": index, "stats": stats}) + "\n")
            rows = data.filter(np.asarray(data.column("episode_index")) == index)
            path = dest / V21_DATA.format(index)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(rows, path)
            for key in video_keys:
                src = next((per_episode[index] / "videos" / key).rglob("*.mp4"))
                target = dest / V21_VIDEO.format(key, index)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
    return dest


def write_v21(base: Path, name: str, cameras: dict[str, str], **kwargs) -> Path:
    """A LeRobot v2.1 folder ``base/name`` of :func:`community_episodes` with the given camera names."""
    from zk0_pipelines.datasets.synthetic import write_so100_episodes

    fps, eps, features = community_episodes(cameras, **kwargs)
    full = write_so100_episodes(base / f".{name}-v30", f"community/{name}", fps, eps, features=features)
    singles = [
        write_so100_episodes(base / f".{name}-ep{i}", f"community/{name}-ep{i}", fps, [ep], features=features)
        for i, ep in enumerate(eps)
    ]
    return relayout_v21(full, base / name, singles)
