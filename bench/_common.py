"""Shared helpers of the benchmark scripts in ``bench/`` (environment, policies, data, timing, output).

Every script prints its ratio on the last line as ``<name>: <ratio>``. Work folders live under
``.zk0/bench/<name>`` inside the checkout and are removed at the end unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from zk0_pipelines import settings

#: SmolVLM2-500M-Video-Instruct (the VLM of lerobot/smolvla_base): vision tower = SigLIP base patch16-512,
#: text model = SmolLM2-360M (Llama); values of the Hub config.json of that checkpoint.
SMOLVLM2_500M_VISION = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 512,
    "patch_size": 16,
    "layer_norm_eps": 1e-6,
}
SMOLVLM2_500M_TEXT = {
    "model_type": "llama",
    "vocab_size": 49280,
    "hidden_size": 960,
    "intermediate_size": 2560,
    "num_hidden_layers": 32,
    "num_attention_heads": 15,
    "num_key_value_heads": 5,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": False,
}
SMOLVLM2_500M_SCALE_FACTOR = 4
#: lerobot/smolvla_base uses the first 16 text layers (SmolVLAConfig default num_vlm_layers=16).
SMOLVLA_BASE_VLM_LAYERS = 16


def setup_env(name: str) -> Path:
    """Keep every scratch folder inside the checkout, go offline; returns ``.zk0/bench/<name>`` (created)."""
    settings.configure_local_env()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = settings.state_dir() / "bench" / name
    tmp = work / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    import tempfile

    tempfile.tempdir = None  # re-read TMPDIR
    quiet_flwr()
    return work


def quiet_flwr() -> None:
    """Only warnings from Flower's logger (it logs every configure/aggregate call at INFO)."""
    import logging

    import flwr.common.logger  # noqa: F401 - configures the "flwr" logger

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.WARNING)
    flwr_logger.propagate = False  # lerobot's import configures the root logger too (duplicate lines)


def cleanup(work: Path, keep: bool) -> None:
    """Remove a script's work folder (only ``.zk0/bench/<name>``) unless ``keep``."""
    if keep:
        print(f"kept work folder {work}")
        return
    bench_root = (settings.state_dir() / "bench").resolve()
    if Path(work).resolve().parent == bench_root:
        shutil.rmtree(work, ignore_errors=True)


def run_config_option(
    parser: argparse.ArgumentParser, key: str, *, flag: str | None = None, default: Any = None
) -> None:
    """Add ``--<key>`` (or ``flag``) for a run-config key: type, choices and help from ``RunConfig``, its
    default unless the bench gives its own."""
    from zk0_pipelines.federated.run_config import RunConfig, describe, kebab

    name = key.replace("-", "_")
    field = RunConfig.model_fields[name]
    assert kebab(name) == key, key
    choices = (
        typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
    )
    parser.add_argument(
        flag or f"--{key}",
        type=str if choices else field.annotation,
        choices=choices,
        default=field.default if default is None else default,
        help=f"run-config {key}: {describe(name)} (default %(default)s)",
    )


def demo_run_options(parser: argparse.ArgumentParser, name: str) -> None:
    """The options of the benches that run the demo: rounds, local steps, clients, keep."""
    run_config_option(parser, "num-server-rounds", flag="--rounds", default=6)
    run_config_option(parser, "local-steps", default=4)
    parser.add_argument("--clients", type=int, default=3, help="first N demo client datasets (1-3)")
    parser.add_argument("--keep", action="store_true", help=f"keep .zk0/bench/{name}")


def demo_run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run config of those options: every client is needed to start."""
    return {
        "num-server-rounds": args.rounds,
        "local-steps": args.local_steps,
        "min-available-clients": args.clients,
    }


def load_note() -> str:
    """The machine's 1-minute load average against its core count (timings are unreliable when busy)."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    busy = " - BUSY, timings are disturbed by other processes" if load > cores + 0.5 else ""
    return f"load average {load:.2f} on {cores} cores{busy}"


