"""A federated round's wall time ÷ (the clients' local training on the simulation's actors + server
evaluation), demo size.

Runs ``zk0_pipelines.federated.launcher.run_federated`` (Flower simulation, one SuperNode per dataset) on
the three synthetic client datasets and the eval dataset of ``configs/datasets.demo.yaml``, written with
``write_synthetic_so100`` into ``.zk0/bench/round_overhead``, with the default run config except
``num-server-rounds`` (``--rounds``), ``local-steps`` (``--local-steps``, 4) and ``min-available-clients``
(= ``--clients``). From ``metrics.json``:

- round wall time: ``rounds[i]["wall-time-s"]`` (the strategy's configure_train → end of the server's
  evaluate_fn for that round: sending, client training, replies, aggregation, server eval, checkpoint);
- client local training time: ``step-time-s`` (mean per step) x ``local-steps`` of each client's train
  record in that round; what counts is the training's critical path on the run's Ray actors
  (``superlink.simulation_actors``): the clients' times packed longest-first onto that many parallel slots
  (the slowest client when there are at least as many actors as clients). The ratio against the slowest
  client alone (the definition before clients ran in waves) is printed too;
- server eval time: ``rounds[i]["server-eval-time-s"]``.

Ray workers start and import torch/lerobot during the query round (before round 1, not counted); round 1
includes the clients' first policy build and dataset opening and is reported separately; the last line is
the median ratio of rounds 2..N (a round-2 client may still build for a partition new to its Ray worker).

    .venv/bin/python bench/round_overhead.py [--rounds 6] [--clients 3] [--keep]

Last line: ``round_overhead: <steady-state median ratio>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import _common as C


def training_path(times: list[float], slots: int) -> float:
    """Wall time of ``times`` run on ``slots`` parallel workers, longest first onto the least loaded one."""
    loads = [0.0] * max(1, min(slots, len(times)))
    for t in sorted(times, reverse=True):
        loads[loads.index(min(loads))] += t
    return max(loads)


def _round_rows(metrics: dict, local_steps: int, actors: int) -> list[dict]:
    rows = []
    for entry in metrics["rounds"]:
        rnd = entry["round"]
        if rnd < 1 or "wall-time-s" not in entry:
            continue
        clients = [c for c in metrics["clients"] if c.get("round") == rnd and c.get("phase") == "train"]
        train = {
            str(c.get("dataset", c.get("node-id"))).rsplit("/", 1)[-1]: c["step-time-s"] * local_steps
            for c in clients
        }
        slowest = max(train.values())
        path = training_path(list(train.values()), actors)
        eval_s = float(entry.get("server-eval-time-s") or 0.0)
        wall = float(entry["wall-time-s"])
        rows.append(
            {
                "round": rnd,
                "wall-s": wall,
                "client-train-s": train,
                "slowest-client-s": slowest,
                "training-path-s": path,
                "sum-clients-s": sum(train.values()),
                "server-eval-s": eval_s,
                "overhead-s": wall - path - eval_s,
                "ratio": wall / (path + eval_s),
                "ratio-vs-slowest-client": wall / (slowest + eval_s),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints round 1, the per-round table, and the steady-state ratio last."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    C.demo_run_options(parser, "round_overhead")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 is start-up)")
    if not 1 <= args.clients <= len(C.DEMO_SPECS):
        parser.error(f"--clients must be between 1 and {len(C.DEMO_SPECS)}")
    work = C.setup_env("round_overhead")
    try:
        from zk0_pipelines.federated.launcher import run_federated
        from zk0_pipelines.federated.run_config import parse_run_config
        from zk0_pipelines.federated.superlink import simulation_actors

        actors = simulation_actors()  # run_federated's default CPUs

        t0 = time.perf_counter()
        data = work / "data"
        train_roots = [C.write_dataset(data, name, **spec) for name, spec in C.DEMO_SPECS[: args.clients]]
        eval_roots = [C.write_dataset(data, C.DEMO_EVAL_SPEC[0], **C.DEMO_EVAL_SPEC[1])]
        print(f"datasets written in {time.perf_counter() - t0:.1f} s")
        config = C.demo_run_config(args)
        cfg = parse_run_config(config)
        t1 = time.perf_counter()
        result = run_federated(train_roots, eval_roots, work / "run", config)
        total = time.perf_counter() - t1
        print(C.load_note())
        metrics = json.loads(result.metrics_path.read_text())
        rows = _round_rows(metrics, cfg.local_steps, actors)
        print(
            f"run_federated: {args.rounds} rounds, {len(train_roots)} clients, "
            f"{actors} Ray actors, local-steps {cfg.local_steps}, batch {cfg.batch_size}, "
            f"{total:.1f} s in all (launcher timings "
            f"{ {k: round(v, 1) for k, v in result.timings.items()} })"
        )
        baseline = next((r for r in metrics["rounds"] if r["round"] == 0), {})
        if baseline.get("server-eval-time-s") is not None:
            print(f"round 0 (baseline server eval only): eval {baseline['server-eval-time-s']:.2f} s")
        for row in rows:
            clients = ", ".join(f"{k} {v:.2f}" for k, v in row["client-train-s"].items())
            keys = ("wall-s", "training-path-s", "server-eval-s", "overhead-s")
            wall, path, ev, other = (row[k] for k in keys)
            print(
                f"round {row['round']}: wall {wall:.2f} s = training on {actors} actors {path:.2f} "
                f"+ eval {ev:.2f}"
                f" + other {other:.2f} s (clients: {clients}; sum {row['sum-clients-s']:.2f}); "
                f"ratio {row['ratio']:.2f} (vs slowest client alone {row['ratio-vs-slowest-client']:.2f})"
            )
        steady = C.median([r["ratio"] for r in rows[1:]])
        print(
            "round_overhead_vs_slowest_client: "
            f"{C.median([r['ratio-vs-slowest-client'] for r in rows[1:]]):.3f}"
        )
        C.print_json({"rounds": rows, "total-s": total, "timings": result.timings})
        print(f"round_overhead_first_round: {rows[0]['ratio']:.3f}")
        print(f"round_overhead: {steady:.3f}")
    finally:
        C.cleanup(work, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
