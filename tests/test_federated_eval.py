"""Server evaluation on the tiny SmolVLA: seeded loss + unnormalised action MSE of predicted action chunks."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures_federated import TINY_CONFIG, InProcessGrid, make_datasets, one_torch_thread  # noqa: F401

from zk0_pipelines.federated import dataset_view, task
from zk0_pipelines.federated import recorder as rec
from zk0_pipelines.federated.run_config import parse_run_config
from zk0_pipelines.tracking.round_metrics import flatten_round, summarize_server_eval

CHUNK = 10


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("federated-eval")
    return {
        "train": make_datasets(base, 2),
        # 20 and 12 frames: different sizes (frame weighting), the last 9 frames of each have padded chunks
        "eval": make_datasets(base, 1, prefix="eval", seed0=10)
        + make_datasets(base, 1, prefix="short", seed0=20, frames=12),
    }


@pytest.fixture(scope="module")
def runtime(roots):
    """Policy, eval dataset and the processors built from that dataset's own stats."""
    from zk0_pipelines.federated.runtime import get_client_runtime

    spec = parse_run_config({"chunk-size": CHUNK}).policy_spec()
    rt = get_client_runtime(roots["eval"][0], spec)
    stats = dataset_view.normalized_stats(rt.meta.stats)
    pre, post = rt.processors(dataset_view.stats_to_json(stats))
    return rt, pre, post, stats


def _hand_action_mse(rt, pre, stats, dataset, *, batch_size: int, seed: int) -> float:
    """MSE in raw units computed here: predicted chunk x std + mean vs the dataset's raw action chunk."""
    mean = torch.as_tensor(np.asarray(stats["action"]["mean"]), dtype=torch.float64)
    std = torch.as_tensor(np.asarray(stats["action"]["std"]), dtype=torch.float64)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    squared, count = 0.0, 0
    for index, raw in enumerate(loader):
        target = raw["action"].double().clone()
        valid = ~raw["action_is_pad"].clone()
        batch = pre(raw)
        n = target.shape[0]
        noise = task.chunk_noise((n, CHUNK, rt.policy.config.max_action_dim), seed, index)
        with torch.no_grad():
            predicted = rt.policy.predict_action_chunk(dict(batch), noise=noise).double()
        raw_predicted = predicted * std + mean
        err = (raw_predicted - target) ** 2
        squared += float(err[valid].sum())
        count += int(valid.sum()) * err.shape[-1]
    return squared / count


def test_same_weights_give_identical_action_mse_and_other_weights_do_not(runtime):
    from zk0_pipelines.policy import load_trainable_state, trainable_state

    rt, pre, post, _ = runtime
    kwargs = {"batch_size": 4, "max_batches": 2, "postprocessor": post}
    rng_before = torch.get_rng_state()
    first = task.evaluate_policy(rt.policy, pre, rt.dataset, seed=0, **kwargs)
    torch.rand(7)  # the caller's RNG moving must not matter
    second = task.evaluate_policy(rt.policy, pre, rt.dataset, seed=0, **kwargs)
    assert first == second
    assert first.samples == 8 and first.action_values == 8 * CHUNK * 6  # frames 0-7: no padded step
    assert first.action_mse is not None and np.isfinite(first.action_mse) and first.action_mse > 0
    # the loss is the same number evaluate_loss gives (the MSE pass does not disturb its seeded noise)
    loss_only = task.evaluate_loss(rt.policy, pre, rt.dataset, seed=0, batch_size=4, max_batches=2)
    assert (first.loss, first.samples) == loss_only
    assert task.evaluate_policy(rt.policy, pre, rt.dataset, seed=1, **kwargs).action_mse != first.action_mse

    start = trainable_state(rt.policy)
    try:
        load_trainable_state(rt.policy, {k: v + 0.05 for k, v in start.items()})
        moved = task.evaluate_policy(rt.policy, pre, rt.dataset, seed=0, **kwargs)
    finally:
        load_trainable_state(rt.policy, start)
    assert moved.action_mse != first.action_mse
    torch.set_rng_state(rng_before)
    task.evaluate_policy(rt.policy, pre, rt.dataset, seed=0, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng_before)  # evaluation leaves the global RNG alone


