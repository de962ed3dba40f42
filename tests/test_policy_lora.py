"""LoRA adapters on the action expert: only adapters train and travel; export merges them into a plain
SmolVLA folder that ``from_pretrained`` loads and that acts as the adapted policy does."""

from __future__ import annotations

import pytest
import torch
from _fixtures_policy import (  # noqa: F401  (fixtures are registered by import)
    fixture_scratch_tempdir,
    fixture_so100_meta,
    fixture_so100_root,
    observation_frame,
)

from zk0_pipelines.policy import (
    PolicySpec,
    build_policy,
    build_processors,
    export_policy_folder,
    frozen_fingerprint,
    load_policy_folder,
    load_trainable_state,
    trainable_state,
)
from zk0_pipelines.policy.lora import has_lora


@pytest.fixture(scope="module")
def adapted(so100_meta):
    """A rank-4 LoRA policy whose adapters moved away from their init (as after federated rounds)."""
    policy = build_policy(PolicySpec(seed=5, lora_rank=4), so100_meta)
    gen = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in trainable_state(policy).items()}
    load_trainable_state(policy, state)
    return policy


def test_only_the_adapters_train_and_travel(adapted, so100_meta):
    full = build_policy(PolicySpec(seed=5), so100_meta)
    state = trainable_state(adapted)
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert any("lm_expert" in k for k in state)
    lora_values = sum(v.numel() for v in state.values())
    assert lora_values < 0.1 * sum(v.numel() for v in trainable_state(full).values())
    # every participant builds the same frozen base (and the same adapter init)
    again = build_policy(PolicySpec(seed=5, lora_rank=4), so100_meta)
    assert frozen_fingerprint(again) == frozen_fingerprint(adapted)


def test_the_export_is_a_merged_smolvla_that_acts_like_the_adapted_policy(
    adapted, so100_meta, so100_root, tmp_path
):
    pre, post = build_processors(adapted, so100_meta.stats)
    out = export_policy_folder(adapted, pre, post, tmp_path / "model", card_markdown="# lora\n")
    assert has_lora(adapted)  # the live policy keeps its adapters
    loaded, loaded_pre, _ = load_policy_folder(out)
    assert not has_lora(loaded)
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    frame = observation_frame(so100_root)
    noise = torch.randn(
        (1, adapted.config.chunk_size, adapted.config.max_action_dim),
        generator=torch.Generator().manual_seed(0),
    )
    actions = []
    for policy, preprocessor in ((adapted, pre), (loaded, loaded_pre)):
        policy.eval()
        policy.reset()
        actions.append(policy.select_action(preprocessor(dict(frame)), noise=noise))
    torch.testing.assert_close(actions[1], actions[0], atol=1e-4, rtol=1e-4)
