"""Export to a lerobot checkpoint folder, load it back, and act with it."""

from __future__ import annotations

import json
import shutil

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
)

CARD = "# zk0 tiny SmolVLA\n\nTest card.\n"


@pytest.fixture(scope="module")
def exported(so100_meta, tmp_path_factory):
    policy = build_policy(PolicySpec(seed=5), so100_meta)
    pre, post = build_processors(policy, so100_meta.stats)
    out = export_policy_folder(
        policy, pre, post, tmp_path_factory.mktemp("export") / "model", card_markdown=CARD
    )
    return policy, pre, post, out


def _act(policy, preprocessor, postprocessor, frame, noise):
    policy.reset()
    action = policy.select_action(preprocessor(dict(frame)), noise=noise)
    return action, postprocessor(action)


def _noise(policy):
    shape = (1, policy.config.chunk_size, policy.config.max_action_dim)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def test_export_layout(exported):
    policy, _, _, out = exported
    names = {p.name for p in out.iterdir()}
    expected = {"config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json"}
    assert expected <= names
    assert any(n.startswith("policy_preprocessor_step_") and n.endswith(".safetensors") for n in names)
    assert any(n.startswith("policy_postprocessor_step_") and n.endswith(".safetensors") for n in names)
    assert (out / "README.md").read_text() == CARD
    config = json.loads((out / "config.json").read_text())
    assert config["type"] == "smolvla"
    assert config["vlm_model_name"] == str(out / "vlm")
    assert (out / "vlm" / "tokenizer.json").is_file()
    steps = json.loads((out / "policy_preprocessor.json").read_text())["steps"]
    tokenizer_step = next(s for s in steps if s["registry_name"] == "tokenizer_processor")
    assert tokenizer_step["config"]["tokenizer_name"] == str(out / "vlm")
    assert str(policy.config.vlm_model_name) != str(out / "vlm")  # the live policy is not modified
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temp leftovers


def test_load_and_select_action(exported, so100_root, so100_meta):
    policy, pre, post, out = exported
    loaded, pre2, post2 = load_policy_folder(out)
    original = policy.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.state_dict().items())
    assert frozen_fingerprint(loaded) == frozen_fingerprint(policy)

    frame = observation_frame(so100_root, index=3)
    noise = _noise(policy)
    raw, action = _act(loaded, pre2, post2, frame, noise)
    assert action.shape == (1, 6) and torch.isfinite(action).all()
    stats = so100_meta.stats["action"]
    mean, std = (torch.as_tensor(stats[k], dtype=torch.float32) for k in ("mean", "std"))
    assert torch.allclose(action, raw * std + mean, rtol=1e-4, atol=1e-4)  # un-normalised to joint units
    _, reference = _act(policy, pre, post, frame, noise)
    assert torch.equal(action, reference)


def test_moved_folder_still_loads(exported, so100_root, tmp_path):
    policy, pre, post, out = exported
    moved = tmp_path / "copied-elsewhere"
    shutil.copytree(out, moved)
    # config.json still names <out>/vlm; hide it so only the copy's own vlm/ can work.
    hidden = tmp_path / "hidden-original-vlm"
    (out / "vlm").rename(hidden)
    try:
        loaded, pre2, post2 = load_policy_folder(moved)
        assert loaded.config.vlm_model_name == str(moved / "vlm")
        frame = observation_frame(so100_root)
        _, action = _act(loaded, pre2, post2, frame, _noise(policy))
        _, reference = _act(policy, pre, post, frame, _noise(policy))
        assert torch.equal(action, reference)
    finally:
        hidden.rename(out / "vlm")


def test_missing_weights_and_occupied_target(exported, tmp_path):
    policy, pre, post, out = exported
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_policy_folder(broken)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_policy_folder(tmp_path / "missing")
    with pytest.raises(FileExistsError, match="broken"):
        export_policy_folder(policy, pre, post, broken, card_markdown=CARD)
    rewritten = export_policy_folder(policy, pre, post, broken, card_markdown=CARD, overwrite=True)
    assert (rewritten / "model.safetensors").is_file()


def test_pretrained_source_loads_an_exported_folder(exported, so100_meta):
    policy, _, _, out = exported
    spec = PolicySpec(source="pretrained", pretrained_path=str(out), chunk_size=8, n_action_steps=4, seed=9)
    rebuilt = build_policy(spec, so100_meta)
    assert rebuilt.config.chunk_size == 8 and rebuilt.config.n_action_steps == 4
    original = policy.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in rebuilt.state_dict().items())
