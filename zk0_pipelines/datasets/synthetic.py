"""Synthetic SO-100 datasets written with LeRobot's own ``LeRobotDataset.create`` (format v3.0).

Each client gets its own seed, task text and motion pattern, so the federation is non-IID:
the joint trajectories (and the camera images that follow them) come from different distributions.
Everything is a pure function of the :class:`SyntheticSpec`; the only non-deterministic byte order
LeRobot produces (key order of ``meta/stats.json``, a Python ``set``) is rewritten in a fixed order.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from zk0_pipelines.datasets.so100 import CAMERA_KEYS, ROBOT_TYPE, SO100_JOINTS, so100_features

MOTIONS: tuple[str, ...] = ("reach", "wave", "circle", "push", "sweep")

_DOF = len(SO100_JOINTS)
_HOME = np.array([0.0, -30.0, 60.0, 30.0, 0.0, 30.0])


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of one synthetic SO-100 dataset (one federated client or an eval set)."""

    seed: int
    task: str
    motion: str = "reach"
    episodes: int = 2
    frames_per_episode: int = 30
    fps: int = 30
    image_hw: tuple[int, int] = (64, 64)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_hw", tuple(int(v) for v in self.image_hw))
        if self.motion not in MOTIONS:
            raise ValueError(f"unknown motion {self.motion!r}; expected one of {', '.join(MOTIONS)}")
        if not self.task or not self.task.strip():
            raise ValueError("task must be a non-empty string")
        if self.episodes < 1 or self.frames_per_episode < 2 or self.fps < 1:
            raise ValueError(
                f"need episodes >= 1, frames_per_episode >= 2 and fps >= 1, got {self.episodes}, "
                f"{self.frames_per_episode}, {self.fps}"
            )
        if len(self.image_hw) != 2 or min(self.image_hw) < 16 or max(self.image_hw) > 1024:
            raise ValueError(f"image_hw must be (height, width) between 16 and 1024, got {self.image_hw}")

    def to_dict(self) -> dict:
        """Plain JSON-able dict of the spec."""
        data = asdict(self)
        data["image_hw"] = list(self.image_hw)
        return data

    def fingerprint(self) -> str:
        """Short stable hash of the spec (same spec ⇒ same dataset bytes on the same stack)."""
        from zk0_pipelines.tracking.lineage import config_hash

        return config_hash(self.to_dict())[:16]


@dataclass
class EpisodeFrames:
    """One episode in memory: joint vectors (n, dof) and per-camera HWC uint8 frames (n, H, W, 3)."""

    task: str
    state: np.ndarray
    action: np.ndarray
    images: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.state.shape[0])