def peak_rss_gib() -> float:
    """Peak resident set size of this process in GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# --- policies ---------------------------------------------------------------------------------------------


def ensure_real_size_vlm(folder: Path) -> Path:
    """A SmolVLM folder with the real SmolVLM2-500M dimensions and the project's locally trained tokenizer.

    ``zk0_pipelines.policy.tiny_vlm`` has fixed tiny dimensions (no config override), so the folder is
    built here with the same tokenizer (``tiny_vlm._train_tokenizer``), the same special tokens, and the
    real vision/text dimensions. No weights: SmolVLA with ``load_vlm_weights=False`` initialises randomly.
    """
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    from zk0_pipelines.policy import tiny_vlm

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "processor_config.json").is_file():
        return folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_vlm._train_tokenizer()
    text = dict(SMOLVLM2_500M_TEXT)
    text.update(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = SmolVLMConfig(
        vision_config=dict(SMOLVLM2_500M_VISION),
        text_config=text,
        scale_factor=SMOLVLM2_500M_SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids(tiny_vlm.EXTRA_SPECIAL_TOKENS["image_token"]),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    side = SMOLVLM2_500M_VISION["image_size"]
    patch = SMOLVLM2_500M_VISION["patch_size"]
    size = {"longest_edge": side}
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(do_image_splitting=False, size=size, max_image_size=size),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(size=size, max_image_size=size),
        image_seq_len=((side // patch) ** 2) // (SMOLVLM2_500M_SCALE_FACTOR**2),
    )
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder.resolve()


def so100_meta(image_hw: tuple[int, int] = (64, 64)):
    """Policy metadata (features only) of an SO-100 dataset, as the ServerApp builds it (``PolicyMeta``)."""
    from zk0_pipelines.datasets.so100 import so100_features
    from zk0_pipelines.federated.task import PolicyMeta

    return PolicyMeta(features=so100_features(image_hw), stats=None)


def build_real_size_policy(vlm_folder: Path, seed: int = 0):
    """SmolVLA as in lerobot/smolvla_base (SmolVLAConfig defaults: 16 VLM layers, expert 0.75 width,
    cross-attention, expert-only training) on the real-size VLM, random weights, CPU, seeded.

    Same construction as ``zk0_pipelines.policy.factory`` (``make_policy_config`` + ``make_policy`` under a
    forked, seeded RNG); only ``vlm_model_name`` and ``num_vlm_layers`` differ from its tiny source.
    """
    import torch
    from lerobot.policies.factory import make_policy, make_policy_config

    cfg = make_policy_config(
        "smolvla",
        device="cpu",
        vlm_model_name=str(vlm_folder),
        load_vlm_weights=False,
        num_vlm_layers=SMOLVLA_BASE_VLM_LAYERS,
        push_to_hub=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_policy(cfg, ds_meta=so100_meta())


def build_tiny_policy(ds_meta, seed: int = 0):
    """The project's tiny SmolVLA (``PolicySpec(source="tiny")``) for the features of ``ds_meta``."""
    from zk0_pipelines.policy import PolicySpec, build_policy

    return build_policy(PolicySpec(source="tiny", seed=seed), ds_meta)


# --- data -------------------------------------------------------------------------------------------------

#: The three client datasets and the eval dataset of configs/datasets.demo.yaml.
DEMO_SPECS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("demo_pick_place", dict(seed=1, task="pick up the cube and place it in the box", motion="reach")),
    ("demo_stack", dict(seed=2, task="stack the red block on the blue block", motion="push")),
    ("demo_sort", dict(seed=3, task="sort the pens into the cup", motion="sweep")),
)
DEMO_EVAL_SPEC = (
    "demo_eval_pick_place",
    dict(seed=99, task="pick up the cube and place it in the box", motion="reach", episodes=1),
)


def write_dataset(folder: Path, dataset_id: str, **spec: Any) -> Path:
    """A synthetic SO-100 dataset (``write_synthetic_so100``) at ``folder/dataset_id``."""
    from zk0_pipelines.datasets.synthetic import SyntheticSpec, write_synthetic_so100

    spec.setdefault("episodes", 2)
    spec.setdefault("frames_per_episode", 30)
    root = Path(folder) / dataset_id
    if not (root / "meta" / "info.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        write_synthetic_so100(root, f"zk0/{dataset_id}", SyntheticSpec(**spec))
    return root


# --- flower -----------------------------------------------------------------------------------------------


class FakeGrid:
    """Just enough of a Flower ``Grid`` for ``strategy.configure_train`` (node sampling).

    Also sets Flower's process task identity (run id, node id), which a ServerApp process gets from the
    SuperLink and ``Message`` construction reads.
    """

    def __init__(self, num_nodes: int) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        self._nodes = list(range(1, num_nodes + 1))
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        quiet_flwr()

    def get_node_ids(self) -> Iterable[int]:
        """The connected node ids."""
        return list(self._nodes)


def noop_observer(kind: str, server_round: int, payload: dict[str, Any]) -> None:
    """Strategy observer that records nothing."""


# --- timing / output --------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    return float(statistics.median(values))


def fmt_bytes(n: float) -> str:
    """Human-readable byte count (MiB)."""
    return f"{n / 1024**2:,.1f} MiB"


def print_json(payload: dict[str, Any]) -> None:
    """One JSON line of the numbers measured (machine readable)."""
    print(json.dumps(payload, sort_keys=True, default=str))
