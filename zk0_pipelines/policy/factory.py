"""SmolVLA construction (tiny offline or pretrained), processors, and the trainable-parameter wire format.

One code path for both sources: ``build_policy`` makes a lerobot ``SmolVLAConfig`` and hands it to lerobot's
``make_policy(cfg, ds_meta=...)``. The tiny source points ``vlm_model_name`` at a local tiny SmolVLM folder
(``ensure_tiny_vlm``) with random weights; the pretrained source loads ``lerobot/smolvla_base`` (or another
repo/folder) at a pinned revision.

Only the parameters with ``requires_grad=True`` travel between server and clients (``trainable_state`` /
``load_trainable_state``); the frozen rest is identical everywhere by construction, which
``frozen_fingerprint`` lets callers verify.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from zk0_pipelines.policy.export import vendored_vlm
from zk0_pipelines.policy.tiny_vlm import IMAGE_SIZE, TEXT_LAYERS, ensure_tiny_vlm

if TYPE_CHECKING:
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

SOURCES = ("tiny", "pretrained")


class PolicyBuildError(RuntimeError):
    """The policy could not be constructed (e.g. pretrained weights unreachable)."""


class TrainableStateError(ValueError):
    """A trainable state does not match the policy (keys, shapes or dtypes)."""


@dataclass(frozen=True)
class PolicySpec:
    """What policy to build. Serialisable with ``to_dict`` / ``from_dict`` (for run configs and MLflow).

    Attributes:
        source: ``"tiny"`` (offline, random init from a local tiny VLM) or ``"pretrained"``.
        pretrained_path: Hub repo id or local folder of a lerobot SmolVLA checkpoint (pretrained only).
        revision: Hub revision (commit sha, tag or branch) of ``pretrained_path``; pin it in production.
        device: Torch device for the policy and its processors.
        chunk_size: Length of the predicted action chunk.
        n_action_steps: Actions executed per chunk by ``select_action`` (``<= chunk_size``).
        seed: Seed of the random initialisation (tiny) / of the non-pretrained heads (pretrained).
        lora_rank: > 0: only rank-``lora_rank`` LoRA adapters of the action expert train (``lora`` module).
    """

    source: Literal["tiny", "pretrained"] = "tiny"
    pretrained_path: str = "lerobot/smolvla_base"
    revision: str | None = None
    device: str = "cpu"
    chunk_size: int = 10
    n_action_steps: int = 10
    seed: int = 0
    lora_rank: int = 0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"PolicySpec.source must be one of {SOURCES}, got {self.source!r}")
        for name in ("chunk_size", "n_action_steps", "seed", "lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"PolicySpec.{name} must be an int, got {value!r}")
        if self.chunk_size < 1 or self.n_action_steps < 1:
            raise ValueError(
                f"PolicySpec.chunk_size and n_action_steps must be >= 1, got {self.chunk_size}, "
                f"{self.n_action_steps}"
            )
        if self.n_action_steps > self.chunk_size:
            raise ValueError(
                f"PolicySpec.n_action_steps ({self.n_action_steps}) must be <= chunk_size ({self.chunk_size})"
            )
        if self.source == "pretrained" and not self.pretrained_path:
            raise ValueError("PolicySpec.pretrained_path is required when source='pretrained'")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON/YAML friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicySpec:
        """Inverse of ``to_dict``; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown PolicySpec key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def _tiny_config(spec: PolicySpec):
    from lerobot.policies.factory import make_policy_config

    return make_policy_config(
        "smolvla",
        device=spec.device,
        vlm_model_name=str(ensure_tiny_vlm()),
        load_vlm_weights=False,
        num_vlm_layers=TEXT_LAYERS,
        resize_imgs_with_padding=(IMAGE_SIZE, IMAGE_SIZE),
        chunk_size=spec.chunk_size,
        n_action_steps=spec.n_action_steps,
        push_to_hub=False,
    )


def _where(spec: PolicySpec) -> str:
    if Path(spec.pretrained_path).is_dir():
        return f"local folder '{spec.pretrained_path}'"
    return f"'{spec.pretrained_path}' at revision {spec.revision or 'None (unpinned: main)'}"


def _pretrained_config(spec: PolicySpec):
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

    try:
        cfg = PreTrainedConfig.from_pretrained(spec.pretrained_path, revision=spec.revision)
    except Exception as exc:  # hub/offline/HTTP errors come in many types
        raise PolicyBuildError(
            f"Cannot load the SmolVLA config of {_where(spec)}: {type(exc).__name__}: {exc}. "
            "Without network access (HF_HUB_OFFLINE=1) the checkpoint must already be in the Hugging Face "
            "cache (HF_HOME) or pretrained_path must be a local folder; use source='tiny' to run offline."
        ) from exc
    if not isinstance(cfg, SmolVLAConfig):
        raise PolicyBuildError(f"{_where(spec)} is a '{cfg.type}' policy, expected 'smolvla'")
    cfg.pretrained_path = spec.pretrained_path
    cfg.pretrained_revision = spec.revision
    cfg.device = spec.device
    cfg.chunk_size = spec.chunk_size
    cfg.n_action_steps = spec.n_action_steps
    cfg.push_to_hub = False
    local = Path(spec.pretrained_path)
    if local.is_dir() and vendored_vlm(local) is not None:  # one of our exports, possibly moved
        cfg.vlm_model_name = str(vendored_vlm(local))
    # Features come from the client dataset (SO-100 camera names differ from smolvla_base's camera1..3;
    # images go through one shared vision tower, so the names carry no weights).
    cfg.input_features = {}
    cfg.output_features = {}
    return cfg


