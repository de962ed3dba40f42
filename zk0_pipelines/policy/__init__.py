"""SmolVLA construction (tiny offline or pretrained), trainable-parameter exchange, lerobot folder export."""

from zk0_pipelines.policy.export import export_policy_folder, load_policy_folder
from zk0_pipelines.policy.factory import (
    PolicyBuildError,
    PolicySpec,
    TrainableStateError,
    build_policy,
    build_processors,
    count_parameters,
    frozen_fingerprint,
    load_trainable_state,
    trainable_state,
)
from zk0_pipelines.policy.tiny_vlm import ensure_tiny_vlm

__all__ = [
    "PolicyBuildError",
    "PolicySpec",
    "TrainableStateError",
    "build_policy",
    "build_processors",
    "count_parameters",
    "ensure_tiny_vlm",
    "export_policy_folder",
    "frozen_fingerprint",
    "load_policy_folder",
    "load_trainable_state",
    "trainable_state",
]
