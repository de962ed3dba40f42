"""Validate a LeRobot v3.0 SO-100 dataset folder, file by file, before it may train anything.

Every check has a stable name (:data:`CHECK_NAMES`, used as Dagster asset-check names) and a message
that names the dataset and, where it applies, the file, the episode and the frame. Every video file is
decoded completely exactly once, over a process pool (one task per file); frame counts and frozen
frames are computed from that same decode pass.

A check whose prerequisite failed is reported as failed with ``details["skipped"] = True``: what
could not be verified does not pass. A symlink that cannot be followed safely (broken, a loop, a
folder link out of the dataset) fails the check of the files it stands in for, naming the link.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import multiprocessing.util
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zk0_pipelines.datasets._decode import DecodeResult, decode_video_file
from zk0_pipelines.datasets.cameras import CameraMappingError, resolve_cameras
from zk0_pipelines.datasets.links import UnsafeLink, find_unsafe_links
from zk0_pipelines.datasets.so100 import (
    SO100_JOINTS,
    VECTOR_KEYS,
    feature_joint_names,
    is_so100_family,
    normalize_joint_name,
)

CHECK_NAMES: tuple[str, ...] = (
    "info_json",
    "schema",
    "parquet_readable",
    "episodes_nonempty",
    "finite_values",
    "timestamps",
    "video_decode",
    "frame_counts",
    "frozen_frames",
)
REQUIRED_INFO_KEYS: tuple[str, ...] = (
    "codebase_version",
    "fps",
    "features",
    "total_episodes",
    "total_frames",
    "data_path",
)
CODEBASE_VERSION = "v3.0"
DEFAULT_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
DEFAULT_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
_MAX_LISTED = 10
_DATA_COLUMNS = ("index", "episode_index", "frame_index", "timestamp", *VECTOR_KEYS)


@dataclass
class CheckOutcome:
    """Result of one named check."""

    name: str
    passed: bool
    message: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {"name": self.name, "passed": self.passed, "message": self.message, "details": self.details}


@dataclass
class ValidationReport:
    """All checks of one dataset, in :data:`CHECK_NAMES` order, plus summary statistics."""

    dataset_id: str
    root: Path
    checks: list[CheckOutcome]
    stats: dict
    cameras: dict | None = None

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> list[CheckOutcome]:
        """The checks that did not pass."""
        return [check for check in self.checks if not check.passed]

    def check(self, name: str) -> CheckOutcome:
        """The outcome of the check called ``name``."""
        for outcome in self.checks:
            if outcome.name == name:
                return outcome
        raise KeyError(f"no check named {name!r}; checks: {', '.join(CHECK_NAMES)}")

    def summary(self) -> str:
        """One line per failed check (or a single ok line)."""
        if self.passed:
            return f"{self.dataset_id}: all {len(self.checks)} checks passed"
        return "\n".join(f"[{c.name}] {c.message}" for c in self.failures)

    def to_dict(self) -> dict:
        """JSON-able form (what the pipeline stores next to a quarantined dataset)."""
        return {
            "dataset_id": self.dataset_id,
            "root": str(self.root),
            "passed": self.passed,
            "checks": [check.to_dict() for check in self.checks],
            "stats": _jsonable(self.stats),
            "cameras": self.cameras,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


# ── loading ─────────────────────────────────────────────────────────────────────────────────────


@dataclass
class _DataFile:
    rel: str
    columns: dict[str, np.ndarray]
    widths: dict[str, int]


@dataclass
class _Ctx:
    root: Path
    dataset_id: str
    info: dict | None = None
    info_ok: bool = False
    fps: float | None = None
    data_files: list[_DataFile] = field(default_factory=list)
    parquet_errors: dict[str, str] = field(default_factory=dict)
    episodes: list[dict] | None = None
    episodes_files: list[str] = field(default_factory=list)
    video_tasks: dict[str, dict] = field(default_factory=dict)
    decoded: dict[str, DecodeResult] = field(default_factory=dict)
    cameras: dict | None = None

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)


def _vector_column(table: Any, name: str) -> tuple[np.ndarray, int]:
    """(n, width) float array of a list column; width -1 when rows have different lengths."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float64)
        return values.reshape(-1, width), width
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        values = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
        return values.reshape(-1, 1), 1
    lengths = pc.list_value_length(column).fill_null(-1).to_numpy()
    if len(lengths) == 0:
        return np.zeros((0, 0)), 0
    if (lengths == lengths[0]).all() and lengths[0] >= 0:
        width = int(lengths[0])
        values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float64)
        return values.reshape(-1, width), width
    return np.zeros((0, 0)), -1


