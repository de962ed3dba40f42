"""validate_dataset: the clean dataset passes; each deliberate corruption of real files fails the right
check, with a message naming the dataset and the file (and episode/frame where it applies)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import av
import numpy as np
import pytest
from _fixtures_datasets import (  # noqa: F401
    DATA_FILE,
    EPISODES_FILE,
    TOP,
    WRIST,
    clean_dataset,
    dataset_copy,
    overwrite_middle,
    rewrite_parquet,
    set_vector_value,
    truncate,
    video_rel,
)

from zk0_pipelines.datasets.so100 import SO100_JOINTS, so100_features
from zk0_pipelines.datasets.synthetic import SyntheticSpec, synthesize_episodes, write_so100_episodes
from zk0_pipelines.datasets.validation import CHECK_NAMES, ValidationReport, validate_dataset

DS = "ds-under-test"


def _validate(root: Path, **kwargs) -> ValidationReport:
    kwargs.setdefault("workers", 1)
    return validate_dataset(root, DS, **kwargs)


def _assert_fails(report: ValidationReport, check: str, *needles: str) -> None:
    outcome = report.check(check)
    assert not outcome.passed, f"{check} passed unexpectedly: {outcome.message}"
    assert not report.passed
    assert outcome.message.startswith(f"{DS}:"), outcome.message
    for needle in needles:
        assert needle in outcome.message, f"{needle!r} not in {outcome.message!r}"


def test_clean_dataset_passes_every_check(clean_dataset: Path) -> None:  # noqa: F811
    report = _validate(clean_dataset)
    assert [c.name for c in report.checks] == list(CHECK_NAMES)
    assert report.passed, report.summary()
    assert report.failures == []
    stats = report.stats
    assert stats["frames"] == 60 and stats["episodes"] == 2
    assert stats["duration_s"] == pytest.approx(2.0)
    assert stats["decoded_frames"] == 120  # 2 cameras x 60 frames, every frame decoded
    assert stats["decode_seconds"] > 0
    assert stats["observation.state"]["names"] == list(SO100_JOINTS)
    assert all(lo <= hi for lo, hi in zip(stats["action"]["min"], stats["action"]["max"], strict=True))
    as_dict = report.to_dict()
    assert json.loads(json.dumps(as_dict))["passed"] is True
    assert {c["name"] for c in as_dict["checks"]} == set(CHECK_NAMES)


def test_process_pool_gives_the_same_findings(dataset_copy: Path) -> None:  # noqa: F811
    truncate(dataset_copy / video_rel(WRIST), 0.5)
    one = _validate(dataset_copy, workers=1)
    two = _validate(dataset_copy, workers=2)
    assert two.stats["workers"] == 2
    assert [c.to_dict() for c in one.checks] == [c.to_dict() for c in two.checks]
    _assert_fails(two, "video_decode", video_rel(WRIST))


def test_truncated_video_fails_decode_and_frame_count(dataset_copy: Path) -> None:  # noqa: F811
    truncate(dataset_copy / video_rel(TOP), 0.5)
    report = _validate(dataset_copy)
    _assert_fails(report, "video_decode", video_rel(TOP), "at frame")
    # the file-wide frame number is placed in its episode (30 frames per episode)
    found = re.search(r"at frame (\d+) \(episode (\d+) frame (\d+)\)", report.check("video_decode").message)
    assert found, report.check("video_decode").message
    frame, episode, in_episode = (int(v) for v in found.groups())
    assert (episode, in_episode) == divmod(frame, 30)
    _assert_fails(report, "frame_counts", video_rel(TOP), "meta/episodes assigns 60")
    assert report.check("parquet_readable").passed and report.check("finite_values").passed


def test_overwritten_bytes_mid_video_fail_decode(dataset_copy: Path) -> None:  # noqa: F811
    overwrite_middle(dataset_copy / video_rel(WRIST), nbytes=128)
    report = _validate(dataset_copy)
    _assert_fails(report, "video_decode", video_rel(WRIST))
    assert video_rel(TOP) not in report.check("video_decode").message


def test_empty_video_fails(dataset_copy: Path) -> None:  # noqa: F811
    (dataset_copy / video_rel(TOP)).write_bytes(b"")
    _assert_fails(_validate(dataset_copy), "video_decode", video_rel(TOP), "empty")


def test_missing_video_fails(dataset_copy: Path) -> None:  # noqa: F811
    (dataset_copy / video_rel(WRIST)).unlink()
    report = _validate(dataset_copy)
    _assert_fails(report, "video_decode", video_rel(WRIST), "missing")
    _assert_fails(report, "frame_counts", video_rel(WRIST))


def test_truncated_data_parquet_fails(dataset_copy: Path) -> None:  # noqa: F811
    truncate(dataset_copy / DATA_FILE, 0.6)
    report = _validate(dataset_copy)
    _assert_fails(report, "parquet_readable", DATA_FILE)
    # what needs the data cannot pass
    assert not report.check("finite_values").passed and report.check("finite_values").details["skipped"]


def test_corrupt_episodes_parquet_fails(dataset_copy: Path) -> None:  # noqa: F811
    path = dataset_copy / EPISODES_FILE
    data = bytearray(path.read_bytes())
    footer_len = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer_len
    data[start : start + 64] = b"\xff" * 64  # garble the start of the thrift footer, keep the PAR1 magic
    path.write_bytes(bytes(data))
    _assert_fails(_validate(dataset_copy), "parquet_readable", EPISODES_FILE)


def test_nan_in_action_fails_naming_episode_and_frame(dataset_copy: Path) -> None:  # noqa: F811
    set_vector_value(dataset_copy, "action", episode=1, frame=7, joint=2, value=math.nan)
    report = _validate(dataset_copy)
    _assert_fails(report, "finite_values", DATA_FILE, "action", "NaN", "episode 1 frame 7", "elbow_flex.pos")
    assert report.check("timestamps").passed


def test_inf_in_state_fails(dataset_copy: Path) -> None:  # noqa: F811
    set_vector_value(dataset_copy, "observation.state", episode=0, frame=29, joint=5, value=-math.inf)
    _assert_fails(
        _validate(dataset_copy),
        "finite_values",
        "observation.state",
        "Inf",
        "episode 0 frame 29",
        "gripper.pos",
    )


def test_timestamp_drift_fails(dataset_copy: Path) -> None:  # noqa: F811
    def drift(rows: list[dict]) -> None:
        for row in rows:
            if row["episode_index"] == 1 and row["frame_index"] >= 10:
                row["timestamp"] += 0.05  # 1.5 frames late at 30 fps

    rewrite_parquet(dataset_copy / DATA_FILE, drift)
    report = _validate(dataset_copy)
    _assert_fails(report, "timestamps", DATA_FILE, "episode 1 frame 10")
    # a tolerance wider than the drift accepts it
    assert _validate(dataset_copy, timestamp_tolerance_s=0.06).check("timestamps").passed


def test_frame_count_mismatch_in_episode_metadata_fails(dataset_copy: Path) -> None:  # noqa: F811
    key = f"videos/{TOP}/to_timestamp"

    def longer(rows: list[dict]) -> None:
        rows[1][key] = rows[1][key] + 0.2  # metadata now claims 6 more frames than the file has

    rewrite_parquet(dataset_copy / EPISODES_FILE, longer)
    report = _validate(dataset_copy)
    _assert_fails(report, "frame_counts", video_rel(TOP), "decoded 60 frames, meta/episodes assigns 66")
    assert report.check("video_decode").passed


def test_shorter_reencoded_video_fails_frame_counts_only(dataset_copy: Path) -> None:  # noqa: F811
    path = dataset_copy / video_rel(WRIST)
    with av.open(str(path)) as src:
        frames = [f.to_ndarray(format="rgb24") for f in src.decode(video=0)]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for array in frames[:50]:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    report = _validate(dataset_copy)
    assert report.check("video_decode").passed, report.check("video_decode").message
    _assert_fails(report, "frame_counts", video_rel(WRIST), "decoded 50 frames")


def test_frozen_frames_fail_naming_episode_camera_and_frame(tmp_path: Path) -> None:
    episodes = synthesize_episodes(SyntheticSpec(seed=5, task="pick", episodes=2, frames_per_episode=30))
    episodes[1].images[TOP][5:27] = episodes[1].images[TOP][5]  # the top camera hangs for 22 frames
    root = write_so100_episodes(tmp_path / "frozen", "zk0/frozen", 30, episodes)
    report = _validate(root)
    _assert_fails(report, "frozen_frames", video_rel(TOP), "episode 1", TOP, "identical frames from frame")
    assert WRIST not in report.check("frozen_frames").message
    assert report.check("video_decode").passed and report.check("frame_counts").passed
    # the run is detected within its episode: a higher threshold accepts it
    assert _validate(root, frozen_min_frames=25).check("frozen_frames").passed


def test_seven_dof_arm_labelled_so100_fails_schema(tmp_path: Path) -> None:
    episodes = synthesize_episodes(SyntheticSpec(seed=6, task="pick", episodes=1, frames_per_episode=10))
    names = [*SO100_JOINTS[:5], "wrist_yaw.pos", "gripper.pos"]
    features = so100_features()
    for key in ("observation.state", "action"):
        features[key] = {"dtype": "float32", "shape": (7,), "names": names}
    for ep in episodes:
        ep.state = np.concatenate([ep.state, ep.state[:, :1]], axis=1)
        ep.action = np.concatenate([ep.action, ep.action[:, :1]], axis=1)
    root = write_so100_episodes(tmp_path / "seven", "zk0/seven", 30, episodes, features=features)
    report = _validate(root)
    _assert_fails(report, "schema", "meta/info.json", "observation.state has shape [7]", "action", DATA_FILE)
    assert report.check("info_json").passed


def test_other_robot_type_fails_schema(dataset_copy: Path) -> None:  # noqa: F811
    info_path = dataset_copy / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["robot_type"] = "koch_follower"
    info_path.write_text(json.dumps(info))
    _assert_fails(_validate(dataset_copy), "schema", "koch_follower")


def test_empty_episode_fails(dataset_copy: Path) -> None:  # noqa: F811
    rewrite_parquet(dataset_copy / DATA_FILE, lambda rows: [r for r in rows if r["episode_index"] != 1])

    def zero(rows: list[dict]) -> None:
        rows[1]["length"] = 0

    rewrite_parquet(dataset_copy / EPISODES_FILE, zero)
    _assert_fails(_validate(dataset_copy), "episodes_nonempty", "episode 1", EPISODES_FILE, DATA_FILE)


def test_invalid_info_json_fails_and_dependent_checks_do_not_pass(dataset_copy: Path) -> None:  # noqa: F811
    (dataset_copy / "meta" / "info.json").write_text(
        '{"codebase_version": "v3.0", "fps": 30,\n "robot_type": "so1'
    )
    report = _validate(dataset_copy)
    _assert_fails(
        report,
        "info_json",
        "meta/info.json",
        "invalid JSON: Unterminated string starting at: line 2 column 16",
    )
    for name in ("schema", "timestamps", "frame_counts", "frozen_frames"):
        assert not report.check(name).passed and report.check(name).details["skipped"]
    # the videos are still decoded
    assert report.check("video_decode").passed


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"codebase_version": "v2.1"}, "codebase_version is 'v2.1'"),
        ({"fps": 0}, "fps must be a positive number"),
        ({"features": None}, "features must be a non-empty object"),
    ],
)
def test_bad_info_values_fail(dataset_copy: Path, edit: dict, needle: str) -> None:  # noqa: F811
    info_path = dataset_copy / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info.update(edit)
    info_path.write_text(json.dumps(info))
    _assert_fails(_validate(dataset_copy), "info_json", "meta/info.json", needle)


def test_missing_dataset_folder_fails_every_check(tmp_path: Path) -> None:
    report = _validate(tmp_path / "nope")
    assert [c.name for c in report.failures] == list(CHECK_NAMES)
    assert "does not exist" in report.failures[0].message


def test_a_file_given_as_dataset_is_named_a_file_once(tmp_path: Path) -> None:
    path = tmp_path / "so100.tar"
    path.write_bytes(b"not a folder")
    report = _validate(path)
    _assert_fails(report, "info_json", f"{path} is a file, not a dataset folder")
    assert [c.name for c in report.failures] == list(CHECK_NAMES)
    others = [c for c in report.checks if c.name != "info_json"]
    assert all(c.details.get("skipped") and "is a file" not in c.message for c in others)
    assert not any("does not exist" in c.message for c in report.checks)


def test_symlink_loops_fail_naming_each_link(dataset_copy: Path) -> None:  # noqa: F811
    os.symlink("..", dataset_copy / "videos" / TOP / "loop")  # a folder link back to its parent
    video = dataset_copy / video_rel(WRIST)
    video.unlink()
    os.symlink(video.name, video)  # a video file that is a link to itself
    report = _validate(dataset_copy)
    _assert_fails(
        report,
        "video_decode",
        f"videos/{TOP}/loop: symlink to '..' is a loop (it leads back to a folder that contains it)",
        f"{video_rel(WRIST)}: symlink to 'file-000.mp4' is a loop (it leads back to itself)",
    )
    assert "file is missing" not in report.check("video_decode").message
    assert report.check("parquet_readable").passed and report.check("info_json").passed


def test_unreferenced_video_file_fails_frame_counts(dataset_copy: Path) -> None:  # noqa: F811
    extra = dataset_copy / "videos" / TOP / "chunk-000" / "file-001.mp4"
    extra.write_bytes((dataset_copy / video_rel(TOP)).read_bytes())
    report = _validate(dataset_copy)
    _assert_fails(
        report, "frame_counts", "videos/observation.images.top/chunk-000/file-001.mp4", "not referenced"
    )
    assert report.check("video_decode").passed
    assert report.stats["decoded_frames"] == 180


def test_decoder_threads_do_not_change_the_result(clean_dataset: Path) -> None:  # noqa: F811
    from zk0_pipelines.datasets._decode import decode_video_file

    path = str(clean_dataset / video_rel(WRIST))
    one = decode_video_file(path, [(0, 0, 30), (1, 30, 60)], min_run=2, threads=1)
    two = decode_video_file(path, [(0, 0, 30), (1, 30, 60)], min_run=2, threads=2)
    assert one.error is None and one.decoded == two.decoded == one.declared == 60
    assert one.longest_run == two.longest_run


def _validate_in_child(root: str) -> None:
    report = validate_dataset(Path(root), "child", workers=2)
    assert report.passed, report.failures


def test_a_multiprocessing_child_that_validated_with_workers_exits(clean_dataset: Path) -> None:  # noqa: F811
    """Dagster runs each step in a multiprocessing child: its kept decode pool must not block its exit.

    A child joins its non-daemon children before concurrent.futures' atexit hook would stop idle pool
    workers; without the pool's exit finalizer the step process (and the Dagster run) never ends.
    """
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    child = spawn.Process(target=_validate_in_child, args=(str(clean_dataset),))
    child.start()
    child.join(timeout=180)
    alive = child.is_alive()
    if alive:
        child.kill()
        child.join()
    assert not alive, "the validating child process did not exit: its decode pool kept it alive"
    assert child.exitcode == 0


def test_report_markdown_is_one_table_row_per_check_with_escaped_details() -> None:
    from zk0_pipelines.datasets.check import report_markdown
    from zk0_pipelines.datasets.validation import CheckOutcome

    checks = [
        CheckOutcome("info_json", True, "lab: info.json ok"),
        CheckOutcome("video_decode", False, "lab: episode 3 | top camera\ntruncated"),
        CheckOutcome("frame_counts", False, "lab: not run", {"skipped": True}),
    ]
    text = report_markdown(ValidationReport("lab", Path("/data/lab"), checks, {}))
    lines = [re.sub(r" +", " ", line) for line in text.splitlines()]
    assert lines[0] == "### lab: FAILED"
    table = lines[lines.index("| check | result | details |") :]
    assert table[2:] == [
        "| info_json | pass | info.json ok |",
        "| video_decode | FAIL | episode 3 \\| top camera truncated |",
        "| frame_counts | skipped | not run |",
    ]
