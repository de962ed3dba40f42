"""Bytes per client per round on the wire ÷ the full fp32 state dict, at the real SmolVLA size.

Model: SmolVLA as in lerobot/smolvla_base (SmolVLAConfig defaults, 16 of the 32 text layers) on a VLM folder
with the real SmolVLM2-500M-Video-Instruct dimensions, random weights, nothing downloaded.

Measured (the project's own code paths):

- down: the ``arrays`` record of the train messages built by the ServerApp's strategy
  (``strategy.make_strategy(...).configure_train``) from ``wire.encode_state(trainable_state(policy))``;
- up: the client's reply record, built as ``client_app.train`` does it: ``trainable_state`` after training
  (float32 wire: the weights; bfloat16 wire: ``wire.sub_state(updated, received)``), ``wire.encode_state``.

Counted: the serialized array bytes (``sum(len(Array.data))`` = ``wire.payload_bytes``) and, for the
record, the size of its Flower protobuf (``serde.array_record_to_proto(...).ByteSize()``).
Baseline (what ivelin/zk0 sends each way): every tensor of ``policy.state_dict()`` as a float32 numpy
``Array`` (counted the same two ways). Ratio = (down + up) / (2 x baseline), per client per round.
LoRA (``lora-rank``): the same policy with ``policy.lora.add_lora_adapters`` (lerobot's default SmolVLA PEFT
targets: the action expert's q/v projections and the state/action/time projections), float32 wire.

    .venv/bin/python bench/payload.py [--keep] [--lora-rank 16]

Last line: ``payload_lora: <ratio>`` (after ``payload_fp32`` and ``payload_bf16``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import _common as C


def _record_sizes(record) -> tuple[int, int]:
    """``(array data bytes, protobuf bytes)`` of an ArrayRecord."""
    from flwr.common import serde

    from zk0_pipelines.federated import wire

    return wire.payload_bytes(record), serde.array_record_to_proto(record).ByteSize()


def _full_state_sizes(policy) -> tuple[int, int, int]:
    """``(numel, data bytes, protobuf bytes)`` of the whole state dict as float32 numpy Arrays (streamed)."""
    import torch
    from flwr.app import Array, ArrayRecord
    from flwr.common import serde

    numel = data = proto = 0
    for name, tensor in policy.state_dict().items():
        array = Array(tensor.detach().to(torch.float32).contiguous().numpy())
        numel += tensor.numel()
        data += len(array.data)
        proto += serde.array_record_to_proto(ArrayRecord({name: array})).ByteSize()
    return numel, data, proto


def _wire_sizes(state: dict, wire_dtype: str) -> dict[str, int]:
    """Down and up sizes of one round for ``wire_dtype`` through the strategy and the client's encoding."""
    import torch
    from flwr.app import ConfigRecord

    from zk0_pipelines.federated import wire
    from zk0_pipelines.federated.run_config import parse_run_config
    from zk0_pipelines.federated.strategy import make_strategy

    cfg = parse_run_config({"wire-dtype": wire_dtype, "min-available-clients": 3})
    strategy = make_strategy(cfg, C.noop_observer, num_nodes=3)
    messages = list(
        strategy.configure_train(1, wire.encode_state(state, "float32"), ConfigRecord(), C.FakeGrid(3))
    )
    down_record = messages[0].content["arrays"]
    down = _record_sizes(down_record)
    # client side: decode what it received, "train" (a small perturbation), encode its reply
    received = wire.decode_state(down_record)
    del messages, down_record
    updated = {k: v + 1e-3 * torch.randn_like(v) for k, v in received.items()}
    payload = updated if wire_dtype == "float32" else wire.sub_state(updated, received)
    up_record = wire.encode_state(payload, wire_dtype)
    up = _record_sizes(up_record)
    del received, updated, payload, up_record
    gc.collect()
    return {"down-data": down[0], "down-proto": down[1], "up-data": up[0], "up-proto": up[1]}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the ratios, bf16 last."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", action="store_true", help="keep .zk0/bench/payload")
    C.run_config_option(parser, "lora-rank", default=16)  # the adapters-only payload's rank
    args = parser.parse_args(argv)
    work = C.setup_env("payload")
    try:
        from zk0_pipelines.policy import count_parameters, trainable_state
        from zk0_pipelines.policy.lora import add_lora_adapters

        t0 = time.perf_counter()
        vlm = C.ensure_real_size_vlm(work / "smolvlm2-500m-shape")
        policy = C.build_real_size_policy(vlm)
        counts = count_parameters(policy)
        print(
            f"SmolVLA (smolvla_base layout, SmolVLM2-500M dims, random init) built in "
            f"{time.perf_counter() - t0:.1f} s: {counts['total'] / 1e6:.1f}M params, "
            f"{counts['trainable'] / 1e6:.1f}M trainable"
        )
        numel, full_data, full_proto = _full_state_sizes(policy)
        print(
            f"baseline full state_dict fp32 (ivelin/zk0): {numel / 1e6:.1f}M values, "
            f"{C.fmt_bytes(full_data)} array data, {C.fmt_bytes(full_proto)} protobuf"
        )
        state = trainable_state(policy)
        lora_state = trainable_state(add_lora_adapters(policy, args.lora_rank))
        lora_values = sum(t.numel() for t in lora_state.values())
        print(f"LoRA rank {args.lora_rank}: {len(lora_state)} tensors, {lora_values / 1e6:.2f}M values")
        del policy
        gc.collect()
        results = {}
        for label, wire_dtype, sent in (
            ("float32", "float32", state),
            ("bfloat16", "bfloat16", state),
            (f"lora-r{args.lora_rank}", "float32", lora_state),
        ):
            sizes = _wire_sizes(sent, wire_dtype)
            per_client = sizes["down-data"] + sizes["up-data"]
            per_client_proto = sizes["down-proto"] + sizes["up-proto"]
            ratio = per_client / (2 * full_data)
            ratio_proto = per_client_proto / (2 * full_proto)
            results[label] = {**sizes, "ratio-data": ratio, "ratio-proto": ratio_proto}
            print(
                f"{label}: down {C.fmt_bytes(sizes['down-data'])} + up {C.fmt_bytes(sizes['up-data'])} "
                f"per client per round (protobuf {C.fmt_bytes(per_client_proto)}); "
                f"ratio data {ratio:.4f}, protobuf {ratio_proto:.4f}"
            )
        print(f"peak RSS {C.peak_rss_gib():.2f} GiB")
        C.print_json(
            {
                "params-total": counts["total"],
                "params-trainable": counts["trainable"],
                "params-lora": lora_values,
                "full-state-bytes": full_data,
                "full-state-proto-bytes": full_proto,
                **{f"{k}/{n}": v for k, r in results.items() for n, v in r.items()},
            }
        )
        print(f"payload_fp32: {results['float32']['ratio-proto']:.3f}")
        print(f"payload_bf16: {results['bfloat16']['ratio-proto']:.3f}")
        print(f"payload_lora: {results[f'lora-r{args.lora_rank}']['ratio-proto']:.4f}")
    finally:
        C.cleanup(work, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
