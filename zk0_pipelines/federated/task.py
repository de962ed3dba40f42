"""Data, local training and seeded evaluation shared by the ClientApp and the ServerApp.

Normalisation rule (one set of statistics per run): every client reports the lerobot ``meta/stats.json``
statistics of its own dataset (only ``observation.*`` and ``action`` features, with their frame counts) in a
query round before training; the server merges them with lerobot's ``aggregate_stats`` (means and variances
weighted by frame count, min/max over clients, quantiles frame-weighted). That single set is sent to every
client with each round's config and used by the clients' preprocessors, the server evaluation and the
exported checkpoints, so weights and normaliser always agree. Frames never leave a client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zk0_pipelines.federated import dataset_view, wire

log = logging.getLogger(__name__)


@dataclass
class PolicyMeta:
    """Stand-in for ``LeRobotDatasetMetadata`` when only features (and stats) are known, e.g. on the server.

    ``make_policy`` reads ``features`` (for the policy's input/output shapes) and ``stats``.
    """

    features: dict[str, Any]
    stats: dict[str, dict[str, np.ndarray]] | None = None


def repo_id_for(root: Path) -> str:
    """A local repo id for a dataset folder (lerobot wants ``owner/name``; nothing is fetched)."""
    return f"local/{Path(root).name}"


def open_metadata(root: Path):
    """``LeRobotDatasetMetadata`` of a local dataset folder; a clear error when the folder is not one."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    root = Path(root)
    dataset_view.info_file(root)  # the clear error before lerobot's own
    return LeRobotDatasetMetadata(repo_id_for(root), root=root)


def open_dataset(root: Path, policy, meta=None):
    """The client's ``LeRobotDataset`` (pyav decoding) with the policy's delta timestamps (action chunk)."""
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = Path(root)
    meta = meta if meta is not None else open_metadata(root)
    delta = resolve_delta_timestamps(policy.config, meta)
    try:
        return LeRobotDataset(repo_id_for(root), root=root, delta_timestamps=delta, video_backend="pyav")
    except Exception as exc:  # lerobot falls back to the Hub when a local file is missing
        raise RuntimeError(
            f"cannot open dataset {root}: {type(exc).__name__}: {exc} "
            "(lerobot tries the Hub when a local data/video file is missing)"
        ) from exc


def aggregate_client_stats(
    stats_list: list[dict[str, dict[str, np.ndarray]]],
) -> dict[str, dict[str, np.ndarray]]:
    """Frame-count weighted merge of per-client stats (lerobot ``aggregate_stats``); all clients same keys."""
    from lerobot.datasets.compute_stats import aggregate_stats

    if not stats_list:
        raise ValueError("no client statistics to aggregate")
    keys = [sorted(s) for s in stats_list]
    if any(k != keys[0] for k in keys):
        raise ValueError(f"clients report different normalised features: {keys}")
    return aggregate_stats(stats_list)


def stats_digest(stats_json: str) -> str:
    """Short digest of a stats JSON (cache key for preprocessors, recorded in checkpoints)."""
    return hashlib.sha256(stats_json.encode()).hexdigest()[:16]


def features_signature(features: Mapping[str, Any]) -> str:
    """Canonical JSON of the feature dtypes and shapes (what determines the policy's architecture)."""
    sig = {k: {"dtype": v.get("dtype"), "shape": list(v.get("shape", []))} for k, v in features.items()}
    return json.dumps(sig, sort_keys=True)


def check_fingerprint(expected: str, actual: str, where: str) -> None:
    """Raise if the frozen-weight fingerprint of a locally built policy differs from the server's."""
    if expected != actual:
        raise ValueError(
            f"frozen weights of the policy built at {where} differ from the server's (fingerprint "
            f"{actual[:16]}… != {expected[:16]}…): same PolicySpec and dataset features are required on "
            "every participant (check policy-source/pretrained-path/pretrained-revision/chunk-size/seed and "
            "the dataset schema)"
        )


def mixed_seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative integers (no collisions like ``seed + round + partition``)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)
    return int(state[0]) & 0x7FFFFFFFFFFFFFFF


def _infinite_batches(dataset, batch_size: int, generator: torch.Generator):
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=0, generator=generator, drop_last=False
    )
    while True:
        yield from loader