def motion_trajectory(motion: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Joint targets (n, 6) in degrees (gripper 0–100) for one episode of the given motion pattern."""
    t = np.linspace(0.0, 1.0, n)
    home = _HOME + rng.uniform(-5.0, 5.0, _DOF)
    traj = np.repeat(home[None, :], n, axis=0)
    phase = rng.uniform(0.0, 2 * np.pi)
    amp = rng.uniform(20.0, 35.0)
    if motion == "reach":
        target = home + rng.uniform(-40.0, 40.0, _DOF)
        s = 0.5 - 0.5 * np.cos(np.pi * t)
        traj = home + (target - home) * s[:, None]
        traj[:, 5] = np.where(t < 0.7, 70.0, 70.0 - 65.0 * np.clip((t - 0.7) / 0.3, 0.0, 1.0))
    elif motion == "wave":
        cycles = rng.uniform(1.0, 2.0)
        traj[:, 0] += amp * np.sin(2 * np.pi * cycles * t + phase)
        traj[:, 3] += 0.8 * amp * np.sin(4 * np.pi * cycles * t + phase)
        traj[:, 5] = 50.0 + 20.0 * np.sin(2 * np.pi * t)
    elif motion == "circle":
        traj[:, 0] += amp * np.cos(2 * np.pi * t + phase)
        traj[:, 1] += amp * np.sin(2 * np.pi * t + phase)
        traj[:, 2] -= 0.5 * amp * np.sin(2 * np.pi * t + phase)
        traj[:, 5] = 20.0
    elif motion == "push":
        s = np.where(t < 0.6, t / 0.6, (1.0 - t) / 0.4)
        traj[:, 1] += amp * s
        traj[:, 2] -= 1.5 * amp * s
        traj[:, 5] = 5.0
    elif motion == "sweep":
        direction = rng.choice([-1.0, 1.0])
        traj[:, 0] += direction * (-50.0 + 100.0 * t)
        traj[:, 4] += direction * 90.0 * t
        traj[:, 5] = 40.0
    else:  # pragma: no cover - guarded by SyntheticSpec
        raise ValueError(f"unknown motion {motion!r}")
    return traj


def _palette(seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 10_000])
    return rng.integers(30, 226, size=(4, 3)).astype(np.float32)


def render_cameras(
    traj: np.ndarray, image_hw: tuple[int, int], palette: np.ndarray, frame_offset: int = 0
) -> dict[str, np.ndarray]:
    """Render the top and wrist camera frames (n, H, W, 3) uint8 that follow a joint trajectory.

    A two-pixel timer bar moves one column per frame so consecutive frames always differ.
    """
    n = traj.shape[0]
    h, w = image_hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = np.arange(n) + frame_offset

    # top camera: coloured background gradient + the "end effector" square + timer bar
    cx = (0.5 + traj[:, 0] / 150.0) * w
    cy = (0.5 + (traj[:, 1] + traj[:, 2] - 30.0) / 200.0) * h
    half = (0.06 + traj[:, 5] / 1000.0) * min(h, w) + 1.0
    square = (np.abs(xx[None] - cx[:, None, None]) <= half[:, None, None]) & (
        np.abs(yy[None] - cy[:, None, None]) <= half[:, None, None]
    )
    grad = (yy / max(h - 1, 1))[..., None]
    background = palette[0] * (1.0 - 0.4 * grad) + palette[1] * 0.4 * grad
    top = np.broadcast_to(background, (n, h, w, 3)).copy()
    top[square] = palette[2]
    bar = np.abs(xx[None] - (frames % w)[:, None, None]) < 1.0
    top[bar] = 255.0

    # wrist camera: stripes rotated by wrist_roll, jaws closing with the gripper, timer bar
    theta = np.deg2rad(traj[:, 4])[:, None, None]
    stripes = 0.5 + 0.5 * np.sin(
        (xx[None] * np.cos(theta) + yy[None] * np.sin(theta)) * (2 * np.pi / 12.0)
        + traj[:, 3, None, None] / 20.0
    )
    wrist = palette[3] * stripes[..., None] + palette[1] * (1.0 - stripes[..., None])
    jaw = (1.0 - traj[:, 5] / 100.0) * 0.45 * w
    jaws = (xx[None] < jaw[:, None, None]) | (xx[None] > (w - 1) - jaw[:, None, None])
    wrist[jaws] = 20.0
    tick = (np.abs(yy[None] - (frames % h)[:, None, None]) < 1.0) & (xx[None] < w // 4)
    wrist[tick] = 240.0

    return {
        CAMERA_KEYS[0]: np.clip(top, 0, 255).astype(np.uint8),
        CAMERA_KEYS[1]: np.clip(wrist, 0, 255).astype(np.uint8),
    }


def synthesize_episodes(spec: SyntheticSpec) -> list[EpisodeFrames]:
    """All episodes of ``spec`` in memory (deterministic: episode ``i`` uses ``default_rng([seed, i])``)."""
    palette = _palette(spec.seed)
    episodes = []
    offset = 0
    for index in range(spec.episodes):
        rng = np.random.default_rng([spec.seed, index])
        n = spec.frames_per_episode
        traj = motion_trajectory(spec.motion, n, rng)
        state = traj + rng.normal(0.0, 0.3, traj.shape)
        ahead = np.concatenate([traj[1:], traj[-1:]], axis=0)
        action = ahead + rng.normal(0.0, 0.3, traj.shape)
        images = render_cameras(traj, spec.image_hw, palette, frame_offset=offset)
        episodes.append(EpisodeFrames(spec.task, state.astype(np.float32), action.astype(np.float32), images))
        offset += n
    return episodes


def _quiet_encoders() -> None:
    # SVT-AV1 prints its whole configuration to stderr at level 3 ("info") for every video.
    os.environ.setdefault("SVT_LOG", "1")
    logging.getLogger("lerobot").setLevel(max(logging.getLogger("lerobot").level, logging.WARNING))


def _canonicalize_stats(root: Path) -> None:
    """Rewrite ``meta/stats.json`` with sorted keys: LeRobot builds it from a ``set`` (hash-seed order)."""
    path = root / "meta" / "stats.json"
    if path.is_file():
        stats = json.loads(path.read_text(encoding="utf-8"))
        with open(path, "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=4, ensure_ascii=False, sort_keys=True)


def _prepare_root(root: Path) -> None:
    if root.exists():
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # LeRobot insists on creating the folder itself
        else:
            raise FileExistsError(f"dataset root {root} already exists and is not empty")
    root.parent.mkdir(parents=True, exist_ok=True)


def write_so100_episodes(
    root: Path,
    repo_id: str,
    fps: int,
    episodes: Sequence[EpisodeFrames],
    *,
    features: dict | None = None,
    robot_type: str = ROBOT_TYPE,
) -> Path:
    """Write in-memory episodes as a LeRobot v3.0 dataset at ``root`` (which must not exist or be empty).

    ``features`` defaults to :func:`so100_features` for the episodes' image size; tests pass other
    features (e.g. a 7-DoF arm) to produce deliberately wrong datasets with real files.
    """
    hf_datasets = importlib.import_module("datasets.utils.tqdm")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if not episodes:
        raise ValueError(f"no episodes to write for {repo_id}")
    root = Path(root)
    _prepare_root(root)
    _quiet_encoders()
    if features is None:
        some = episodes[0].images[CAMERA_KEYS[0]]
        features = so100_features((int(some.shape[1]), int(some.shape[2])))
    video_keys = [k for k, ft in features.items() if ft["dtype"] == "video"]
    bars_were_on = not hf_datasets.are_progress_bars_disabled()
    hf_datasets.disable_progress_bars()  # one "Map" bar per episode otherwise
    ds = LeRobotDataset.create(
        repo_id=repo_id,
        fps=fps,
        features=features,
        root=root,
        robot_type=robot_type,
        use_videos=True,
        video_backend="pyav",
    )
    try:
        for episode in episodes:
            for i in range(len(episode)):
                frame = {
                    "observation.state": episode.state[i],
                    "action": episode.action[i],
                    "task": episode.task,
                }
                for key in video_keys:
                    frame[key] = episode.images[key][i]
                ds.add_frame(frame)
            ds.save_episode(parallel_encoding=False)
    finally:
        ds.finalize()
        if bars_were_on:
            hf_datasets.enable_progress_bars()
    _canonicalize_stats(root)
    leftovers = root / "images"
    if leftovers.is_dir() and not any(p.is_file() for p in leftovers.rglob("*")):
        shutil.rmtree(leftovers)
    return root


def write_synthetic_so100(root: Path, repo_id: str, spec: SyntheticSpec) -> Path:
    """Write a deterministic synthetic SO-100 dataset (2 cameras, 6-DoF, ``spec.task``) at ``root``.

    Uses ``LeRobotDataset.create(..., robot_type="so100_follower", use_videos=True)``; never touches
    the Hub. Returns the dataset root.
    """
    return write_so100_episodes(Path(root), repo_id, spec.fps, synthesize_episodes(spec))
