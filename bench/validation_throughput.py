"""Video throughput of validate_dataset against a plain PyAV decode of the same files.

Baseline: one process decodes every frame of every video file with PyAV's defaults (no checks).
Measured: validate_dataset on each dataset (every check; videos decoded once each over a process pool
with ``err_detect=explode``, frame counts and frozen-frame runs from that same pass), timed end to end.
Each side is timed ``--repeat`` times (alternating) and the best run is kept.

    .venv/bin/python bench/validation_throughput.py                 # generate 4 x 3 x 90 frames at 96x96
    .venv/bin/python bench/validation_throughput.py --root PATH     # a dataset, or a folder of datasets

The last line is ``validation_throughput: <validated frames/s ÷ raw frames/s>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from zk0_pipelines import settings


def _generate(out: Path, count: int, episodes: int, frames: int, hw: int) -> list[Path]:
    from zk0_pipelines.datasets.synthetic import MOTIONS, SyntheticSpec, write_synthetic_so100

    roots = []
    for i in range(count):
        spec = SyntheticSpec(
            seed=100 + i,
            task=f"bench task {i}",
            motion=MOTIONS[i % len(MOTIONS)],
            episodes=episodes,
            frames_per_episode=frames,
            image_hw=(hw, hw),
        )
        root = out / f"bench-{i}"
        marker = root / ".spec"
        if not (marker.is_file() and marker.read_text() == spec.fingerprint()):
            shutil.rmtree(root, ignore_errors=True)
            write_synthetic_so100(root, f"zk0/bench-{i}", spec)
            marker.write_text(spec.fingerprint())
        roots.append(root)
    return roots


def _dataset_roots(path: Path) -> list[Path]:
    if (path / "meta" / "info.json").is_file():
        return [path]
    roots = sorted(p.parent.parent for p in path.glob("*/meta/info.json"))
    if not roots:
        raise SystemExit(f"no LeRobot dataset (meta/info.json) at {path} or in its sub-folders")
    return roots


def _raw(videos: list[Path]) -> tuple[int, float]:
    from zk0_pipelines.datasets._decode import raw_decode_count

    start = time.perf_counter()
    frames = sum(raw_decode_count(str(v)) for v in videos)
    return frames, time.perf_counter() - start


def _validated(roots: list[Path], workers: int) -> tuple[int, float, list[str]]:
    from zk0_pipelines.datasets.validation import validate_dataset

    frames, failed = 0, []
    start = time.perf_counter()
    for root in roots:
        report = validate_dataset(root, root.name, workers=workers, progress=False)
        frames += report.stats["decoded_frames"]
        if not report.passed:
            failed.append(f"{root.name}: {report.summary()}")
    return frames, time.perf_counter() - start, failed


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the ratio on the last line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, help="a dataset or a folder of datasets (default: generate)")
    parser.add_argument("--out", type=Path, default=None, help="where to generate (default .zk0/bench/...)")
    parser.add_argument("--datasets", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--frames", type=int, default=90)
    parser.add_argument("--hw", type=int, default=96)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    settings.configure_local_env()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.root is not None:
        roots = _dataset_roots(args.root)
    else:
        out = args.out or settings.state_dir() / "bench" / "validation_throughput"
        start = time.perf_counter()
        roots = _generate(out, args.datasets, args.episodes, args.frames, args.hw)
        print(f"datasets: {len(roots)} at {out} (ready in {time.perf_counter() - start:.1f} s)")
    videos = sorted(v for root in roots for v in (root / "videos").rglob("*.mp4"))
    print(f"video files: {len(videos)}; cpu cores: {os.cpu_count()}; validate workers: {args.workers}")

    best_raw = best_val = None
    frames_raw = frames_val = 0
    failures: list[str] = []
    for _ in range(args.repeat):
        frames_raw, seconds = _raw(videos)
        best_raw = seconds if best_raw is None else min(best_raw, seconds)
        frames_val, seconds, failures = _validated(roots, args.workers)
        best_val = seconds if best_val is None else min(best_val, seconds)
    raw_fps = frames_raw / best_raw
    val_fps = frames_val / best_val
    print(
        f"raw PyAV decode (1 process, defaults): {frames_raw} frames in {best_raw:.3f} s "
        f"= {raw_fps:.0f} frames/s"
    )
    print(
        f"validate_dataset (all checks, {args.workers} workers): {frames_val} frames in {best_val:.3f} s "
        f"= {val_fps:.0f} frames/s"
    )
    if frames_val != frames_raw:
        print(f"WARNING: validation decoded {frames_val} frames, the raw decode {frames_raw}")
    if failures:
        print("WARNING: datasets failed validation:\n  " + "\n  ".join(failures))
    print(json.dumps({"raw_fps": round(raw_fps, 1), "validated_fps": round(val_fps, 1)}))
    print(f"validation_throughput: {val_fps / raw_fps:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
