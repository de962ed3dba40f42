"""The SO-100 / SO-101 arm schema shared by the generator, the sources and the validation."""

from __future__ import annotations

import re

SO100_JOINTS: tuple[str, ...] = (
    "shoulder_pan.pos",
    "shoulder_lift.pos",
    "elbow_flex.pos",
    "wrist_flex.pos",
    "wrist_roll.pos",
    "gripper.pos",
)
CAMERA_KEYS: tuple[str, ...] = ("observation.images.top", "observation.images.wrist")
VECTOR_KEYS: tuple[str, ...] = ("observation.state", "action")
ROBOT_TYPE = "so100_follower"

# so100, so100_follower, so101_follower, so-100, so_101, ...  (case-insensitive)
_ROBOT_FAMILY = re.compile(r"^so[-_]?10[01](?:$|[-_])", re.IGNORECASE)


def so100_features(image_hw: tuple[int, int] = (64, 64)) -> dict:
    """Return the ``LeRobotDataset.create`` feature dict of a 6-DoF SO-100 arm with two video cameras."""
    height, width = (int(v) for v in image_hw)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_hw must be two positive integers, got {image_hw!r}")
    vector = {"dtype": "float32", "shape": (len(SO100_JOINTS),), "names": list(SO100_JOINTS)}
    features: dict = {key: dict(vector, names=list(SO100_JOINTS)) for key in VECTOR_KEYS}
    for key in CAMERA_KEYS:
        features[key] = {
            "dtype": "video",
            "shape": (height, width, 3),
            "names": ["height", "width", "channels"],
        }
    return features


def is_so100_family(robot_type: str | None) -> bool:
    """True when ``robot_type`` names an SO-100 or SO-101 arm (``so100``, ``so100_follower``, ``so101``…)."""
    return bool(robot_type) and bool(_ROBOT_FAMILY.match(str(robot_type)))


def normalize_joint_name(name: str) -> str:
    """Map the joint spellings seen on the Hub onto one form: ``main_shoulder_pan`` → ``shoulder_pan.pos``."""
    base = str(name).strip()
    for prefix in ("main_", "follower_", "leader_"):
        if base.startswith(prefix):
            base = base[len(prefix) :]
    if not base.endswith(".pos"):
        base = base + ".pos"
    return base


def feature_joint_names(feature: dict) -> list[str] | None:
    """The joint names of a vector feature: ``names`` is a list, or a dict holding one list (v2 style)."""
    names = feature.get("names")
    if isinstance(names, dict):
        lists = [v for v in names.values() if isinstance(v, list)]
        names = lists[0] if len(lists) == 1 else None
    if not isinstance(names, list):
        return None
    return [str(n) for n in names]
