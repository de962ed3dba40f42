"""What a registered run records so that ``zk0 reproduce`` can rebuild it, and reading it back.

An MLflow run holds, under ``zk0/``, the exact run config (``run_config.json``, credentials withheld) and
the sha256 of the global weights after every round (``round_weights.json``, :func:`round_weight_hashes`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zk0_pipelines.tracking.secrets import scrub_mapping

RECORD_FOLDER = "zk0"
RUN_CONFIG_ARTIFACT = f"{RECORD_FOLDER}/run_config.json"
ROUND_WEIGHTS_ARTIFACT = f"{RECORD_FOLDER}/round_weights.json"


@dataclass
class ReproductionRecord:
    """The run config and the per-round weight hashes of a logged run."""

    config: dict[str, Any]
    round_weights: dict[str, str]


def weights_sha256(safetensors_file: Path) -> str:
    """sha256 over the tensor names, dtypes, shapes and bytes of a safetensors file (order-independent)."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(safetensors_file))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def round_weight_hashes(run_dir: Path) -> dict[str, str]:
    """``{round: sha256}`` of the global weights checkpointed after each round, plus ``final``."""
    hashes: dict[str, str] = {}
    for ckpt in sorted((run_dir / "checkpoints").glob("round-*")):
        weights = ckpt / "pretrained_model" / "model.safetensors"
        if weights.is_file():
            hashes[str(int(ckpt.name.split("-")[1]))] = weights_sha256(weights)
    final = run_dir / "final" / "model.safetensors"
    if final.is_file():
        hashes["final"] = weights_sha256(final)
    return hashes


def log_reproduction_record(client: Any, run_id: str, record: ReproductionRecord) -> None:
    """Log ``record`` to the MLflow run ``run_id`` (``client``: an ``MlflowClient``)."""
    config, _withheld = scrub_mapping(dict(record.config))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / RECORD_FOLDER
        folder.mkdir()
        (folder / Path(RUN_CONFIG_ARTIFACT).name).write_text(json.dumps(config, indent=2))
        (folder / Path(ROUND_WEIGHTS_ARTIFACT).name).write_text(json.dumps(record.round_weights))
        client.log_artifacts(run_id, str(folder), artifact_path=RECORD_FOLDER)


def read_reproduction_record(client: Any, run_id: str, downloads: Path) -> ReproductionRecord:
    """Download the record of the MLflow run ``run_id`` into ``downloads`` and read it."""

    def recorded(artifact: str) -> Any:
        return json.loads(Path(client.download_artifacts(run_id, artifact, str(downloads))).read_text())

    return ReproductionRecord(recorded(RUN_CONFIG_ARTIFACT), recorded(ROUND_WEIGHTS_ARTIFACT))
