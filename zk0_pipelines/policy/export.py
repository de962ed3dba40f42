"""Export a SmolVLA policy and its processors as a lerobot checkpoint folder, and load it back.

Layout (lerobot's own format, what ``SmolVLAPolicy.from_pretrained`` and ``lerobot-record --policy.path``
read), plus a model card and, for a local VLM backbone, a vendored copy of it::

    config.json                                   policy config (type "smolvla")
    model.safetensors                             all policy weights (trainable and frozen)
    policy_preprocessor.json                      preprocessor pipeline
    policy_preprocessor_step_*_normalizer_processor.safetensors
    policy_postprocessor.json
    policy_postprocessor_step_*_unnormalizer_processor.safetensors
    README.md                                     model card
    vlm/                                          only when vlm_model_name is a local folder (tiny VLM)

SmolVLA rebuilds its VLM from ``config.vlm_model_name`` (a Hub id, or an absolute folder path for the tiny
offline VLM). For a local folder the export copies it to ``vlm/`` and points ``config.json`` and the
tokenizer step at that copy's absolute path, so plain lerobot loading works on this machine even if the
cache is cleared; ``load_policy_folder`` also re-points them at ``<folder>/vlm`` when the folder was moved
or copied elsewhere (MLflow artifacts, a Hub download).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from zk0_pipelines.policy.lora import has_lora, merged_copy

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "policy_preprocessor.json"
POSTPROCESSOR_FILE = "policy_postprocessor.json"
CARD_FILE = "README.md"
VLM_DIR = "vlm"
TOKENIZER_STEP = "tokenizer_processor"


def vendored_vlm(folder: Path) -> Path | None:
    """The ``vlm/`` copy inside an exported policy folder, if there is one (absolute path)."""
    candidate = Path(folder).resolve() / VLM_DIR
    return candidate if (candidate / "config.json").is_file() else None


def _vendor_vlm(policy, tmp_dir: Path, final_dir: Path) -> None:
    """Copy a local VLM folder into ``vlm/`` and re-point config.json + the tokenizer step at it."""
    source = Path(str(policy.config.vlm_model_name))
    if not source.is_dir():
        return  # a Hub id: portable as is
    shutil.copytree(source, tmp_dir / VLM_DIR, ignore=shutil.ignore_patterns(".*", "*.lock"))
    vendored = str(final_dir / VLM_DIR)
    dataclasses.replace(policy.config, vlm_model_name=vendored)._save_pretrained(tmp_dir)
    path = tmp_dir / PREPROCESSOR_FILE
    pipeline = json.loads(path.read_text())
    steps = [s for s in pipeline.get("steps", []) if s.get("registry_name") == TOKENIZER_STEP]
    if len(steps) != 1:
        raise ValueError(f"{path}: expected one '{TOKENIZER_STEP}' step, found {len(steps)}")
    steps[0].setdefault("config", {})["tokenizer_name"] = vendored
    path.write_text(json.dumps(pipeline, indent=4) + "\n")


def export_policy_folder(
    policy, preprocessor, postprocessor, out_dir: Path, *, card_markdown: str, overwrite: bool = False
) -> Path:
    """Write ``policy`` and its processors as a lerobot checkpoint folder at ``out_dir`` (see module doc).

    The folder is assembled in a temporary sibling and moved into place, so ``out_dir`` is either complete
    or absent. ``out_dir`` must not exist (or be empty) unless ``overwrite=True``.

    Returns:
        The absolute folder path.
    """
    out_dir = Path(out_dir).resolve()
    occupied = out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    if occupied and not overwrite:
        raise FileExistsError(f"export folder {out_dir} already exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if has_lora(policy):  # LoRA adapters merged into their base layers: a plain SmolVLA folder
            policy = merged_copy(policy)
        policy.save_pretrained(tmp)
        preprocessor.save_pretrained(tmp)
        postprocessor.save_pretrained(tmp)
        _vendor_vlm(policy, tmp, out_dir)
        (tmp / CARD_FILE).write_text(card_markdown if card_markdown.endswith("\n") else card_markdown + "\n")
        for name in (CONFIG_FILE, WEIGHTS_FILE, PREPROCESSOR_FILE, POSTPROCESSOR_FILE):
            if not (tmp / name).is_file():
                raise RuntimeError(f"lerobot did not write {name} while exporting to {out_dir}")
        if out_dir.exists():
            if out_dir.is_dir():
                shutil.rmtree(out_dir)
            else:
                out_dir.unlink()
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_policy_folder(folder: Path, device: str = "cpu", preprocessor_overrides: dict | None = None):
    """Load a folder written by ``export_policy_folder`` (or any lerobot SmolVLA checkpoint folder).

    Uses ``SmolVLAPolicy.from_pretrained`` (strict: every weight must be present) and lerobot's
    ``make_pre_post_processors(..., pretrained_path=folder)``, overriding the processors' device (and
    the preprocessor steps named in ``preprocessor_overrides``, e.g. a camera rename map).

    Returns:
        ``(policy, preprocessor, postprocessor)``; the policy is in eval mode.

    Raises:
        FileNotFoundError: naming the missing file; ValueError: not a SmolVLA checkpoint.
    """
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    folder = Path(folder).resolve()
    for name in (CONFIG_FILE, WEIGHTS_FILE, PREPROCESSOR_FILE, POSTPROCESSOR_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"policy folder {folder} has no {name}")
    cfg = PreTrainedConfig.from_pretrained(folder)
    if not isinstance(cfg, SmolVLAConfig):
        raise ValueError(f"{folder / CONFIG_FILE}: policy type is '{cfg.type}', expected 'smolvla'")
    cfg.device = device
    pre_overrides: dict = {**(preprocessor_overrides or {}), "device_processor": {"device": device}}
    vendored = vendored_vlm(folder)
    if vendored is not None:
        cfg.vlm_model_name = str(vendored)
        pre_overrides[TOKENIZER_STEP] = {"tokenizer_name": str(vendored)}
    policy = SmolVLAPolicy.from_pretrained(folder, config=cfg, strict=True)
    preprocessor, postprocessor = make_pre_post_processors(
        cfg, pretrained_path=str(folder), preprocessor_overrides=pre_overrides
    )
    return policy, preprocessor, postprocessor
