"""The dataset registry: a YAML file listing the federated clients' training datasets and the eval sets.

Format (``extra`` keys are errors everywhere; every error names the file and the line)::

    version: 1
    datasets:
      - id: client-a            # slug [a-z0-9][a-z0-9_-]*, used as the Dagster partition key
        role: train             # train | eval
        source:
          kind: synthetic       # SyntheticSpec fields
          seed: 1
          task: pick up the red cube
          motion: reach
      - id: so100-pickplace
        role: train
        source:
          kind: hub
          repo_id: lerobot/svla_so100_pickplace
          revision: v3.0        # pinned: a 40-hex commit sha or a version tag
      - id: lab-drop
        role: eval
        source:
          kind: local
          path: ../drop/lab_dataset   # relative to this file's folder, or absolute
        cameras:                      # optional: dataset camera -> policy image input
          laptop: top                 # (short or full keys; default: the automatic rule of
          phone: wrist                #  zk0_pipelines.datasets.cameras)

Pinning rule for ``hub`` sources: ``revision`` must be a full 40-character hex commit sha, or a version
tag matching ``v?MAJOR[.MINOR[.PATCH]][-suffix]`` (``v3.0``, ``v2.1``, ``1.0.0``). Branch names such as
``main`` move and are rejected; the commit actually fetched is recorded by :func:`fetch_dataset`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

from zk0_pipelines.datasets.cameras import normalize_mapping
from zk0_pipelines.datasets.sim_env import SimLab
from zk0_pipelines.datasets.sim_expert import SimulationSpec
from zk0_pipelines.datasets.synthetic import MOTIONS, SyntheticSpec

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
TAG_RE = re.compile(r"^v?\d+(?:\.\d+){0,2}(?:[-+][0-9A-Za-z.-]+)?$")
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

_KIND_FIELDS: dict[str, set[str]] = {
    "hub": {"repo_id", "revision"},
    "local": {"path"},
    "synthetic": {"seed", "task", "motion", "episodes", "frames_per_episode", "fps", "image_hw"},
    "simulation": {"seed", "task", "episodes", "image_hw", "lab"},
}
_REQUIRED: dict[str, set[str]] = {
    "hub": {"repo_id", "revision"},
    "local": {"path"},
    "synthetic": {"seed", "task"},
    "simulation": {"seed"},
}


def is_pinned_revision(revision: str) -> bool:
    """True for a 40-hex commit sha or a version tag (see the module docstring)."""
    return bool(SHA_RE.match(revision) or TAG_RE.match(revision))


def slugify(text: str) -> str:
    """Turn e.g. a Hub repo id into a valid dataset id: ``lerobot/svla_so100`` → ``lerobot-svla_so100``."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")
    slug = slug[:64].rstrip("-_")
    if not slug:
        raise ValueError(f"cannot make a dataset id from {text!r}")
    return slug


