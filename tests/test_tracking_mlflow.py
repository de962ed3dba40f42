"""MLflow run logging and the challenger/champion registry on a sqlite store (one store per module)."""

from __future__ import annotations

import re
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from _fixtures_tracking import FAKE_PASSWORD, FAKE_TOKEN, fake_checkpoint, files_containing, git

from zk0_pipelines.tracking.lineage import config_hash, git_commit, library_versions
from zk0_pipelines.tracking.mlflow_registry import CHALLENGER, CHAMPION, MAX_PARAM_VALUE_LEN, ModelRegistry
from zk0_pipelines.tracking.mlflow_store import MlflowStoreUnavailable, default_tracking_uri
from zk0_pipelines.tracking.round_plots import plot_round_metrics

ROUNDS = [
    {"round": 1, "train_loss": 1.50, "eval_loss": 1.80, "eval_action_mse": 310.5, "note": "text is skipped"},
    {"round": 2, "train_loss": 1.10, "eval_loss": 1.40, "eval_action_mse": 250.25},
    {"round": 3, "train_loss": 0.90, "eval_loss": 1.25, "eval_action_mse": 260.0},
]
CLIENTS = [
    {"round": r, "client": c, "train_loss": 2.0 / r + i, "num_examples": 10 + i}
    for r in (1, 2, 3)
    for i, c in enumerate(("client_a", "client_b"))
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="module")
def registry(store: Path) -> ModelRegistry:
    return ModelRegistry(f"sqlite:///{store / 'mlflow.db'}", experiment="zk0-test")


@pytest.fixture(scope="module")
def logged(registry: ModelRegistry, store: Path) -> str:
    """One run with params, per-round and per-client metrics, a plot and a checkpoint."""
    work = store / "inputs"
    png = plot_round_metrics(ROUNDS, work / "loss.png")
    params = {"strategy": "fedavg", "lr": 1e-4, "model": {"chunk_size": 10}, "long": "x" * 2000}
    return registry.log_federated_run(
        "demo-run", params, ROUNDS, CLIENTS, {"loss": png}, fake_checkpoint(work / "ckpt"), {"stage": "test"}
    )


def _register(registry: ModelRegistry, run_id: str, name: str, loss: float, **kw):
    return registry.register_version(
        name, run_id, tags={"dvc_md5": "abc.dir", "git_commit": "f00"}, eval_loss=loss, **kw
    )


def test_run_logs_params_metrics_and_artifacts(registry: ModelRegistry, logged: str) -> None:
    client = registry.client
    run = client.get_run(logged)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "demo-run"
    assert run.data.params["strategy"] == "fedavg"
    assert run.data.params["model.chunk_size"] == "10"
    assert len(run.data.params["long"]) == MAX_PARAM_VALUE_LEN and "[+" in run.data.params["long"]
    assert run.data.tags["stage"] == "test"
    history = client.get_metric_history(logged, "eval_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (r["round"], r["eval_loss"]) for r in ROUNDS
    ]
    mse_history = client.get_metric_history(logged, "eval_action_mse")
    assert sorted((m.step, m.value) for m in mse_history) == [
        (r["round"], r["eval_action_mse"]) for r in ROUNDS
    ]
    assert "note" not in run.data.metrics
    b_hist = client.get_metric_history(logged, "client/client_b/train_loss")
    expected = [(c["round"], c["train_loss"]) for c in CLIENTS if c["client"] == "client_b"]
    assert sorted((m.step, m.value) for m in b_hist) == expected
    artifacts = {a.path for a in client.list_artifacts(logged, "model")} | {
        a.path for a in client.list_artifacts(logged, "plots")
    }
    assert {"model/config.json", "model/model.safetensors", "plots/loss.png"} <= artifacts


