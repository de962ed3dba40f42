"""Rebuild a registered model version from what the registry recorded, and compare the weights.

The version's tags give the DVC md5 of the data it was trained on and the dataset ids; its MLflow run
holds the reproduction record (:mod:`~zk0_pipelines.tracking.reproduction_records`): the exact run
config and the sha256 of the weights after every round. Reproduction restores the data with DVC at that
md5 into a workspace of its own (never the user's ``data/``), re-runs the federated training with the
recorded config and compares: on CPU with the recorded seeds the weights are bit-identical; otherwise the
report gives the largest absolute difference and the rounds whose weights diverged.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zk0_pipelines import settings
from zk0_pipelines.tracking.reproduction_records import (
    read_reproduction_record,
    round_weight_hashes,
    weights_sha256,
)

#: run-config keys that name places on the original machine; reproduction sets its own.
PLACE_KEYS = ("train-datasets", "eval-datasets", "output-dir", "resume")


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between the same-named tensors of two safetensors files."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return float("inf")
    diffs = ((ta[k].double() - tb[k].double()).abs().max().item() for k in ta if ta[k].numel())
    return max(diffs, default=0.0)


@dataclass
class ReproductionReport:
    """The outcome of a reproduction."""

    model_name: str
    version: str
    identical: bool
    original_sha256: str
    reproduced_sha256: str
    max_abs_diff: float
    diverged_rounds: list[str] = field(default_factory=list)
    dvc_md5: str = ""
    recorded_git_commit: str = ""
    current_git_commit: str = ""
    workspace: str = ""

    def lines(self) -> list[str]:
        """Human-readable report; the first line is ``identical`` or ``different``."""
        out = ["identical" if self.identical else "different"]
        out.append(f"model {self.model_name} version {self.version}, data {self.dvc_md5}")
        out.append(f"original   weights sha256 {self.original_sha256}")
        out.append(f"reproduced weights sha256 {self.reproduced_sha256}")
        if not self.identical:
            out.append(f"max abs difference {self.max_abs_diff:.3e}; rounds diverged: {self.diverged_rounds}")
        if self.recorded_git_commit != self.current_git_commit:
            out.append(
                f"note: trained at git {self.recorded_git_commit}, reproduced at {self.current_git_commit}"
            )
        out.append(f"workspace {self.workspace}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def restore_data(workspace: Path, dvc_md5: str, remote_url: str) -> Path:
    """Restore the exact ``data/`` pinned by ``dvc_md5`` into ``workspace`` from the DVC remote."""
    from zk0_pipelines.tracking.dvc import DvcRepo

    workspace.mkdir(parents=True, exist_ok=True)
    repo = DvcRepo(workspace)
    repo.ensure_initialized(remote_url)
    (workspace / "data.dvc").write_text(
        yaml.safe_dump({"outs": [{"md5": dvc_md5, "hash": "md5", "path": "data"}]}, sort_keys=False)
    )
    repo.pull("data")
    return workspace / "data"


def reproduce_version(
    model_name: str,
    version: str,
    *,
    tracking_uri: str | None = None,
    remote_url: str | None = None,
    workspace: Path | None = None,
) -> ReproductionReport:
    """Re-train a registered version from its recorded data pin and config, and compare the weights."""
    from zk0_pipelines.federated.launcher import run_federated
    from zk0_pipelines.tracking.dvc import DvcRepo
    from zk0_pipelines.tracking.lineage import git_commit
    from zk0_pipelines.tracking.mlflow_registry import ModelRegistry
    from zk0_pipelines.tracking.mlflow_store import default_tracking_uri

    registry = ModelRegistry(tracking_uri or default_tracking_uri())
    client = registry.client
    mv = client.get_model_version(model_name, str(version))
    tags = dict(mv.tags)
    missing = [k for k in ("dvc_md5", "datasets.train", "datasets.eval") if k not in tags]
    if missing:
        raise ValueError(f"model {model_name} version {version} lacks the lineage tag(s) {missing}")
    workspace = workspace or settings.state_dir() / "reproductions" / f"{model_name}-v{version}"
    if workspace.exists():
        shutil.rmtree(workspace)  # our own earlier reproduction of this same version
    downloads = workspace / "recorded"
    downloads.mkdir(parents=True)

    record = read_reproduction_record(client, mv.run_id, downloads)
    original = Path(client.download_artifacts(mv.run_id, "model/model.safetensors", str(downloads)))

    remote = remote_url or DvcRepo(settings.repo_root()).remote_url()
    data = restore_data(workspace / "project", tags["dvc_md5"], remote)
    train = [data / i for i in tags["datasets.train"].split(",") if i]
    evals = [data / i for i in tags["datasets.eval"].split(",") if i]
    knobs = {k: v for k, v in record.config.items() if k not in PLACE_KEYS}
    result = run_federated(train, evals, workspace / "run", knobs)

    reproduced = result.final_checkpoint / "model.safetensors"
    new_rounds = round_weight_hashes(result.run_dir)
    diverged = [r for r, h in record.round_weights.items() if new_rounds.get(r) != h]
    original_sha, reproduced_sha = weights_sha256(original), weights_sha256(reproduced)
    return ReproductionReport(
        model_name=model_name,
        version=str(version),
        identical=original_sha == reproduced_sha,
        original_sha256=original_sha,
        reproduced_sha256=reproduced_sha,
        max_abs_diff=max_abs_diff(original, reproduced),
        diverged_rounds=diverged,
        dvc_md5=tags["dvc_md5"],
        recorded_git_commit=tags.get("git_commit", "unknown"),
        current_git_commit=git_commit(settings.repo_root()),
        workspace=str(workspace),
    )
