"""Fixtures for the policy tests: a tiny synthetic SO-100 dataset and tiny SmolVLA policies.

Import the fixture functions into the test module (``from _fixtures_policy import fixture_so100_meta``);
pytest registers them under their ``name`` (``so100_meta``), which keeps them local to that module.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from zk0_pipelines.datasets.synthetic import SyntheticSpec, write_synthetic_so100

REPO_ID = "zk0/policy_tests"
TASK = "pick up the red cube and place it in the box"


@pytest.fixture(autouse=True, name="scratch_tempdir")
def fixture_scratch_tempdir(tmp_path, monkeypatch) -> Path:
    """Keep library temp files in pytest's tmp folder.

    lerobot's ``PreTrainedConfig.from_pretrained`` writes a ``NamedTemporaryFile(delete=False)`` per call.
    """
    scratch = tmp_path / "scratch-tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


@pytest.fixture(scope="session", name="so100_root")
def fixture_so100_root(tmp_path_factory) -> Path:
    """One episode of 20 frames, 2 video cameras 64x64, 6-DoF state/action, robot_type so100_follower."""
    root = tmp_path_factory.mktemp("policy_ds") / "so100"
    spec = SyntheticSpec(seed=7, task=TASK, motion="reach", episodes=1, frames_per_episode=20)
    return write_synthetic_so100(root, REPO_ID, spec)


@pytest.fixture(scope="session", name="so100_meta")
def fixture_so100_meta(so100_root):
    """``LeRobotDatasetMetadata`` of the ``so100_root`` dataset."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    return LeRobotDatasetMetadata(REPO_ID, root=so100_root)


def open_dataset(root: Path, chunk_size: int | None = None):
    """The dataset with an action chunk of ``chunk_size`` steps per sample (training), or single actions."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

    delta = None
    if chunk_size is not None:
        fps = LeRobotDatasetMetadata(REPO_ID, root=root).fps
        delta = {"action": [i / fps for i in range(chunk_size)]}
    return LeRobotDataset(REPO_ID, root=root, delta_timestamps=delta, video_backend="pyav")


def training_batch(root: Path, chunk_size: int, batch_size: int = 2) -> dict:
    """The first ``batch_size`` samples (with action chunks) collated by a torch DataLoader."""
    loader = torch.utils.data.DataLoader(open_dataset(root, chunk_size), batch_size=batch_size, shuffle=False)
    return next(iter(loader))


def observation_frame(root: Path, index: int = 0) -> dict:
    """One unbatched observation (images, state, task string) as a robot/eval loop would provide it."""
    item = open_dataset(root)[index]
    return {k: v for k, v in item.items() if k.startswith("observation.") or k == "task"}