def _read_parquet(path: Path) -> Any:
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _load(ctx: _Ctx) -> None:
    """Read meta/episodes and the data parquet files (what is readable); remember what is not."""
    import pyarrow as pa  # noqa: F401 - imported for its side effects on pyarrow.parquet

    episode_rows: list[dict] = []
    for path in sorted((ctx.root / "meta" / "episodes").rglob("*.parquet")):
        rel = ctx.rel(path)
        ctx.episodes_files.append(rel)
        try:
            table = _read_parquet(path)
        except Exception as exc:  # noqa: BLE001
            ctx.parquet_errors[rel] = f"{type(exc).__name__}: {exc}"
            continue
        keep = [c for c in table.column_names if not c.startswith("stats/")]
        for row in table.select(keep).to_pylist():
            row["_file"] = rel
            episode_rows.append(row)
    if ctx.episodes_files:
        ctx.episodes = sorted(
            episode_rows, key=lambda r: (r.get("episode_index") is None, r.get("episode_index"))
        )

    tasks = ctx.root / "meta" / "tasks.parquet"
    if tasks.exists():
        try:
            _read_parquet(tasks)
        except Exception as exc:  # noqa: BLE001
            ctx.parquet_errors[ctx.rel(tasks)] = f"{type(exc).__name__}: {exc}"

    for path in sorted((ctx.root / "data").rglob("*.parquet")):
        rel = ctx.rel(path)
        try:
            table = _read_parquet(path)
        except Exception as exc:  # noqa: BLE001
            ctx.parquet_errors[rel] = f"{type(exc).__name__}: {exc}"
            continue
        columns: dict[str, np.ndarray] = {}
        widths: dict[str, int] = {}
        for name in _DATA_COLUMNS:
            if name not in table.column_names:
                continue
            if name in VECTOR_KEYS:
                columns[name], widths[name] = _vector_column(table, name)
            else:
                columns[name] = np.asarray(table.column(name).to_numpy(zero_copy_only=False))
        ctx.data_files.append(_DataFile(rel, columns, widths))


# ── helpers ─────────────────────────────────────────────────────────────────────────────────────


def _outcome(ctx: _Ctx, name: str, problems: list[str], ok_message: str, **details: Any) -> CheckOutcome:
    if not problems:
        return CheckOutcome(name, True, f"{ctx.dataset_id}: {ok_message}", details)
    listed = "; ".join(problems[:_MAX_LISTED])
    more = f" (+{len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
    details = {**details, "problems": problems[:100], "problem_count": len(problems)}
    return CheckOutcome(name, False, f"{ctx.dataset_id}: {listed}{more}", details)


def _skipped(ctx: _Ctx, name: str, requires: str) -> CheckOutcome:
    return CheckOutcome(
        name,
        False,
        f"{ctx.dataset_id}: not run: needs a passing {requires} check",
        {"skipped": True, "requires": requires},
    )


def _frames_of(ctx: _Ctx, data_file: _DataFile, rows: Iterable[int]) -> list[str]:
    ep = data_file.columns.get("episode_index")
    fi = data_file.columns.get("frame_index")
    out = []
    for row in rows:
        e = int(ep[row]) if ep is not None else "?"
        f = int(fi[row]) if fi is not None else row
        out.append(f"episode {e} frame {f}")
    return out


def _format_path(template: str, **kwargs: Any) -> str | None:
    try:
        return template.format(**kwargs)
    except (KeyError, IndexError, ValueError, TypeError):
        return None


# ── the checks ──────────────────────────────────────────────────────────────────────────────────


def _check_info(ctx: _Ctx) -> CheckOutcome:
    path = ctx.root / "meta" / "info.json"
    rel = ctx.rel(path)
    if not path.is_file():
        return _outcome(ctx, "info_json", [f"{rel} is missing"], "")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        return _outcome(ctx, "info_json", [f"{rel} is not UTF-8 text: {exc}"], "")
    except json.JSONDecodeError as exc:
        return _outcome(ctx, "info_json", [f"{rel}: invalid JSON: {exc}"], "")  # msg: line L column C
    if not isinstance(info, dict):
        return _outcome(
            ctx, "info_json", [f"{rel}: top level is {type(info).__name__}, expected an object"], ""
        )
    ctx.info = info
    problems = [f"{rel}: missing key {key!r}" for key in REQUIRED_INFO_KEYS if key not in info]
    version = info.get("codebase_version")
    if "codebase_version" in info and version != CODEBASE_VERSION:
        problems.append(f"{rel}: codebase_version is {version!r}, expected {CODEBASE_VERSION!r}")
    fps = info.get("fps")
    if "fps" in info:
        if isinstance(fps, bool) or not isinstance(fps, int | float) or not math.isfinite(fps) or fps <= 0:
            problems.append(f"{rel}: fps must be a positive number, got {fps!r}")
        else:
            ctx.fps = float(fps)
    features = info.get("features")
    if "features" in info:
        if not isinstance(features, dict) or not features:
            problems.append(f"{rel}: features must be a non-empty object")
        else:
            for key, ft in features.items():
                if not isinstance(ft, dict) or "dtype" not in ft or "shape" not in ft:
                    problems.append(f"{rel}: feature {key!r} needs 'dtype' and 'shape'")
            has_video = any(isinstance(ft, dict) and ft.get("dtype") == "video" for ft in features.values())
            if has_video and "video_path" not in info:
                problems.append(f"{rel}: missing key 'video_path' (the dataset has video features)")
    for key in ("total_episodes", "total_frames"):
        value = info.get(key)
        if key in info and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            problems.append(f"{rel}: {key} must be a non-negative integer, got {value!r}")
    ctx.info_ok = not problems
    return _outcome(
        ctx,
        "info_json",
        problems,
        f"{rel} ok ({version}, {info.get('fps')} fps, robot_type {info.get('robot_type')!r})",
    )