def test_promotion_flow(registry: ModelRegistry, logged: str) -> None:
    name = "zk0-promotion"
    v1 = _register(registry, logged, name, 1.0)
    assert (v1.version, v1.promoted, v1.champion_eval_loss) == ("1", True, None)
    assert set(v1.aliases) == {CHALLENGER, CHAMPION}
    assert v1.tags["dvc_md5"] == "abc.dir" and v1.tags["eval_loss"] == "1.0"
    assert v1.source.endswith("/model")

    worse = _register(registry, logged, name, 2.0)
    assert not worse.promoted and worse.aliases == [CHALLENGER] and worse.champion_eval_loss == 1.0
    assert "kept as challenger" in worse.decision
    assert str(registry.champion(name).version) == "1"

    tie = _register(registry, logged, name, 1.0)
    assert not tie.promoted and str(registry.champion(name).version) == "1"

    better = _register(registry, logged, name, 0.5)
    assert better.promoted and set(better.aliases) == {CHALLENGER, CHAMPION}
    assert str(registry.champion(name).version) == better.version
    tags = registry.client.get_model_version(name, better.version).tags
    assert tags["zk0.promotion.champion_eval_loss"] == "1.0" and tags["eval_loss"] == "0.5"
    assert tags["zk0.promotion.champion_version"] == "1"
    assert registry.client.get_model_version(name, "1").aliases == []


def test_a_champion_evaluated_on_other_datasets_is_not_compared(registry: ModelRegistry, logged: str) -> None:
    name = "zk0-eval-sets"

    def register(loss: float, eval_set: str, **kw):
        tags = {"dvc_md5": "abc.dir", "datasets": {"eval": eval_set}}
        return registry.register_version(name, logged, tags=tags, eval_loss=loss, **kw)

    assert register(4.0, "synthetic_eval").promoted
    other = register(2.0, "sim_lab_eval")
    assert not other.promoted and other.aliases == [CHALLENGER]
    assert "'synthetic_eval'" in other.decision and "not comparable" in other.decision
    assert str(registry.champion(name).version) == "1"
    assert register(3.0, "synthetic_eval").promoted  # the same eval set: compared as always
    assert register(9.0, "sim_lab_eval", promote_rule="always").promoted


def test_promote_rules(registry: ModelRegistry, logged: str) -> None:
    name = "zk0-rules"
    never = _register(registry, logged, name, 0.1, promote_rule="never")
    assert not never.promoted and registry.champion(name) is None
    assert _register(registry, logged, name, 5.0, promote_rule="always").promoted
    nan = _register(registry, logged, name, float("nan"))
    assert not nan.promoted and str(registry.champion(name).version) == "2"
    with pytest.raises(ValueError, match="promote_rule"):
        _register(registry, logged, name, 0.1, promote_rule="sometimes")


def test_promotion_by_action_mse(registry: ModelRegistry, logged: str) -> None:
    name = "zk0-by-mse"
    rule = {"promote_rule": "lower_action_mse"}
    v1 = _register(registry, logged, name, 1.0, action_mse=200.0, **rule)
    assert (
        v1.promoted and v1.tags["action_mse"] == "200.0" and v1.tags["zk0.promotion.metric"] == "action_mse"
    )
    # worse loss but lower action MSE: promoted under this rule; both champion numbers are recorded
    v2 = _register(registry, logged, name, 3.0, action_mse=150.0, **rule)
    assert v2.promoted and "action_mse 150 < champion v1 200" in v2.decision
    assert (v2.champion_action_mse, v2.champion_eval_loss) == (200.0, 1.0)
    assert v2.tags["zk0.promotion.champion_action_mse"] == "200.0"
    # better loss, worse action MSE: kept as challenger
    v3 = _register(registry, logged, name, 0.1, action_mse=180.0, **rule)
    assert not v3.promoted and str(registry.champion(name).version) == v2.version
    missing = _register(registry, logged, name, 0.1, **rule)
    assert not missing.promoted and "action_mse is None" in missing.decision
    assert missing.tags["action_mse"] == "none"
    # the default rule still compares the eval loss, whatever the MSE
    assert _register(registry, logged, name, 0.05, action_mse=1e9).promoted


