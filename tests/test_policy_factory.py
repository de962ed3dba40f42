"""SmolVLA construction, seeded determinism, and the trainable-parameter wire format."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _fixtures_policy import (  # noqa: F401  (fixtures are registered by import)
    REPO_ID,
    fixture_scratch_tempdir,
    fixture_so100_meta,
    fixture_so100_root,
    training_batch,
)

from zk0_pipelines.policy import (
    PolicyBuildError,
    PolicySpec,
    TrainableStateError,
    build_policy,
    build_processors,
    count_parameters,
    frozen_fingerprint,
    load_trainable_state,
    trainable_state,
)

_BUILD_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
from zk0_pipelines.policy import PolicySpec, build_policy, frozen_fingerprint
meta = LeRobotDatasetMetadata(sys.argv[1], root=Path(sys.argv[2]))
policy = build_policy(PolicySpec(seed=int(sys.argv[3])), meta)
torch.save({k: v.clone() for k, v in policy.state_dict().items()}, sys.argv[4])
print("RESULT " + json.dumps({"fingerprint": frozen_fingerprint(policy)}))
"""


def test_spec_round_trip_and_validation():
    spec = PolicySpec(source="pretrained", revision="abc", chunk_size=8, n_action_steps=4, seed=3)
    assert PolicySpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown_key"):
        PolicySpec.from_dict({**spec.to_dict(), "unknown_key": 1})
    with pytest.raises(ValueError, match="source"):
        PolicySpec(source="huge")
    with pytest.raises(ValueError, match="n_action_steps"):
        PolicySpec(chunk_size=4, n_action_steps=5)
    with pytest.raises(ValueError, match="chunk_size"):
        PolicySpec(chunk_size=0, n_action_steps=0)


def test_same_spec_gives_bit_identical_weights_across_processes(so100_meta, so100_root, tmp_path):
    rng_before = torch.get_rng_state()
    policy = build_policy(PolicySpec(seed=0), so100_meta)
    assert torch.equal(torch.get_rng_state(), rng_before), "build_policy must not consume the global RNG"

    out = tmp_path / "state.pt"
    env = dict(os.environ, PYTHONHASHSEED="12345", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD_SCRIPT, REPO_ID, str(so100_root), "0", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    other = torch.load(out)

    mine = policy.state_dict()
    assert set(other) == set(mine)
    differing = [k for k in mine if mine[k].dtype != other[k].dtype or not torch.equal(mine[k], other[k])]
    assert differing == []
    assert result["fingerprint"] == frozen_fingerprint(policy)

    reseeded = build_policy(PolicySpec(seed=1), so100_meta)
    assert frozen_fingerprint(reseeded) != frozen_fingerprint(policy)
    assert any(not torch.equal(a, trainable_state(reseeded)[k]) for k, a in trainable_state(policy).items())


def test_trainable_state_is_exactly_the_trainable_params(so100_meta):
    policy = build_policy(PolicySpec(), so100_meta)
    state = trainable_state(policy)
    expected = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert set(state) == expected and expected
    assert set(state) < set(policy.state_dict())
    # SmolVLA with train_expert_only: the VLM stays frozen, the action expert and projections train.
    assert not any(k.startswith("model.vlm_with_expert.vlm.") for k in state)
    assert any(k.startswith("model.vlm_with_expert.lm_expert.") for k in state)
    assert "model.action_out_proj.weight" in state
    counts = count_parameters(policy)
    assert counts["trainable"] == sum(t.numel() for t in state.values())
    assert counts["total"] > counts["trainable"]
    # Returned tensors are detached copies.
    name = "model.action_out_proj.weight"
    state[name].add_(1.0)
    assert not torch.equal(state[name], dict(policy.named_parameters())[name].detach())


def test_load_trainable_state_round_trip_and_bf16(so100_meta):
    source = build_policy(PolicySpec(seed=0), so100_meta)
    target = build_policy(PolicySpec(seed=1), so100_meta)
    frozen_before = frozen_fingerprint(target)

    load_trainable_state(target, trainable_state(source))
    for name, tensor in trainable_state(source).items():
        assert torch.equal(trainable_state(target)[name], tensor), name
    assert frozen_fingerprint(target) == frozen_before  # frozen weights are not touched

    wire = {k: v.to(torch.bfloat16) for k, v in trainable_state(source).items()}
    target_state = {k: v * 0 for k, v in trainable_state(target).items()}
    load_trainable_state(target, target_state)
    load_trainable_state(target, wire)
    params = dict(target.named_parameters())
    for name, tensor in wire.items():
        assert params[name].dtype == torch.float32
        assert torch.equal(params[name].detach(), tensor.to(torch.float32)), name


def test_load_trainable_state_rejects_mismatches_without_writing(so100_meta):
    policy = build_policy(PolicySpec(), so100_meta)
    good = trainable_state(policy)
    changed = {k: v + 1.0 for k, v in good.items()}
    name = "model.action_out_proj.weight"
    frozen_name = next(n for n, p in policy.named_parameters() if not p.requires_grad)

    cases = {
        "missing": ({k: v for k, v in changed.items() if k != name}, name),
        "unexpected": ({**changed, frozen_name: torch.zeros(1)}, frozen_name),
        "shape": ({**changed, name: changed[name][:-1]}, name),
        "dtype": ({**changed, name: changed[name].to(torch.int64)}, name),
    }
    for kind, (state, key) in cases.items():
        with pytest.raises(TrainableStateError) as err:
            load_trainable_state(policy, state)
        assert kind in str(err.value) and key in str(err.value), str(err.value)
        after = trainable_state(policy)
        assert all(torch.equal(after[k], good[k]) for k in good), f"{kind}: partial write"


def test_pretrained_offline_error_names_repo_and_revision(so100_meta, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = PolicySpec(source="pretrained", pretrained_path="lerobot/smolvla_base", revision="v0.0-pinned")
    with pytest.raises(PolicyBuildError) as err:
        build_policy(spec, so100_meta)
    assert "lerobot/smolvla_base" in str(err.value)
    assert "v0.0-pinned" in str(err.value)


def test_one_train_step_changes_only_trainable_params(so100_meta, so100_root):
    spec = PolicySpec()
    policy = build_policy(spec, so100_meta)
    preprocessor, _ = build_processors(policy, so100_meta.stats)
    batch = preprocessor(training_batch(so100_root, spec.chunk_size, batch_size=2))

    before = {k: v.detach().clone() for k, v in policy.named_parameters()}
    fingerprint = frozen_fingerprint(policy)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    policy.train()
    loss, info = policy.forward(batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    assert info["loss"] == pytest.approx(loss.item())
    loss.backward()
    optimizer.step()

    params = dict(policy.named_parameters())
    changed = {k for k, v in params.items() if not torch.equal(v.detach(), before[k])}
    trainable_names = {k for k, p in params.items() if p.requires_grad}
    assert changed and changed <= trainable_names
    with_grad = {k for k in trainable_names if params[k].grad is not None and params[k].grad.abs().sum() > 0}
    assert with_grad <= changed
    assert all(p.grad is None for k, p in params.items() if k not in trainable_names)
    assert frozen_fingerprint(policy) == fingerprint
