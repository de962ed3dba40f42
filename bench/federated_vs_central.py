"""Federated (FedAvg, FedProx) vs centralised training on non-IID simulated labs, judged on a held-out lab.

Data: the labs of ``configs/datasets.sim.yaml`` (scripted-expert pick-and-place in the SO-101 MuJoCo
simulator; cube colour/size, start region, lighting and camera differ per lab), ``--episodes`` expert
episodes per training lab, and its held-out lab.

Same data, same total optimisation steps, same code path (the project's Flower app in simulation):

- (a) centralised: one client holding the pooled episodes of every training lab, ``--rounds`` rounds of
  ``n_labs × --local-steps`` local steps;
- (b) FedAvg: one client per lab, ``--rounds`` rounds of ``--local-steps`` local steps each;
- (c) FedProx: as (b) with ``proximal-mu = --mu``.

Measured on the held-out lab: the server evaluation's action MSE (raw joint units, seeded noise) after
the last round, and the rollout success rate (``--rollouts`` seeded episodes of at most ``--max-steps``
steps in the held-out lab's simulator) of the final policy.

    .venv/bin/python bench/federated_vs_central.py [--episodes 2] [--rounds 3] [--local-steps 4]
        [--rollouts 5] [--max-steps 60] [--mu 0.01] [--policy-source tiny|pretrained] [--keep]

Last line: ``federated_vs_central: <FedAvg action MSE ÷ centralised action MSE>``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import _common as C


def _labs(episodes: int) -> tuple[list, object]:
    """The registry's training labs (with ``episodes`` each) and its held-out lab."""
    from zk0_pipelines import settings
    from zk0_pipelines.datasets.registry import load_registry

    registry = load_registry(settings.repo_root() / "configs" / "datasets.sim.yaml")
    train, held_out = [], None
    for entry in registry.entries:
        spec = entry.source.simulation_spec()
        if entry.role == "train":
            train.append((entry.id, type(spec)(**{**spec.__dict__, "episodes": episodes})))
        elif held_out is None:
            held_out = (entry.id, spec)
    return train, held_out


def _record(work: Path, train: list, held_out: tuple) -> tuple[list[Path], Path, Path]:
    from zk0_pipelines.datasets.sim_env import SIM_FPS, SIM_ROBOT_TYPE
    from zk0_pipelines.datasets.sim_expert import record_expert_episodes
    from zk0_pipelines.datasets.synthetic import write_so100_episodes

    data = work / "data"
    roots, pooled = [], []
    for lab_id, spec in train:
        episodes = record_expert_episodes(spec)
        pooled += episodes
        roots.append(
            write_so100_episodes(data / lab_id, f"zk0/{lab_id}", SIM_FPS, episodes, robot_type=SIM_ROBOT_TYPE)
        )
    pooled_root = write_so100_episodes(
        data / "pooled", "zk0/pooled", SIM_FPS, pooled, robot_type=SIM_ROBOT_TYPE
    )
    eval_id, eval_spec = held_out
    eval_root = write_so100_episodes(
        data / eval_id,
        f"zk0/{eval_id}",
        SIM_FPS,
        record_expert_episodes(eval_spec),
        robot_type=SIM_ROBOT_TYPE,
    )
    return roots, pooled_root, eval_root


def main(argv: list[str] | None = None) -> int:
    """Train the three variants, evaluate them on the held-out lab, print the table and the ratio."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=2, help="expert episodes per training lab")
    C.run_config_option(parser, "num-server-rounds", flag="--rounds", default=3)
    C.run_config_option(parser, "local-steps", default=4)
    C.run_config_option(parser, "batch-size", default=4)
    C.run_config_option(parser, "learning-rate", flag="--lr", default=1e-3)
    C.run_config_option(parser, "proximal-mu", flag="--mu", default=0.01)
    parser.add_argument("--rollouts", type=int, default=5, help="seeded rollout episodes on the held-out lab")
    parser.add_argument("--max-steps", type=int, default=60)
    C.run_config_option(parser, "policy-source")  # pretrained: lerobot/smolvla_base, needs the Hub
    parser.add_argument("--keep", action="store_true", help="keep .zk0/bench/federated_vs_central")
    args = parser.parse_args(argv)
    work = C.setup_env("federated_vs_central")
    try:
        from zk0_pipelines.evaluation.rollout import EvalLab, evaluate_policy_folder
        from zk0_pipelines.federated.launcher import run_federated

        train, held_out = _labs(args.episodes)
        t0 = time.perf_counter()
        roots, pooled, eval_root = _record(work, train, held_out)
        print(f"recorded {len(roots)} labs x {args.episodes} episodes in {time.perf_counter() - t0:.0f} s")
        common = {
            "num-server-rounds": args.rounds,
            "batch-size": args.batch_size,
            "learning-rate": args.lr,
            "chunk-size": 10,
            "seed": 0,
            "min-available-clients": 1,
            "policy-source": args.policy_source,
        }
        variants = {
            "centralised": ([pooled], {"local-steps": args.local_steps * len(roots), "strategy": "fedavg"}),
            "fedavg": (roots, {"local-steps": args.local_steps, "strategy": "fedavg"}),
            "fedprox": (
                roots,
                {"local-steps": args.local_steps, "strategy": "fedprox", "proximal-mu": args.mu},
            ),
        }
        eval_lab = EvalLab(held_out[0], held_out[1].lab, held_out[1].task)
        results = {}
        for name, (train_roots, extra) in variants.items():
            run_dir = work / "runs" / name
            shutil.rmtree(run_dir, ignore_errors=True)
            t1 = time.perf_counter()
            result = run_federated(train_roots, [eval_root], run_dir, {**common, **extra})
            train_s = time.perf_counter() - t1
            mse = float(result.rounds[-1]["server-eval"]["eval-action-mse"])
            t2 = time.perf_counter()
            rollout = evaluate_policy_folder(
                result.final_checkpoint, [eval_lab], episodes=args.rollouts, max_steps=args.max_steps
            )["overall"]
            results[name] = (mse, rollout, train_s, time.perf_counter() - t2)
        print(C.load_note())
        print(
            f"{'variant':<12} {'action MSE':>12} {'success':>8} {'95% CI':>15} {'train s':>8} {'roll s':>7}"
        )
        for name, (mse, r, train_s, roll_s) in results.items():
            ci = f"[{r['success_rate_ci_low']:.2f}, {r['success_rate_ci_high']:.2f}]"
            print(
                f"{name:<12} {mse:>12.4f} {r['success_rate']:>8.2f} {ci:>15} {train_s:>8.0f} {roll_s:>7.0f}"
            )
        central = results["centralised"][0]
        print(f"success rates: centralised {results['centralised'][1]['success_rate']:.2f}, "
              f"fedavg {results['fedavg'][1]['success_rate']:.2f}, "
              f"fedprox {results['fedprox'][1]['success_rate']:.2f}")  # fmt: skip
        print(f"federated_vs_central_fedprox: {results['fedprox'][0] / central:.3f}")
        print(f"federated_vs_central: {results['fedavg'][0] / central:.3f}")
    finally:
        C.cleanup(work, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
