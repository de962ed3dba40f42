"""Flower ServerApp (Message API): FedAvg/FedProx over SmolVLA's trainable parameters.

Order of a run (``run_server``):

1. validate the run config (``ValueError`` naming the key, before any round);
2. wait for the quorum (``min-available-clients``), then a *query* round: each client reports its dataset's
   features, frame count and normalisation stats; features must agree; stats are merged (``task`` doc);
3. build the global SmolVLA from the same ``PolicySpec`` + the clients' features; its frozen-weight
   fingerprint goes to the clients with every round's config (they refuse to train on a mismatch);
4. ``strategy.start`` with only the trainable parameters as ``initial_arrays`` (the strategy drops failed
   clients, rejects invalid updates, enforces the quorum and sends each round's scheduled learning rate:
   ``strategy`` doc); after every round the
   ``evaluate_fn`` loads the aggregate, computes the seeded server loss and the raw-unit action MSE of the
   predicted action chunks on the eval datasets (when due; ``ServerEvaluator``), the update norm, and writes
   a checkpoint and ``metrics.json`` (``recorder`` doc); the best rounds by each metric are recorded at the
   end (``best_rounds_record``). The baseline (round-0) evaluation depends only on the initial weights: it
   runs in a background thread while the clients train round 1 (``clients_run_elsewhere``), and round 1's
   evaluation waits for it;
5. export the final global policy to ``<output-dir>/final``.

With ``dp`` != none the strategy is wrapped in Flower's central-DP fixed-clipping wrapper (``privacy``
module): ε after every round is recorded as ``dp-epsilon``, and ``dp-target-epsilon`` stops the run after
the last round that keeps ε within the target (``dp-stopped-early`` in metrics.json).

The module imports neither torch nor lerobot: in simulation it is loaded in the process that starts Ray, so
the training stack is imported by ``ServerPrewarm``'s thread while the clients start, and by ``_run`` only
after the query round; the global RNGs are seeded once that thread has ended.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from zk0_pipelines.datasets.cameras import export_rename_map
from zk0_pipelines.datasets.so100 import CAMERA_KEYS as POLICY_CAMERAS
from zk0_pipelines.federated import dataset_view, privacy
from zk0_pipelines.federated import recorder as rec
from zk0_pipelines.federated.prewarm import BackgroundCall, ServerPrewarm
from zk0_pipelines.federated.run_config import RunConfig, parse_run_config
from zk0_pipelines.tracking import round_metrics

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

app = ServerApp()

NORMALIZATION_RULE = (
    "frame-weighted merge (lerobot aggregate_stats) of the clients' observation.*/action stats, "
    "collected in a query round before training; used by clients, server eval and exported processors"
)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """ServerApp entry point: validate the run config, then :func:`run_server`."""
    from zk0_pipelines.settings import configure_local_env, runs_dir

    configure_local_env()
    quiet_flower_propagation()
    cfg = parse_run_config(dict(context.run_config))
    output_dir = Path(cfg.output_dir) if cfg.output_dir else runs_dir() / f"flwr-{context.run_id}"
    run_server(grid, cfg, output_dir, run_id=context.run_id)


def quiet_flower_propagation() -> None:
    """Keep Flower's records in Flower's own handler (lerobot's import configures the root logger too)."""
    logging.getLogger("flwr").propagate = False


def clients_run_elsewhere(grid: Grid) -> bool:
    """False for a grid that runs the ClientApps in this process (``runs_clients_in_process``, the tests'
    in-process grid): SmolVLA samples from torch's global RNG, which an in-process client's seeded training
    would share, so there the baseline evaluation does not overlap round 1."""
    return not getattr(grid, "runs_clients_in_process", False)


def wait_for_quorum(grid: Grid, quorum: int, timeout_s: float) -> list[int]:
    """Node ids once at least ``quorum`` nodes are connected; ``TimeoutError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= quorum:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} client(s) connected after {timeout_s:.0f}s; "
                f"min-available-clients = {quorum}"
            )
        time.sleep(1.0)


@dataclass
class ClientReport:
    """What a client reported in the query round."""

    node_id: int
    dataset: str
    partition_id: int
    num_frames: int
    features: dict[str, Any]
    stats: dict[str, dict[str, np.ndarray]]
    cameras: dict[str, Any] | None = None


def query_clients(grid: Grid, node_ids: list[int], timeout_s: float) -> list[ClientReport]:
    """Query round: every node reports its dataset's features, frame count and normalisation stats."""
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"server-round": 0})}),
            dst_node_id=nid,
            message_type=MessageType.QUERY,
        )
        for nid in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    failed = [m for m in replies if m.has_error()]
    if failed:
        from zk0_pipelines.federated.strategy import ClientFailure

        details = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed)
        raise ClientFailure(f"{len(failed)} client(s) failed in the query round: {details}")
    if len(replies) < len(node_ids):
        raise TimeoutError(
            f"query round: {len(replies)} of {len(node_ids)} clients replied within {timeout_s}s"
        )
    reports = []
    for msg in replies:
        info = msg.content["client-info"]
        reports.append(
            ClientReport(
                node_id=int(msg.metadata.src_node_id),
                dataset=str(info["dataset"]),
                partition_id=int(info["partition-id"]),
                num_frames=int(info["num-frames"]),
                features=json.loads(str(info["features-json"])),
                stats=dataset_view.stats_from_json(str(info["stats-json"])),
                cameras=json.loads(str(info["cameras-json"])) if "cameras-json" in info else None,
            )
        )
    # a fixed order (not node ids, which are random per launch): the merged stats are bit-reproducible
    return sorted(reports, key=lambda r: (r.partition_id, r.dataset, r.node_id))


