"""Fixtures of the dataset tests: one clean synthetic SO-100 dataset per session, copied per test,
and helpers that damage real files of a copy in the ways real datasets break.

Import the fixtures into a test module with ``from _fixtures_datasets import clean_dataset, dataset_copy``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLEAN_SPEC_KW = {
    "seed": 7,
    "task": "pick up the red cube",
    "motion": "reach",
    "episodes": 2,
    "frames_per_episode": 30,
}
TOP = "observation.images.top"
WRIST = "observation.images.wrist"
DATA_FILE = "data/chunk-000/file-000.parquet"
EPISODES_FILE = "meta/episodes/chunk-000/file-000.parquet"

_CACHE: dict[str, Path] = {}


def video_rel(key: str = TOP) -> str:
    """Relative path of the (only) video file of a camera in the clean dataset."""
    return f"videos/{key}/chunk-000/file-000.mp4"


@pytest.fixture(scope="session")
def clean_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clean synthetic dataset, written once per test session (treat as read-only)."""
    if "clean" not in _CACHE:
        from zk0_pipelines.datasets.synthetic import SyntheticSpec, write_synthetic_so100

        root = tmp_path_factory.mktemp("so100_clean") / "ds"
        write_synthetic_so100(root, "zk0/test-clean", SyntheticSpec(**CLEAN_SPEC_KW))
        _CACHE["clean"] = root
    return _CACHE["clean"]


@pytest.fixture
def dataset_copy(clean_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the clean dataset that a test may damage."""
    dest = tmp_path / "ds"
    shutil.copytree(clean_dataset, dest)
    return dest


def truncate(path: Path, fraction: float) -> None:
    """Cut a file to ``fraction`` of its size."""
    os.truncate(path, int(path.stat().st_size * fraction))


def overwrite_middle(path: Path, nbytes: int = 256, seed: int = 0) -> None:
    """Overwrite ``nbytes`` in the middle of a file with random bytes (size unchanged)."""
    size = path.stat().st_size
    garbage = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(garbage)


def rewrite_parquet(path: Path, edit) -> None:
    """Read a parquet file into Python rows, let ``edit(rows)`` change them, write it back (same schema)."""
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows = edit(rows) or rows
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def set_vector_value(root: Path, key: str, episode: int, frame: int, joint: int, value: float) -> None:
    """Put ``value`` into ``key[joint]`` of one frame of the data parquet."""

    def edit(rows: list[dict]) -> None:
        for row in rows:
            if row["episode_index"] == episode and row["frame_index"] == frame:
                row[key] = list(row[key])
                row[key][joint] = value

    rewrite_parquet(root / DATA_FILE, edit)