def _check_schema(ctx: _Ctx, mapping: Mapping[str, str] | None) -> CheckOutcome:
    assert ctx.info is not None
    rel = "meta/info.json"
    features: dict = ctx.info["features"]
    problems: list[str] = []
    robot_type = ctx.info.get("robot_type")
    if not is_so100_family(robot_type):
        problems.append(f"{rel}: robot_type {robot_type!r} is not an SO-100/SO-101 arm")
    expected_names = list(SO100_JOINTS)
    for key in VECTOR_KEYS:
        ft = features.get(key)
        if ft is None:
            problems.append(f"{rel}: feature {key!r} is missing")
            continue
        shape = list(ft.get("shape") or [])
        if shape != [len(SO100_JOINTS)]:
            problems.append(
                f"{rel}: {key} has shape {shape}, an SO-100 arm has [{len(SO100_JOINTS)}] (6-DoF)"
            )
        if ft.get("dtype") not in ("float32", "float64"):
            problems.append(f"{rel}: {key} has dtype {ft.get('dtype')!r}, expected float32")
        names = feature_joint_names(ft)
        if names is None or [normalize_joint_name(n) for n in names] != expected_names:
            problems.append(
                f"{rel}: {key} joint names {names} do not match the SO-100 joints {expected_names}"
            )
    try:
        camera_map = resolve_cameras(features, mapping)
    except CameraMappingError as exc:
        problems.append(f"{rel}: {exc}")
        camera_map = None
    else:
        ctx.cameras = camera_map.to_dict()
    for key in camera_map.rename if camera_map is not None else ():
        ft = features[key]
        if ft.get("dtype") != "video":
            problems.append(f"{rel}: camera {key} has dtype {ft.get('dtype')!r}, expected 'video'")
        shape = list(ft.get("shape") or [])
        if len(shape) != 3 or 3 not in (shape[0], shape[-1]):
            problems.append(f"{rel}: camera {key} has shape {shape}, expected (height, width, 3)")
    for data_file in ctx.data_files:
        for key in VECTOR_KEYS:
            if key not in data_file.columns and key in features:
                problems.append(f"{data_file.rel}: column {key!r} is missing")
            width = data_file.widths.get(key)
            if width is not None and width != len(SO100_JOINTS):
                what = "rows of different lengths" if width < 0 else f"{width} values per frame"
                problems.append(f"{data_file.rel}: {key} has {what}, expected {len(SO100_JOINTS)}")
    cameras = camera_map.describe() if camera_map is not None else "none"
    return _outcome(
        ctx,
        "schema",
        problems,
        f"SO-100 schema ok ({robot_type}, 6-DoF, cameras {cameras})",
        cameras=ctx.cameras,
    )


def _check_parquet(ctx: _Ctx) -> CheckOutcome:
    problems = [f"{rel}: unreadable parquet ({err})" for rel, err in sorted(ctx.parquet_errors.items())]
    if not ctx.data_files and not any(rel.startswith("data/") for rel in ctx.parquet_errors):
        problems.append("data/: no parquet files")
    if not ctx.episodes_files:
        problems.append("meta/episodes/: no parquet files")
    template = (ctx.info or {}).get("data_path") or DEFAULT_DATA_PATH
    referenced = set()
    for row in ctx.episodes or []:
        rel = _format_path(
            template, chunk_index=row.get("data/chunk_index"), file_index=row.get("data/file_index")
        )
        if rel is not None:
            referenced.add(rel)
    for rel in sorted(referenced):
        if not (ctx.root / rel).is_file():
            problems.append(f"{rel}: missing (referenced by meta/episodes)")
    count = len(ctx.data_files) + len(ctx.episodes_files)
    return _outcome(ctx, "parquet_readable", problems, f"{count} parquet files readable", files=count)


