"""The camera map: automatic rule, explicit mappings, refusals, the registry's ``cameras:`` and discovery."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zk0_pipelines.datasets.cameras import (
    CameraMappingError,
    export_rename_map,
    parse_mapping,
    resolve_cameras,
)
from zk0_pipelines.datasets.discovery import discovered_cameras
from zk0_pipelines.datasets.registry import load_registry

TOP, WRIST = "observation.images.top", "observation.images.wrist"
VIDEO = {"dtype": "video", "shape": [64, 64, 3], "names": ["height", "width", "channels"]}
STATE = {"dtype": "float32", "shape": [6], "names": None}


def _features(*names: str) -> dict:
    return {"observation.state": STATE, **{f"observation.images.{n}": VIDEO for n in names}}


@pytest.mark.parametrize(
    ("cameras", "expected", "unused"),
    [
        (("top", "wrist", "side"), {"top": "top", "wrist": "wrist"}, ["side"]),
        (("laptop", "phone"), {"laptop": "top", "phone": "wrist"}, []),
        (("front", "gripper"), {"front": "top", "gripper": "wrist"}, []),
        (("side", "front", "wrist"), {"front": "top", "wrist": "wrist"}, ["side"]),
        (("cam_b", "cam_a"), {"cam_a": "top", "cam_b": "wrist"}, []),
    ],
)
def test_automatic_rule(cameras: tuple[str, ...], expected: dict, unused: list[str]) -> None:
    found = resolve_cameras(_features(*cameras))
    short = {s.rsplit(".", 1)[-1]: d.rsplit(".", 1)[-1] for s, d in found.rename.items()}
    assert short == expected and found.rule == "auto"
    assert [u.rsplit(".", 1)[-1] for u in found.unused] == unused
    features = found.policy_features(_features(*cameras))
    assert sorted(k for k in features if k.startswith("observation.images.")) == [TOP, WRIST]
    assert "observation.state" in features


@pytest.mark.parametrize(
    ("cameras", "mapping", "needles"),
    [
        (("front",), None, ["1 camera(s) (observation.images.front)", "needs 2"]),
        (("left_wrist", "right_wrist"), None, ["ambiguous", "left_wrist", "cameras: {"]),
        (
            ("a", "b"),
            {"c": "top", "a": "wrist"},
            ["observation.images.c", "cameras found", "--cameras a=top,b=wrist"],
        ),
        (("a", "b"), {"a": "top"}, ["feeds no camera to observation.images.wrist"]),
        (("front", "top", "x"), {"front": "top", "x": "wrist"}, ["observation.images.top is not mapped"]),
    ],
)
def test_refusals_name_the_cameras_and_how_to_map_them(cameras, mapping, needles) -> None:
    with pytest.raises(CameraMappingError) as err:
        resolve_cameras(_features(*cameras), mapping)
    for needle in needles:
        assert needle in str(err.value)


def test_explicit_mapping_and_its_parsing() -> None:
    found = resolve_cameras(_features("laptop", "phone"), parse_mapping("phone=top, laptop=wrist"))
    assert found.rename == {"observation.images.phone": TOP, "observation.images.laptop": WRIST}
    assert found.rule == "registry" and not found.is_identity
    stats = found.policy_stats({"observation.images.phone": {"mean": 1}, "action": {"mean": 2}})
    assert stats == {TOP: {"mean": 1}, "action": {"mean": 2}}
    assert parse_mapping('{"observation.images.a": "top"}') == {"observation.images.a": TOP}
    for bad in ("laptop", "laptop=side", "a=top,b=top"):
        with pytest.raises(ValueError):
            parse_mapping(bad)


def test_registry_cameras_are_normalised_and_bad_targets_named_by_line(tmp_path: Path) -> None:
    def registry(cameras: dict) -> Path:
        path = tmp_path / "registry.yaml"
        entry = {"id": "lab", "role": "train", "source": {"kind": "local", "path": "."}, "cameras": cameras}
        path.write_text(yaml.safe_dump({"version": 1, "datasets": [entry]}, sort_keys=False))
        return path

    entry = load_registry(registry({"laptop": "top", "phone": "wrist"})).get("lab")
    assert entry.cameras == {"observation.images.laptop": TOP, "observation.images.phone": WRIST}
    with pytest.raises(
        ValueError, match=r"registry.yaml:\d+: datasets\[0\]\.cameras: .*'side' is not a policy input"
    ):
        load_registry(registry({"laptop": "side"}))


def test_discovery_writes_the_automatic_map_only_where_it_renames() -> None:
    assert discovered_cameras({"features": _features("laptop", "phone")}) == {
        "observation.images.laptop": TOP,
        "observation.images.phone": WRIST,
    }
    assert discovered_cameras({"features": _features("top", "wrist")}) is None
    assert discovered_cameras({"features": _features("front")}) is None


def test_export_rename_map_keeps_the_pairs_that_do_not_conflict() -> None:
    laptop, phone, cam = "observation.images.laptop", "observation.images.phone", "observation.images.cam"
    merged = export_rename_map(
        [
            {laptop: TOP, phone: WRIST},
            {TOP: TOP, WRIST: WRIST},
            {cam: TOP, laptop: TOP},
            {WRIST: TOP, TOP: WRIST},
        ]
    )
    assert merged == {cam: TOP, laptop: TOP, phone: WRIST}
    assert export_rename_map([{cam: TOP}, {cam: WRIST}]) == {}


def test_lineage_tags_record_camera_maps_and_conversions() -> None:
    from zk0_pipelines.defs.release_assets import dataset_lineage_tags

    conversion = {
        "source_version": "v2.1",
        "target_version": "v3.0",
        "converter": "lerobot.scripts.convert_dataset_v21_to_v30",
        "converter_version": "lerobot 0.6.1",
    }
    tags = dataset_lineage_tags(
        [
            {"id": "a", "cameras": {"observation.images.laptop": TOP, "observation.images.phone": WRIST}},
            {"id": "b", "cameras": {TOP: TOP, WRIST: WRIST}, "conversion": conversion},
        ]
    )
    assert tags["cameras.a"] == "laptop=top,phone=wrist" and tags["cameras.b"] == "top=top,wrist=wrist"
    assert tags["converted.b"].startswith("v2.1->v3.0 by lerobot.scripts.convert_dataset_v21_to_v30")
    assert "converted.a" not in tags