@dataclass
class TrainResult:
    """Metrics of one local training run (keys match the MetricRecord sent to the server)."""

    train_loss: float
    grad_norm: float
    proximal_term: float
    num_examples: int
    samples_seen: int
    step_time_s: float
    client_update_norm: float
    lr: float = 0.0
    proximal_mu: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def to_metrics(self) -> dict[str, float | int]:
        """Flower MetricRecord content."""
        return {
            "train-loss": self.train_loss,
            "grad-norm": self.grad_norm,
            "proximal-term": self.proximal_term,
            "num-examples": self.num_examples,
            "samples-seen": self.samples_seen,
            "step-time-s": self.step_time_s,
            "client-update-norm": self.client_update_norm,
            "lr": self.lr,
            "proximal-mu": self.proximal_mu,
        }


def train_local(
    policy,
    preprocessor,
    dataset,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float = 1e-10,
    grad_clip_norm: float = 10.0,
    proximal_mu: float = 0.0,
    seed: int = 0,
) -> TrainResult:
    """Run ``steps`` AdamW steps on the trainable parameters (SmolVLA preset: betas 0.9/0.95, eps 1e-8).

    Batches are drawn with a ``torch.Generator`` seeded by ``seed``; the flow-matching noise/time use the
    global torch RNG inside ``fork_rng`` seeded by ``seed`` too, so the caller's RNG is left untouched and the
    run is reproducible. With ``proximal_mu > 0`` the FedProx term ``(mu/2)*||w - w_start||^2`` is added to
    the loss before backward (``w_start`` = the weights at entry, i.e. the received global weights).
    ``num_examples`` is the number of frames in the client dataset (FedAvg's n_k weighting).
    """
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise ValueError("policy has no trainable parameters")
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(
        params, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay
    )
    max_norm = grad_clip_norm if grad_clip_norm > 0 else math.inf
    generator = torch.Generator().manual_seed(seed)
    batches = _infinite_batches(dataset, batch_size, generator)
    losses, grad_norms, prox_terms, step_times, lrs = [], [], [], [], []
    samples = 0
    policy.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = preprocessor(next(batches))
            loss, _ = policy.forward(batch)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"non-finite training loss {loss_value}")
            if proximal_mu > 0:  # fused FedProx term (two foreach kernels), added before backward
                prox = wire.proximal_term_lists(params, start, proximal_mu)
                (loss + prox).backward()
                prox_terms.append(float(prox.detach()))
            else:
                loss.backward()
                prox_terms.append(0.0)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            lrs.append(float(optimizer.param_groups[0]["lr"]))  # the rate this step is taken with
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - t0)
            losses.append(loss_value)
            grad_norms.append(float(grad_norm))
            samples += int(batch["action"].shape[0])
    with torch.no_grad():
        drift = wire.update_norm(params, start)
    return TrainResult(
        train_loss=float(np.mean(losses)),
        grad_norm=float(np.mean(grad_norms)),
        proximal_term=float(np.mean(prox_terms)),
        num_examples=len(dataset),
        samples_seen=samples,
        step_time_s=float(np.mean(step_times)),
        client_update_norm=drift,
        lr=float(np.mean(lrs)),
        proximal_mu=float(proximal_mu),
    )


@dataclass
class EvalResult:
    """Seeded server/client evaluation of a policy on one dataset.

    ``loss``: mean seeded flow-matching loss per sample (normalised space, what SmolVLA trains on).
    ``action_mse``: mean squared error, in the dataset's raw action units, between the predicted action
    chunk (un-normalised by the policy's postprocessor) and the dataset's action chunk, over the valid
    (not ``action_is_pad``) chunk steps and all action dims; None when it was not computed.
    ``samples``: frames evaluated; ``action_values``: valid (step, dim) entries the MSE averages over.
    """

    loss: float
    samples: int
    action_mse: float | None = None
    action_values: int = 0