def _check_episodes(ctx: _Ctx) -> CheckOutcome:
    problems: list[str] = []
    episodes = ctx.episodes or []
    if not episodes:
        problems.append("meta/episodes: no episodes")
    total = (ctx.info or {}).get("total_episodes")
    if isinstance(total, int) and episodes and total != len(episodes):
        problems.append(f"meta/info.json: total_episodes is {total} but meta/episodes lists {len(episodes)}")
    counts: dict[int, int] = {}
    where: dict[int, str] = {}
    for data_file in ctx.data_files:
        ep = data_file.columns.get("episode_index")
        if ep is None:
            problems.append(f"{data_file.rel}: column 'episode_index' is missing")
            continue
        values, n = np.unique(ep, return_counts=True)
        for value, count in zip(values.tolist(), n.tolist(), strict=True):
            counts[value] = counts.get(value, 0) + count
            where.setdefault(value, data_file.rel)
    template = (ctx.info or {}).get("data_path") or DEFAULT_DATA_PATH
    listed = set()
    for row in episodes:
        index = row.get("episode_index")
        listed.add(index)
        length = row.get("length")
        data_rel = _format_path(
            template, chunk_index=row.get("data/chunk_index"), file_index=row.get("data/file_index")
        )
        if not isinstance(length, int) or length <= 0:
            problems.append(f"{row['_file']}: episode {index} has length {length!r} (empty episode)")
        if ctx.data_files:
            found = counts.get(index, 0)
            if found == 0:
                problems.append(f"{data_rel or 'data/'}: episode {index} has no frames")
            elif isinstance(length, int) and found != length:
                problems.append(
                    f"{data_rel or where.get(index)}: episode {index} has {found} frames, "
                    f"{row['_file']} says {length}"
                )
    for index in sorted(set(counts) - listed):
        problems.append(f"{where[index]}: episode {index} has frames but is not in meta/episodes")
    return _outcome(ctx, "episodes_nonempty", problems, f"{len(episodes)} non-empty episodes")


def _check_finite(ctx: _Ctx) -> CheckOutcome:
    problems: list[str] = []
    bad_total = 0
    for data_file in ctx.data_files:
        for key in VECTOR_KEYS:
            values = data_file.columns.get(key)
            if values is None or values.size == 0:
                continue
            bad = ~np.isfinite(values)
            rows = np.flatnonzero(bad.any(axis=1))
            bad_total += len(rows)
            for row, label in zip(
                rows[:_MAX_LISTED], _frames_of(ctx, data_file, rows[:_MAX_LISTED]), strict=True
            ):
                joints = [
                    SO100_JOINTS[j] if j < len(SO100_JOINTS) else str(j) for j in np.flatnonzero(bad[row])
                ]
                kinds = sorted(
                    {"NaN" if np.isnan(values[row, j]) else "Inf" for j in np.flatnonzero(bad[row])}
                )
                problems.append(
                    f"{data_file.rel}: {key} is {'/'.join(kinds)} at {label} ({', '.join(joints)})"
                )
            if len(rows) > _MAX_LISTED:
                problems.append(f"{data_file.rel}: {key}: {len(rows) - _MAX_LISTED} more non-finite frames")
    return _outcome(
        ctx, "finite_values", problems, "no NaN/Inf in observation.state or action", bad_frames=bad_total
    )


def _check_timestamps(ctx: _Ctx, tolerance_s: float) -> CheckOutcome:
    assert ctx.fps is not None
    problems: list[str] = []
    worst = 0.0
    for data_file in ctx.data_files:
        ts = data_file.columns.get("timestamp")
        fi = data_file.columns.get("frame_index")
        ep = data_file.columns.get("episode_index")
        if ts is None or fi is None or ep is None:
            problems.append(f"{data_file.rel}: needs columns timestamp, frame_index and episode_index")
            continue
        drift = np.abs(ts.astype(np.float64) - fi.astype(np.float64) / ctx.fps)
        if drift.size:
            worst = max(worst, float(drift.max()))
        rows = np.flatnonzero(drift > tolerance_s)
        for row in rows[:_MAX_LISTED]:
            problems.append(
                f"{data_file.rel}: episode {int(ep[row])} frame {int(fi[row])}: "
                f"timestamp {float(ts[row]):.4f} s, expected {float(fi[row]) / ctx.fps:.4f} s "
                f"(tolerance {tolerance_s:.4f} s)"
            )
        if len(rows) > _MAX_LISTED:
            problems.append(f"{data_file.rel}: {len(rows) - _MAX_LISTED} more frames off their timestamp")
        order = (
            np.argsort(data_file.columns["index"], kind="stable") if "index" in data_file.columns else None
        )
        ep_sorted = ep[order] if order is not None else ep
        fi_sorted = fi[order] if order is not None else fi
        for value in np.unique(ep_sorted):
            frames = fi_sorted[ep_sorted == value]
            expected = np.arange(len(frames))
            if not np.array_equal(frames, expected):
                first = int(np.flatnonzero(frames != expected)[0])
                problems.append(
                    f"{data_file.rel}: episode {int(value)}: frame_index is not 0..{len(frames) - 1} "
                    f"(row {first} has {int(frames[first])})"
                )
    return _outcome(
        ctx,
        "timestamps",
        problems,
        f"timestamps within {tolerance_s:.4f} s of frame_index/fps (worst {worst:.2e} s)",
        worst_drift_s=worst,
        tolerance_s=tolerance_s,
    )