def test_locked_sqlite_store_fails_fast_and_registration_retries_alone(tmp_path: Path) -> None:
    db = tmp_path / "locked" / "mlflow.db"
    uri = f"sqlite:///{db}"
    registry = ModelRegistry(uri, experiment="zk0-lock", busy_timeout_s=0.5)
    checkpoint = fake_checkpoint(tmp_path / "ckpt")
    run_id = registry.log_federated_run("before-lock", {}, ROUNDS, checkpoint_dir=checkpoint)
    holder = sqlite3.connect(db, isolation_level=None, timeout=0.1)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing: nobody else may read or write
    try:
        started = time.monotonic()
        with pytest.raises(MlflowStoreUnavailable, match=re.escape(uri)) as err:
            ModelRegistry(uri, busy_timeout_s=0.5).register_version("zk0-locked", run_id, eval_loss=1.0)
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "database is locked" in str(err.value) and "retry" in str(err.value)
    assert waited < 10, f"the configured 0.5 s busy timeout was not applied (waited {waited:.1f} s)"
    assert (checkpoint / "model.safetensors").stat().st_size > 0  # what was trained stays on disk

    retried = ModelRegistry(uri, busy_timeout_s=0.5).register_version("zk0-locked", run_id, eval_loss=1.0)
    assert retried.version == "1" and retried.promoted  # the failed attempt left no half-made version
    assert len(registry.client.search_model_versions("name='zk0-locked'")) == 1


