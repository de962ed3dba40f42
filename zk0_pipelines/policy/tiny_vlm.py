"""A tiny, offline SmolVLM folder so that SmolVLA can be built without the Hugging Face Hub.

SmolVLA (``lerobot.policies.smolvla``) loads its vision-language backbone with
``AutoConfig.from_pretrained(vlm_model_name)`` and ``AutoProcessor.from_pretrained(vlm_model_name)``; with
``load_vlm_weights=False`` the weights are randomly initialised, so only configuration and tokenizer files
are needed. This module writes such a folder: a byte-level BPE tokenizer trained locally on a fixed corpus of
robot task phrases, a small ``SmolVLMConfig`` (SigLIP-style vision tower + Llama text model) and a
``SmolVLMProcessor``.

The folder is deterministic (same bytes on every machine), idempotent, and safe when several processes ask for
it at once (an exclusive file lock plus build-in-a-temp-sibling and ``os.replace``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from zk0_pipelines import settings

#: Bump when anything below changes the folder's content; outdated folders are rebuilt.
TINY_VLM_VERSION = "1"
MARKER_FILE = "zk0_tiny_vlm.json"
DEFAULT_FOLDER_NAME = "tiny-smolvlm"

#: Vision input side; SmolVLA's ``resize_imgs_with_padding`` must equal it.
IMAGE_SIZE = 64
PATCH_SIZE = 16
SCALE_FACTOR = 2  # pixel-shuffle factor of the connector: (64/16)^2 / 2^2 = 4 tokens per image
TEXT_LAYERS = 4
VOCAB_SIZE = 512

SPECIAL_TOKENS = {
    "unk_token": "<|unk|>",
    "bos_token": "<|im_start|>",
    "eos_token": "<end_of_utterance>",
    "pad_token": "<|pad|>",
}
#: Named extra tokens; SmolVLA reads ``tokenizer.fake_image_token_id`` and ``global_image_token_id``.
EXTRA_SPECIAL_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "end_of_utterance_token": "<end_of_utterance>",
    "global_image_token": "<global-img>",
    "video_token": "<video>",
}

_OBJECTS = (
    "red cube",
    "blue cube",
    "green block",
    "yellow lego brick",
    "white cup",
    "black pen",
    "orange ball",
    "sponge",
    "tape",
    "marker",
    "bottle",
    "screwdriver",
    "small box",
    "plastic bowl",
    "towel",
)
_PLACES = (
    "the box",
    "the bowl",
    "the tray",
    "the left bin",
    "the right bin",
    "the drawer",
    "the plate",
    "the basket",
    "the center of the table",
    "the shelf",
)
_TEMPLATES = (
    "pick up the {o} and place it in {p}",
    "grasp the {o} and put it on {p}",
    "push the {o} towards {p}",
    "move the {o} to {p}",
    "stack the {o} on top of {p}",
    "reach for the {o}",
    "lift the {o} and hold it above {p}",
    "slide the {o} next to {p}",
    "rotate the {o} and drop it into {p}",
    "open the gripper, approach the {o}, close the gripper",
)
_EXTRA_LINES = (
    "so100 follower arm: shoulder pan, shoulder lift, elbow flex, wrist flex, wrist roll, gripper.",
    "Sort the objects by color. Clean up the table. Open the drawer. Close the lid.",
    "Fold the towel. Insert the peg into the hole. Press the button. Pour water into the cup.",
    "The robot moves left, right, up, down, forward and backward. Stop. Wait. Done.",
    "0 1 2 3 4 5 6 7 8 9 10 first second third one two three",
)


def _corpus() -> list[str]:
    """The fixed training corpus of the tokenizer (task phrases in the SO-100 style)."""
    lines = [t.format(o=o, p=p) for t in _TEMPLATES for o in _OBJECTS for p in _PLACES]
    lines += [line[0].upper() + line[1:] + "." for line in lines[::7]]
    return lines + list(_EXTRA_LINES)


def _train_tokenizer():
    """Train the byte-level BPE tokenizer and wrap it in ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([*SPECIAL_TOKENS.values(), *EXTRA_SPECIAL_TOKENS.values()]))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=512,
        extra_special_tokens=dict(EXTRA_SPECIAL_TOKENS),
        **SPECIAL_TOKENS,
    )


def _build_into(folder: Path) -> None:
    """Write the tokenizer, config and processor files into ``folder`` (which must exist)."""
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    tokenizer = _train_tokenizer()
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
    }
    text = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }
    config = SmolVLMConfig(
        vision_config=vision,
        text_config=text,
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids(EXTRA_SPECIAL_TOKENS["image_token"]),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    size = {"longest_edge": IMAGE_SIZE}
    image_processor = SmolVLMImageProcessor(do_image_splitting=False, size=size, max_image_size=size)
    video_processor = SmolVLMVideoProcessor(size=size, max_image_size=size)
    image_seq_len = ((IMAGE_SIZE // PATCH_SIZE) ** 2) // (SCALE_FACTOR**2)
    processor = SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_len=image_seq_len,
    )
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / MARKER_FILE).write_text(json.dumps(_marker(), indent=2, sort_keys=True) + "\n")


def _marker() -> dict:
    return {
        "version": TINY_VLM_VERSION,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "scale_factor": SCALE_FACTOR,
        "text_layers": TEXT_LAYERS,
        "vocab_size": VOCAB_SIZE,
    }


def is_current(folder: Path) -> bool:
    """True if ``folder`` holds a complete tiny VLM written by this version of the code."""
    marker = folder / MARKER_FILE
    needed = ("config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json")
    if not marker.is_file() or not all((folder / name).is_file() for name in needed):
        return False
    try:
        return json.loads(marker.read_text()) == _marker()
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_tiny_vlm(folder: Path | None = None) -> Path:
    """Return a folder holding the tiny SmolVLM (config, tokenizer, processor), building it if needed.

    Args:
        folder: Where the folder lives; defaults to ``settings.cache_dir() / "tiny-smolvlm"``.

    Returns:
        The absolute folder path, suitable for SmolVLA's ``vlm_model_name``.

    The build is deterministic and offline. Concurrent callers serialise on a lock file next to the folder;
    the folder is written into a temporary sibling and moved into place with ``os.replace``, so a reader
    never sees a half-written folder. A folder written by an older ``TINY_VLM_VERSION`` is replaced.
    """
    folder = Path(folder) if folder is not None else settings.cache_dir() / DEFAULT_FOLDER_NAME
    folder = folder.resolve()
    if is_current(folder):
        return folder
    with _exclusive_lock(folder.parent / f".{folder.name}.lock"):
        if is_current(folder):  # another process built it while we waited
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            _build_into(tmp)
            if folder.exists():  # outdated or incomplete: move aside, then swap in
                old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
                os.replace(folder, old / folder.name)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder
