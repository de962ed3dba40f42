"""LoRA adapters on SmolVLA's action expert (``peft``), so that only the adapters train and travel.

``add_lora_adapters`` injects LoRA layers in place (``peft.inject_adapter_in_model``) into the modules that
lerobot's SmolVLA names as its default PEFT targets (``SmolVLAPolicy._get_default_peft_targets``: the action
expert's q/v projections and the state/action/time projections) and leaves only the adapter matrices
trainable. The policy stays a ``SmolVLAPolicy`` (the LoRA layers wrap the original ``nn.Linear`` modules), so
training, evaluation, ``trainable_state`` and ``frozen_fingerprint`` work unchanged: the wire carries the
``lora_A`` / ``lora_B`` matrices only; clients merge nothing.

``merged_copy`` folds the adapters into their base layers (``W + B·A·scale``) on a copy: what
``export_policy_folder`` saves, so an exported folder is a plain SmolVLA that ``from_pretrained`` loads.
"""

from __future__ import annotations

import copy

import torch

ADAPTER = "default"


def add_lora_adapters(policy, rank: int, alpha: float | None = None):
    """Inject rank-``rank`` LoRA adapters (scaling ``alpha / rank``, default alpha = rank) into ``policy``.

    Adapter init (``lora_A`` random, ``lora_B`` = 0: the adapted policy computes what the base computes) runs
    under a private RNG seeded with ``rank``, so every participant builds the same adapters.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = policy._get_default_peft_targets()
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=targets["target_modules"],
        lora_dropout=0.0,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rank)
        inject_adapter_in_model(config, policy, adapter_name=ADAPTER)
    for name, param in policy.named_parameters():
        param.requires_grad_(".lora_" in name)
    return policy


def has_lora(policy) -> bool:
    """Whether ``policy`` carries LoRA layers."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(module, LoraLayer) for module in policy.modules())


def merged_copy(policy):
    """A copy of ``policy`` with every LoRA layer merged into (and replaced by) its base layer."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(policy)
    replacements = [
        (name, module) for name, module in merged.named_modules() if isinstance(module, LoraLayer)
    ]
    for name, module in replacements:
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        setattr(parent, child, module.get_base_layer())
    return merged