def _plan_videos(ctx: _Ctx) -> list[str]:
    """Map every video file (referenced or present) to its episode segments; problems found on the way."""
    problems: list[str] = []
    features = (ctx.info or {}).get("features") or {}
    video_keys = [k for k, ft in features.items() if isinstance(ft, dict) and ft.get("dtype") == "video"]
    template = (ctx.info or {}).get("video_path") or DEFAULT_VIDEO_PATH
    fps = ctx.fps or 0.0
    for key in video_keys:
        for row in ctx.episodes or []:
            cols = [
                f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")
            ]
            if not isinstance(row.get("episode_index"), int):
                problems.append(f"{row['_file']}: a row has episode_index {row.get('episode_index')!r}")
                continue
            if any(row.get(c) is None for c in cols):
                problems.append(
                    f"{row['_file']}: episode {row.get('episode_index')} has no {key} video columns"
                )
                continue
            rel = _format_path(template, video_key=key, chunk_index=row[cols[0]], file_index=row[cols[1]])
            if rel is None:
                problems.append(f"meta/info.json: video_path {template!r} cannot be formatted")
                continue
            start = round(float(row[cols[2]]) * fps)
            end = round(float(row[cols[3]]) * fps)
            task = ctx.video_tasks.setdefault(rel, {"key": key, "segments": [], "episodes": {}})
            task["segments"].append((int(row["episode_index"]), start, end))
            task["episodes"][int(row["episode_index"])] = row
    for path in sorted((ctx.root / "videos").rglob("*.mp4")) if (ctx.root / "videos").is_dir() else []:
        rel = ctx.rel(path)
        if rel not in ctx.video_tasks:
            parts = rel.split("/")
            ctx.video_tasks[rel] = {
                "key": parts[1] if len(parts) > 2 else "?",
                "segments": [],
                "episodes": {},
            }
    return problems


