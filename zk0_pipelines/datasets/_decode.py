"""Decode one video file completely (the work unit of the validation's process pool).

Kept free of heavy imports (only PyAV and NumPy) so pool workers start fast.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import av
import numpy as np


@dataclass
class DecodeResult:
    """What one full decode of a video file found."""

    path: str
    exists: bool = True
    size: int = 0
    decoded: int = 0
    declared: int | None = None
    error: str | None = None
    error_frame: int | None = None
    # runs of identical consecutive frames: (segment id, first frame in file, run length)
    frozen_runs: list[tuple[int, int, int]] = field(default_factory=list)
    longest_run: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    pix_fmt: str | None = None

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)


def _luma_key(frame: av.VideoFrame, bytes_per_sample: int = 1) -> bytes:
    """The luma plane of a frame as bytes, row padding removed (two frames are equal iff these are)."""
    plane = frame.planes[0]
    row = plane.width * bytes_per_sample
    if plane.line_size == row:
        return bytes(plane)
    view = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[: plane.height, :row]
    return view.copy().tobytes()  # copy() first: tobytes() of a strided view is slow


def _bytes_per_sample(frame: av.VideoFrame) -> int:
    try:
        return max(1, (frame.format.components[0].bits + 7) // 8)
    except (AttributeError, IndexError):
        return 1


def decode_video_file(
    path: str,
    segments: list[tuple[int, int, int]] | None = None,
    min_run: int = 2,
    threads: int = 1,
) -> DecodeResult:
    """Decode every frame of ``path`` with ``err_detect=explode``; never raises.

    ``segments`` are ``(segment_id, start_frame, end_frame)`` ranges of the file (one per episode);
    runs of identical consecutive frames (luma plane compared byte for byte) are counted inside each
    segment, and runs of at least ``min_run`` frames are returned. A file that ends before the frame
    count its container declares is reported as an error (truncation).
    """
    result = DecodeResult(path=path)
    start = time.perf_counter()
    if not os.path.exists(path):
        result.exists = False
        result.error = "file is missing"
        return result
    result.size = os.path.getsize(path)
    if result.size == 0:
        result.error = "file is empty (0 bytes)"
        return result

    # without episode metadata the whole file is one segment (id -1)
    bounds = sorted(segments, key=lambda s: s[1]) if segments else [(-1, 0, 1 << 62)]
    seg_idx = 0
    current_seg: int | None = None
    prev_key: bytes | None = None
    sample_bytes = 1
    run_start = 0
    run_len = 0

    def close_run() -> None:
        if current_seg is None or run_len < 1:
            return
        if run_len > result.longest_run.get(current_seg, 0):
            result.longest_run[current_seg] = run_len
        if run_len >= min_run:
            result.frozen_runs.append((current_seg, run_start, run_len))

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            result.declared = int(stream.frames) if stream.frames else None
            ctx = stream.codec_context
            ctx.options = {"err_detect": "explode"}
            ctx.thread_count = threads
            for frame in container.decode(stream):
                index = result.decoded
                if result.pix_fmt is None:
                    result.pix_fmt = frame.format.name
                    sample_bytes = _bytes_per_sample(frame)
                # which episode segment does this frame belong to?
                while seg_idx < len(bounds) and index >= bounds[seg_idx][2]:
                    seg_idx += 1
                seg = bounds[seg_idx][0] if seg_idx < len(bounds) and index >= bounds[seg_idx][1] else None
                key = _luma_key(frame, sample_bytes)
                if seg != current_seg:
                    close_run()
                    current_seg, run_start, run_len = seg, index, 1
                elif key == prev_key:
                    run_len += 1
                else:
                    close_run()
                    run_start, run_len = index, 1
                prev_key = key
                result.decoded += 1
        close_run()
        if result.declared is not None and result.decoded < result.declared:
            result.error = (
                f"decoded {result.decoded} of the {result.declared} frames the container declares "
                "(truncated or damaged)"
            )
            result.error_frame = result.decoded
    except Exception as exc:  # noqa: BLE001 - any decoder/demuxer failure is a finding, not a crash
        close_run()
        result.error = f"{type(exc).__name__}: {exc}"
        result.error_frame = result.decoded
    result.seconds = time.perf_counter() - start
    return result


def raw_decode_count(path: str) -> int:
    """Plain PyAV decode of every frame with default settings (the benchmark baseline)."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream))
