"""Admission of a fetched dataset: into ``data/`` when it validates, into quarantine when it does not.

Nothing is ever deleted. A dataset that fails validation is moved (with its report) under
``.zk0/quarantine/<id>/<attempt>/``; if an earlier validated copy sat in ``data/<id>``, it is moved
beside it as ``previous`` so that training can no longer pick it up. A re-fetched dataset that
validates replaces its older copy in ``data/``; the older copy moves under ``.zk0/superseded/``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zk0_pipelines import settings

PROVENANCE_FILE = "meta/zk0_provenance.json"


@dataclass(frozen=True)
class AdmittedDataset:
    """A dataset that sits in ``data/`` with its provenance."""

    dataset_id: str
    role: str
    path: Path
    provenance: dict[str, Any]


def write_provenance(root: Path, provenance: dict[str, Any]) -> None:
    """Record where a dataset came from inside its own folder (so DVC pins it with the bytes).

    No timestamps: unchanged data must keep the same DVC md5.
    """
    path = root / PROVENANCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


def admit(staged: Path, dataset_id: str, provenance: dict[str, Any]) -> Path:
    """Move a validated staged dataset to ``data/<id>``, replacing an older copy of the same id."""
    write_provenance(staged, provenance)
    target = settings.data_dir() / dataset_id
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        # The older copy is kept, never deleted: it may be what an earlier model version was trained on.
        superseded = settings.state_dir() / "superseded" / dataset_id / time.strftime("%Y%m%dT%H%M%S")
        superseded.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(target), str(superseded))
    shutil.move(str(staged), str(target))
    return target


def quarantine(staged: Path, dataset_id: str, report: dict[str, Any], markdown: str | None = None) -> Path:
    """Move a failing dataset (and any earlier admitted copy) into quarantine with its report.

    The report lands beside the copy as ``report.json`` and ``validation.json`` (the same content), and
    ``validation.md`` when ``markdown`` is given (the table of checks people read).
    """
    attempt = settings.quarantine_dir() / dataset_id / time.strftime("%Y%m%dT%H%M%S")
    attempt.mkdir(parents=True, exist_ok=False)
    if staged.exists():
        shutil.move(str(staged), str(attempt / "dataset"))
    admitted = settings.data_dir() / dataset_id
    if admitted.exists():
        shutil.move(str(admitted), str(attempt / "previous"))
    text = json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
    (attempt / "report.json").write_text(text)
    (attempt / "validation.json").write_text(text)
    if markdown is not None:
        (attempt / "validation.md").write_text(markdown)
    return attempt


def admitted_datasets() -> list[AdmittedDataset]:
    """Every dataset currently in ``data/`` (sorted by id), read from its provenance file."""
    found: list[AdmittedDataset] = []
    root = settings.data_dir()
    if not root.exists():
        return found
    for child in sorted(root.iterdir()):
        prov_path = child / PROVENANCE_FILE
        if child.name.startswith(".") or not prov_path.is_file():
            continue
        provenance = json.loads(prov_path.read_text())
        found.append(AdmittedDataset(child.name, provenance.get("role", "train"), child, provenance))
    return found


def data_fingerprint(datasets: list[AdmittedDataset]) -> str:
    """A stable key of the admitted dataset set: ids, roles and resolved revisions.

    It changes when a dataset is admitted, re-fetched at another revision or quarantined, and is cheap
    enough for a sensor tick (no hashing of the bytes; DVC's md5 is taken by the snapshot asset).
    """
    payload = sorted((d.dataset_id, d.role, str(d.provenance.get("resolved_revision"))) for d in datasets)
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]
