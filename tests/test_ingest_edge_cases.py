"""The Dagster ingest fed unusual but plausible datasets: every outcome leaves a record that says why.

One module-scoped set of runs (one ``dg.materialize`` per dataset partition, then the snapshot) feeds
every test: a clean dataset, another robot, symlink loops, a truncated video, a cut info.json and a
file given as the dataset folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml
from _fixtures_datasets import TOP, WRIST, clean_dataset, truncate, video_rel  # noqa: F401
from dagster._core.event_api import PartitionKeyFilter

from zk0_pipelines.defs.ingest_assets import so100_dataset, validated_dataset
from zk0_pipelines.defs.partitions import SO100_DATASETS
from zk0_pipelines.defs.resources import DatasetRegistryResource, DvcResource
from zk0_pipelines.defs.training_assets import dataset_snapshot

VALIDATED = dg.AssetKey("validated_dataset")


def _with_robot(root: Path, robot_type: str) -> None:
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["robot_type"] = robot_type
    info_path.write_text(json.dumps(info))


def _looped(root: Path) -> None:
    os.symlink("..", root / "videos" / TOP / "loop")  # videos/<camera>/loop -> ..
    video = root / video_rel(WRIST)
    video.unlink()
    os.symlink(video.name, video)  # a video file that links to itself


def _cut_info_json(root: Path) -> None:
    info = (root / "meta" / "info.json").read_text()
    (root / "meta" / "info.json").write_text(info[: info.index('"robot_type"') + 20])


# dataset id -> how its local copy of the clean dataset is damaged (None: a file is given instead)
CASES = {
    "good": lambda root: None,
    "koch": lambda root: _with_robot(root, "koch_follower"),
    "looped": _looped,
    "cut-json": _cut_info_json,
    "a-file": None,
    "broken": lambda root: truncate(root / video_rel(TOP), 0.5),  # ingested last: the newest checks fail
}


@dataclass
class Ingest:
    workspace: Path
    instance: dg.DagsterInstance
    runs: dict[str, dg.ExecuteInProcessResult]
    snapshot: dict

    def metadata(self, dataset_id: str, asset: str) -> dict:
        (mat,) = [m for m in self.runs[dataset_id].asset_materializations_for_node(asset)]
        return {k: v.value for k, v in mat.metadata.items()}

    def checks(self, dataset_id: str) -> dict[str, dg.AssetCheckEvaluation]:
        return {e.check_name: e for e in self.runs[dataset_id].get_asset_check_evaluations()}

    def quarantined(self, dataset_id: str) -> Path:
        (attempt,) = (self.workspace / ".zk0" / "quarantine" / dataset_id).iterdir()
        return attempt


def _failure_text(result: dg.ExecuteInProcessResult) -> str:
    texts = []
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data is not None:
            error = event.step_failure_data.error
            while error is not None:
                texts.append(error.message)
                error = error.cause
    return "\n".join(texts)


@pytest.fixture(scope="module")
def ingest(tmp_path_factory: pytest.TempPathFactory, clean_dataset: Path) -> Iterator[Ingest]:  # noqa: F811
    workspace = tmp_path_factory.mktemp("ingest_edges") / "workspace"
    sources = workspace.parent / "sources"
    entries = []
    for dataset_id, damage in CASES.items():
        path = sources / dataset_id
        if damage is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"PK\x03\x04 an archive, not a folder")
        else:
            shutil.copytree(clean_dataset, path)
            damage(path)
        entries.append({"id": dataset_id, "role": "train", "source": {"kind": "local", "path": str(path)}})
    workspace.mkdir()
    registry = workspace / "registry.yaml"
    registry.write_text(yaml.safe_dump({"datasets": entries}, sort_keys=False))
    resources = {"dataset_registry": DatasetRegistryResource(registry_path=str(registry))}
    with pytest.MonkeyPatch.context() as mp, dg.instance_for_test() as instance:
        mp.setenv("ZK0_ROOT", str(workspace))
        instance.add_dynamic_partitions(SO100_DATASETS.name, list(CASES))
        runs = {
            dataset_id: dg.materialize(
                [so100_dataset, validated_dataset],
                partition_key=dataset_id,
                resources=resources,
                instance=instance,
                raise_on_error=False,
            )
            for dataset_id in CASES
        }
        snap = dg.materialize(
            [dataset_snapshot], resources={**resources, "dvc": DvcResource()}, instance=instance
        )
        yield Ingest(workspace, instance, runs, snap.output_for_node("dataset_snapshot"))


def test_symlink_loops_are_refused_and_recorded(ingest: Ingest) -> None:
    assert ingest.runs["looped"].success
    links = (
        f"videos/{TOP}/loop: symlink to '..' is a loop (it leads back to a folder that contains it)",
        f"{video_rel(WRIST)}: symlink to 'file-000.mp4' is a loop (it leads back to itself)",
    )
    fetched = ingest.metadata("looped", "so100_dataset")
    assert fetched["status"] == "refused"
    assert fetched["refused"].startswith("dataset 'looped' (local:")
    assert all(link in fetched["refused"] for link in links)
    validated = ingest.metadata("looped", "validated_dataset")
    assert validated["status"] == "quarantined" and validated["refused"] == fetched["refused"]
    schema = ingest.checks("looped")["schema"]
    assert not schema.passed and schema.description.startswith("looped: refused at fetch: dataset 'looped'")
    report = json.loads((ingest.quarantined("looped") / "report.json").read_text())
    assert all(link in json.dumps(report) for link in links)
    assert "Errno 40" not in json.dumps(report)
    excluded = ingest.snapshot["excluded"]["looped"]
    assert excluded.startswith("quarantined (") and links[0] in excluded


def test_other_robot_leaves_report_copy_and_reason(ingest: Ingest) -> None:
    assert ingest.runs["koch"].success
    reason = "meta/info.json declares robot_type 'koch_follower', not an SO-100/SO-101 arm"
    assert reason in ingest.metadata("koch", "so100_dataset")["refused"]
    validated = ingest.metadata("koch", "validated_dataset")
    assert validated["status"] == "quarantined" and reason in validated["refused"]
    assert "schema" in validated["failed_checks"].split(", ")
    attempt = ingest.quarantined("koch")
    assert (
        json.loads((attempt / "dataset" / "meta" / "info.json").read_text())["robot_type"] == "koch_follower"
    )
    report = json.loads((attempt / "report.json").read_text())
    (schema,) = [c for c in report["checks"] if c["name"] == "schema"]
    assert reason in schema["message"] and schema["details"]["refused"] is True
    assert not (ingest.workspace / "data" / "koch").exists()
    excluded = ingest.snapshot["excluded"]["koch"]
    assert excluded.startswith(f"quarantined ({attempt}): koch: refused at fetch:") and reason in excluded


def test_a_file_given_as_the_dataset_folder_fails_the_fetch_saying_so(ingest: Ingest) -> None:
    result = ingest.runs["a-file"]
    assert not result.success
    text = _failure_text(result)
    assert "dataset 'a-file': local source" in text and "a-file is a file, not a dataset folder" in text
    assert "does not exist" not in text
    assert ingest.snapshot["excluded"]["a-file"] == "not ingested yet"


def test_decode_error_names_the_episode(ingest: Ingest) -> None:
    decode = ingest.checks("broken")["video_decode"]
    assert not decode.passed
    assert decode.description.startswith(f"broken: {video_rel(TOP)}: ")
    found = re.search(r"at frame (\d+) \(episode (\d+) frame (\d+)\)", decode.description)
    assert found, decode.description
    frame, episode, in_episode = (int(v) for v in found.groups())
    assert (episode, in_episode) == divmod(frame, 30)  # the clean dataset: 2 episodes x 30 frames
    assert "failed checks video_decode, frame_counts" in ingest.snapshot["excluded"]["broken"]


def test_invalid_json_names_line_and_column(ingest: Ingest) -> None:
    info = ingest.checks("cut-json")["info_json"]
    assert not info.passed
    assert re.search(
        r"^cut-json: meta/info.json: invalid JSON: Unterminated string starting at: line \d+ column \d+",
        info.description,
    ), info.description


def test_check_results_are_kept_per_partition(ingest: Ingest) -> None:
    storage = ingest.instance.event_log_storage
    key = dg.AssetCheckKey(VALIDATED, "video_decode")
    latest = storage.get_latest_asset_check_execution_by_key([key])[key]
    assert latest.partition == "broken" and latest.status.value == "FAILED"  # validated last
    expected = {"good": "SUCCEEDED", "koch": "FAILED", "looped": "FAILED", "broken": "FAILED"}
    for partition, status in expected.items():
        (record,) = storage.get_asset_check_execution_history(
            key, limit=5, partition_filter=PartitionKeyFilter(key=partition)
        )
        evaluation = record.evaluation
        assert (record.partition, record.status.value) == (partition, status)
        assert evaluation.partition == partition
        assert evaluation.description.startswith(f"{partition}: ")
        assert evaluation.metadata["partition"].value == partition
    assert [d["id"] for d in ingest.snapshot["datasets"]] == ["good"]  # only the clean one trains
