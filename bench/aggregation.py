"""The ServerApp strategy's FedAvg aggregation ÷ a memcpy of the same bytes, at the real trainable size.

Measured: ``strategy.aggregate_train(1, replies)`` of the strategy the ServerApp builds
(``zk0_pipelines.federated.strategy.make_strategy`` with the default run config: FedAvg, float32 wire), i.e.
everything the ServerApp does with a round's replies: dropped-client bookkeeping, the server-side update
validation (key set, shapes, dtypes, weights, NaN/Inf, update-norm outliers), the fused zero-copy weighted
average (``zk0_pipelines.federated.aggregate``), the finiteness check, the output ``ArrayRecord`` and the
metric aggregation. On ``--clients`` replies built like ``client_app.train`` builds them
(``wire.encode_state`` of the client's trainable weights, a MetricRecord with ``num-examples``, the
client-info record), as answers to the strategy's own ``configure_train`` messages. The bfloat16 wire (bf16
updates into the float32 master copy) is measured and printed too.

Size: the trainable set of SmolVLA as in lerobot/smolvla_base on the real SmolVLM2-500M dimensions
(99.9M parameters; ``--tiny`` uses the project's tiny SmolVLA instead).

Baseline: ``numpy.copyto`` of one buffer holding as many bytes as the replies' arrays (pre-allocated,
pages touched), i.e. the memory traffic of reading every received byte once.
Interleaved repetitions, medians. Torch runs with ``--threads`` intra-op threads (default 1: the launcher
starts the ServerApp with ``OMP_NUM_THREADS=1``); numpy's copy is single-threaded too.

    .venv/bin/python bench/aggregation.py [--reps 5] [--clients 3] [--threads 1] [--tiny] [--keep]

Last line: ``aggregation: <aggregate_train seconds ÷ memcpy seconds>`` (float32 wire, the default).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import _common as C


def _trainable_state(work, tiny: bool) -> dict:
    from zk0_pipelines.policy import trainable_state

    if tiny:
        policy = C.build_tiny_policy(C.so100_meta())
    else:
        policy = C.build_real_size_policy(C.ensure_real_size_vlm(work / "smolvlm2-500m-shape"))
    state = trainable_state(policy)
    del policy
    gc.collect()
    return state


def _replies(strategy, state: dict, wire_dtype: str, clients: int) -> list:
    """Client replies to the strategy's train messages, encoded as ``client_app.train`` does."""
    import torch
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from zk0_pipelines.federated import wire
    from zk0_pipelines.federated.strategy import INFO_KEY

    messages = list(
        strategy.configure_train(1, wire.encode_state(state, "float32"), ConfigRecord(), C.FakeGrid(clients))
    )
    replies = []
    generator = torch.Generator().manual_seed(0)
    for index, msg in enumerate(messages):
        update = {k: 1e-3 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
        payload = update if wire_dtype == "bfloat16" else {k: state[k] + update[k] for k in state}
        del update
        metrics = {
            "train-loss": 1.0,
            "grad-norm": 1.0,
            "proximal-term": 0.0,
            "num-examples": 60 + 15 * index,
            "samples-seen": 8,
            "step-time-s": 0.1,
            "client-update-norm": 0.1,
        }
        content = RecordDict(
            {
                "arrays": wire.encode_state(payload, wire_dtype),
                "metrics": MetricRecord(metrics),
                INFO_KEY: ConfigRecord({"dataset": f"client-{index}", "partition-id": index, "round": 1}),
            }
        )
        del payload
        replies.append(Message(content, reply_to=msg))
    return replies


def _memcpy_timer(total: int):
    import numpy as np

    src = np.ones(total, dtype=np.uint8)
    dst = np.zeros(total, dtype=np.uint8)

    def run() -> float:
        seconds, _ = C.timed(lambda: np.copyto(dst, src))
        return seconds

    return run


def _measure(state: dict, wire_dtype: str, clients: int, reps: int) -> dict:
    from zk0_pipelines.federated import wire
    from zk0_pipelines.federated.run_config import parse_run_config
    from zk0_pipelines.federated.strategy import make_strategy

    cfg = parse_run_config({"wire-dtype": wire_dtype, "min-available-clients": clients})
    strategy = make_strategy(cfg, C.noop_observer, num_nodes=clients)
    replies = _replies(strategy, state, wire_dtype, clients)
    total = sum(wire.payload_bytes(m.content["arrays"]) for m in replies)
    memcpy = _memcpy_timer(total)
    agg_times, copy_times = [], []
    for rep in range(reps + 1):  # first pair = warm-up
        copy_s = memcpy()
        agg_s, (arrays, _) = C.timed(lambda: strategy.aggregate_train(1, replies))
        if rep == 0:
            expected = set(state)
            if set(arrays.keys()) != expected:
                raise RuntimeError("aggregate has different keys from the trainable state")
        else:
            agg_times.append(agg_s)
            copy_times.append(copy_s)
        del arrays
        gc.collect()
    agg, cp = C.median(agg_times), C.median(copy_times)
    return {"bytes": total, "aggregate-s": agg, "memcpy-s": cp, "ratio": agg / cp}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the bfloat16 ratio, then the float32 (default) ratio last."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (ServerApp: 1)")
    parser.add_argument("--tiny", action="store_true", help="tiny SmolVLA trainable set instead of real size")
    parser.add_argument("--keep", action="store_true", help="keep .zk0/bench/aggregation")
    args = parser.parse_args(argv)
    work = C.setup_env("aggregation")
    try:
        import torch

        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        state = _trainable_state(work, args.tiny)
        numel = sum(t.numel() for t in state.values())
        size = "tiny SmolVLA" if args.tiny else "SmolVLA (smolvla_base layout, SmolVLM2-500M dims)"
        print(
            f"{size}: {numel / 1e6:.1f}M trainable params in {len(state)} tensors "
            f"(ready in {time.perf_counter() - t0:.1f} s); {args.clients} client replies; "
            f"torch threads {torch.get_num_threads()}"
        )
        results = {}
        for wire_dtype in ("bfloat16", "float32"):
            r = _measure(state, wire_dtype, args.clients, args.reps)
            results[wire_dtype] = r
            print(
                f"{wire_dtype} wire: aggregate_train {r['aggregate-s']:.3f} s, memcpy of the same "
                f"{C.fmt_bytes(r['bytes'])} {r['memcpy-s']:.3f} s "
                f"({r['bytes'] / r['memcpy-s'] / 1e9:.1f} GB/s); ratio {r['ratio']:.2f}"
            )
        print(C.load_note())
        print(f"peak RSS {C.peak_rss_gib():.2f} GiB")
        C.print_json({"trainable-params": numel, "clients": args.clients, "reps": args.reps, **results})
        print(f"aggregation_bf16: {results['bfloat16']['ratio']:.3f}")
        print(f"aggregation: {results['float32']['ratio']:.3f}")
    finally:
        C.cleanup(work, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
