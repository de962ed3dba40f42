"""Flower ClientApp (Message API): one SO-100 dataset per client, SmolVLA trainable parameters on the wire.

Which dataset: a SuperNode started with node config ``dataset-path=<root>`` uses that folder (deployment: each
SuperNode is given only its own dataset); otherwise (simulation) ``train-datasets[partition-id]``.

Handlers:

- ``query``: reports the dataset's normalisation stats, features, camera map and frame count (``task`` doc);
  features and stats carry the policy's camera names (``dataset_view.policy_view``).
- ``train``: builds SmolVLA locally (cached), checks the frozen-weight fingerprint sent by the server, loads
  the received trainable weights, runs ``local-steps`` seeded steps with the learning rate the server sent
  for this round (``learning-rate`` in the message config: the server's schedule, not the local run config;
  FedProx term when ``proximal-mu`` is in the config) and replies with its weights (float32 wire) or its
  update (bfloat16 wire) and metrics (incl. ``lr``, the optimizer's learning rate; its info record carries
  ``torch-threads``, the intra-op threads it trained with). Faults named by the
  tests-only ``inject-faults`` key are applied here (``faults`` module).
- ``evaluate``: seeded flow-matching loss of the received weights on the local dataset.

Mod ``dp_clipping_mod``: with ``dp = central-client-clip`` the server's train config carries
``clipping_norm`` and Flower's ``fixedclipping_mod`` clips the reply's update to it before it leaves the
client (``privacy`` module).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from zk0_pipelines.federated import dataset_view
from zk0_pipelines.federated.faults import InjectedFault, faults_for
from zk0_pipelines.federated.run_config import RunConfig, parse_run_config

log = logging.getLogger(__name__)


def dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` on train messages carrying a clipping norm (``central-client-clip``)."""
    conf = msg.content.config_records.get("config")
    if msg.metadata.message_type == MessageType.TRAIN and conf is not None and KEY_CLIPPING_NORM in conf:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[dp_clipping_mod])

INFO_KEY = "client-info"


def dataset_root(node_config: dict, cfg: RunConfig) -> tuple[Path, int]:
    """``(dataset root, partition id or -1)`` of this client from its node config and the run config."""
    if "dataset-path" in node_config:
        return Path(str(node_config["dataset-path"])), int(node_config.get("partition-id", -1))
    if "partition-id" not in node_config:
        raise ValueError(
            "node config has neither 'dataset-path' (deployment) nor 'partition-id' (simulation)"
        )
    pid = int(node_config["partition-id"])
    paths = cfg.train_paths
    if not 0 <= pid < len(paths):
        raise ValueError(
            f"partition-id {pid} has no dataset: run config 'train-datasets' lists {len(paths)} path(s)"
        )
    return paths[pid], pid


def _client_key(root: Path, pid: int) -> int:
    if pid >= 0:
        return pid
    return int(hashlib.sha256(str(root).encode()).hexdigest()[:8], 16)


def _setup(context: Context) -> tuple[RunConfig, Path, int]:
    from zk0_pipelines.settings import configure_local_env

    configure_local_env()
    logging.getLogger("flwr").propagate = False  # lerobot's import configures the root logger too
    cfg = parse_run_config(dict(context.run_config))
    root, pid = dataset_root(dict(context.node_config), cfg)
    return cfg, root, pid


def _info(root: Path, pid: int, **extra) -> ConfigRecord:
    return ConfigRecord({"dataset": str(root), "partition-id": pid, **extra})


def _runtime(cfg: RunConfig, root: Path, conf: ConfigRecord):
    from zk0_pipelines.federated import task
    from zk0_pipelines.federated.prewarm import wait_for_client_prewarm
    from zk0_pipelines.federated.runtime import get_client_runtime

    wait_for_client_prewarm()  # nothing may run beside seeded work (prewarm module doc)

    for key in ("frozen-fingerprint", "norm-stats"):
        if key not in conf:
            raise ValueError(f"server message config lacks '{key}' (server and client app versions differ?)")
    runtime = get_client_runtime(root, cfg.policy_spec())
    task.check_fingerprint(str(conf["frozen-fingerprint"]), runtime.fingerprint, where=f"client {root}")
    return runtime


