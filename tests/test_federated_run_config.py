"""Run config validation (unknown keys, bad values) and the launcher's checks before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from zk0_pipelines import config_tables
from zk0_pipelines.federated import app_folder, deployment, launch_records, launcher
from zk0_pipelines.federated.run_config import (
    KEYS,
    defaults,
    parse_run_config,
    pyproject_app_config,
    replace,
)

REPO = Path(__file__).resolve().parents[1]


def test_defaults_parse_and_cover_every_key():
    cfg = parse_run_config({})
    assert cfg.to_dict() == defaults()
    assert set(cfg.to_dict()) == set(KEYS)


def test_unknown_key_is_refused_by_name():
    with pytest.raises(ValueError, match="num-rounds"):
        parse_run_config({"num-rounds": 3})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("strategy", "fedsgd"),
        ("num-server-rounds", 0),
        ("batch-size", "2"),
        ("local-steps", True),
        ("learning-rate", -1e-4),
        ("fraction-train", 0.0),
        ("wire-dtype", "int8"),
        ("policy-source", "huge"),
        ("train-datasets", "a,,b"),
        ("resume", "yes"),
    ],
)
def test_bad_value_is_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"'{key}'"):
        parse_run_config({key: value})


def test_proximal_mu_must_match_the_strategy():
    with pytest.raises(ValueError, match="proximal-mu"):
        parse_run_config({"strategy": "fedavg", "proximal-mu": 0.1})
    with pytest.raises(ValueError, match="proximal-mu"):
        parse_run_config({"strategy": "fedprox", "proximal-mu": 0.0})
    assert parse_run_config({"strategy": "fedprox", "proximal-mu": 0.1}).proximal_mu == 0.1


def test_typed_values_and_paths():
    cfg = parse_run_config({"learning-rate": 1, "train-datasets": "/a, /b", "num-server-rounds": 3.0})
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.num_server_rounds == 3 and isinstance(cfg.num_server_rounds, int)
    assert cfg.train_paths == [Path("/a"), Path("/b")]


def test_eval_schedule():
    cfg = parse_run_config({"num-server-rounds": 5, "eval-every": 2, "eval-datasets": "/e"})
    assert [r for r in range(6) if cfg.should_evaluate(r)] == [0, 2, 4, 5]
    assert not parse_run_config({"eval-every": 0, "eval-datasets": "/e"}).should_evaluate(1)
    assert not parse_run_config({"eval-every": 1}).should_evaluate(1)  # no eval datasets


def test_rendered_app_config_round_trips():
    values = {"strategy": "fedprox", "proximal-mu": 0.01, "train-datasets": '/x/"q"', "resume": True}
    table = tomllib.loads(pyproject_app_config(values))["tool"]["flwr"]["app"]["config"]
    assert parse_run_config(table) == parse_run_config(values)


def test_repo_pyproject_app_config_is_the_rendered_defaults():
    text = (REPO / "pyproject.toml").read_text()
    assert config_tables.pyproject_app_table(text) == pyproject_app_config(), "run `make config`"
    table = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    assert parse_run_config(table, fill_defaults=False).to_dict() == defaults()


def test_defaults_are_the_offline_demo_s():
    cfg = parse_run_config({})
    assert (cfg.local_steps, cfg.min_available_clients, cfg.num_server_rounds) == (2, 1, 2)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("local-steps", 2.5),
        ("learning-rate", True),
        ("learning-rate", "1e-4"),
        ("seed", -1),
        ("lr-step-gamma", 1.5),
        ("fraction-evaluate", 1.5),
        ("output-dir", 3),
        ("dp", "local"),
    ],
)
def test_strict_types_and_bounds(key, value):
    with pytest.raises(ValueError, match=f"run config key '{key}'"):
        parse_run_config({key: value})


def test_every_error_is_named_and_snake_case_keys_are_unknown():
    with pytest.raises(ValueError) as info:
        parse_run_config({"local-steps": 0, "batch-size": "x"})
    assert "'local-steps'" in str(info.value) and "'batch-size'" in str(info.value)
    with pytest.raises(ValueError, match="unknown run config key"):
        parse_run_config({"local_steps": 3})


def test_missing_key_is_an_error_without_defaults():
    values = defaults()
    del values["seed"]
    with pytest.raises(ValueError, match="'seed' is missing"):
        parse_run_config(values, fill_defaults=False)


def test_frozen_and_replace_revalidates():
    cfg = parse_run_config({"seed": 3})
    with pytest.raises(ValidationError):
        cfg.seed = 4
    changed = replace(cfg, **{"local-steps": 5})
    assert (changed.seed, changed.local_steps, cfg.local_steps) == (3, 5, 2)
    with pytest.raises(ValueError, match="'local-steps'"):
        replace(cfg, **{"local-steps": 0})
    assert list(cfg.to_dict()) == list(KEYS)


def test_path_lists_and_paths_are_accepted_as_text():
    cfg = parse_run_config({"train-datasets": [Path("/a"), "/b"], "output-dir": Path("/out")})
    assert (cfg.train_datasets, cfg.output_dir) == ("/a,/b", "/out")


def test_node_config_is_toml(tmp_path):
    dataset = tmp_path / 'odd "name" \\ here'
    doc = tomllib.loads(deployment.node_config_toml(dataset, 2))
    assert doc == {"dataset-path": str(dataset.resolve()), "partition-id": 2}
    assert tomllib.loads(deployment.node_config_toml(dataset)) == {"dataset-path": str(dataset.resolve())}


def _dataset(root: Path) -> Path:
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text("{}")
    return root


def test_launcher_checks_before_starting(tmp_path):
    a, b = _dataset(tmp_path / "a"), _dataset(tmp_path / "b")
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="'learning-rate'"):
        launcher.run_federated([a, b], [], run_dir, {"learning-rate": "fast"})
    with pytest.raises(ValueError, match="unknown run config key"):
        launcher.run_federated([a, b], [], run_dir, {"rounds": 2})
    with pytest.raises(ValueError, match="train-datasets"):
        launcher.run_federated([a, b], [], run_dir, {"train-datasets": "/x"})
    with pytest.raises(ValueError, match="min-available-clients"):
        launcher.run_federated([a], [], run_dir, {"min-available-clients": 2})
    with pytest.raises(FileNotFoundError, match="missing"):
        launcher.run_federated([a, tmp_path / "missing"], [], run_dir, {})
    assert not run_dir.exists()  # nothing was started or written


def test_generated_app_pyproject(tmp_path):
    a, b = _dataset(tmp_path / "a"), _dataset(tmp_path / "b")
    cfg = launcher.build_run_config([a, b], [], tmp_path / "run", {"seed": 7})
    doc = tomllib.loads(app_folder.app_pyproject(cfg))
    assert doc["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "zk0_pipelines.federated.server_app:app",
        "clientapp": "zk0_pipelines.federated.client_app:app",
    }
    app_cfg = parse_run_config(doc["tool"]["flwr"]["app"]["config"])
    assert app_cfg.seed == 7
    assert app_cfg.train_paths == [a.resolve(), b.resolve()]
    assert app_cfg.output_dir == str((tmp_path / "run").resolve())


def _record(run_dir: Path, launch_id: str, launcher_pid: int, home: Path) -> Path:
    path = run_dir / "logs" / launch_records.LAUNCH_RECORD.format(launch_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = launch_records.process_identity(launcher_pid) or {"pid": launcher_pid, "create-time": 0.0}
    payload = {"launch-id": launch_id, "status": "running", "launcher": entry, "flwr-home": str(home)}
    path.write_text(json.dumps(payload))
    return path


def test_stale_launches_are_reaped_and_live_ones_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    home = tmp_path / "flwr" / "launches" / "dead0001"
    home.mkdir(parents=True)
    env = dict(os.environ, **{launch_records.LAUNCH_ENV: "dead0001"})
    orphan = subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a launcher that no longer exists
    try:
        path = _record(tmp_path / "run", "dead0001", gone.pid, home)
        assert [p.pid for p in launch_records.launch_processes("dead0001")] == [orphan.pid]
        reaped = launch_records.reap_stale_launches(tmp_path / "run")
        assert [r["launch-id"] for r in reaped] == ["dead0001"]
        assert orphan.wait(timeout=10) is not None and not home.exists()
        assert json.loads(path.read_text())["status"] == "reaped"
        assert launch_records.reap_stale_launches(tmp_path / "run") == []  # idempotent

        alive = subprocess.Popen(["sleep", "60"])
        try:
            _record(tmp_path / "busy", "live0001", alive.pid, home)
            with pytest.raises(launch_records.FederatedRunError, match="in use by launch live0001"):
                launch_records.reap_stale_launches(tmp_path / "busy")
        finally:
            alive.kill()
            alive.wait()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