def _decode_all(ctx: _Ctx, workers: int, min_run: int, progress: bool) -> tuple[float, int]:
    """Decode every planned video once; returns (wall seconds, worker processes used)."""
    start = time.perf_counter()
    if not ctx.video_tasks:
        return 0.0, 0
    from tqdm.auto import tqdm

    n_workers = max(1, min(workers, len(ctx.video_tasks)))
    if n_workers > 1 and not _main_is_importable():
        n_workers = 1  # worker processes re-import __main__; a script read from stdin cannot be
    # v3 datasets pack many episodes into few large files: when there are fewer files than cores,
    # let the decoder thread inside each file, but only for frames large enough to profit from it.
    spare = max(1, workers // n_workers)
    jobs = {
        rel: (
            str(ctx.root / rel),
            task["segments"],
            min_run,
            spare if _frame_area(ctx, task["key"]) >= _THREADED_DECODE_MIN_AREA else 1,
        )
        for rel, task in ctx.video_tasks.items()
    }
    bar = tqdm(total=len(jobs), desc=f"validate {ctx.dataset_id}", unit="video", disable=not progress)
    try:
        if n_workers == 1:
            for rel, args in jobs.items():
                ctx.decoded[rel] = decode_video_file(*args)
                bar.update(1)
        else:
            pool = _get_pool(n_workers)
            futures = {pool.submit(decode_video_file, *args): rel for rel, args in jobs.items()}
            broken = False
            for future in as_completed(futures):
                rel = futures[future]
                try:
                    ctx.decoded[rel] = future.result()
                except Exception as exc:  # noqa: BLE001 - a crashed worker is a finding for that file
                    broken = broken or isinstance(exc, BrokenProcessPool)
                    ctx.decoded[rel] = DecodeResult(
                        path=jobs[rel][0],
                        error=f"decode worker failed: {exc!r} (a script that validates with workers > 1 "
                        "needs the `if __name__ == '__main__':` guard; or pass workers=1)",
                    )
                bar.update(1)
            if broken:
                _drop_pool()
    finally:
        bar.close()
    return time.perf_counter() - start, n_workers


_THREADED_DECODE_MIN_AREA = 320 * 240


def _frame_area(ctx: _Ctx, key: str) -> int:
    feature = ((ctx.info or {}).get("features") or {}).get(key) or {}
    shape = [v for v in feature.get("shape") or [] if isinstance(v, int) and v != 3]
    return int(np.prod(shape)) if len(shape) == 2 else 0


_POOL: dict[str, Any] = {}
_POOL_LOCK = threading.Lock()


def _main_is_importable() -> bool:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return path is None or os.path.exists(path)


def _get_pool(n_workers: int) -> ProcessPoolExecutor:
    """A process pool kept between calls (workers stay warm), rebuilt when the size changes.

    Workers come from a forkserver with the decode module preloaded: safe in threaded hosts (Dagster,
    torch), and a new worker costs a fork rather than a fresh interpreter.
    """
    with _POOL_LOCK:
        pool = _POOL.get("pool")
        if pool is not None and _POOL.get("size") == n_workers:
            return pool
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["zk0_pipelines.datasets._decode"])
        else:  # pragma: no cover - non-POSIX
            context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=context)
        _POOL.update(pool=pool, size=n_workers)
        if not _POOL.get("finalizer"):
            # A multiprocessing child (Dagster's step worker) joins its non-daemon children at exit
            # *before* concurrent.futures' own atexit hook would stop them: idle pool workers then keep
            # the step process (and the run) alive forever. multiprocessing runs finalizers of priority
            # >= 0 before that join, highest first: stop the pool there, before the call queue's own
            # finalizer (priority 10) stops the feeder thread that must deliver the workers' stop sentinels.
            _POOL["finalizer"] = multiprocessing.util.Finalize(None, shutdown_decode_pool, exitpriority=100)
        return pool


def _drop_pool(wait: bool = False) -> None:
    with _POOL_LOCK:
        pool = _POOL.pop("pool", None)
        _POOL.pop("size", None)
    if pool is not None:
        pool.shutdown(wait=wait, cancel_futures=True)


def shutdown_decode_pool() -> None:
    """Stop and join the worker processes kept between validations (also run at process exit)."""
    _drop_pool(wait=True)


def _check_video_decode(ctx: _Ctx, plan_problems: list[str]) -> CheckOutcome:
    problems = list(plan_problems)
    for rel in sorted(ctx.decoded):
        result = ctx.decoded[rel]
        if result.error:
            at = f" at frame {result.error_frame}" if result.error_frame is not None and result.exists else ""
            if at:
                at += _episode_of_frame(ctx.video_tasks.get(rel), result.error_frame)
            problems.append(f"{rel}: {result.error}{at}")
    decoded = sum(r.decoded for r in ctx.decoded.values())
    if not ctx.video_tasks:
        problems.append("videos/: no video files")
    return _outcome(
        ctx,
        "video_decode",
        problems,
        f"{len(ctx.decoded)} video files, all {decoded} frames decoded without error",
        decoded_frames=decoded,
    )


def _episode_of_frame(task: dict | None, frame: int) -> str:
    """`` (episode E frame F)``: where a file-wide frame number falls in meta/episodes (or ``""``)."""
    for episode, start, end in (task or {}).get("segments", []):
        if start <= frame < end:
            return f" (episode {episode} frame {frame - start})"
    ends = [(end, episode) for episode, _, end in (task or {}).get("segments", [])]
    if ends and frame >= max(ends)[0]:
        return f" (after the last frame of episode {max(ends)[1]})"
    return ""


def _check_frame_counts(ctx: _Ctx) -> CheckOutcome:
    problems: list[str] = []
    for rel in sorted(ctx.video_tasks):
        task = ctx.video_tasks[rel]
        result = ctx.decoded.get(rel)
        decoded = result.decoded if result is not None else 0
        if not task["segments"]:
            problems.append(f"{rel}: not referenced by meta/episodes ({decoded} frames unaccounted for)")
            continue
        expected = sum(end - start for _, start, end in task["segments"])
        if decoded != expected:
            eps = sorted(task["episodes"])
            problems.append(
                f"{rel}: decoded {decoded} frames, meta/episodes assigns {expected} "
                f"(episodes {eps[0]}..{eps[-1]})"
            )
        for episode, start, end in task["segments"]:
            length = task["episodes"][episode].get("length")
            if isinstance(length, int) and end - start != length:
                problems.append(
                    f"{rel}: episode {episode} ({task['key']}) spans {end - start} video frames "
                    f"but has {length} data frames"
                )
    return _outcome(ctx, "frame_counts", problems, "decoded frame counts match meta/episodes for every video")