def _stats_json(conf: ConfigRecord) -> str:
    value = conf["norm-stats"]
    return value.decode() if isinstance(value, bytes) else str(value)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report the local dataset's normalisation stats, features and frame count; then import the policy
    stacks in the background while the server builds (``prewarm`` module)."""
    from zk0_pipelines.federated.prewarm import prewarm_client_imports

    _, root, pid = _setup(context)
    meta = dataset_view.read_meta(root)
    features, stats, cameras = dataset_view.policy_view(root, meta)
    info = _info(
        root,
        pid,
        **{
            "num-frames": meta.total_frames,
            "features-json": json.dumps(features, sort_keys=True),
            "stats-json": dataset_view.stats_to_json(stats),
            "cameras-json": json.dumps(cameras.to_dict(), sort_keys=True),
        },
    )
    prewarm_client_imports()
    return Message(RecordDict({INFO_KEY: info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training round on this client's dataset."""
    import torch

    from zk0_pipelines.federated import task, wire
    from zk0_pipelines.policy import load_trainable_state, trainable_state

    cfg, root, pid = _setup(context)
    conf = msg.content["config"]
    server_round = int(conf.get("global-round", conf.get("server-round", 0)))
    faults = faults_for(cfg.inject_faults, pid, server_round)
    if "stall" in faults:
        time.sleep(min(cfg.round_timeout_s, 600.0))
    if "raise" in faults:
        raise InjectedFault(f"injected failure (inject-faults) in partition {pid}, round {server_round}")
    if "learning-rate" not in conf:
        raise ValueError(
            "server message config lacks 'learning-rate' (server and client app versions differ?)"
        )
    runtime = _runtime(cfg, root, conf)
    preprocessor, _ = runtime.processors(_stats_json(conf))
    received = wire.decode_state(msg.content["arrays"])
    load_trainable_state(runtime.policy, received)
    result = task.train_local(
        runtime.policy,
        preprocessor,
        runtime.dataset,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        learning_rate=float(conf["learning-rate"]),  # the server's schedule, not the local config
        weight_decay=cfg.weight_decay,
        grad_clip_norm=cfg.grad_clip_norm,
        proximal_mu=float(conf.get("proximal-mu", 0.0)),
        seed=task.mixed_seed(cfg.seed, server_round, _client_key(root, pid)),
    )
    updated = trainable_state(runtime.policy)
    payload = updated if cfg.wire_dtype == "float32" else wire.sub_state(updated, received)
    if "nan" in faults:
        first = sorted(payload)[0]
        payload[first] = payload[first].clone()
        payload[first].view(-1)[0] = float("nan")
    log.info("client %s round %s: loss %.4f", root.name, server_round, result.train_loss)
    content = RecordDict(
        {
            "arrays": wire.encode_state(payload, cfg.wire_dtype),
            "metrics": MetricRecord(result.to_metrics()),
            INFO_KEY: _info(root, pid, round=server_round, **{"torch-threads": torch.get_num_threads()}),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Seeded flow-matching loss of the received global weights on the local dataset."""
    from zk0_pipelines.federated import task, wire
    from zk0_pipelines.policy import load_trainable_state

    cfg, root, pid = _setup(context)
    conf = msg.content["config"]
    runtime = _runtime(cfg, root, conf)
    preprocessor, _ = runtime.processors(_stats_json(conf))
    load_trainable_state(runtime.policy, wire.decode_state(msg.content["arrays"]))
    loss, count = task.evaluate_loss(
        runtime.policy,
        preprocessor,
        runtime.dataset,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        max_batches=cfg.eval_max_batches,
    )
    server_round = int(conf.get("global-round", conf.get("server-round", 0)))
    content = RecordDict(
        {
            "metrics": MetricRecord({"eval-loss": loss, "num-examples": count}),
            INFO_KEY: _info(root, pid, round=server_round),
        }
    )
    return Message(content, reply_to=msg)
