"""Scripted-expert demonstrations in the SO-101 simulator, written as LeRobot v3.0 SO-100 datasets.

The expert is the package's own ``PickPlaceController`` (hover, descend, close, lift, traverse, lower,
open) driving the end effector through the simulator's IK; what is recorded is joint space: the
measured joints as ``observation.state`` and the joint targets the IK commanded as ``action`` (units in
:mod:`zk0_pipelines.datasets.sim_env`). Only successful episodes are kept. Episode ``i`` of a spec is
tried with seeds ``seed * 1000 + k`` (k = 0, 1, …) until it succeeds, so the same spec always yields the
same episodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zk0_pipelines.datasets.sim_env import (
    ACTION_SCALE,
    DEFAULT_TASK,
    SIM_FPS,
    SIM_ROBOT_TYPE,
    LabCameras,
    SimLab,
    make_lab_env,
)
from zk0_pipelines.datasets.synthetic import EpisodeFrames, write_so100_episodes

_TRIES_PER_EPISODE = 20
EXPERT_MAX_STEPS = 150  # the expert needs about 50 control steps; a stuck attempt is cut here


@dataclass(frozen=True)
class SimulationSpec:
    """One simulated dataset: a lab, a seed, how many expert episodes, the image size."""

    seed: int
    task: str = DEFAULT_TASK
    episodes: int = 2
    image_hw: tuple[int, int] = (64, 64)
    lab: SimLab = field(default_factory=SimLab)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_hw", tuple(int(v) for v in self.image_hw))
        if isinstance(self.lab, dict):
            object.__setattr__(self, "lab", SimLab(**self.lab))
        if not self.task or not self.task.strip():
            raise ValueError("task must be a non-empty string")
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        if len(self.image_hw) != 2 or min(self.image_hw) < 16 or max(self.image_hw) > 512:
            raise ValueError(f"image_hw must be (height, width) between 16 and 512, got {self.image_hw}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        data = asdict(self)
        data["image_hw"] = list(self.image_hw)
        data["lab"] = self.lab.to_dict()
        return data

    def fingerprint(self) -> str:
        """Short stable hash of the spec."""
        from zk0_pipelines.tracking.lineage import config_hash

        return config_hash(self.to_dict())[:16]


@dataclass
class ExpertEpisode:
    """What one expert attempt did; ``frames`` is set when it was recorded."""

    seed: int
    success: bool
    steps: int
    frames: EpisodeFrames | None = None


def run_expert_episode(env: Any, seed: int, task: str, cameras: LabCameras | None = None) -> ExpertEpisode:
    """One scripted pick-and-place attempt from ``env.reset(seed=seed)``; records frames if ``cameras``."""
    from lerobot_env_so101.scripted.pick_place import PickPlaceController

    env.reset(seed=seed)
    expert = PickPlaceController(ACTION_SCALE)
    states, actions, images = [], [], []
    success, steps = False, 0
    for steps in range(1, EXPERT_MAX_STEPS + 1):  # noqa: B007 - steps is the episode length
        if cameras is not None:
            states.append(env.joint_state())
            images.append(cameras.render())
        command = expert.act(env.ik_point_pos, env.block_pos(), env.goal_pos)
        _, _, terminated, truncated, info = env.step(command)
        if cameras is not None:
            actions.append(env.joint_targets())
        success = bool(info.get("succeed", False))
        if terminated or truncated:
            break
    frames = None
    if cameras is not None and states:
        frames = EpisodeFrames(
            task=task,
            state=np.stack(states).astype(np.float32),
            action=np.stack(actions).astype(np.float32),
            images={key: np.stack([im[key] for im in images]) for key in images[0]},
        )
    return ExpertEpisode(seed=seed, success=success, steps=steps, frames=frames)


def record_expert_episodes(spec: SimulationSpec) -> list[EpisodeFrames]:
    """``spec.episodes`` successful expert episodes with both cameras rendered (deterministic)."""
    env = make_lab_env(spec.lab)
    cameras = LabCameras(env, spec.image_hw)
    episodes: list[EpisodeFrames] = []
    try:
        for index in range(spec.episodes):
            for attempt in range(_TRIES_PER_EPISODE):
                seed = spec.seed * 1000 + index * _TRIES_PER_EPISODE + attempt
                result = run_expert_episode(env, seed, spec.task, cameras)
                if result.success and result.frames is not None:
                    episodes.append(result.frames)
                    break
            else:
                raise RuntimeError(
                    f"the scripted expert failed {_TRIES_PER_EPISODE} times in a row for episode {index} "
                    f"of simulation seed {spec.seed} (lab {spec.lab.to_dict()})"
                )
    finally:
        cameras.close()
        env.close()
    return episodes


def expert_success_rate(lab: SimLab, episodes: int, seed: int = 0) -> dict[str, Any]:
    """The scripted expert's success rate over ``episodes`` seeded episodes (state only, no rendering)."""
    env = make_lab_env(lab)
    try:
        results = [run_expert_episode(env, seed * 1000 + i, DEFAULT_TASK) for i in range(episodes)]
    finally:
        env.close()
    successes = sum(r.success for r in results)
    return {
        "episodes": episodes,
        "successes": successes,
        "success_rate": successes / episodes,
        "mean_steps": float(np.mean([r.steps for r in results])),
    }


def write_simulated_so100(root: Path, repo_id: str, spec: SimulationSpec) -> Path:
    """Record ``spec``'s expert episodes and write them as a LeRobot v3.0 dataset at ``root``."""
    return write_so100_episodes(
        Path(root), repo_id, SIM_FPS, record_expert_episodes(spec), robot_type=SIM_ROBOT_TYPE
    )
