"""A federated run's fixed cost ÷ importing torch + lerobot and building the tiny policy once, demo size.

Fixed cost = ``run_federated``'s wall time − N × the median round wall time (``metrics.json``
``rounds[i]["wall-time-s"]``, rounds 1..N): SuperLink start, app submission, ServerApp and client processes
starting and importing, the query round, the server's policy build, the round-0 baseline evaluation, the
final export and the shutdown. The median, not the sum of the rounds: clients import the training stack
after the query round, so round 1 carries start-up work that a plain sum would hide.
It runs ``run_federated`` (Flower simulation, one SuperNode per dataset) on the three
synthetic client datasets and the eval dataset of ``configs/datasets.demo.yaml`` with the default run config
except ``num-server-rounds`` (``--rounds``), ``local-steps`` (``--local-steps``, 4) and
``min-available-clients`` (= ``--clients``).

Baseline: a fresh Python process (same interpreter, same single-thread settings as a client) that imports
torch and lerobot's SmolVLA and builds the tiny policy once (``PolicySpec(source="tiny")``) for a demo
dataset: the least any run must pay once; the mean of one measurement right before and one right after the
run, since the machine's speed drifts. The goal is a ratio ≤ 3.

    .venv/bin/python bench/run_startup.py [--rounds 6] [--clients 3] [--keep]

Last line: ``run_startup: <fixed cost / baseline>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import _common as C

_BASELINE = r"""
import time, sys
t0 = time.perf_counter()
import torch  # noqa: F401
import lerobot.policies.smolvla.modeling_smolvla  # noqa: F401
t1 = time.perf_counter()
from pathlib import Path
from zk0_pipelines.federated import task
from zk0_pipelines.policy import PolicySpec, build_policy
meta = task.open_metadata(Path(sys.argv[1]))
build_policy(PolicySpec(source="tiny"), meta)
t2 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f}")
"""


def baseline_seconds(dataset_root) -> tuple[float, float]:
    """``(import s, build s)`` in a fresh process with one intra-op thread (as each client runs)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(
        [sys.executable, "-c", _BASELINE, str(dataset_root)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[-2]), float(out[-1])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the fixed-cost breakdown, then the ratio last."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    C.demo_run_options(parser, "run_startup")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= len(C.DEMO_SPECS):
        parser.error(f"--clients must be between 1 and {len(C.DEMO_SPECS)}")
    work = C.setup_env("run_startup")
    try:
        from zk0_pipelines.federated.launcher import run_federated

        data = work / "data"
        train_roots = [C.write_dataset(data, name, **spec) for name, spec in C.DEMO_SPECS[: args.clients]]
        eval_roots = [C.write_dataset(data, C.DEMO_EVAL_SPEC[0], **C.DEMO_EVAL_SPEC[1])]
        baseline_seconds(train_roots[0])  # warms the tiny VLM folder and the page cache
        before = baseline_seconds(train_roots[0])
        print(C.load_note())
        config = C.demo_run_config(args)
        shutil.rmtree(work / "run", ignore_errors=True)  # a kept earlier run would be refused
        t0 = time.perf_counter()
        result = run_federated(train_roots, eval_roots, work / "run", config)
        wall = time.perf_counter() - t0
        print(C.load_note())
        after = baseline_seconds(train_roots[0])
        # measured on both sides of the run: the machine's speed drifts over a minute
        base_import, base_build = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        baseline = base_import + base_build
        print(
            f"baseline: import torch + lerobot {base_import:.2f} s, build tiny policy {base_build:.2f} s "
            f"(mean of {sum(before):.2f} s before and {sum(after):.2f} s after the run)"
        )
        metrics = json.loads(result.metrics_path.read_text())
        walls = [float(r["wall-time-s"]) for r in metrics["rounds"] if r["round"] >= 1 and "wall-time-s" in r]
        steady = statistics.median(walls)
        fixed = wall - len(walls) * steady
        startup = {k: round(v, 2) for k, v in (metrics.get("startup") or {}).items()}
        round0 = next((r for r in metrics["rounds"] if r["round"] == 0), {})
        print(
            f"run_federated: {args.rounds} rounds, {len(train_roots)} clients, {wall:.1f} s in all; "
            f"rounds {', '.join(f'{w:.2f}' for w in walls)} (sum {sum(walls):.1f} s, median {steady:.2f} s)"
        )
        print(f"launcher timings: { {k: round(v, 2) for k, v in result.timings.items()} }")
        print(f"server start-up: {startup}; round-0 eval {round0.get('server-eval-time-s', 0.0):.2f} s")
        print(f"fixed cost {fixed:.1f} s vs baseline {baseline:.1f} s (import + build once)")
        C.print_json(
            {
                "wall-s": wall,
                "round-walls-s": walls,
                "fixed-s": fixed,
                "fixed-minus-round-sum-s": wall - sum(walls),
                "baseline-import-s": base_import,
                "baseline-build-s": base_build,
                "baseline-before-s": sum(before),
                "baseline-after-s": sum(after),
                "startup": startup,
                "timings": result.timings,
            }
        )
        print(f"run_startup: {fixed / baseline:.3f}")
    finally:
        C.cleanup(work, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
