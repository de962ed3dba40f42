"""The synthetic SO-100 generator writes real LeRobot v3.0 datasets, deterministically, non-IID per client."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _fixtures_datasets import CLEAN_SPEC_KW, DATA_FILE, clean_dataset  # noqa: F401

from zk0_pipelines.datasets.so100 import CAMERA_KEYS, SO100_JOINTS, so100_features
from zk0_pipelines.datasets.synthetic import (
    MOTIONS,
    SyntheticSpec,
    synthesize_episodes,
    write_synthetic_so100,
)


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_so100_features_shape_and_names() -> None:
    features = so100_features((48, 80))
    for key in ("observation.state", "action"):
        assert features[key]["shape"] == (6,)
        assert features[key]["names"] == list(SO100_JOINTS)
    for key in CAMERA_KEYS:
        assert features[key]["dtype"] == "video"
        assert features[key]["shape"] == (48, 80, 3)
    with pytest.raises(ValueError, match="image_hw"):
        so100_features((0, 64))


def test_clean_dataset_is_lerobot_v3_so100(clean_dataset: Path) -> None:  # noqa: F811
    info = json.loads((clean_dataset / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert info["robot_type"] == "so100_follower"
    assert info["total_episodes"] == CLEAN_SPEC_KW["episodes"]
    assert info["total_frames"] == CLEAN_SPEC_KW["episodes"] * CLEAN_SPEC_KW["frames_per_episode"]
    for key in CAMERA_KEYS:
        assert info["features"][key]["dtype"] == "video"
        assert (clean_dataset / "videos" / key / "chunk-000" / "file-000.mp4").stat().st_size > 0
    tasks = pq.read_table(clean_dataset / "meta" / "tasks.parquet").to_pandas()
    assert list(tasks.index) == [CLEAN_SPEC_KW["task"]]
    assert not (clean_dataset / "images").exists()


def test_clean_dataset_loads_with_lerobot(clean_dataset: Path) -> None:  # noqa: F811
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset("zk0/test-clean", root=clean_dataset, video_backend="pyav")
    assert len(ds) == 60
    item = ds[45]
    assert tuple(item["observation.state"].shape) == (6,)
    assert tuple(item["action"].shape) == (6,)
    assert tuple(item[CAMERA_KEYS[0]].shape) == (3, 64, 64)
    assert item["task"] == CLEAN_SPEC_KW["task"]
    assert int(item["episode_index"]) == 1 and int(item["frame_index"]) == 15


def test_same_spec_writes_byte_identical_files(clean_dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    again = write_synthetic_so100(tmp_path / "again", "zk0/test-clean", SyntheticSpec(**CLEAN_SPEC_KW))
    assert _file_hashes(again) == _file_hashes(clean_dataset)


def test_episodes_are_deterministic_and_clients_differ() -> None:
    a1 = synthesize_episodes(SyntheticSpec(seed=1, task="pick", motion="reach"))
    a2 = synthesize_episodes(SyntheticSpec(seed=1, task="pick", motion="reach"))
    for x, y in zip(a1, a2, strict=True):
        np.testing.assert_array_equal(x.state, y.state)
        for key in CAMERA_KEYS:
            np.testing.assert_array_equal(x.images[key], y.images[key])
    other_seed = synthesize_episodes(SyntheticSpec(seed=2, task="pick", motion="reach"))
    assert not np.allclose(a1[0].state, other_seed[0].state)
    # non-IID: motion patterns produce different joint distributions
    spreads = [
        synthesize_episodes(SyntheticSpec(seed=1, task=m, motion=m))[0].state.std(axis=0) for m in MOTIONS
    ]
    assert len({tuple(np.round(s, 1)) for s in spreads}) == len(MOTIONS)


def test_action_leads_state_and_frames_change() -> None:
    ep = synthesize_episodes(SyntheticSpec(seed=3, task="wave", motion="wave", frames_per_episode=40))[0]
    assert ep.state.dtype == np.float32 and ep.state.shape == (40, 6)
    # action[t] tracks state[t+1] (the next target) more closely than state[t]
    lead = np.abs(ep.action[:-1] - ep.state[1:]).mean()
    same = np.abs(ep.action[:-1] - ep.state[:-1]).mean()
    assert lead < same
    for key in CAMERA_KEYS:
        frames = ep.images[key]
        assert frames.dtype == np.uint8 and frames.shape == (40, 64, 64, 3)
        assert all((frames[i] != frames[i + 1]).any() for i in range(39))


def test_write_refuses_non_empty_root(clean_dataset: Path) -> None:  # noqa: F811
    with pytest.raises(FileExistsError, match="not empty"):
        write_synthetic_so100(clean_dataset, "zk0/x", SyntheticSpec(seed=0, task="t"))
    assert (clean_dataset / DATA_FILE).is_file()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"motion": "teleport"}, "unknown motion"),
        ({"task": " "}, "task"),
        ({"episodes": 0}, "episodes"),
        ({"image_hw": (8, 8)}, "image_hw"),
    ],
)
def test_spec_rejects_bad_values(kwargs: dict, match: str) -> None:
    params = {"seed": 0, "task": "pick", **kwargs}
    with pytest.raises(ValueError, match=match):
        SyntheticSpec(**params)


def test_spec_fingerprint_is_stable_and_sensitive() -> None:
    a = SyntheticSpec(seed=1, task="pick", image_hw=[64, 64])
    assert a.image_hw == (64, 64)
    assert a.fingerprint() == SyntheticSpec(seed=1, task="pick").fingerprint()
    assert a.fingerprint() != SyntheticSpec(seed=1, task="pick", motion="wave").fingerprint()
