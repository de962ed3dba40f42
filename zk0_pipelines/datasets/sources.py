"""Fetch a registered dataset into a folder and record exactly which revision was fetched.

- ``hub``: the pinned revision is resolved to its commit sha first (``HfApi().dataset_info``), then
  ``snapshot_download(repo_type="dataset", revision=<sha>, local_dir=...)`` fetches exactly that commit.
- ``local``: the folder is copied; the revision is ``sha256:`` + a digest of relative paths and bytes.
- ``synthetic``: the dataset is generated; the revision is ``synthetic:`` + the spec's fingerprint.
- ``simulation``: scripted-expert episodes are recorded in the SO-101 simulator; the revision is
  ``simulation:`` + the spec's fingerprint.

The destination is built in a temporary sibling folder and swapped in at the end, so ``dest`` is
either the complete new dataset or untouched. A dataset whose ``meta/info.json`` names a robot other
than an SO-100/SO-101 arm, or a local folder with a link that cannot be followed safely (broken, a loop,
a folder link out of the dataset: see :mod:`zk0_pipelines.datasets.links`), is refused with a
:class:`DatasetRefusedError`; file links inside a local folder are copied as the files they point to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from zk0_pipelines.datasets.links import find_unsafe_links
from zk0_pipelines.datasets.registry import DatasetEntry
from zk0_pipelines.datasets.sim_expert import write_simulated_so100
from zk0_pipelines.datasets.so100 import is_so100_family
from zk0_pipelines.datasets.synthetic import write_synthetic_so100


class DatasetFetchError(RuntimeError):
    """A dataset could not be fetched (message names the dataset id and its source)."""


class DatasetRefusedError(DatasetFetchError):
    """The dataset was reached but may not be ingested (another robot, an unsafe link).

    ``result`` is set when the refused copy was kept (``fetch_dataset(..., keep_refused=True)``).
    """

    result: FetchResult | None = None


@dataclass
class FetchResult:
    """Where a dataset landed and which exact revision it is."""

    dataset_id: str
    path: Path
    source_kind: str
    resolved_revision: str
    requested_revision: str | None = None
    origin: str | None = None

    def to_dict(self) -> dict:
        """JSON-able form."""
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def tree_digest(root: Path) -> str:
    """sha256 over the sorted relative paths and the bytes of every file under ``root``."""
    digest = hashlib.sha256()
    root = Path(root)
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _check_robot_type(entry: DatasetEntry, root: Path) -> None:
    """Refuse datasets that declare a non-SO-100/101 robot (an unreadable info.json is left to validation)."""
    info_path = root / "meta" / "info.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(info, dict) or "robot_type" not in info:
        return
    robot_type = info.get("robot_type")
    if not is_so100_family(robot_type):
        raise DatasetRefusedError(
            f"dataset {entry.id!r} ({entry.source.describe()}): meta/info.json declares robot_type "
            f"{robot_type!r}, not an SO-100/SO-101 arm (so100*, so101*)"
        )


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Replace ``dest`` by ``tmp`` (both on the same filesystem); the old folder is removed afterwards."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _fetch_hub(entry: DatasetEntry, tmp: Path) -> str:
    from huggingface_hub import HfApi, snapshot_download

    source = entry.source
    where = f"dataset {entry.id!r}: cannot fetch hub dataset {source.repo_id}@{source.revision}"
    try:
        sha = HfApi().dataset_info(source.repo_id, revision=source.revision).sha
        if not sha:
            raise DatasetFetchError(f"{where}: the Hub returned no commit sha")
        snapshot_download(
            repo_id=source.repo_id,
            repo_type="dataset",
            revision=sha,
            local_dir=tmp,
        )
    except DatasetFetchError:
        raise
    except Exception as exc:
        hint = ""
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            hint = " (HF_HUB_OFFLINE is set: the Hub is not reachable in offline mode)"
        raise DatasetFetchError(f"{where}: {type(exc).__name__}: {exc}{hint}") from exc
    # huggingface_hub keeps download bookkeeping (with timestamps) in local_dir/.cache: not data.
    shutil.rmtree(tmp / ".cache", ignore_errors=True)
    return sha


def _check_links(entry: DatasetEntry, src: Path) -> None:
    """Refuse a local folder holding a link that cannot be followed safely, naming every such link."""
    unsafe = find_unsafe_links(src)
    if unsafe:
        listed = "; ".join(link.message() for link in unsafe[:10])
        more = f" (+{len(unsafe) - 10} more)" if len(unsafe) > 10 else ""
        raise DatasetRefusedError(
            f"dataset {entry.id!r} ({entry.source.describe()}): {listed}{more}; replace the link by the "
            "file or folder it should point to"
        )


def fetch_dataset(entry: DatasetEntry, dest: Path, *, keep_refused: bool = False) -> FetchResult:
    """Fetch ``entry`` into ``dest`` (created, or replaced as a whole) and return what was fetched.

    Raises :class:`DatasetFetchError` (a ``RuntimeError``) naming the dataset id and its source when
    the Hub is unreachable or the local folder does not exist, and its subclass
    :class:`DatasetRefusedError` when the robot is not an SO-100/SO-101 or a local folder holds an
    unsafe link. With ``keep_refused`` a refused robot's copy still lands in ``dest`` (the ingest
    quarantines it) and the error's ``result`` says what was fetched.
    """
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    source = entry.source
    try:
        if source.kind == "hub":
            tmp.mkdir()
            resolved = _fetch_hub(entry, tmp)
        elif source.kind == "local":
            src = Path(source.path) if source.path is not None else None
            if src is not None and src.is_file():
                raise DatasetFetchError(
                    f"dataset {entry.id!r}: local source {src} is a file, not a dataset folder "
                    "(a LeRobot dataset is a folder holding meta/info.json)"
                )
            if src is None or not src.is_dir():
                raise DatasetFetchError(
                    f"dataset {entry.id!r}: local source folder {src} does not exist or is not a folder"
                )
            if src.resolve() == dest.resolve():
                raise DatasetFetchError(f"dataset {entry.id!r}: local source {src} is the destination itself")
            _check_links(entry, src)
            shutil.copytree(src, tmp, symlinks=False)
            resolved = "sha256:" + tree_digest(tmp)
        elif source.kind == "synthetic":
            spec = source.synthetic_spec()
            write_synthetic_so100(tmp, f"zk0/{entry.id}", spec)
            resolved = "synthetic:" + spec.fingerprint()
        elif source.kind == "simulation":
            sim_spec = source.simulation_spec()
            write_simulated_so100(tmp, f"zk0/{entry.id}", sim_spec)
            resolved = "simulation:" + sim_spec.fingerprint()
        else:  # pragma: no cover - guarded by the registry model
            raise DatasetFetchError(f"dataset {entry.id!r}: unknown source kind {source.kind!r}")
        result = FetchResult(
            dataset_id=entry.id,
            path=dest,
            source_kind=source.kind,
            resolved_revision=resolved,
            requested_revision=source.revision,
            origin=source.describe(),
        )
        try:
            _check_robot_type(entry, tmp)
        except DatasetRefusedError as exc:
            if keep_refused:
                _swap_into_place(tmp, dest)
                exc.result = result
            raise
        _swap_into_place(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return result
