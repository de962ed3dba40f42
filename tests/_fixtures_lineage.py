"""What the lineage tests share, in process (test_lineage) and through the UI (test_ui_e2e)."""

from __future__ import annotations

from typing import Any

#: The training lineage, upstream first: every asset depends on the one before it.
LINEAGE = (
    "so100_dataset",
    "validated_dataset",
    "dataset_snapshot",
    "federated_model",
    "server_evaluation",
    "registered_model",
    "hub_release",
)


def synthetic_source(seed: int, task: str, motion: str) -> dict[str, Any]:
    """A registry source for a tiny synthetic SO-100 dataset (1 episode x 20 frames)."""
    return {
        "kind": "synthetic",
        "seed": seed,
        "task": task,
        "motion": motion,
        "episodes": 1,
        "frames_per_episode": 20,
    }
