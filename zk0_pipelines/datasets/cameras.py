"""The one place that maps a dataset's cameras onto the policy's image inputs.

The policy reads :data:`~zk0_pipelines.datasets.so100.CAMERA_KEYS` (``observation.images.top`` and
``observation.images.wrist``). A dataset may name its cameras anything (``laptop``, ``phone``, ``front``,
``gripper``…); a :class:`CameraMap` says which dataset camera feeds which policy input (lerobot's
``rename_map`` idea). It is resolved from an explicit mapping (the registry entry's ``cameras:``, the
``--cameras`` option of ``zk0 validate``) or, without one, by the automatic rule:

1. a camera already named like a policy input feeds that input;
2. ``observation.images.wrist`` ← the remaining camera whose name contains ``wrist``, else ``gripper``,
   else ``hand``; ``observation.images.top`` ← the remaining camera whose name contains ``top``, else
   ``overhead``, ``front``, ``laptop``, ``scene``, ``side`` (first hint that matches wins; two cameras
   matching that same hint are ambiguous);
3. inputs still unfed take the remaining cameras in sorted key order.

Cameras left over are not used by the policy. Fewer cameras than inputs, an ambiguous choice, or an
explicit mapping naming a camera that does not exist is a :class:`CameraMappingError` naming the
cameras found and how to map them. The admitted dataset carries its resolved map in its provenance file,
so validation, statistics, client training, server evaluation and export all read the same answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zk0_pipelines.datasets.admission import PROVENANCE_FILE
from zk0_pipelines.datasets.so100 import CAMERA_KEYS

IMAGE_PREFIX = "observation.images."
_HINTS: dict[str, tuple[str, ...]] = {
    "observation.images.wrist": ("wrist", "gripper", "hand"),
    "observation.images.top": ("top", "overhead", "front", "laptop", "scene", "side"),
}


class CameraMappingError(ValueError):
    """A dataset's cameras cannot be mapped onto the policy's image inputs."""


def full_key(name: str) -> str:
    """``laptop`` → ``observation.images.laptop``; full keys are kept."""
    name = str(name).strip()
    return name if name.startswith("observation.") else IMAGE_PREFIX + name


def normalize_mapping(mapping: Mapping[str, str] | None) -> dict[str, str] | None:
    """A user mapping (short or full keys) as ``{dataset camera: policy input}``; ``ValueError`` when bad."""
    if mapping is None:
        return None
    out: dict[str, str] = {}
    for source, target in mapping.items():
        src, dst = full_key(source), full_key(target)
        if dst not in CAMERA_KEYS:
            raise ValueError(
                f"camera mapping {source!r}: {target!r} is not a policy input; use one of {CAMERA_KEYS}"
            )
        if dst in out.values():
            raise ValueError(f"camera mapping: two cameras map to {dst!r}")
        out[src] = dst
    return out


def parse_mapping(text: str) -> dict[str, str]:
    """``laptop=top,phone=wrist`` (or JSON) → a normalised mapping; ``ValueError`` when malformed."""
    text = text.strip()
    if text.startswith("{"):
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("camera mapping JSON must be an object")
        return normalize_mapping({str(k): str(v) for k, v in data.items()}) or {}
    pairs: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        source, sep, target = part.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise ValueError(f"camera mapping {part!r} is not SOURCE=TARGET (e.g. laptop=top,phone=wrist)")
        pairs[source.strip()] = target.strip()
    return normalize_mapping(pairs) or {}


@dataclass(frozen=True)
class CameraMap:
    """Which dataset camera feeds which policy input; ``rule`` says how it was chosen."""

    rename: dict[str, str]
    rule: str
    unused: tuple[str, ...] = field(default=())

    @property
    def is_identity(self) -> bool:
        """True when every policy input is fed by the camera of the same name."""
        return all(src == dst for src, dst in self.rename.items())

    def describe(self) -> str:
        """``laptop→top, phone→wrist (auto)``."""
        pairs = ", ".join(
            f"{src.removeprefix(IMAGE_PREFIX)}→{dst.removeprefix(IMAGE_PREFIX)}"
            for src, dst in self.rename.items()
        )
        return f"{pairs} ({self.rule})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (provenance, asset metadata)."""
        return {"rename": dict(self.rename), "rule": self.rule, "unused": list(self.unused)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CameraMap:
        """Inverse of :meth:`to_dict`."""
        return cls(dict(data["rename"]), str(data.get("rule", "recorded")), tuple(data.get("unused", ())))

    def policy_features(self, features: Mapping[str, Any]) -> dict[str, Any]:
        """The dataset's features as the policy sees them: mapped cameras renamed, unused cameras left out."""
        out: dict[str, Any] = {}
        for key, ft in features.items():
            if key in self.rename:
                out[self.rename[key]] = ft
            elif not _is_camera(key, ft):
                out[key] = ft
        return out

    def policy_stats(self, stats: Mapping[str, Any]) -> dict[str, Any]:
        """Statistics keyed like :meth:`policy_features` (unused cameras dropped)."""
        cameras = set(self.unused)
        return {self.rename.get(k, k): v for k, v in stats.items() if k not in cameras}


def _is_camera(key: str, ft: Any) -> bool:
    return isinstance(ft, dict) and (ft.get("dtype") in ("video", "image") or key.startswith(IMAGE_PREFIX))


def camera_keys(features: Mapping[str, Any]) -> list[str]:
    """The camera (video/image) feature keys of a dataset, sorted."""
    return sorted(k for k, ft in features.items() if _is_camera(k, ft))


def _how_to_map(found: list[str]) -> str:
    names = [k.removeprefix(IMAGE_PREFIX) for k in found] or ["<camera>", "<camera>"]
    pairs = list(zip(names, (k.removeprefix(IMAGE_PREFIX) for k in CAMERA_KEYS), strict=False))
    as_yaml = ", ".join(f"{src}: {dst}" for src, dst in pairs)
    as_option = ",".join(f"{src}={dst}" for src, dst in pairs)
    return (
        f"map them with `cameras: {{{as_yaml}}}` in the registry entry "
        f"or `zk0 validate --cameras {as_option}`"
    )


def resolve_cameras(features: Mapping[str, Any], mapping: Mapping[str, str] | None = None) -> CameraMap:
    """The :class:`CameraMap` of a dataset with ``features`` (its ``meta/info.json`` features).

    ``mapping`` is an explicit ``{dataset camera: policy input}`` (short names allowed); without it the
    automatic rule of the module doc applies. Raises :class:`CameraMappingError`.
    """
    found = camera_keys(features)
    listed = ", ".join(found) or "none"
    if len(found) < len(CAMERA_KEYS):
        raise CameraMappingError(
            f"the dataset has {len(found)} camera(s) ({listed}); the policy needs {len(CAMERA_KEYS)} "
            f"({', '.join(CAMERA_KEYS)}): record one more camera or train without this dataset"
        )
    if mapping is not None:
        rename = normalize_mapping(mapping) or {}
        missing = [src for src in rename if src not in found]
        if missing:
            raise CameraMappingError(
                f"the camera mapping names {', '.join(missing)}, which the dataset does not have "
                f"(cameras found: {listed}); {_how_to_map(found)}"
            )
        unfed = [dst for dst in CAMERA_KEYS if dst not in rename.values()]
        if unfed:
            raise CameraMappingError(
                f"the camera mapping feeds no camera to {', '.join(unfed)} (cameras found: {listed}); "
                f"{_how_to_map(found)}"
            )
        rule = "registry"
    else:
        rename, rule = _auto(found, listed), "auto"
    clash = [src for src in found if src not in rename and src in rename.values()]
    if clash:
        raise CameraMappingError(
            f"camera {clash[0]} is not mapped but another camera is mapped onto its name (cameras found: "
            f"{listed}); map {clash[0]} explicitly"
        )
    ordered = {src: dst for dst in CAMERA_KEYS for src, d in rename.items() if d == dst}
    return CameraMap(ordered, rule, tuple(src for src in found if src not in ordered))


def _auto(found: list[str], listed: str) -> dict[str, str]:
    rename = {key: key for key in CAMERA_KEYS if key in found}
    free = [key for key in found if key not in rename]
    for target, hints in _HINTS.items():
        if target in rename.values():
            continue
        for hint in hints:  # earlier hints win; two cameras matching the same best hint are ambiguous
            candidates = [k for k in free if hint in k.removeprefix(IMAGE_PREFIX).lower()]
            if len(candidates) > 1:
                raise CameraMappingError(
                    f"ambiguous cameras: {', '.join(candidates)} could all feed {target} (cameras found: "
                    f"{listed}); {_how_to_map(found)}"
                )
            if candidates:
                rename[candidates[0]] = target
                free.remove(candidates[0])
                break
    for target in CAMERA_KEYS:
        if target not in rename.values():
            rename[free.pop(0)] = target
    return rename


def export_rename_map(renames: list[Mapping[str, str]]) -> dict[str, str]:
    """The ``rename_map`` an exported model carries: every client's renaming pairs that do not conflict.

    A camera name that two clients map to different inputs, or that is itself a policy input name (a
    swap), is left out; identity pairs are not needed. A robot whose cameras are named as in one of the
    training datasets can then run the exported model as is.
    """
    merged: dict[str, str] = {}
    conflicting: set[str] = set()
    for rename in renames:
        for src, dst in rename.items():
            if src == dst:
                continue
            if src in CAMERA_KEYS or merged.get(src, dst) != dst:
                conflicting.add(src)
            merged[src] = dst
    return {src: dst for src, dst in sorted(merged.items()) if src not in conflicting}


def recorded_camera_map(root: Path) -> CameraMap | None:
    """The camera map recorded in an admitted dataset's provenance file, if any."""
    path = Path(root) / PROVENANCE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cameras = data.get("cameras") if isinstance(data, dict) else None
    return CameraMap.from_dict(cameras) if isinstance(cameras, dict) and "rename" in cameras else None


def dataset_camera_map(root: Path, features: Mapping[str, Any] | None = None) -> CameraMap:
    """The camera map of the dataset folder ``root``: the recorded one, else the automatic rule."""
    recorded = recorded_camera_map(root)
    if recorded is not None:
        return recorded
    if features is None:
        info = json.loads((Path(root) / "meta" / "info.json").read_text(encoding="utf-8"))
        features = info.get("features") or {}
    return resolve_cameras(features)
