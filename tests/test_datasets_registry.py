"""The dataset registry YAML: strict schema, errors that name the file and the line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from zk0_pipelines.datasets.registry import (
    DatasetEntry,
    DatasetSource,
    is_pinned_revision,
    load_registry,
    slugify,
)
from zk0_pipelines.datasets.synthetic import SyntheticSpec

GOOD = """\
version: 1
datasets:
  - id: client-a
    role: train
    source:
      kind: synthetic
      seed: 1
      task: pick up the red cube
      motion: wave
      image_hw: [32, 48]
  - id: so100-pickplace
    role: train
    source: {kind: hub, repo_id: lerobot/svla_so100_pickplace, revision: v3.0}
  - id: lab_drop
    role: eval
    source:
      kind: local
      path: drops/lab
"""


def _write(tmp_path: Path, text: str, name: str = "datasets.yaml") -> Path:
    path = tmp_path / "configs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_good_registry_loads(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    registry = load_registry(path)
    assert registry.ids == ["client-a", "so100-pickplace", "lab_drop"]
    assert registry.train_ids == ["client-a", "so100-pickplace"]
    assert registry.eval_ids == ["lab_drop"]
    spec = registry.get("client-a").source.synthetic_spec()
    assert spec == SyntheticSpec(seed=1, task="pick up the red cube", motion="wave", image_hw=(32, 48))
    hub = registry.get("so100-pickplace").source
    assert (hub.kind, hub.repo_id, hub.revision) == ("hub", "lerobot/svla_so100_pickplace", "v3.0")
    # relative local paths are relative to the registry file's folder
    assert registry.get("lab_drop").source.path == (tmp_path / "configs" / "drops" / "lab").resolve()


def test_unknown_id_lists_known_ids(tmp_path: Path) -> None:
    registry = load_registry(_write(tmp_path, GOOD))
    with pytest.raises(KeyError, match="known ids: client-a, so100-pickplace, lab_drop"):
        registry.get("nope")


def test_unknown_key_names_file_and_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        datasets:
          - id: a
            role: train
            source:
              kind: synthetic
              seed: 1
              task: pick
              colour: red
        """,
    )
    with pytest.raises(ValueError, match=rf"{path}:8: .*unknown key 'colour'"):
        load_registry(path)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "datasets: []\nowner: me\n")
    with pytest.raises(ValueError, match=rf"{path}:2: .*unknown key 'owner'"):
        load_registry(path)


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        datasets:
          - id: a
            role: train
            source: {kind: synthetic, seed: 1, task: t}
          - id: b
            role: train
            source: {kind: synthetic, seed: 2, task: t}
          - id: a
            role: eval
            source: {kind: synthetic, seed: 3, task: t}
        """,
    )
    with pytest.raises(ValueError, match=rf"{path}:8: duplicate dataset id 'a' \(first at line 2\)"):
        load_registry(path)


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "datasets:\n  - id: a\n    id: b\n    role: train\n    source: {kind: local, path: x}\n"
    )
    with pytest.raises(ValueError, match=rf"{path}:3: duplicate key 'id'"):
        load_registry(path)


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("{kind: hub, repo_id: a/b, revision: main}", "revision 'main' is not pinned"),
        ("{kind: hub, repo_id: a/b}", "a 'hub' source needs revision"),
        ("{kind: hub, repo_id: nope, revision: v1.0}", "not of the form 'owner/name'"),
        ("{kind: local}", "a 'local' source needs path"),
        ("{kind: local, path: x, seed: 3}", "seed do not apply to a 'local' source"),
        ("{kind: synthetic, seed: 1, task: t, motion: teleport}", "unknown motion 'teleport'"),
        ("{kind: synthetic, task: t}", "a 'synthetic' source needs seed"),
        ("{kind: ftp, path: x}", "kind"),
    ],
)
def test_bad_sources_name_the_line(tmp_path: Path, source: str, needle: str) -> None:
    path = _write(tmp_path, f"datasets:\n  - id: ok\n    role: train\n    source: {source}\n")
    with pytest.raises(ValueError, match=rf"{path}:4: ") as info:
        load_registry(path)
    assert needle in str(info.value)


@pytest.mark.parametrize("bad_id", ["Upper", "with space", "-lead", "a/b", ""])
def test_ids_must_be_slugs(tmp_path: Path, bad_id: str) -> None:
    path = _write(
        tmp_path, f"datasets:\n  - id: '{bad_id}'\n    role: train\n    source: {{kind: local, path: x}}\n"
    )
    with pytest.raises(ValueError, match=rf"{path}:2: .*not a slug"):
        load_registry(path)


def test_bad_role_and_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "datasets:\n  - id: a\n    role: test\n    source: {kind: local, path: x}\n")
    with pytest.raises(ValueError, match=rf"{path}:3: "):
        load_registry(path)
    broken = _write(tmp_path, "datasets: [\n", name="broken.yaml")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_registry(broken)
    with pytest.raises(ValueError, match="cannot read"):
        load_registry(tmp_path / "missing.yaml")


def test_pinning_rule() -> None:
    assert is_pinned_revision("0123456789abcdef0123456789abcdef01234567")
    for tag in ("v3.0", "v2.1", "1.0.0", "v1", "v3.0-rc1"):
        assert is_pinned_revision(tag), tag
    for moving in ("main", "refs/heads/main", "0123abc", "latest", "v3.x"):
        assert not is_pinned_revision(moving), moving


def test_entries_can_be_built_in_code() -> None:
    entry = DatasetEntry(
        id=slugify("lerobot/SVLA_so100.PickPlace"),
        role="train",
        source=DatasetSource(kind="hub", repo_id="lerobot/svla_so100_pickplace", revision="v3.0"),
    )
    assert entry.id == "lerobot-svla_so100-pickplace"
    assert entry.source.describe() == "hub:lerobot/svla_so100_pickplace@v3.0"
    with pytest.raises(ValueError):
        DatasetEntry(
            id="x", role="train", source={"kind": "hub", "repo_id": "a/b", "revision": "v1", "extra": 1}
        )