def build_policy(spec: PolicySpec, ds_meta) -> SmolVLAPolicy:
    """Construct a SmolVLA policy for the features of ``ds_meta`` (a ``LeRobotDatasetMetadata``).

    Initialisation runs under a private, seeded torch RNG (``spec.seed``), so the same spec and dataset
    features give bit-identical initial weights in any process, and the caller's global RNG is untouched.

    Raises:
        PolicyBuildError: pretrained checkpoint unreachable or not SmolVLA (names repo id and revision).
    """
    from lerobot.policies.factory import make_policy

    if ds_meta is None:
        raise ValueError("build_policy needs dataset metadata (LeRobotDatasetMetadata) for feature shapes")
    cfg = _tiny_config(spec) if spec.source == "tiny" else _pretrained_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        try:
            policy = make_policy(cfg, ds_meta=ds_meta)
        except (OSError, ValueError) as exc:
            if spec.source == "tiny":
                raise
            raise PolicyBuildError(
                f"Cannot build SmolVLA from {_where(spec)} (VLM backbone '{cfg.vlm_model_name}'): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    if spec.lora_rank > 0:
        from zk0_pipelines.policy.lora import add_lora_adapters

        add_lora_adapters(policy, spec.lora_rank)
    return policy


def build_processors(policy, dataset_stats: dict | None, rename_map: dict[str, str] | None = None):
    """lerobot pre/post-processor pipelines for ``policy`` (normaliser stats from ``dataset_stats``).

    ``rename_map`` (``{dataset camera key: policy image input}``, a dataset's camera map) goes into the
    preprocessor's lerobot ``RenameObservationsProcessorStep``, its first step, so a batch read from the
    dataset reaches the policy under the policy's camera names (and a saved processor config carries it).

    Returns:
        ``(preprocessor, postprocessor)``: the preprocessor takes a raw frame/batch dict (images float
        [0, 1] CHW, ``observation.state``, ``task`` string(s)), adds the batch dim, tokenizes the task,
        normalises; the postprocessor un-normalises actions and moves them to the CPU.
    """
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.processor.rename_processor import RenameObservationsProcessorStep

    preprocessor, postprocessor = make_pre_post_processors(policy.config, dataset_stats=dataset_stats)
    if rename_map:
        steps = [s for s in preprocessor.steps if isinstance(s, RenameObservationsProcessorStep)]
        if not steps:
            raise ValueError("the policy's preprocessor has no rename step for the camera map")
        steps[0].rename_map = dict(rename_map)
    return preprocessor, postprocessor


def trainable_state(policy) -> dict[str, torch.Tensor]:
    """Detached CPU clones of the parameters with ``requires_grad=True``, keyed by parameter name."""
    return {
        name: param.detach().to("cpu", copy=True)
        for name, param in policy.named_parameters()
        if param.requires_grad
    }


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise TrainableStateError(
        f"trainable state entry '{name}' is a {type(value).__name__}, expected a torch.Tensor"
    )


def load_trainable_state(policy, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the trainable parameters of ``policy``, strictly.

    The key set must equal the policy's trainable parameter names, every shape must match, and every value
    must be a floating-point tensor (or numpy array); other floating dtypes (e.g. bf16 on the wire) are cast
    to the parameter's dtype. Everything is checked before anything is written.

    Raises:
        TrainableStateError: listing missing/unexpected keys and shape/dtype mismatches.
    """
    params = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(
            f"unexpected keys ({len(unexpected)}): {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    tensors = {}
    for name in sorted(set(params) & set(state)):
        tensor = _as_tensor(name, state[name])
        param = params[name]
        if tuple(tensor.shape) != tuple(param.shape):
            problems.append(
                f"shape mismatch for '{name}': got {tuple(tensor.shape)}, expected {tuple(param.shape)}"
            )
        elif not tensor.is_floating_point():
            problems.append(f"dtype mismatch for '{name}': got {tensor.dtype}, expected a floating dtype")
        tensors[name] = tensor
    if problems:
        raise TrainableStateError("trainable state does not match the policy: " + "; ".join(problems))
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(device=params[name].device, dtype=params[name].dtype))


def frozen_fingerprint(policy) -> str:
    """sha256 over the frozen parameters (sorted names, dtype, shape and raw bytes), as a hex string.

    Two policies with the same fingerprint agree on everything that ``trainable_state`` does not carry.
    """
    digest = hashlib.sha256()
    frozen = sorted(
        ((n, p) for n, p in policy.named_parameters() if not p.requires_grad), key=lambda item: item[0]
    )
    for name, param in frozen:
        data = param.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(param.shape)}\n".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def count_parameters(policy) -> dict[str, int]:
    """``{"total": ..., "trainable": ...}`` parameter counts (shared parameters counted once)."""
    total = trainable = 0
    for param in policy.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return {"total": total, "trainable": trainable}