def _check_frozen(ctx: _Ctx, min_frames: int, fraction: float) -> CheckOutcome:
    problems: list[str] = []
    longest = 0
    for rel in sorted(ctx.decoded):
        result = ctx.decoded[rel]
        task = ctx.video_tasks.get(rel, {"key": "?", "segments": [], "episodes": {}})
        seg_start = {episode: start for episode, start, _ in task["segments"]}
        longest = max([longest, *result.longest_run.values()])
        for episode, start, length in result.frozen_runs:
            ep_len = (task["episodes"].get(episode) or {}).get("length") or 0
            threshold = max(min_frames, math.ceil(fraction * ep_len))
            if length >= threshold:
                first = start - seg_start.get(episode, 0)
                problems.append(
                    f"{rel}: episode {episode} ({task['key']}): {length} identical frames from frame {first} "
                    f"(threshold {threshold})"
                )
    return _outcome(
        ctx,
        "frozen_frames",
        problems,
        f"no frozen video (longest run of identical frames: {longest})",
        longest_run=longest,
        min_frames=min_frames,
        fraction=fraction,
    )


def _stats(ctx: _Ctx, decode_seconds: float, workers: int) -> dict:
    frames = sum(len(f.columns.get("episode_index", ())) for f in ctx.data_files)
    stats: dict[str, Any] = {
        "frames": frames,
        "episodes": len(ctx.episodes or []),
        "fps": ctx.fps,
        "duration_s": frames / ctx.fps if ctx.fps else None,
        "video_files": len(ctx.decoded),
        "decoded_frames": sum(r.decoded for r in ctx.decoded.values()),
        "decode_seconds": round(decode_seconds, 4),
        "workers": workers,
    }
    stats["decode_fps"] = stats["decoded_frames"] / decode_seconds if decode_seconds > 0 else None
    for key in VECTOR_KEYS:
        arrays = [f.columns[key] for f in ctx.data_files if key in f.columns and f.widths.get(key, 0) > 0]
        widths = {a.shape[1] for a in arrays}
        if arrays and len(widths) == 1:
            values = np.concatenate(arrays)
            with np.errstate(invalid="ignore"):
                stats[key] = {
                    "names": list(SO100_JOINTS) if values.shape[1] == len(SO100_JOINTS) else None,
                    "min": np.nanmin(values, axis=0).tolist() if len(values) else [],
                    "max": np.nanmax(values, axis=0).tolist() if len(values) else [],
                }
    return stats


