"""Shared helpers for the tracking tests (DVC, MLflow, Hub release)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from zk0_pipelines.tracking.dvc import dvc_executable

FAKE_TOKEN = "hf_" + hashlib.sha256(b"zk0-tracking-test-token").hexdigest()[:34]
FAKE_PASSWORD = "mlflow-pw-" + hashlib.sha256(b"zk0-tracking-test-password").hexdigest()[:16]


def require_dvc() -> str:
    """The DVC executable, or skip the test with the reason (the tool venv is created by the Makefile)."""
    try:
        exe = dvc_executable()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return exe


def write_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    """Write ``{relative path: content}`` under ``root``; returns ``root``."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    """``{relative posix path: bytes}`` of every file under ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def git(root: Path, *args: str) -> str:
    """Run git with a throwaway identity; returns stdout."""
    cmd = ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", "-C", str(root), *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def fake_checkpoint(folder: Path, *, seed: int = 0) -> Path:
    """A small LeRobot-looking policy folder (config + weights bytes + card)."""
    return write_tree(
        folder,
        {
            "config.json": f'{{"type": "smolvla", "seed": {seed}}}',
            "model.safetensors": bytes(range(256)) * (4 + seed),
            "README.md": "# tiny policy\n",
        },
    )


def files_containing(root: Path, needle: bytes) -> list[Path]:
    """Every file under ``root`` (or ``root`` itself) whose bytes contain ``needle``."""
    paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    return [p for p in paths if needle in p.read_bytes()]
