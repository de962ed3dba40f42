"""Closed-loop evaluation: a lerobot policy folder acts in the SO-101 simulator for seeded episodes.

The loop is lerobot's eval loop for one environment: each step the observation (joint state in dataset
units, the ``top`` and ``wrist`` renders as float CHW in [0, 1], the task text) goes through the
policy's own preprocessor, ``policy.select_action`` (action chunks, queued), the postprocessor
(un-normalised joint targets) and the simulator's joint position actuators. Torch's RNG is seeded per
episode and the simulator by the episode seed, so the same weights and seeds give the same numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zk0_pipelines.datasets.sim_env import LabCameras, SimLab, make_lab_env
from zk0_pipelines.datasets.so100 import CAMERA_KEYS

_Z95 = 1.959963984540054


@dataclass(frozen=True)
class EvalLab:
    """A held-out lab to roll out in: its dataset id, simulator settings and task text."""

    lab_id: str
    lab: SimLab
    task: str


@dataclass
class EpisodeResult:
    """One rollout: success, sparse return, length, wall time and the video (if written)."""

    lab_id: str
    seed: int
    success: bool
    episode_return: float
    length: int
    seconds: float
    final_joints: list[float]
    video: str | None = None


def wilson_interval(successes: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a success rate (well behaved at 0 and 1, unlike the normal one)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float], z: float = _Z95) -> tuple[float, float, float]:
    """Mean and its 95 % normal-approximation interval (zero width for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean()) if arr.size else float("nan")
    if arr.size < 2:
        return mean, mean, mean
    half = z * float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return mean, mean - half, mean + half


def episode_seeds(seed: int, episodes: int) -> list[int]:
    """The evaluation episode seeds (disjoint from the expert's recording seeds ``seed * 1000 + k``)."""
    return [1_000_000 + seed * 1000 + i for i in range(episodes)]


def _observation(env: Any, frames: dict[str, np.ndarray], task: str) -> dict[str, Any]:
    import torch

    obs: dict[str, Any] = {"observation.state": torch.from_numpy(env.joint_state()), "task": task}
    for key in CAMERA_KEYS:
        obs[key] = torch.from_numpy(frames[key]).permute(2, 0, 1).float().div_(255.0)
    return obs