def test_busy_timeout_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZK0_MLFLOW_BUSY_TIMEOUT_S", "2.5")
    assert ModelRegistry("sqlite:///unused.db").busy_timeout_s == 2.5
    monkeypatch.setenv("ZK0_MLFLOW_BUSY_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="ZK0_MLFLOW_BUSY_TIMEOUT_S"):
        ModelRegistry("sqlite:///unused.db")
    with pytest.raises(ValueError, match="busy timeout"):
        ModelRegistry("sqlite:///unused.db", busy_timeout_s=-1)


def test_registered_folder_downloads(registry: ModelRegistry, logged: str, tmp_path: Path) -> None:
    _register(registry, logged, "zk0-download", 1.0)
    folder = registry.download_version("zk0-download", CHAMPION, tmp_path / "dl")
    assert (folder / "config.json").read_text() == (
        fake_checkpoint(tmp_path / "ref") / "config.json"
    ).read_text()
    assert (folder / "model.safetensors").stat().st_size > 0


def test_register_needs_logged_folder(registry: ModelRegistry) -> None:
    run_id = registry.log_federated_run("no-ckpt", {}, ROUNDS)
    with pytest.raises(FileNotFoundError, match="no artifacts under 'model'"):
        registry.register_version("zk0-none", run_id, eval_loss=1.0)


def test_bad_metric_rows_name_the_row(registry: ModelRegistry) -> None:
    with pytest.raises(ValueError, match=r"client_metrics\[0\] has no 'client'"):
        registry.log_federated_run("bad", {}, ROUNDS, [{"round": 1, "loss": 1.0}])


def test_secrets_never_reach_the_store(
    registry: ModelRegistry, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", FAKE_PASSWORD)
    params = {
        "hf_token": FAKE_TOKEN,
        "hub": {"api_token": "whatever-it-is"},
        "db_password": "hunter2-but-longer",
        "note": f"pushed with {FAKE_TOKEN}",
        "mlflow_uri": f"https://bob:{FAKE_PASSWORD}@mlflow.example/",
        "kept_param": "visible",
    }
    rounds = [{"round": 1, "eval_loss": 1.0, "hf_token": 3.0}]
    run_id = registry.log_federated_run(
        f"run-{FAKE_TOKEN}",
        params,
        rounds,
        [{"round": 1, "client": "c0", "loss": 1.0}],
        checkpoint_dir=fake_checkpoint(tmp_path / "ckpt"),
        tags={"client_secret": "s3cr3t-value", "origin": f"token={FAKE_TOKEN}", "kept_tag": "yes"},
    )
    registry.register_version("zk0-secret", run_id, tags={"hf_token": FAKE_TOKEN, "ok": "1"}, eval_loss=1.0)
    run = registry.client.get_run(run_id)
    assert run.data.params["kept_param"] == "visible" and run.data.tags["kept_tag"] == "yes"
    withheld = run.data.tags["zk0.withheld_keys"].split(",")
    assert {
        "hf_token",
        "hub.api_token",
        "db_password",
        "note",
        "mlflow_uri",
        "client_secret",
        "origin",
    } <= set(withheld)
    for needle in (FAKE_TOKEN, FAKE_PASSWORD, "hunter2-but-longer", "s3cr3t-value", "whatever-it-is"):
        assert not files_containing(store, needle.encode()), f"{needle[:4]}... leaked into the store"


def test_checkpoint_holding_a_token_is_refused(
    registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    ckpt = fake_checkpoint(tmp_path / "ckpt")
    (ckpt / "train_config.json").write_text(f'{{"hub_token": "{FAKE_TOKEN}"}}')
    with pytest.raises(ValueError, match="train_config.json") as err:
        registry.log_federated_run("leaky", {}, ROUNDS, checkpoint_dir=ckpt)
    assert FAKE_TOKEN not in str(err.value)


def test_unusable_sqlite_path_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    uri = f"sqlite:///{blocker / 'sub' / 'mlflow.db'}"
    with pytest.raises(MlflowStoreUnavailable, match=re.escape(uri)):
        ModelRegistry(uri).experiment_id()


def test_unreachable_server_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(MlflowStoreUnavailable, match=re.escape(uri)):
        ModelRegistry(uri).experiment_id()


def test_default_store_lives_in_the_checkout_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZK0_ROOT", str(tmp_path))
    assert default_tracking_uri() == f"sqlite:///{tmp_path / '.zk0' / 'mlflow' / 'mlflow.db'}"
    reg = ModelRegistry()
    assert reg.tracking_uri == default_tracking_uri()
    assert reg.artifact_location == (tmp_path / ".zk0" / "mlflow" / "artifacts").as_uri()


def test_lineage_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = config_hash({"b": 1, "a": {"y": [1, 2], "x": "s"}})
    assert a == config_hash({"a": {"x": "s", "y": [1, 2]}, "b": 1})
    assert a != config_hash({"b": 2, "a": {"y": [1, 2], "x": "s"}})
    assert re.fullmatch(r"[0-9a-f]{64}", a)

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # ignore enclosing repos
    assert git_commit(tmp_path) == "unknown"
    git(tmp_path, "init", "-q")
    assert git_commit(tmp_path) == "unknown"  # no commit yet
    (tmp_path / "f.txt").write_text("1")
    git(tmp_path, "add", "f.txt")
    git(tmp_path, "commit", "-q", "-m", "c")
    sha = git(tmp_path, "rev-parse", "HEAD").strip()
    assert git_commit(tmp_path) == sha
    (tmp_path / "f.txt").write_text("2")
    assert git_commit(tmp_path) == f"{sha}+dirty"

    import mlflow

    versions = library_versions()
    assert versions["mlflow"] == mlflow.__version__
    assert set(versions) >= {"torch", "lerobot", "flwr", "dagster", "mlflow", "transformers"}


def test_plot_round_metrics(tmp_path: Path) -> None:
    png = plot_round_metrics(ROUNDS, tmp_path / "p" / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    only = plot_round_metrics(ROUNDS, tmp_path / "t.png", keys=["train_loss"])
    assert only.stat().st_size > 0
    with pytest.raises(ValueError, match="missing_key"):
        plot_round_metrics(ROUNDS, tmp_path / "x.png", keys=["missing_key"])
    with pytest.raises(ValueError, match="no rows"):
        plot_round_metrics([], tmp_path / "y.png")


def test_reproduction_record_round_trips_without_credentials(
    registry: ModelRegistry, logged: str, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    from zk0_pipelines.tracking.reproduction_records import (
        ReproductionRecord,
        log_reproduction_record,
        read_reproduction_record,
        round_weight_hashes,
    )

    torch = pytest.importorskip("torch")
    run_dir = tmp_path / "run"
    for folder in (run_dir / "checkpoints" / "round-001" / "pretrained_model", run_dir / "final"):
        folder.mkdir(parents=True)
    save_file(
        {"w": torch.zeros(2)},
        str(run_dir / "checkpoints" / "round-001" / "pretrained_model" / "model.safetensors"),
    )
    save_file({"w": torch.ones(2)}, str(run_dir / "final" / "model.safetensors"))
    hashes = round_weight_hashes(run_dir)
    assert set(hashes) == {"1", "final"} and hashes["1"] != hashes["final"]

    config = {"num-server-rounds": 1, "hub-token": FAKE_TOKEN}
    log_reproduction_record(registry.client, logged, ReproductionRecord(config, hashes))
    back = read_reproduction_record(registry.client, logged, tmp_path / "downloads")
    assert back.round_weights == hashes
    assert back.config == {"num-server-rounds": 1}  # the credential never reached the store
