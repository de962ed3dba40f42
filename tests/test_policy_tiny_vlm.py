"""The tiny offline SmolVLM folder: deterministic, loadable, safe under concurrent builders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zk0_pipelines.policy import tiny_vlm
from zk0_pipelines.policy.tiny_vlm import EXTRA_SPECIAL_TOKENS, MARKER_FILE, ensure_tiny_vlm


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return ensure_tiny_vlm(tmp_path_factory.mktemp("vlm_ref") / "tiny")


def test_folder_loads_with_special_tokens(reference):
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(reference)
    tokenizer = processor.tokenizer
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in EXTRA_SPECIAL_TOKENS.items()}
    assert tokenizer.fake_image_token_id == ids["fake_image_token"]
    assert tokenizer.global_image_token_id == ids["global_image_token"]
    assert len({ids["fake_image_token"], ids["global_image_token"], ids["image_token"]}) == 3
    assert tokenizer.pad_token_id is not None
    config = AutoConfig.from_pretrained(reference)
    assert config.vision_config.image_size == tiny_vlm.IMAGE_SIZE
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_token_id == ids["image_token"]
    # Task text is tokenized into several ids and decodes back exactly (byte-level BPE).
    text = "Pick up the red cube and place it in the box\n"
    encoded = tokenizer(text)["input_ids"]
    assert 1 < len(encoded) < len(text)
    assert tokenizer.decode(encoded) == text


def test_build_is_deterministic_and_idempotent(reference, tmp_path):
    other = ensure_tiny_vlm(tmp_path / "again")
    assert _files(other) == _files(reference)
    stamp = (other / "config.json").stat().st_mtime_ns
    assert ensure_tiny_vlm(tmp_path / "again") == other
    assert (other / "config.json").stat().st_mtime_ns == stamp  # not rebuilt


def test_outdated_folder_is_rebuilt(reference, tmp_path):
    folder = ensure_tiny_vlm(tmp_path / "old")
    marker = json.loads((folder / MARKER_FILE).read_text())
    (folder / MARKER_FILE).write_text(json.dumps(dict(marker, version="0")))
    (folder / "stale.txt").write_text("from an older version")
    assert not tiny_vlm.is_current(folder)
    assert ensure_tiny_vlm(folder) == folder
    assert _files(folder) == _files(reference)


_BUILD = "import sys; from pathlib import Path; from zk0_pipelines.policy.tiny_vlm import ensure_tiny_vlm; "
_BUILD += "print('RESULT', ensure_tiny_vlm(Path(sys.argv[1])))"


def test_concurrent_processes_agree(reference, tmp_path):
    target = tmp_path / "shared" / "tiny"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD, str(target)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    results = {out.split("RESULT ", 1)[1].strip() for out, _ in outputs}
    assert results == {str(target.resolve())}
    assert _files(target) == _files(reference)
    leftovers = [p.name for p in target.parent.iterdir() if p.name != "tiny" and not p.name.endswith(".lock")]
    assert leftovers == []