def write_video(path: Path, frames: Sequence[np.ndarray], fps: int) -> Path:
    """Write HWC uint8 frames as an H.264 mp4 (MPEG-4 part 2 when no H.264 encoder is bundled)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    av.logging.set_level(av.logging.ERROR)  # libx264 prints its statistics at INFO
    with av.open(str(path), mode="w") as container:
        try:
            stream = container.add_stream("libx264", rate=fps)
        except Exception:  # noqa: BLE001 - encoder availability depends on PyAV's FFmpeg build
            stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def rollout_episode(
    policy: Any,
    preprocessor: Any,
    postprocessor: Any,
    env: Any,
    cameras: LabCameras,
    seed: int,
    task: str,
    max_steps: int,
    video_path: Path | None = None,
) -> EpisodeResult:
    """One closed-loop episode of ``policy`` from ``env.reset(seed=seed)``."""
    import torch

    start = time.perf_counter()
    torch.manual_seed(seed)
    policy.reset()
    env.reset(seed=seed)
    video: list[np.ndarray] = []
    total, success, length = 0.0, False, 0
    for length in range(1, max_steps + 1):  # noqa: B007 - length is the episode length
        frames = cameras.render()
        if video_path is not None:
            video.append(np.concatenate([frames[k] for k in CAMERA_KEYS], axis=1))
        with torch.inference_mode():
            action = postprocessor(policy.select_action(preprocessor(_observation(env, frames, task))))
        _, reward, terminated, truncated, info = env.step(action.reshape(-1).cpu().numpy().astype(np.float64))
        total += float(reward)
        success = success or bool(info.get("succeed", False))
        if terminated or truncated:
            break
    written = None
    if video_path is not None and video:
        from zk0_pipelines.datasets.sim_env import SIM_FPS

        written = str(write_video(video_path, video, SIM_FPS))
    return EpisodeResult(
        lab_id=env_lab_id(env),
        seed=seed,
        success=success,
        episode_return=total,
        length=length,
        seconds=time.perf_counter() - start,
        final_joints=[float(v) for v in env.joint_state()],
        video=written,
    )


def env_lab_id(env: Any) -> str:
    return str(getattr(env, "zk0_lab_id", ""))


def summarize(results: Sequence[EpisodeResult]) -> dict[str, float]:
    """Success rate with its Wilson 95 % interval, mean return and length with normal 95 % intervals."""
    n = len(results)
    successes = sum(r.success for r in results)
    low, high = wilson_interval(successes, n)
    ret, ret_lo, ret_hi = mean_interval([r.episode_return for r in results])
    length, len_lo, len_hi = mean_interval([r.length for r in results])
    return {
        "success_rate": successes / n if n else float("nan"),
        "success_rate_ci_low": low,
        "success_rate_ci_high": high,
        "episode_return": ret,
        "episode_return_ci_low": ret_lo,
        "episode_return_ci_high": ret_hi,
        "episode_length": length,
        "episode_length_ci_low": len_lo,
        "episode_length_ci_high": len_hi,
        "episodes": float(n),
        "seconds_per_episode": float(np.mean([r.seconds for r in results])) if n else float("nan"),
    }


def evaluate_policy(
    policy: Any,
    preprocessor: Any,
    postprocessor: Any,
    labs: Sequence[EvalLab],
    *,
    episodes: int,
    seed: int = 0,
    max_steps: int | None = None,
    image_hw: tuple[int, int] = (64, 64),
    video_dir: Path | None = None,
    videos_per_lab: int = 1,
) -> dict[str, Any]:
    """Roll ``policy`` out for ``episodes`` seeded episodes in each lab.

    Returns ``{"overall": summary, "labs": {lab_id: summary}, "episodes": [EpisodeResult dicts]}``;
    the first ``videos_per_lab`` episodes of each lab are written to ``video_dir/<lab>-seed<seed>.mp4``.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if not labs:
        raise ValueError("no lab to evaluate in")
    results: list[EpisodeResult] = []
    per_lab: dict[str, dict[str, float]] = {}
    for lab in labs:
        env = make_lab_env(lab.lab, joint_control=True)
        env.zk0_lab_id = lab.lab_id
        cameras = LabCameras(env, image_hw)
        steps = int(max_steps or lab.lab.rollout_steps)
        lab_results = []
        try:
            for index, episode_seed in enumerate(episode_seeds(seed, episodes)):
                video = None
                if video_dir is not None and index < videos_per_lab:
                    video = Path(video_dir) / f"{lab.lab_id}-seed{episode_seed}.mp4"
                lab_results.append(
                    rollout_episode(
                        policy,
                        preprocessor,
                        postprocessor,
                        env,
                        cameras,
                        episode_seed,
                        lab.task,
                        steps,
                        video,
                    )
                )
        finally:
            cameras.close()
            env.close()
        per_lab[lab.lab_id] = summarize(lab_results)
        results += lab_results
    return {
        "overall": summarize(results),
        "labs": per_lab,
        "episodes": [asdict(r) for r in results],
    }


def evaluate_policy_folder(folder: Path, labs: Sequence[EvalLab], **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate_policy` of a lerobot policy folder (a checkpoint or a release folder)."""
    from zk0_pipelines.policy.export import load_policy_folder

    policy, preprocessor, postprocessor = load_policy_folder(Path(folder))
    return evaluate_policy(policy, preprocessor, postprocessor, labs, **kwargs)


def eval_labs_from_datasets(datasets: Sequence[Mapping[str, Any]]) -> list[EvalLab]:
    """The held-out simulated labs among the snapshot's datasets (``role: eval``, ``kind: simulation``)."""
    from zk0_pipelines.datasets.registry import DatasetSource

    labs = []
    for d in datasets:
        source = d.get("source") or {}
        if d.get("role") != "eval" or source.get("kind") != "simulation":
            continue
        spec = DatasetSource.model_validate(
            {k: v for k, v in source.items() if v is not None}
        ).simulation_spec()
        labs.append(EvalLab(lab_id=str(d["id"]), lab=spec.lab, task=spec.task))
    return labs
