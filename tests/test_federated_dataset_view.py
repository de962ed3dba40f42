"""The query round's dataset view: meta/ read as lerobot reads it, without the training stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _fixtures_federated import make_datasets

from zk0_pipelines.federated import dataset_view


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_datasets(tmp_path_factory.mktemp("view"), 1, frames=12)[0]


def test_meta_files_equal_lerobots_metadata(dataset: Path):
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    ours = dataset_view.read_meta(dataset)
    theirs = LeRobotDatasetMetadata("local/view", root=dataset)
    assert ours.features == theirs.features
    assert ours.total_frames == theirs.total_frames == 12
    assert ours.fps == theirs.fps
    assert set(ours.stats) == set(theirs.stats)
    for feature, values in theirs.stats.items():
        assert set(ours.stats[feature]) == set(values)
        for name, value in values.items():
            np.testing.assert_array_equal(ours.stats[feature][name], value)
            assert ours.stats[feature][name].dtype == value.dtype
    # the policy's view (renamed cameras, normalised features only) is the same from either reader
    ours_view = dataset_view.policy_view(dataset, ours)
    theirs_view = dataset_view.policy_view(dataset, theirs)
    assert ours_view[0] == theirs_view[0]
    assert dataset_view.stats_to_json(ours_view[1]) == dataset_view.stats_to_json(theirs_view[1])


def test_missing_meta_files_are_named(tmp_path: Path, dataset: Path):
    with pytest.raises(FileNotFoundError, match=r"no meta/info\.json"):
        dataset_view.read_meta(tmp_path)
    (tmp_path / "meta").mkdir()
    info = json.loads((dataset / "meta" / "info.json").read_text())
    del info["total_frames"]
    (tmp_path / "meta" / "info.json").write_text(json.dumps(info))
    (tmp_path / "meta" / "stats.json").write_text("{}")
    with pytest.raises(ValueError, match=r"info\.json lacks a valid 'total_frames'"):
        dataset_view.read_meta(tmp_path)
    (tmp_path / "meta" / "stats.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no meta/stats\.json"):
        dataset_view.read_meta(tmp_path)


def test_the_query_reply_needs_neither_torch_nor_lerobot(dataset: Path):
    """The ClientApp module and its query handler's reading stay off the training stack (start-up)."""
    code = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from zk0_pipelines.federated import client_app, dataset_view\n"
        "meta = dataset_view.read_meta(Path(sys.argv[1]))\n"
        "features, stats, cameras = dataset_view.policy_view(Path(sys.argv[1]), meta)\n"
        "dataset_view.stats_to_json(stats)\n"
        "heavy = sorted(m for m in ('torch', 'lerobot', 'transformers', 'torchvision') if m in sys.modules)\n"
        "print(json.dumps({'heavy': heavy, 'features': len(features)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(dataset)], capture_output=True, text=True, check=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["features"] > 0
