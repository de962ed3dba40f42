"""Where the federated_model asset puts a run, and when it resumes one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zk0_pipelines.defs.training_assets import federated_run_dir

CONFIG = {"num-server-rounds": 2, "strategy": "fedavg", "seed": 0}


@pytest.fixture(autouse=True)
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ZK0_ROOT", str(tmp_path))
    return tmp_path


def _write_status(run_dir: Path, status: str) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"status": status, "rounds": []}))


def test_fresh_key_starts_a_new_run() -> None:
    run_dir, resume = federated_run_dir("abc123.dir", CONFIG, "run-1")
    assert not resume and not run_dir.exists()


def test_interrupted_run_with_same_data_and_config_is_resumed() -> None:
    run_dir, _ = federated_run_dir("abc123.dir", CONFIG, "run-1")
    _write_status(run_dir, "running")  # what a SIGKILLed run leaves behind
    again, resume = federated_run_dir("abc123.dir", CONFIG, "run-2")
    assert resume and again == run_dir


def test_completed_run_is_never_overwritten_and_other_data_or_config_gets_its_own_folder() -> None:
    run_dir, _ = federated_run_dir("abc123.dir", CONFIG, "run-1")
    _write_status(run_dir, "completed")
    again, resume = federated_run_dir("abc123.dir", CONFIG, "run-2abcdef")
    assert not resume and again != run_dir and again.name.endswith("-run-2abc")
    other_data, _ = federated_run_dir("ffff00.dir", CONFIG, "run-3")
    other_config, _ = federated_run_dir("abc123.dir", {**CONFIG, "seed": 1}, "run-3")
    assert len({run_dir, other_data, other_config}) == 3