def test_action_mse_is_in_raw_units_and_matches_a_hand_computation(runtime):
    rt, pre, post, stats = runtime
    result = task.evaluate_policy(rt.policy, pre, rt.dataset, batch_size=4, seed=3, postprocessor=post)
    expected = _hand_action_mse(rt, pre, stats, rt.dataset, batch_size=4, seed=3)
    assert result.action_mse == pytest.approx(expected, rel=1e-5)
    # all 20 frames, but the 9 last chunks run past the episode end: 45 padded steps are not counted
    assert result.samples == 20 and result.action_values == (20 * CHUNK - 45) * 6

    # the hand computation un-normalises with the stats: it can only match a raw-unit MSE because the
    # action stats are far from the identity (mean 0, std 1)
    std, mean = np.asarray(stats["action"]["std"]), np.asarray(stats["action"]["mean"])
    assert not np.allclose(std, 1.0, rtol=0.2) and not np.allclose(mean, 0.0, atol=0.1)


class _PaddedTail(torch.utils.data.Dataset):
    """Frames of ``base`` whose chunk steps ``>= keep`` are flagged padded and hold absurd action values."""

    def __init__(self, base, keep: int, flag: bool = True) -> None:
        self.base, self.keep, self.flag = base, keep, flag

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.base[index])
        action = item["action"].clone()
        action[self.keep :] = 1.0e6
        is_pad = item["action_is_pad"].clone()
        if self.flag:
            is_pad[self.keep :] = True
        item["action"], item["action_is_pad"] = action, is_pad
        return item


def test_padded_steps_are_excluded(runtime):
    rt, pre, post, stats = runtime
    kwargs = {"batch_size": 4, "seed": 0, "max_batches": 2, "postprocessor": post}
    padded = task.evaluate_policy(rt.policy, pre, _PaddedTail(rt.dataset, keep=4), **kwargs)
    assert padded.action_values == 8 * 4 * 6  # only steps 0-3 of each of the 8 frames count

    # equals the MSE over steps 0-3 of the untouched frames, computed by hand
    untouched = [{**rt.dataset[i], "action_is_pad": torch.arange(CHUNK) >= 4} for i in range(8)]
    expected = _hand_action_mse(rt, pre, stats, untouched, batch_size=4, seed=0)
    assert padded.action_mse == pytest.approx(expected, rel=1e-5)
    assert padded.action_mse < 1e3

    # the same absurd values, not flagged as padding, dominate the error
    unflagged = task.evaluate_policy(rt.policy, pre, _PaddedTail(rt.dataset, keep=4, flag=False), **kwargs)
    assert unflagged.action_mse > 1e10


