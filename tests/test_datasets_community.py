"""Community datasets: other camera names (2 and 3 cameras), SO-101, LeRobot v2.1, through ``zk0 validate``,
the Dagster ingest, and one federated round with a renamed-camera client and a converted v2.1 client."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml
from _fixtures_community import TOP, WRIST, write_community, write_v21
from _fixtures_federated import one_torch_thread  # noqa: F401

from zk0_pipelines.cli import main
from zk0_pipelines.datasets.sources import tree_digest

LAPTOP, PHONE = "observation.images.laptop", "observation.images.phone"


@dataclass
class Community:
    two: Path  # laptop + phone, so101_follower
    three: Path  # front + wrist + side
    v21: Path  # LeRobot v2.1, front + gripper
    one: Path  # a single camera: cannot feed the policy


@pytest.fixture(scope="module")
def community(tmp_path_factory: pytest.TempPathFactory) -> Community:
    base = tmp_path_factory.mktemp("community")
    return Community(
        two=write_community(base / "lab_laptop", {TOP: LAPTOP, WRIST: PHONE}, robot_type="so101_follower"),
        three=write_community(
            base / "lab_three",
            {TOP: "observation.images.front", WRIST: WRIST},
            extra=("observation.images.side",),
            seed=4,
            motion="wave",
        ),
        v21=write_v21(
            base, "lab_v21", {TOP: "observation.images.front", WRIST: "observation.images.gripper"}, seed=5
        ),
        one=write_community(base / "lab_one", {TOP: "observation.images.front"}, seed=6, episodes=1),
    )


def test_validate_cli_passes_renamed_three_camera_so101_and_v21_without_touching_them(
    community: Community, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = {p: tree_digest(p) for p in (community.two, community.three, community.v21)}
    out_json = tmp_path / "reports.json"
    rc = main(
        ["validate", str(community.two), str(community.three), str(community.v21), "--json", str(out_json)]
    )
    printed = capsys.readouterr()
    assert rc == 0, printed.out
    assert "| check | result | details |" in re.sub(r" +", " ", printed.out)  # tabulate pads the columns
    assert "3 of 3 dataset(s) passed" in printed.out
    reports = {r["dataset_id"]: r for r in json.loads(out_json.read_text())["datasets"]}
    assert reports["lab_laptop"]["cameras"]["rename"] == {LAPTOP: TOP, PHONE: WRIST}
    assert reports["lab_three"]["cameras"]["rename"] == {"observation.images.front": TOP, WRIST: WRIST}
    assert reports["lab_three"]["cameras"]["unused"] == ["observation.images.side"]
    assert reports["lab_v21"]["conversion"]["source_version"] == "v2.1"
    assert "lerobot" in reports["lab_v21"]["conversion"]["converter_version"]
    assert reports["lab_v21"]["cameras"]["rename"]["observation.images.gripper"] == WRIST
    assert {p: tree_digest(p) for p in before} == before  # read only


def test_validate_cli_refuses_what_cannot_train_with_a_message_and_no_traceback(
    community: Community, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rc = main(["validate", str(community.one)])
    out = capsys.readouterr()
    assert rc == 1
    printed = re.sub(r" +", " ", out.out)  # tabulate pads the columns
    assert "| schema | FAIL |" in printed and "1 camera(s) (observation.images.front)" in printed

    broken = tmp_path / "broken_v21"
    shutil.copytree(community.v21, broken)
    (broken / "videos/chunk-000/observation.images.gripper/episode_000001.mp4").unlink()
    rc = main(["validate", str(broken), str(community.two)])
    out = capsys.readouterr()
    assert rc == 1 and "1 of 2 dataset(s) passed" in out.out
    assert "videos/chunk-000/observation.images.gripper/episode_000001.mp4 is missing (episode 1" in out.out

    rc = main(["validate", str(community.two), "--cameras", "laptop=wrist,phone=top"])
    out = capsys.readouterr()
    assert rc == 0 and "laptop→wrist" in out.out and "(registry)" in out.out
    assert main(["validate", str(community.two), "--cameras", "webcam=top,phone=wrist"]) == 1
    assert "webcam" in capsys.readouterr().out

    assert main(["validate", str(community.two), "--cameras", "laptop"]) == 2
    assert main(["validate", str(tmp_path / "nowhere")]) == 2
    out = capsys.readouterr()
    assert "not a dataset folder" in out.err and "Traceback" not in out.out + out.err


@dataclass
class Ingested:
    workspace: Path
    results: dict[str, dg.ExecuteInProcessResult]


@pytest.fixture(scope="module")
def ingested(community: Community, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingested]:
    """The Dagster ingest of the community datasets as local registry sources (one with a camera map)."""
    from zk0_pipelines.defs.ingest_assets import so100_dataset, validated_dataset
    from zk0_pipelines.defs.resources import DatasetRegistryResource

    workspace = tmp_path_factory.mktemp("community-ingest")
    registry = {
        "version": 1,
        "datasets": [
            {
                "id": "laptop-phone",
                "role": "train",
                "source": {"kind": "local", "path": str(community.two)},
                "cameras": {"laptop": "top", "phone": "wrist"},
            },
            {"id": "old-v21", "role": "train", "source": {"kind": "local", "path": str(community.v21)}},
            {"id": "three-cams", "role": "eval", "source": {"kind": "local", "path": str(community.three)}},
            {"id": "one-cam", "role": "train", "source": {"kind": "local", "path": str(community.one)}},
        ],
    }
    (workspace / "registry.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))
    resources = {"dataset_registry": DatasetRegistryResource(registry_path=str(workspace / "registry.yaml"))}
    with pytest.MonkeyPatch.context() as mp, dg.instance_for_test() as instance:
        mp.setenv("ZK0_ROOT", str(workspace))
        ids = [d["id"] for d in registry["datasets"]]
        instance.add_dynamic_partitions("so100_datasets", ids)
        results = {
            dataset_id: dg.materialize(
                [so100_dataset, validated_dataset],
                partition_key=dataset_id,
                resources=resources,
                instance=instance,
            )
            for dataset_id in ids
        }
        mp.undo()  # ZK0_ROOT only while ingesting: Ray's socket paths under a pytest tmp root are too long
        yield Ingested(workspace, results)


def _validated_metadata(result: dg.ExecuteInProcessResult) -> dict:
    events = result.asset_materializations_for_node("validated_dataset")
    return events[-1].metadata


def test_ingest_admits_mapped_and_converted_datasets_and_quarantines_with_a_report(
    community: Community, ingested: Ingested
) -> None:
    data = ingested.workspace / "data"
    prov = json.loads((data / "laptop-phone" / "meta" / "zk0_provenance.json").read_text())
    assert prov["cameras"] == {"rename": {LAPTOP: TOP, PHONE: WRIST}, "rule": "registry", "unused": []}
    converted = data / "old-v21"
    assert json.loads((converted / "meta" / "info.json").read_text())["codebase_version"] == "v3.0"
    prov = json.loads((converted / "meta" / "zk0_provenance.json").read_text())
    assert prov["conversion"]["source_version"] == "v2.1" and prov["cameras"]["rule"] == "auto"
    assert (community.v21 / "meta" / "episodes.jsonl").is_file()  # the original stays v2.1
    meta = _validated_metadata(ingested.results["old-v21"])
    validation_md = re.sub(r" +", " ", meta["validation"].value)
    assert meta["status"].value == "validated" and "| timestamps | pass |" in validation_md
    assert meta["conversion"].value["converter"] == "lerobot.scripts.convert_dataset_v21_to_v30"

    assert not (data / "one-cam").exists()
    meta = _validated_metadata(ingested.results["one-cam"])
    assert meta["status"].value == "quarantined"
    (attempt,) = (ingested.workspace / ".zk0" / "quarantine" / "one-cam").iterdir()
    report_md = re.sub(r" +", " ", (attempt / "validation.md").read_text())
    assert "| schema | FAIL |" in report_md and "observation.images.front" in report_md
    assert json.loads((attempt / "validation.json").read_text())["passed"] is False


def test_one_federated_round_with_a_renamed_camera_client_and_a_converted_v21_client(
    ingested: Ingested,
) -> None:
    from zk0_pipelines.federated import recorder as rec
    from zk0_pipelines.federated.launcher import run_federated

    data = ingested.workspace / "data"
    config = {
        "num-server-rounds": 1,
        "local-steps": 1,
        "batch-size": 2,
        "chunk-size": 10,
        "min-available-clients": 2,
    }
    res = run_federated(
        [data / "laptop-phone", data / "old-v21"],
        [data / "three-cams"],
        ingested.workspace / "run",
        config,
        timeout_s=900,
    )
    metrics = json.loads(res.metrics_path.read_text())
    assert metrics["status"] == "completed", metrics.get("error")
    trained = {Path(c["dataset"]).name for c in res.clients if c["phase"] == "train" and c["train-loss"] > 0}
    assert trained == {"laptop-phone", "old-v21"}
    assert res.rounds[-1]["server-eval"]["eval-loss"] > 0
    info = json.loads(
        (rec.checkpoint_dir(res.run_dir, 1) / rec.TRAINING_STATE_DIR / rec.ROUND_FILE).read_text()
    )
    cameras = {Path(k).name: v["rename"] for k, v in info["cameras"].items()}
    assert cameras["laptop-phone"] == {LAPTOP: TOP, PHONE: WRIST}
    assert cameras["old-v21"]["observation.images.gripper"] == WRIST
    card = (res.final_checkpoint / "README.md").read_text()
    assert "laptop-phone cameras (registry)" in card
    processor = json.loads((res.final_checkpoint / "policy_preprocessor.json").read_text())
    (rename,) = [s["config"]["rename_map"] for s in processor["steps"] if "rename_map" in s.get("config", {})]
    assert rename[LAPTOP] == TOP and rename["observation.images.gripper"] == WRIST