class DatasetSource(BaseModel):
    """Where a dataset comes from: ``hub`` (repo_id + pinned revision), ``local`` (path), ``synthetic``,
    ``simulation`` (scripted-expert episodes recorded in the SO-101 MuJoCo simulator, one ``lab``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["hub", "local", "synthetic", "simulation"]
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None
    seed: int | None = None
    task: str | None = None
    motion: str | None = None
    episodes: int | None = None
    frames_per_episode: int | None = None
    fps: int | None = None
    image_hw: tuple[int, int] | None = None
    lab: dict[str, Any] | None = None

    @field_validator("repo_id")
    @classmethod
    def _check_repo_id(cls, value: str | None) -> str | None:
        if value is not None and not REPO_ID_RE.match(value):
            raise ValueError(f"repo_id {value!r} is not of the form 'owner/name'")
        return value

    @field_validator("revision")
    @classmethod
    def _check_revision(cls, value: str | None) -> str | None:
        if value is not None and not is_pinned_revision(value):
            raise ValueError(
                f"revision {value!r} is not pinned: use a 40-hex commit sha or a version tag like 'v3.0' "
                "(branches such as 'main' move)"
            )
        return value

    @field_validator("motion")
    @classmethod
    def _check_motion(cls, value: str | None) -> str | None:
        if value is not None and value not in MOTIONS:
            raise ValueError(f"unknown motion {value!r}; expected one of {', '.join(MOTIONS)}")
        return value

    @model_validator(mode="after")
    def _check_kind_fields(self, info: ValidationInfo) -> DatasetSource:
        given = {name for name in self.model_fields_set if name != "kind" and getattr(self, name) is not None}
        foreign = sorted(given - _KIND_FIELDS[self.kind])
        if foreign:
            raise ValueError(f"field(s) {', '.join(foreign)} do not apply to a {self.kind!r} source")
        missing = sorted(_REQUIRED[self.kind] - given)
        if missing:
            raise ValueError(f"a {self.kind!r} source needs {', '.join(missing)}")
        if self.kind == "local" and self.path is not None and not self.path.is_absolute():
            base = (info.context or {}).get("base_dir") if info else None
            if base is not None:
                object.__setattr__(self, "path", (Path(base) / self.path).resolve())
        if self.kind == "synthetic":
            self.synthetic_spec()  # raises ValueError on bad combinations
        if self.kind == "simulation":
            self.simulation_spec()
        return self

    def synthetic_spec(self) -> SyntheticSpec:
        """The :class:`SyntheticSpec` of a synthetic source (defaults for fields left out)."""
        if self.kind != "synthetic":
            raise ValueError(f"a {self.kind!r} source has no synthetic spec")
        params = {
            name: getattr(self, name) for name in _KIND_FIELDS["synthetic"] if getattr(self, name) is not None
        }
        return SyntheticSpec(**params)

    def simulation_spec(self) -> SimulationSpec:
        """The :class:`SimulationSpec` of a simulation source (defaults for fields left out)."""
        if self.kind != "simulation":
            raise ValueError(f"a {self.kind!r} source has no simulation spec")
        params: dict[str, Any] = {
            name: getattr(self, name)
            for name in _KIND_FIELDS["simulation"]
            if getattr(self, name) is not None
        }
        if "lab" in params:
            try:
                params["lab"] = SimLab(**params["lab"])
            except TypeError as exc:
                raise ValueError(
                    f"lab: {exc} (known keys: {', '.join(SimLab.__dataclass_fields__)})"
                ) from exc
        return SimulationSpec(**params)

    def describe(self) -> str:
        """Short human-readable origin, e.g. ``hub:lerobot/x@v3.0``."""
        if self.kind == "hub":
            return f"hub:{self.repo_id}@{self.revision}"
        if self.kind == "local":
            return f"local:{self.path}"
        if self.kind == "simulation":
            return f"simulation:seed={self.seed}"
        return f"synthetic:seed={self.seed},motion={self.motion or 'reach'}"


class DatasetEntry(BaseModel):
    """One registered dataset: its id (Dagster partition key), role, source and optional camera mapping."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    role: Literal["train", "eval"]
    source: DatasetSource
    cameras: dict[str, str] | None = None

    @field_validator("cameras")
    @classmethod
    def _check_cameras(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return normalize_mapping(value)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not SLUG_RE.match(value):
            raise ValueError(
                f"id {value!r} is not a slug: lowercase letters, digits, '-' and '_', starting with a letter "
                "or digit, at most 64 characters"
            )
        return value


class _RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    datasets: list[DatasetEntry]


@dataclass(frozen=True)
class DatasetRegistry:
    """The loaded registry: entries in file order."""

    entries: list[DatasetEntry]
    path: Path | None = None
    _by_id: dict[str, DatasetEntry] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_id.update({entry.id: entry for entry in self.entries})

    def get(self, dataset_id: str) -> DatasetEntry:
        """The entry with this id; ``KeyError`` naming the known ids otherwise."""
        try:
            return self._by_id[dataset_id]
        except KeyError:
            where = f" in {self.path}" if self.path else ""
            known = ", ".join(self.ids) or "none"
            raise KeyError(f"unknown dataset id {dataset_id!r}{where}; known ids: {known}") from None

    @property
    def ids(self) -> list[str]:
        """All ids in file order."""
        return [entry.id for entry in self.entries]

    @property
    def train_ids(self) -> list[str]:
        """Ids of the training (client) datasets."""
        return [entry.id for entry in self.entries if entry.role == "train"]

    @property
    def eval_ids(self) -> list[str]:
        """Ids of the held-out evaluation datasets."""
        return [entry.id for entry in self.entries if entry.role == "eval"]


def _node_line(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at ``loc`` (keys point at the key itself), or of its deepest parent."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((kv for kv in node.value if getattr(kv[0], "value", None) == part), None)
            if match is None:
                return line
            key_node, node = match
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _duplicate_keys(node: yaml.Node | None, path: Path) -> list[str]:
    errors: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = getattr(key_node, "value", None)
            line = key_node.start_mark.line + 1
            if key in seen:
                errors.append(f"{path}:{line}: duplicate key {key!r} (first at line {seen[key]})")
            else:
                seen[key] = line
            errors.extend(_duplicate_keys(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            errors.extend(_duplicate_keys(item, path))
    return errors


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_registry(path: Path) -> DatasetRegistry:
    """Load and validate a registry YAML file.

    Unknown keys, missing or bad fields, duplicate YAML keys and duplicate dataset ids raise one
    ``ValueError`` listing every problem as ``<file>:<line>: <what>``. Relative ``local`` paths are
    resolved against the registry file's folder.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read dataset registry {path}: {exc}") from exc
    try:
        root_node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from exc
    errors = _duplicate_keys(root_node, path)
    if errors:
        raise ValueError("invalid dataset registry:\n" + "\n".join(errors))
    if not isinstance(data, dict):
        raise ValueError(f"{path}:1: the registry must be a mapping with a 'datasets' list")

    errors = _duplicate_ids(data, root_node, path)
    try:
        parsed = _RegistryFile.model_validate(data, context={"base_dir": path.parent.resolve()})
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = _node_line(root_node, loc)
            what = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                what = f"unknown key {loc[-1]!r}"
            errors.append(f"{path}:{line}: {_format_loc(loc) or '<root>'}: {what}")
        parsed = None
    if errors or parsed is None:
        raise ValueError("invalid dataset registry:\n" + "\n".join(errors))
    return DatasetRegistry(entries=list(parsed.datasets), path=path)


def _duplicate_ids(data: dict, root_node: yaml.Node | None, path: Path) -> list[str]:
    errors: list[str] = []
    items = data.get("datasets")
    if not isinstance(items, list):
        return errors
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        line = _node_line(root_node, ("datasets", index, "id")) or 0
        if item["id"] in seen:
            errors.append(
                f"{path}:{line}: duplicate dataset id {item['id']!r} (first at line {seen[item['id']]})"
            )
        else:
            seen[item["id"]] = line
    return errors