def test_squared_error_counts_only_valid_steps():
    predicted = torch.zeros(2, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [100.0, 100.0]], [[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    is_pad = torch.tensor([[False, False, True], [False, False, False]])
    squared, count = task.raw_action_squared_error(predicted, target, is_pad)
    assert (squared, count) == (1 + 1 + 4 + 4 + 9, 5 * 2)
    with pytest.raises(ValueError, match="predicted chunk"):
        task.raw_action_squared_error(predicted[:, :2], target, is_pad)


def test_server_evaluator_reports_per_dataset_and_frame_weighted_overall(roots, runtime):
    from zk0_pipelines.federated.server_app import ServerEvaluator

    rt, pre, post, _ = runtime
    cfg = parse_run_config(
        {"chunk-size": CHUNK, "batch-size": 4, "eval-datasets": ",".join(map(str, roots["eval"]))}
    )
    evaluator = ServerEvaluator(cfg, rt.policy, pre, rt.meta.features, post)
    metrics = evaluator()
    names = [r.name for r in roots["eval"]]
    assert metrics["eval-samples"] == 20 + 12
    per = {name: metrics[f"eval-action-mse/{name}"] for name in names}
    assert metrics["eval-action-mse"] == pytest.approx((20 * per[names[0]] + 12 * per[names[1]]) / 32)
    assert per[names[0]] != per[names[1]]
    assert evaluator() == metrics  # deterministic
    without = ServerEvaluator(cfg, rt.policy, pre, rt.meta.features)()
    assert "eval-action-mse" not in without and without["eval-loss"] == metrics["eval-loss"]


def test_summary_picks_the_best_round_by_the_selection_metric():
    rows = [
        {"round": 0, "eval_loss": 2.0, "eval_action_mse": 30.0},
        {"round": 1, "eval_loss": 1.0, "eval_action_mse": 40.0},
        {"round": 2, "eval_loss": 1.5, "eval_action_mse": 10.0},
        {"round": 3, "train_loss": 0.5},
    ]
    by_loss = summarize_server_eval(rows)
    assert (by_loss["best_round"], by_loss["best_eval_loss"], by_loss["final_eval_loss"]) == (1, 1.0, 1.5)
    assert (by_loss["best_action_mse_round"], by_loss["final_action_mse"]) == (2, 10.0)
    assert summarize_server_eval(rows, "action_mse")["best_round"] == 2
    with pytest.raises(ValueError, match="action_mse"):
        summarize_server_eval([{"round": 0, "eval_loss": 1.0}], "action_mse")


def test_federated_run_records_action_mse_each_round_and_mlflow_logs_it(roots, tmp_path):
    from zk0_pipelines.federated.client_app import app as client_app
    from zk0_pipelines.federated.server_app import run_server
    from zk0_pipelines.tracking.mlflow_registry import ModelRegistry
    from zk0_pipelines.tracking.round_plots import plot_round_metrics

    out = tmp_path / "out"
    values = dict(
        TINY_CONFIG,
        **{
            "train-datasets": ",".join(map(str, roots["train"])),
            "eval-datasets": ",".join(map(str, roots["eval"])),
            "eval-max-batches": 2,
            "output-dir": str(out),
        },
    )
    cfg = parse_run_config(values)
    run_server(InProcessGrid(client_app, [{"partition-id": 0}, {"partition-id": 1}], cfg.to_dict()), cfg, out)
    metrics = json.loads((out / rec.METRICS_FILE).read_text())
    assert metrics["status"] == "completed"
    evals = [r["server-eval"] for r in metrics["rounds"]]
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    names = [r.name for r in roots["eval"]]
    for entry in evals:
        assert entry["eval-action-mse"] > 0
        assert {f"eval-action-mse/{n}" for n in names} <= set(entry)
    mses = [e["eval-action-mse"] for e in evals]
    assert metrics["best-action-mse"] == min(mses)
    assert metrics["best-action-mse-round"] == mses.index(min(mses))
    assert "action MSE" in (out / rec.FINAL_DIR / "README.md").read_text()

    rows = [flatten_round(r) for r in metrics["rounds"]]
    summary = summarize_server_eval(rows, "action_mse")
    assert summary["best_round"] == metrics["best-action-mse-round"]
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}", experiment="zk0-eval")
    png = plot_round_metrics(rows, tmp_path / "loss.png")
    run_id = registry.log_federated_run(
        "eval-run", cfg.to_dict(), rows, plots={"loss": png}, checkpoint_dir=out / rec.FINAL_DIR
    )
    history = registry.client.get_metric_history(run_id, "eval_action_mse")
    assert sorted((m.step, m.value) for m in history) == list(enumerate(mses))
    flat_name = names[1].replace("-", "_")  # flatten_round writes snake_case keys
    per_dataset = registry.client.get_metric_history(run_id, f"eval_action_mse/{flat_name}")
    assert sorted(m.step for m in per_dataset) == [0, 1, 2]
    version = registry.register_version(
        "zk0-eval",
        run_id,
        eval_loss=summary["final_eval_loss"],
        action_mse=summary["final_action_mse"],
        promote_rule="lower_action_mse",
    )
    assert version.promoted and version.tags["action_mse"] == repr(mses[-1])
    assert version.tags["zk0.promotion.metric"] == "action_mse"


def test_the_baseline_evaluation_runs_while_round_1_trains_and_changes_no_value(roots, tmp_path, monkeypatch):
    from flwr.app import MessageType

    from zk0_pipelines.federated import server_app
    from zk0_pipelines.federated.client_app import app as client_app

    calls: list[threading.Thread] = []
    train_sent, baseline_done = threading.Event(), threading.Event()
    evaluate = server_app.ServerEvaluator.__call__

    def spy(self):
        calls.append(threading.current_thread())
        if len(calls) > 1:
            return evaluate(self)
        # the baseline: round 1's train messages go out while it runs
        assert train_sent.wait(timeout=60), "round 1 did not start during the baseline evaluation"
        try:
            return evaluate(self)
        finally:
            baseline_done.set()

    class ElsewhereGrid(InProcessGrid):
        runs_clients_in_process = False  # as Flower's runtimes, whose clients are other processes

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if any(m.metadata.message_type == MessageType.TRAIN for m in messages):
                train_sent.set()
                # these clients share this process's torch RNG: they train after the baseline
                assert baseline_done.wait(timeout=120), "the baseline evaluation did not end"
            return super().send_and_receive(messages, timeout=timeout)

    def run(grid_type, out: Path) -> dict:
        values = dict(
            TINY_CONFIG,
            **{
                "train-datasets": ",".join(map(str, roots["train"])),
                "eval-datasets": str(roots["eval"][0]),
                "eval-max-batches": 1,
                "output-dir": str(out),
            },
        )
        cfg = parse_run_config(values)
        nodes = [{"partition-id": 0}, {"partition-id": 1}]
        server_app.run_server(grid_type(client_app, nodes, cfg.to_dict()), cfg, out)
        return json.loads((out / rec.METRICS_FILE).read_text())

    with monkeypatch.context() as patch:
        patch.setattr(server_app.ServerEvaluator, "__call__", spy)
        overlapped = run(ElsewhereGrid, tmp_path / "overlapped")
    assert calls[0].name == "zk0-baseline-eval"
    assert all(t is threading.main_thread() for t in calls[1:])
    sequential = run(InProcessGrid, tmp_path / "sequential")
    assert overlapped["status"] == sequential["status"] == "completed"
    assert [r["round"] for r in overlapped["rounds"]] == [0, 1, 2]
    for a, b in zip(overlapped["rounds"], sequential["rounds"], strict=True):
        assert a["server-eval"] == b["server-eval"]
        assert a.get("update-norm") == b.get("update-norm")


def test_server_evaluation_asset_shows_curves_and_the_best_round_by_the_promotion_rule(tmp_path):
    import dagster as dg

    from zk0_pipelines.defs.resources import MlflowResource
    from zk0_pipelines.defs.training_assets import server_evaluation

    rounds = [
        {"round": 0, "eval_loss": 2.0, "eval_action_mse": 30.0, "eval_action_mse/heldout": 30.0},
        {
            "round": 1,
            "train_loss": 1.2,
            "eval_loss": 1.0,
            "eval_action_mse": 40.0,
            "eval_action_mse/heldout": 40.0,
        },
        {
            "round": 2,
            "train_loss": 1.1,
            "eval_loss": 1.5,
            "eval_action_mse": 10.0,
            "eval_action_mse/heldout": 10.0,
        },
    ]
    model = {"rounds": rounds, "run_dir": str(tmp_path)}
    results = {}
    for rule in ("lower_eval_loss", "lower_action_mse"):
        with dg.build_asset_context() as context:
            results[rule] = server_evaluation(
                context, federated_model=model, mlflow=MlflowResource(promote_rule=rule)
            )
    by_loss, by_mse = results["lower_eval_loss"], results["lower_action_mse"]
    assert (by_loss["best_round"], by_mse["best_round"]) == (1, 2)
    assert by_loss["final_action_mse"] == 10.0 and by_loss["best_action_mse"] == 10.0
    assert list(by_loss["rounds"][1])[:3] == ["round", "eval_loss", "eval_action_mse"]
    assert {Path(p).name for p in by_loss["plots"].values()} == {
        "server_eval.png",
        "server_eval_action_mse.png",
    }
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in by_loss["plots"].values())

    stale = {"rounds": [{"round": 0, "eval_loss": 1.0}], "run_dir": str(tmp_path)}
    with dg.build_asset_context() as context, pytest.raises(dg.Failure, match="action_mse"):
        server_evaluation(
            context, federated_model=stale, mlflow=MlflowResource(promote_rule="lower_action_mse")
        )