def check_same_features(named_features: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The shared feature dict; ``ValueError`` naming the datasets whose dtypes/shapes differ."""
    from zk0_pipelines.federated import task

    reference_name, reference = named_features[0]
    ref_sig = task.features_signature(reference)
    bad = [name for name, feats in named_features[1:] if task.features_signature(feats) != ref_sig]
    if bad:
        raise ValueError(f"dataset(s) {bad} have features (dtype/shape) different from {reference_name}")
    return reference


class ServerEvaluator:
    """Seeded evaluation of the global policy on the server's eval datasets (per dataset and overall).

    Per dataset: the seeded flow-matching loss and, with a ``postprocessor``, the action MSE in raw units
    of the predicted action chunks (``task.evaluate_policy``). Overall values are frame-weighted means of
    the per-dataset values.
    """

    def __init__(
        self,
        cfg: RunConfig,
        policy,
        preprocessor,
        features: dict[str, Any],
        postprocessor=None,
        stats: dict[str, Any] | None = None,
        opened: dict[Path, Any] | None = None,
    ) -> None:
        from zk0_pipelines.federated import task

        self.cfg = cfg
        self.policy = policy
        self.preprocessor = preprocessor
        self.postprocessor = postprocessor
        self.datasets: dict[str, Any] = {}
        self.preprocessors: dict[str, Any] = {}
        opened = opened or {}
        for index, root in enumerate(cfg.eval_paths):
            meta = task.open_metadata(root)
            eval_features, _, cameras = dataset_view.policy_view(root, meta)
            check_same_features(
                [("the clients' datasets", features), (f"eval dataset {root}", eval_features)]
            )
            name = root.name if root.name not in self.datasets else f"{root.name}-{index}"
            self.datasets[name] = opened.get(root) or task.open_dataset(root, policy, meta)
            if not cameras.is_identity:  # the same processors, reading this dataset's camera names
                from zk0_pipelines.policy import build_processors

                self.preprocessors[name] = build_processors(policy, stats, cameras.rename)[0]

    def __call__(self) -> dict[str, float]:
        """``eval-loss``, ``eval-action-mse`` (overall and ``/<dataset>``) and ``eval-samples``."""
        from zk0_pipelines.federated import task

        out: dict[str, float] = {}
        loss_sum, mse_sum, count = 0.0, 0.0, 0
        for name, dataset in self.datasets.items():
            result = task.evaluate_policy(
                self.policy,
                self.preprocessors.get(name, self.preprocessor),
                dataset,
                batch_size=self.cfg.batch_size,
                seed=self.cfg.seed,
                max_batches=self.cfg.eval_max_batches,
                postprocessor=self.postprocessor,
            )
            out[f"eval-loss/{name}"] = result.loss
            loss_sum += result.loss * result.samples
            if result.action_mse is not None:
                out[f"eval-action-mse/{name}"] = result.action_mse
                mse_sum += result.action_mse * result.samples
            count += result.samples
        out["eval-loss"] = loss_sum / count
        if self.postprocessor is not None:
            out["eval-action-mse"] = mse_sum / count
        out["eval-samples"] = count
        return out


def model_card(
    cfg: RunConfig,
    server_round: int,
    reports: list[ClientReport],
    eval_loss: float | None,
    action_mse: float | None = None,
    epsilon: float | None = None,
) -> str:
    """Short markdown card for exported folders."""
    lines = [
        "# zk0 federated SmolVLA",
        "",
        f"Federated fine-tuning of SmolVLA ({cfg.policy_source}) with Flower ({cfg.strategy}), "
        f"global round {server_round} of {cfg.num_server_rounds}.",
        "",
        f"- clients: {len(reports)} ({', '.join(Path(r.dataset).name for r in reports)})",
        f"- local steps {cfg.local_steps}, batch {cfg.batch_size}, lr {cfg.learning_rate} "
        f"({cfg.lr_schedule} schedule), seed {cfg.seed}",
        f"- normalisation: {NORMALIZATION_RULE}",
        f"- image inputs: {', '.join(POLICY_CAMERAS)}; the preprocessor's rename_observations step "
        "(lerobot rename_map) carries the clients' camera renaming where it does not conflict",
    ]
    for r in reports:
        rename = (r.cameras or {}).get("rename") or {}
        if any(src != dst for src, dst in rename.items()):
            pairs = ", ".join(f"{src} → {dst}" for src, dst in rename.items())
            lines.append(f"- client {Path(r.dataset).name} cameras ({r.cameras.get('rule')}): {pairs}")
    if eval_loss is not None:
        lines.append(f"- server eval loss (seeded flow matching): {eval_loss:.6f}")
    if action_mse is not None:
        lines.append(f"- server eval action MSE (predicted chunks, raw units): {action_mse:.6g}")
    if cfg.dp != "none":
        spent = f"ε = {epsilon:.4g}" if epsilon is not None else "ε not yet spent"
        lines.append(
            f"- differential privacy: {privacy.MECHANISMS[cfg.dp]}; "
            f"noise multiplier {cfg.dp_noise_multiplier}, "
            f"clipping norm {cfg.dp_clipping_norm}; {spent} at δ = {cfg.dp_delta:g} ({privacy.ACCOUNTANT}, "
            "one client = one unit of privacy)"
        )
    return "\n".join(lines) + "\n"


def best_rounds_record(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``metrics.json`` summary of :func:`~zk0_pipelines.tracking.round_metrics.best_rounds`.

    ``{"best-round", "best-eval-loss", "best-action-mse-round", "best-action-mse"}``, None when absent.
    """
    best = round_metrics.best_rounds([round_metrics.flatten_round(r) for r in rounds])
    out: dict[str, Any] = {}
    for name, round_key, value_key in (
        ("eval_loss", "best-round", "best-eval-loss"),
        ("action_mse", "best-action-mse-round", "best-action-mse"),
    ):
        out[round_key] = best[name][1] if best[name] else None
        out[value_key] = best[name][0] if best[name] else None
    return out


def run_server(grid: Grid, cfg: RunConfig, output_dir: Path, *, run_id: int | str | None = None) -> Result:
    """Run the whole federated training (module doc); records ``failed`` in metrics.json on any error."""
    metrics_path = Path(output_dir) / rec.METRICS_FILE
    previous = json.loads(metrics_path.read_text()) if cfg.resume and metrics_path.is_file() else {}
    recorder = rec.RunRecorder(output_dir, cfg.to_dict(), run_id=run_id)
    recorder.write()
    try:
        result = _run(grid, cfg, Path(output_dir), recorder, previous)
    except BaseException as exc:
        recorder.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    return result


def _run(
    grid: Grid, cfg: RunConfig, output_dir: Path, recorder: rec.RunRecorder, previous: dict[str, Any]
) -> Result:
    random.seed(cfg.seed)  # Flower samples nodes with `random`
    prewarm = ServerPrewarm(cfg)  # builds the policy and opens the eval datasets while clients start
    startup: dict[str, float] = {}
    t0 = time.perf_counter()
    node_ids = wait_for_quorum(grid, cfg.min_available_clients, cfg.quorum_timeout_s)
    startup["quorum-wait-s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if cfg.quorum > len(node_ids):
        raise ValueError(
            f"run config key 'min-replies' is {cfg.min_replies} but only {len(node_ids)} client(s) "
            "are connected"
        )
    reports = query_clients(grid, node_ids, cfg.round_timeout_s)
    startup["query-round-s"] = time.perf_counter() - t0  # in simulation: Ray and its actors start here
    t0 = time.perf_counter()
    import numpy as np
    import torch

    from zk0_pipelines.federated import aggregate, task, wire
    from zk0_pipelines.federated.strategy import make_strategy, sample_size
    from zk0_pipelines.policy import (
        build_policy,
        build_processors,
        export_policy_folder,
        frozen_fingerprint,
        load_trainable_state,
        trainable_state,
    )

    features = check_same_features([(r.dataset, r.features) for r in reports])
    stats = task.aggregate_client_stats([r.stats for r in reports])
    stats_json = dataset_view.stats_to_json(stats)
    recorder.set(
        "norm-stats",
        {
            "rule": NORMALIZATION_RULE,
            "digest": task.stats_digest(stats_json),
            "clients": [{"dataset": r.dataset, "num-frames": r.num_frames} for r in reports],
            "stats": json.loads(stats_json),
        },
    )

    policy, opened = prewarm.take_policy(features)  # joins the prewarm thread (it seeds a private RNG)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    startup["prewarmed"] = float(policy is not None)
    if policy is None:
        policy = build_policy(cfg.policy_spec(), task.PolicyMeta(features=features, stats=stats))
    preprocessor, postprocessor = build_processors(policy, stats)
    export_rename = export_rename_map([(r.cameras or {}).get("rename") or {} for r in reports])
    # what checkpoints and the final folder carry: the clients' camera renaming (lerobot rename_map)
    export_preprocessor = build_processors(policy, stats, export_rename)[0] if export_rename else preprocessor
    fingerprint = frozen_fingerprint(policy)
    state = trainable_state(policy)
    recorder.set(
        "policy",
        {
            "spec": cfg.policy_spec().to_dict(),
            "frozen-fingerprint": fingerprint,
            "trainable-tensors": len(state),
            "trainable-params": int(sum(t.numel() for t in state.values())),
            "payload-bytes-float32": int(sum(t.numel() * 4 for t in state.values())),
        },
    )

    offset = 0
    if cfg.resume and (latest := rec.latest_checkpoint(output_dir)) is not None:
        offset, folder = latest
        info, state = rec.read_checkpoint(folder)
        if info.get("frozen-fingerprint") != fingerprint:
            raise ValueError(f"cannot resume from {folder}: it was trained with different frozen weights")
        recorder.restore(previous, offset)
        log.info("resuming after round %d from %s", offset, folder)
    load_trainable_state(policy, state)

    evaluator = ServerEvaluator(cfg, policy, preprocessor, features, postprocessor, stats, opened)
    overlap_baseline = clients_run_elsewhere(grid)
    startup["server-build-s"] = time.perf_counter() - t0
    recorder.set("startup", startup)
    last = {
        "state": {k: v.clone() for k, v in state.items()},
        "eval": None,
        "action-mse": None,
        "epsilon": None,
    }
    round_info = {
        "strategy": cfg.strategy,
        "run-config": cfg.to_dict(),
        "frozen-fingerprint": fingerprint,
        "norm-stats-digest": task.stats_digest(stats_json),
        "clients": [r.dataset for r in reports],
        "cameras": {r.dataset: r.cameras for r in reports},
    }

    def evaluate(current: dict[str, Any], global_round: int) -> dict[str, Any]:
        load_trainable_state(policy, current)
        if not cfg.should_evaluate(global_round):
            return {}
        t0 = time.perf_counter()
        metrics = evaluator()
        return {"server-eval": metrics, "server-eval-time-s": time.perf_counter() - t0}

    def note_evaluation(values: dict[str, Any]) -> MetricRecord | None:
        metrics = values.get("server-eval")
        if not metrics:
            return None
        last["eval"] = metrics["eval-loss"]
        last["action-mse"] = metrics.get("eval-action-mse")
        return MetricRecord(metrics)

    def record_baseline(values: dict[str, Any]) -> MetricRecord | None:
        recorder.finish_round(0, **values)
        return note_evaluation(values)

    def baseline_work(current: dict[str, Any]) -> dict[str, Any]:
        # first the short kernel load, so round 1's aggregation finds it done even when the evaluation is long
        aggregate.warm_up(sample_size(cfg, len(node_ids)), replies_are_updates=cfg.wire_dtype == "bfloat16")
        return evaluate(current, 0)

    pending: list[BackgroundCall] = []  # the baseline evaluation, running while the clients train round 1

    def finish_baseline() -> None:
        if pending:
            values = pending.pop().result()
            log.info("baseline (round 0) server evaluation: %s", values.get("server-eval"))
            record_baseline(values)

    def evaluate_fn(server_round: int, arrays) -> MetricRecord | None:
        global_round = offset + server_round
        if server_round == 0 and offset > 0:
            return None  # the baseline of a resumed run was recorded by the first run
        current = wire.decode_state(arrays)
        if server_round == 0:
            last["state"] = current
            if overlap_baseline and cfg.should_evaluate(0):
                # it depends only on the initial weights; round 1's evaluation waits for it
                pending.append(BackgroundCall(lambda: baseline_work(current), name="zk0-baseline-eval"))
                return None
            return record_baseline(evaluate(current, 0))
        finish_baseline()
        values = evaluate(current, global_round)
        metrics = note_evaluation(values)
        delta = wire.sub_state(current, last["state"])
        values["update-norm"] = wire.l2_norm(delta)
        values["update-norm-relative"] = values["update-norm"] / max(wire.l2_norm(last["state"]), 1e-12)
        folder = rec.write_checkpoint(
            output_dir,
            global_round,
            policy=policy,
            preprocessor=export_preprocessor,
            postprocessor=postprocessor,
            trainable=current,
            round_info=round_info,
            card_markdown=model_card(
                cfg, global_round, reports, last["eval"], last["action-mse"], last["epsilon"]
            ),
        )
        values["checkpoint"] = str(folder)
        last["state"] = current
        recorder.finish_round(global_round, **values)
        return metrics

    clients = {r.node_id: {"dataset": r.dataset, "partition-id": r.partition_id} for r in reports}

    def observe(kind: str, global_round: int, payload: dict[str, Any]) -> None:
        if kind == "privacy":
            last["epsilon"] = payload["dp-epsilon"]
        recorder.observe(kind, global_round, payload)

    strategy = make_strategy(cfg, observe, num_nodes=len(node_ids), round_offset=offset, clients=clients)
    num_rounds = cfg.num_server_rounds - offset
    if cfg.dp != "none":
        spec = privacy.PrivacySpec.from_run_config(
            cfg, sample_size=sample_size(cfg, len(node_ids)), population=len(node_ids)
        )
        strategy = privacy.wrap_strategy(strategy, spec, observe, round_offset=offset)
        num_rounds = privacy.rounds_within_budget(spec, num_rounds, start=offset)
        recorder.set("privacy", {"mechanism": privacy.MECHANISMS[cfg.dp], "accountant": privacy.ACCOUNTANT})
        if num_rounds == 0:
            raise ValueError(
                f"run config key 'dp-target-epsilon' ({cfg.dp_target_epsilon}) is below the ε of a single "
                f"round ({privacy.EpsilonAccountant(spec).epsilon_after(offset + 1):.4g}): no round can run"
            )
        if num_rounds < cfg.num_server_rounds - offset:
            recorder.set("dp-stopped-early", offset + num_rounds)
            log.info("dp-target-epsilon: stopping after global round %d", offset + num_rounds)
    # stats as UTF-8 JSON bytes: Flower logs bytes as <bytes> instead of printing the whole table
    run_conf = {"frozen-fingerprint": fingerprint, "norm-stats": stats_json.encode()}
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=wire.encode_state(state, "float32"),
            num_rounds=num_rounds,
            timeout=cfg.round_timeout_s,
            train_config=ConfigRecord(dict(run_conf)),
            evaluate_config=ConfigRecord(dict(run_conf)),
            evaluate_fn=evaluate_fn,
        )
    except BaseException:
        with contextlib.suppress(Exception):
            finish_baseline()  # a run failing in round 1 keeps its baseline
        raise
    finish_baseline()  # a run without rounds
    if len(result.arrays) > 0:
        load_trainable_state(policy, wire.decode_state(result.arrays))
    final = export_policy_folder(
        policy,
        export_preprocessor,
        postprocessor,
        output_dir / rec.FINAL_DIR,
        card_markdown=model_card(
            cfg, offset + num_rounds, reports, last["eval"], last["action-mse"], last["epsilon"]
        ),
        overwrite=True,
    )
    recorder.finish("completed", final=str(final), **best_rounds_record(recorder.data["rounds"]))
    return result
