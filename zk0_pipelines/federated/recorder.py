"""Server-side run record: ``metrics.json`` and per-round checkpoints in the run's output folder.

Layout (mirrors lerobot's training checkpoints)::

    <output-dir>/
      metrics.json                      config, status, rounds (aggregates, server eval, update norm,
                                        payload bytes, wall time, scheduled learning rate, dropped and
                                        rejected clients with reasons), clients (per client per round,
                                        status accepted / rejected / dropped)
      checkpoints/round-001/
        pretrained_model/               lerobot folder of the full global policy (export_policy_folder)
        training_state/
          round.json                    round, strategy, run config, fingerprints, stats digest
          trainable_state.safetensors   float32 global trainable weights (what resume loads)
          rng_state.safetensors         lerobot's save_rng_state (python, numpy, torch)
      final/                            lerobot folder of the final global policy

Files are written to temporary siblings and moved into place; a checkpoint counts as complete once its
``training_state/round.json`` exists (written last).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
PRETRAINED_DIR = "pretrained_model"
TRAINING_STATE_DIR = "training_state"
ROUND_FILE = "round.json"
TRAINABLE_FILE = "trainable_state.safetensors"


def checkpoint_dir(output_dir: Path, server_round: int) -> Path:
    """Folder of the checkpoint after ``server_round``."""
    return Path(output_dir) / CHECKPOINTS_DIR / f"round-{server_round:03d}"


def latest_checkpoint(output_dir: Path) -> tuple[int, Path] | None:
    """``(round, folder)`` of the newest complete checkpoint in ``output_dir``, or None."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = []
    for folder in root.glob("round-*") if root.is_dir() else []:
        suffix = folder.name.removeprefix("round-")
        if suffix.isdigit() and (folder / TRAINING_STATE_DIR / ROUND_FILE).is_file():
            found.append((int(suffix), folder))
    return max(found) if found else None


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temporary file + ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


class RunRecorder:
    """Collects per-round and per-client records and writes them to ``metrics.json`` after each change."""

    def __init__(self, output_dir: Path, config: dict[str, Any], *, run_id: int | str | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {
            "run-id": str(run_id) if run_id is not None else None,
            "status": "running",
            "config": dict(config),
            "started-at": time.time(),
            "rounds": [],
            "clients": [],
        }
        self._round_started: dict[int, float] = {}

    @property
    def path(self) -> Path:
        """The ``metrics.json`` path."""
        return self.output_dir / METRICS_FILE

    def restore(self, previous: dict[str, Any], up_to_round: int) -> None:
        """Keep rounds/clients of a previous ``metrics.json`` up to ``up_to_round`` (resume)."""
        self.data["rounds"] = [r for r in previous.get("rounds", []) if r.get("round", 0) <= up_to_round]
        self.data["clients"] = [c for c in previous.get("clients", []) if c.get("round", 0) <= up_to_round]
        self.data["resumed-from-round"] = up_to_round

    def set(self, key: str, value: Any) -> None:
        """Set a top-level entry (e.g. ``norm-stats``, ``policy``) and write."""
        self.data[key] = value
        self.write()

    def round_entry(self, server_round: int) -> dict[str, Any]:
        """The record of ``server_round`` (created on first access)."""
        for entry in self.data["rounds"]:
            if entry["round"] == server_round:
                return entry
        entry = {"round": server_round, "train": None, "server-eval": None}
        self.data["rounds"].append(entry)
        self.data["rounds"].sort(key=lambda e: e["round"])
        return entry

    def observe(self, kind: str, server_round: int, payload: dict[str, Any]) -> None:
        """Strategy callback (see ``strategy.Observer``)."""
        if kind == "configure-train":
            self._round_started[server_round] = time.time()
            self.round_entry(server_round).update(payload)
        elif kind in ("client-train", "client-evaluate"):
            row = {"round": server_round, "phase": kind.removeprefix("client-"), **payload}
            row["round"] = server_round
            self.data["clients"].append(row)
        elif kind == "aggregate-train":
            entry = self.round_entry(server_round)
            payload = dict(payload)
            entry["train"] = payload.pop("metrics")
            entry.update(payload)
        elif kind in ("evaluate-dropped", "privacy"):
            self.round_entry(server_round).update(payload)
        self.write()

    def finish_round(self, server_round: int, **values: Any) -> None:
        """Add server-side values (eval, update norm, checkpoint) to a round and stamp its wall time."""
        entry = self.round_entry(server_round)
        entry.update(values)
        if server_round in self._round_started:
            entry["wall-time-s"] = time.time() - self._round_started[server_round]
        self.write()

    def finish(self, status: str, **values: Any) -> None:
        """Final status (``completed`` / ``failed``) and summary values."""
        self.data["status"] = status
        self.data["finished-at"] = time.time()
        self.data.update(values)
        self.write()

    def write(self) -> None:
        """Write ``metrics.json`` atomically."""
        write_json_atomic(self.path, self.data)


def write_checkpoint(
    output_dir: Path,
    server_round: int,
    *,
    policy,
    preprocessor,
    postprocessor,
    trainable: dict,
    round_info: dict[str, Any],
    card_markdown: str,
) -> Path:
    """Write the checkpoint of ``server_round`` (layout in the module doc); returns its folder."""
    from lerobot.utils.random_utils import save_rng_state
    from safetensors.torch import save_file

    from zk0_pipelines.policy import export_policy_folder

    final = checkpoint_dir(output_dir, server_round)
    final.mkdir(parents=True, exist_ok=True)
    state_done = final / TRAINING_STATE_DIR
    if state_done.exists():  # a re-run of this round: the checkpoint is incomplete until round.json is back
        shutil.rmtree(state_done)
    # exported in place (export_policy_folder is atomic itself and records its absolute VLM path)
    export_policy_folder(
        policy,
        preprocessor,
        postprocessor,
        final / PRETRAINED_DIR,
        card_markdown=card_markdown,
        overwrite=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{TRAINING_STATE_DIR}.tmp-", dir=final))
    try:
        save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / TRAINABLE_FILE))
        save_rng_state(tmp)
        write_json_atomic(tmp / ROUND_FILE, {"round": server_round, **round_info})
        os.replace(tmp, state_done)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict]:
    """``(round.json content, float32 trainable state)`` of a checkpoint folder; restores its RNG state."""
    from lerobot.utils.random_utils import load_rng_state
    from safetensors.torch import load_file

    state_dir = Path(folder) / TRAINING_STATE_DIR
    info = json.loads((state_dir / ROUND_FILE).read_text())
    trainable = load_file(str(state_dir / TRAINABLE_FILE))
    load_rng_state(state_dir)
    return info, trainable
