"""LeRobot v2.1 → v3.0 conversion of a local dataset folder with lerobot's own converter, offline.

LeRobot's ``lerobot.scripts.convert_dataset_v21_to_v30`` downloads from and pushes to the Hub; only its
step functions are called here (info, tasks, data, videos, episodes metadata), reading the v2.1 folder
and writing a new v3.0 folder: the source is never modified. Before converting, the v2.1 layout is
checked file by file so that a broken input is refused with a message naming the file (and episode).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

V21 = "v2.1"
V30 = "v3.0"
CONVERTER = "lerobot.scripts.convert_dataset_v21_to_v30"
_LEGACY_FILES = ("meta/episodes.jsonl", "meta/tasks.jsonl", "meta/episodes_stats.jsonl")
V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"


class DatasetConversionError(RuntimeError):
    """A v2.1 dataset could not be converted (message names the dataset, the file and the episode)."""


@dataclass(frozen=True)
class ConversionRecord:
    """What was converted, from which version, by which converter (recorded in metadata and tags)."""

    source_version: str
    target_version: str
    converter: str
    converter_version: str

    def to_dict(self) -> dict[str, str]:
        """JSON-able form."""
        return asdict(self)


def codebase_version(root: Path) -> str | None:
    """``codebase_version`` of ``root/meta/info.json`` (None when it is missing or unreadable)."""
    try:
        info = json.loads((Path(root) / "meta" / "info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info.get("codebase_version") if isinstance(info, dict) else None


def _jsonl(path: Path, rel: str, dataset_id: str) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DatasetConversionError(f"{dataset_id}: {rel}: line {number} is not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise DatasetConversionError(f"{dataset_id}: {rel}: line {number} is not an object")
        rows.append(row)
    return rows


def check_v21_layout(root: Path, dataset_id: str) -> None:
    """Refuse a v2.1 folder whose files the converter would trip on, naming the file and episode."""
    root = Path(root)
    info = json.loads((root / "meta" / "info.json").read_text(encoding="utf-8"))
    for rel in _LEGACY_FILES:
        if not (root / rel).is_file():
            raise DatasetConversionError(f"{dataset_id}: {rel} is missing (a v2.1 dataset needs it)")
    episodes = _jsonl(root / _LEGACY_FILES[0], _LEGACY_FILES[0], dataset_id)
    stats = {
        row.get("episode_index") for row in _jsonl(root / _LEGACY_FILES[2], _LEGACY_FILES[2], dataset_id)
    }
    _jsonl(root / _LEGACY_FILES[1], _LEGACY_FILES[1], dataset_id)
    chunks_size = int(info.get("chunks_size") or 1000)
    features = info.get("features") or {}
    video_keys = [k for k, ft in features.items() if isinstance(ft, dict) and ft.get("dtype") == "video"]
    data_template = info.get("data_path") or V21_DATA_PATH
    video_template = info.get("video_path") or V21_VIDEO_PATH
    for row in episodes:
        episode = row.get("episode_index")
        if not isinstance(episode, int):
            raise DatasetConversionError(f"{dataset_id}: {_LEGACY_FILES[0]}: episode_index {episode!r}")
        if episode not in stats:
            raise DatasetConversionError(f"{dataset_id}: {_LEGACY_FILES[2]}: no stats for episode {episode}")
        chunk = episode // chunks_size
        try:
            data_rel = data_template.format(episode_chunk=chunk, episode_index=episode)
            video_rels = {
                key: video_template.format(episode_chunk=chunk, video_key=key, episode_index=episode)
                for key in video_keys
            }
        except (KeyError, IndexError, ValueError) as exc:
            raise DatasetConversionError(
                f"{dataset_id}: meta/info.json: data_path/video_path cannot be formatted ({exc!r})"
            ) from None
        if not (root / data_rel).is_file():
            raise DatasetConversionError(f"{dataset_id}: {data_rel} is missing (episode {episode})")
        for key, video_rel in video_rels.items():
            if not (root / video_rel).is_file():
                raise DatasetConversionError(
                    f"{dataset_id}: {video_rel} is missing (episode {episode}, {key})"
                )


def convert_v21_to_v30(src: Path, dest: Path, dataset_id: str) -> ConversionRecord:
    """Convert the v2.1 folder ``src`` into a new v3.0 folder ``dest`` (``src`` is only read).

    Raises :class:`DatasetConversionError` naming the dataset and the file or conversion step.
    """
    import lerobot
    from lerobot.datasets.utils import DEFAULT_DATA_FILE_SIZE_IN_MB, DEFAULT_VIDEO_FILE_SIZE_IN_MB
    from lerobot.scripts import convert_dataset_v21_to_v30 as converter

    src, dest = Path(src), Path(dest)
    version = codebase_version(src)
    if version != V21:
        raise DatasetConversionError(
            f"{dataset_id}: meta/info.json codebase_version is {version!r}, not {V21!r}"
        )
    check_v21_layout(src, dataset_id)
    if dest.exists():
        shutil.rmtree(dest)
    step = "info"
    try:
        converter.convert_info(src, dest, DEFAULT_DATA_FILE_SIZE_IN_MB, DEFAULT_VIDEO_FILE_SIZE_IN_MB)
        step = "tasks"
        converter.convert_tasks(src, dest)
        step = "data"
        episodes = converter.convert_data(src, dest, DEFAULT_DATA_FILE_SIZE_IN_MB)
        step = "videos"
        videos = converter.convert_videos(src, dest, DEFAULT_VIDEO_FILE_SIZE_IN_MB)
        step = "episodes metadata"
        converter.convert_episodes_metadata(src, dest, episodes, videos)
    except Exception as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise DatasetConversionError(
            f"{dataset_id}: lerobot's v2.1 → v3.0 converter failed at the {step} step: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return ConversionRecord(V21, V30, CONVERTER, f"lerobot {lerobot.__version__}")