def validate_dataset(
    root: Path,
    dataset_id: str,
    *,
    workers: int | None = None,
    timestamp_tolerance_s: float | None = None,
    frozen_min_frames: int = 15,
    frozen_fraction: float = 0.1,
    cameras: Mapping[str, str] | None = None,
    progress: bool | None = None,
) -> ValidationReport:
    """Run every check of :data:`CHECK_NAMES` on the dataset folder ``root``.

    ``workers`` (default ``os.cpu_count()``) processes decode the video files, one file per task; the
    pool is kept warm between calls (:func:`shutdown_decode_pool` stops it). As with any
    ``multiprocessing`` code, a script calling this with ``workers > 1`` needs the
    ``if __name__ == "__main__":`` guard.
    Timestamps must be within ``timestamp_tolerance_s`` (default half a frame, ``1/(2*fps)``) of
    ``frame_index/fps``. A video is frozen when one episode shows at least
    ``max(frozen_min_frames, ceil(frozen_fraction * episode_length))`` identical consecutive frames.
    ``cameras`` maps the dataset's cameras onto the policy's image inputs (``{dataset key: policy key}``;
    default: the automatic rule of :mod:`zk0_pipelines.datasets.cameras`); the map used is in
    ``report.cameras``.
    ``progress`` shows a progress bar (default: when stderr is a terminal).
    """
    root = Path(root)
    workers = workers or os.cpu_count() or 1
    if progress is None:
        progress = sys.stderr.isatty()
    ctx = _Ctx(root=root, dataset_id=dataset_id)
    if not root.is_dir():
        return _not_a_folder_report(ctx)

    results: dict[str, CheckOutcome] = {"info_json": _check_info(ctx)}
    _load(ctx)
    results["parquet_readable"] = _check_parquet(ctx)
    data_ok = bool(ctx.data_files)
    results["schema"] = _check_schema(ctx, cameras) if ctx.info_ok else _skipped(ctx, "schema", "info_json")
    results["episodes_nonempty"] = _check_episodes(ctx)
    results["finite_values"] = (
        _check_finite(ctx) if data_ok else _skipped(ctx, "finite_values", "parquet_readable")
    )
    if not ctx.info_ok:
        results["timestamps"] = _skipped(ctx, "timestamps", "info_json")
    elif not data_ok:
        results["timestamps"] = _skipped(ctx, "timestamps", "parquet_readable")
    else:
        tolerance = timestamp_tolerance_s if timestamp_tolerance_s is not None else 1.0 / (2.0 * ctx.fps)
        results["timestamps"] = _check_timestamps(ctx, tolerance)

    plan_problems = _plan_videos(ctx) if ctx.info_ok else []
    if not ctx.info_ok and (root / "videos").is_dir():
        for path in sorted((root / "videos").rglob("*.mp4")):
            ctx.video_tasks[ctx.rel(path)] = {
                "key": path.relative_to(root).parts[1],
                "segments": [],
                "episodes": {},
            }
    decode_seconds, used_workers = _decode_all(ctx, workers, max(2, frozen_min_frames), progress)
    results["video_decode"] = _check_video_decode(ctx, plan_problems)
    if not ctx.info_ok:
        results["frame_counts"] = _skipped(ctx, "frame_counts", "info_json")
        results["frozen_frames"] = _skipped(ctx, "frozen_frames", "info_json")
    elif ctx.episodes is None or any(rel in ctx.parquet_errors for rel in ctx.episodes_files):
        results["frame_counts"] = _skipped(ctx, "frame_counts", "parquet_readable")
        results["frozen_frames"] = _check_frozen(ctx, frozen_min_frames, frozen_fraction)
    else:
        results["frame_counts"] = _check_frame_counts(ctx)
        results["frozen_frames"] = _check_frozen(ctx, frozen_min_frames, frozen_fraction)

    _add_link_problems(ctx, results, find_unsafe_links(root))
    checks = [results[name] for name in CHECK_NAMES]
    stats = _stats(ctx, decode_seconds, used_workers)
    return ValidationReport(dataset_id, root, checks, stats, ctx.cameras)


def _not_a_folder_report(ctx: _Ctx) -> ValidationReport:
    """A path that is no folder fails ``info_json`` once, saying what it is; the other checks are not run."""
    root = ctx.root
    if root.is_file():
        what = f"{root} is a file, not a dataset folder (a LeRobot dataset is a folder with meta/info.json)"
    elif root.is_symlink():
        what = f"dataset folder {root} is a symlink that does not resolve (broken or a loop)"
    elif root.exists():
        what = f"{root} is not a folder"
    else:
        what = f"dataset folder {root} does not exist"
    first = CheckOutcome("info_json", False, f"{ctx.dataset_id}: {what}", {"path": str(root)})
    results = {"info_json": first}
    checks = [results.get(name) or _skipped(ctx, name, "info_json") for name in CHECK_NAMES]
    return ValidationReport(ctx.dataset_id, root, checks, {})


def _link_check(rel: str) -> str:
    """The check a link belongs to: the videos' (decode), info.json's, or the other files' (parquet)."""
    if rel.startswith("videos/") or rel == "videos":
        return "video_decode"
    if rel == "meta/info.json":
        return "info_json"
    return "parquet_readable"


def _add_link_problems(ctx: _Ctx, results: dict[str, CheckOutcome], links: list[UnsafeLink]) -> None:
    """Fail the check each unsafe link belongs to, naming the link; drop what that check said of it."""
    for name in CHECK_NAMES:
        mine = [link for link in links if _link_check(link.rel) == name]
        if not mine:
            continue
        old = results[name]
        rels = {link.rel for link in mine}
        kept = [p for p in old.details.get("problems", []) if p.split(":", 1)[0] not in rels]
        details = {k: v for k, v in old.details.items() if k not in ("problems", "problem_count")}
        results[name] = _outcome(ctx, name, [link.message() for link in mine] + kept, "", **details)


def refused_report(root: Path, dataset_id: str, reason: str) -> ValidationReport:
    """The report of a dataset refused at fetch: ``schema`` fails with ``reason``, nothing else is run.

    What the ingest stores beside a refused dataset's quarantined copy, like any validation report.
    """
    refused = CheckOutcome("schema", False, f"{dataset_id}: refused at fetch: {reason}", {"refused": True})
    results = {"schema": refused}
    checks = [
        results.get(name)
        or CheckOutcome(
            name,
            False,
            f"{dataset_id}: not run: the dataset was refused at fetch (see schema)",
            {"skipped": True, "requires": "fetch"},
        )
        for name in CHECK_NAMES
    ]
    return ValidationReport(dataset_id, Path(root), checks, {})
