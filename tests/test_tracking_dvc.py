"""DVC snapshots through the CLI: init modes, add/push, change detection, restore in a fresh clone."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from _fixtures_tracking import FAKE_TOKEN, git, read_tree, require_dvc, write_tree

from zk0_pipelines.tracking.dvc import DvcError, DvcRepo, Snapshot, _scm_mode

FILES_V1 = {
    "client_a/meta/info.json": '{"fps": 30}',
    "client_a/data/chunk-000/file-000.parquet": bytes(range(256)) * 8,
    "client_b/videos/top.mp4": b"\x00\x01fake-video" * 100,
}


@dataclass
class History:
    top: Path
    root: Path
    first: Snapshot
    again: Snapshot
    modified: Snapshot
    bytes_v2: dict[str, bytes]


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    """A Git checkout with its own DVC project, and a workspace in a folder that checkout ignores
    (like pytest tmp dirs under ``.zk0/``), snapshotted three times: new, unchanged, one file modified.
    """
    require_dvc()
    top = tmp_path_factory.mktemp("dvc_git")
    git(top, "init", "-q")
    (top / ".gitignore").write_text("/ignored/\n")
    DvcRepo(top).ensure_initialized()
    root = top / "ignored" / "ws"
    write_tree(root / "data", FILES_V1)
    repo = DvcRepo(root)
    repo.ensure_initialized()
    first = repo.snapshot("data")
    again = repo.snapshot("data")
    (root / "data" / "client_a" / "meta" / "info.json").write_text('{"fps": 15}')
    modified = repo.snapshot("data")
    return History(top, root, first, again, modified, read_tree(root / "data"))


def test_first_snapshot_records_md5_count_and_size(history: History) -> None:
    snap = history.first
    assert snap.changed is True
    assert snap.md5.endswith(".dir") and len(snap.md5) == 32 + 4
    assert snap.nfiles == len(FILES_V1)
    assert snap.size == sum(len(v.encode() if isinstance(v, str) else v) for v in FILES_V1.values())
    assert snap.dvc_file == history.root / "data.dvc"
    remote = history.root / ".zk0" / "dvc-remote"
    assert sum(1 for p in remote.rglob("*") if p.is_file()) >= len(FILES_V1) + 1  # files + .dir manifest


def test_unchanged_data_keeps_md5(history: History) -> None:
    assert history.again.changed is False
    assert history.again.md5 == history.first.md5


def test_modified_file_changes_md5(history: History) -> None:
    assert history.modified.changed is True
    assert history.modified.md5 != history.first.md5
    assert DvcRepo(history.root).current_md5("data") == history.modified.md5


def test_config_is_portable(history: History) -> None:
    config = (history.root / ".dvc" / "config").read_text()
    assert "../.zk0/dvc-remote" in config
    assert str(history.root) not in config
    assert "analytics = false" in config


def test_fresh_clone_pulls_identical_bytes(history: History, tmp_path: Path) -> None:
    """Only what Git would carry (.dvc/config, data.dvc) plus the remote at the same relative place."""
    clone = tmp_path / "clone"
    (clone / ".dvc").mkdir(parents=True)
    shutil.copy2(history.root / ".dvc" / "config", clone / ".dvc" / "config")
    shutil.copy2(history.root / "data.dvc", clone / "data.dvc")
    shutil.copytree(history.root / ".zk0" / "dvc-remote", clone / ".zk0" / "dvc-remote")
    repo = DvcRepo(clone)
    assert repo.is_initialized()
    repo.pull()
    assert read_tree(clone / "data") == history.bytes_v2
    assert repo.current_md5() == history.modified.md5


def test_failed_push_is_retried_on_next_snapshot(history: History, tmp_path: Path) -> None:
    """Uses the Git-backed project at the top (plain ``dvc init``): add writes /data to .gitignore."""
    root = history.top
    write_tree(root / "data", {"x.bin": b"abc" * 10})
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the remote folder should be")
    repo = DvcRepo(root)
    repo.ensure_initialized(remote_url=str(blocker / "remote"))
    with pytest.raises(DvcError) as err:
        repo.snapshot()
    assert "dvc push" in str(err.value) and "exit code" in str(err.value)
    assert "/data" in (root / ".gitignore").read_text()
    good = tmp_path / "remote"
    repo.ensure_initialized(remote_url=str(good))
    snap = repo.snapshot()
    assert snap.changed is False  # data.dvc was written before the push failed
    assert any(p.is_file() for p in good.rglob("*")), "unchanged data must still be pushed to the new remote"


def test_dvc_error_names_command_and_scrubs_secrets(
    history: History, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    with pytest.raises(DvcError) as err:
        DvcRepo(history.root).run("add", f"missing-{FAKE_TOKEN}")
    message = str(err.value)
    assert err.value.returncode != 0
    assert "dvc add" in message and f"exit code {err.value.returncode}" in message
    assert FAKE_TOKEN not in message and "***" in message


def test_snapshot_errors_are_clear(tmp_path: Path) -> None:
    repo = DvcRepo(tmp_path / "nope")
    with pytest.raises(RuntimeError, match="not a DVC project"):
        repo.snapshot()
    assert repo.current_md5() is None


def test_init_mode_follows_git_layout(history: History) -> None:
    top = history.top
    (top / "sub").mkdir(exist_ok=True)
    assert _scm_mode(top) == "git"
    assert _scm_mode(top / "sub") == "subdir"
    assert _scm_mode(history.root) == "no-scm"
    assert "no_scm" not in (top / ".dvc" / "config").read_text()  # a real Git-backed DVC project
    # The nested workspace is its own (SCM-less) DVC project, not part of the parent's.
    assert "no_scm = True" in (history.root / ".dvc" / "config").read_text()


def test_reinitializing_is_free_and_keeps_the_remote(
    history: History, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = DvcRepo(history.root)
    expected = str(history.root / ".zk0" / "dvc-remote")
    assert repo.default_remote() == "local" and repo.remote_url() == expected

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"unexpected dvc call {args}")

    monkeypatch.setattr(DvcRepo, "run", no_subprocess)
    repo.ensure_initialized()
    repo.ensure_initialized(remote_url=expected)
    repo.ensure_initialized(remote_url=".zk0/dvc-remote")