def chunk_noise(shape: tuple[int, ...], seed: int, batch_index: int) -> torch.Tensor:
    """The fixed flow-matching start noise for predicting the chunk of eval batch ``batch_index``."""
    generator = torch.Generator().manual_seed(mixed_seed(seed, batch_index, 1))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def raw_action_squared_error(
    predicted: torch.Tensor, target: torch.Tensor, is_pad: torch.Tensor | None
) -> tuple[float, int]:
    """``(sum of squared errors, number of entries)`` over the valid steps of ``(B, T, D)`` action chunks.

    Steps flagged in ``is_pad`` (``(B, T)``, True = beyond the episode end, lerobot's ``action_is_pad``)
    are left out: their target is a copy of the episode's last action, not a real one.
    """
    if predicted.shape != target.shape:
        raise ValueError(f"predicted chunk {tuple(predicted.shape)} != target chunk {tuple(target.shape)}")
    squared = (predicted.double() - target.double()) ** 2
    valid = torch.ones(squared.shape[:2], dtype=torch.bool) if is_pad is None else ~is_pad.bool().cpu()
    return float(squared[valid].sum()), int(valid.sum()) * int(squared.shape[-1])


def predict_raw_chunk(policy, postprocessor, batch: dict[str, Any], noise: torch.Tensor) -> torch.Tensor:
    """SmolVLA's action chunk for a preprocessed batch, un-normalised to raw units (CPU, float32).

    ``predict_action_chunk`` with the given start ``noise`` (so the chunk is deterministic), then the
    policy's postprocessor: the same un-normaliser lerobot applies at inference.
    """
    state = batch.get("observation.state")
    device = state.device if isinstance(state, torch.Tensor) else torch.device("cpu")
    normalised = policy.predict_action_chunk(dict(batch), noise=noise.to(device))
    return postprocessor(normalised).detach().to("cpu", torch.float32)


@torch.no_grad()
def evaluate_policy(
    policy,
    preprocessor,
    dataset,
    *,
    batch_size: int,
    seed: int,
    max_batches: int = 0,
    postprocessor=None,
) -> EvalResult:
    """Seeded loss and (with ``postprocessor``) raw-unit action-chunk MSE of ``policy`` on ``dataset``.

    Frames are read in order, at most ``max_batches`` batches (0 = all). Loss: before batch ``i`` the
    torch RNG (forked, so the caller's is untouched) is re-seeded with ``mixed_seed(seed, i)``, so
    SmolVLA's noise and time samples depend only on the seed and the batch. Action MSE: the chunk is
    predicted from the fixed noise :func:`chunk_noise` ``(seed, i)``, un-normalised by ``postprocessor``
    and compared with the dataset's raw action chunk (padded steps excluded). The same weights give the
    same numbers.
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    was_training = policy.training
    policy.eval()
    total, count = 0.0, 0
    squared_sum, values = 0.0, 0
    try:
        with torch.random.fork_rng(devices=[]):
            for index, raw in enumerate(loader):
                if max_batches and index >= max_batches:
                    break
                target = raw["action"].detach().clone().to(torch.float32)  # raw units, before normalising
                is_pad = raw.get("action_is_pad")
                is_pad = is_pad.detach().clone() if is_pad is not None else None
                torch.manual_seed(mixed_seed(seed, index))
                batch = preprocessor(raw)
                loss, _ = policy.forward(dict(batch))
                n = int(batch["action"].shape[0])
                total += float(loss) * n
                count += n
                if postprocessor is not None:
                    cfg = policy.config
                    noise = chunk_noise((n, cfg.chunk_size, cfg.max_action_dim), seed, index)
                    predicted = predict_raw_chunk(policy, postprocessor, batch, noise)
                    sq, k = raw_action_squared_error(predicted, target, is_pad)
                    squared_sum += sq
                    values += k
    finally:
        policy.train(was_training)
    if count == 0:
        raise ValueError("evaluation dataset yielded no samples")
    if postprocessor is not None and values == 0:
        raise ValueError("evaluation dataset yielded no valid (unpadded) action steps")
    action_mse = squared_sum / values if postprocessor is not None else None
    return EvalResult(loss=total / count, samples=count, action_mse=action_mse, action_values=values)


def evaluate_loss(
    policy, preprocessor, dataset, *, batch_size: int, seed: int, max_batches: int = 0
) -> tuple[float, int]:
    """Seeded flow-matching loss of ``policy`` on ``dataset`` (:func:`evaluate_policy` without the MSE).

    Returns ``(mean loss per sample, samples)``.
    """
    result = evaluate_policy(
        policy, preprocessor, dataset, batch_size=batch_size, seed=seed, max_batches=max_batches
    )
    return result.loss, result.samples
