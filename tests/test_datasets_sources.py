"""fetch_dataset: local copies, synthetic generation and the (offline) Hub path, with recorded revisions."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from _fixtures_datasets import DATA_FILE, TOP, WRIST, clean_dataset, video_rel  # noqa: F401

from zk0_pipelines.datasets.registry import DatasetEntry, DatasetSource
from zk0_pipelines.datasets.sources import (
    DatasetFetchError,
    DatasetRefusedError,
    FetchResult,
    fetch_dataset,
    tree_digest,
)
from zk0_pipelines.datasets.synthetic import SyntheticSpec


def _local(dataset_id: str, path: Path) -> DatasetEntry:
    return DatasetEntry(id=dataset_id, role="train", source=DatasetSource(kind="local", path=path))


def test_local_copy_records_content_digest(clean_dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    result = fetch_dataset(_local("lab", clean_dataset), tmp_path / "data" / "lab")
    assert isinstance(result, FetchResult)
    assert (result.dataset_id, result.source_kind, result.path) == ("lab", "local", tmp_path / "data" / "lab")
    assert result.resolved_revision == "sha256:" + tree_digest(clean_dataset)
    assert (result.path / DATA_FILE).read_bytes() == (clean_dataset / DATA_FILE).read_bytes()
    assert json.loads(json.dumps(result.to_dict()))["path"] == str(result.path)
    # leaves no temporary siblings behind
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["lab"]


def test_digest_changes_with_any_byte_and_any_name(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.bin").write_bytes(b"abc")
    first = tree_digest(root)
    (root / "a" / "x.bin").write_bytes(b"abd")
    second = tree_digest(root)
    (root / "a" / "x.bin").rename(root / "a" / "y.bin")
    third = tree_digest(root)
    assert len({first, second, third}) == 3


def test_fetch_replaces_destination_as_a_whole(clean_dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    fetch_dataset(_local("lab", clean_dataset), dest)
    assert not (dest / "stale.txt").exists()
    assert (dest / "meta" / "info.json").is_file()


def test_missing_local_folder_is_a_clear_error(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(
        DatasetFetchError, match=r"dataset 'gone': local source folder .*gone-folder does not exist"
    ):
        fetch_dataset(_local("gone", tmp_path / "gone-folder"), dest)
    assert not dest.exists()


def test_a_file_as_local_source_is_named_a_file(tmp_path: Path) -> None:
    archive = tmp_path / "so100.zip"
    archive.write_bytes(b"PK")
    with pytest.raises(
        DatasetFetchError, match=r"dataset 'zipped': local source .*so100.zip is a file, not a"
    ):
        fetch_dataset(_local("zipped", archive), tmp_path / "dest")


def test_unsafe_symlinks_are_refused_naming_each_link(clean_dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "linked"
    shutil.copytree(clean_dataset, src)
    os.symlink("..", src / "videos" / TOP / "loop")
    video = src / video_rel(WRIST)
    video.unlink()
    os.symlink(video.name, video)
    os.symlink(str(tmp_path), src / "meta" / "outside")
    dest = tmp_path / "dest"
    with pytest.raises(DatasetRefusedError) as info:
        fetch_dataset(_local("linked", src), dest)
    message = str(info.value)
    assert message.startswith(f"dataset 'linked' (local:{src}): ")
    for needle in (
        f"videos/{TOP}/loop: symlink to '..' is a loop (it leads back to a folder that contains it)",
        f"{video_rel(WRIST)}: symlink to 'file-000.mp4' is a loop (it leads back to itself)",
        f"meta/outside: symlink to '{tmp_path}' points to a folder outside the dataset",
    ):
        assert needle in message, message
    assert not dest.exists() and info.value.result is None


def test_file_links_are_copied_as_the_files_they_point_to(clean_dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    """A dataset laid out like the Hugging Face cache: its files are links into a blob store elsewhere."""
    src, blobs = tmp_path / "snapshot", tmp_path / "blobs"
    shutil.copytree(clean_dataset, src)
    blobs.mkdir()
    video = src / video_rel(TOP)
    shutil.move(video, blobs / "top.mp4")
    os.symlink(blobs / "top.mp4", video)
    result = fetch_dataset(_local("cached", src), tmp_path / "dest")
    copied = result.path / video_rel(TOP)
    assert not copied.is_symlink() and copied.read_bytes() == (blobs / "top.mp4").read_bytes()
    assert result.resolved_revision == "sha256:" + tree_digest(clean_dataset)


def test_other_robot_is_refused_and_destination_untouched(clean_dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "koch"
    shutil.copytree(clean_dataset, src)
    info = json.loads((src / "meta" / "info.json").read_text())
    info["robot_type"] = "koch_follower"
    (src / "meta" / "info.json").write_text(json.dumps(info))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("keep")
    with pytest.raises(
        DatasetFetchError, match=r"dataset 'koch-arm'.*robot_type 'koch_follower'.*SO-100/SO-101"
    ):
        fetch_dataset(_local("koch-arm", src), dest)
    assert (dest / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "koch"]
    # the ingest keeps the refused copy (to quarantine it) and learns what was fetched
    with pytest.raises(DatasetRefusedError) as info:
        fetch_dataset(_local("koch-arm", src), dest, keep_refused=True)
    assert info.value.result.resolved_revision == "sha256:" + tree_digest(src)
    assert json.loads((dest / "meta" / "info.json").read_text())["robot_type"] == "koch_follower"


def test_synthetic_fetch_is_reproducible(clean_dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    from _fixtures_datasets import CLEAN_SPEC_KW

    source = DatasetSource(kind="synthetic", **CLEAN_SPEC_KW)
    entry = DatasetEntry(id="client-a", role="train", source=source)
    result = fetch_dataset(entry, tmp_path / "client-a")
    assert result.source_kind == "synthetic"
    assert result.resolved_revision == "synthetic:" + SyntheticSpec(**CLEAN_SPEC_KW).fingerprint()
    assert tree_digest(result.path) == tree_digest(clean_dataset)


def test_hub_unreachable_names_dataset_and_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    entry = DatasetEntry(
        id="so100-pickplace",
        role="train",
        source=DatasetSource(kind="hub", repo_id="lerobot/svla_so100_pickplace", revision="v3.0"),
    )
    dest = tmp_path / "dest"
    with pytest.raises(DatasetFetchError) as info:
        fetch_dataset(entry, dest)
    message = str(info.value)
    assert "dataset 'so100-pickplace'" in message
    assert "lerobot/svla_so100_pickplace@v3.0" in message
    assert "offline" in message.lower()
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("hf")) == []
