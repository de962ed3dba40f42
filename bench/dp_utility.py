"""Utility cost of central DP on the demo: server eval action MSE with DP ÷ without, same data and seed.

Data: the demo's three synthetic client datasets and its held-out eval dataset (``_common.DEMO_SPECS``).
Runs (Flower simulation, ``launcher.run_federated``): the Launchpad defaults of ``FederatedTrainingConfig``
(the ``zk0 demo`` run) once with ``dp = none`` and once with ``dp = central-client-clip`` (σ, C from the
flags); both with the same seed. Reported: the final round's server eval action MSE (raw units) and loss of
each run, the ε spent, and the ratio of the action MSEs.

    .venv/bin/python bench/dp_utility.py [--keep] [--noise-multiplier 1.0] [--clipping-norm 0.1]

Last line: ``dp_utility_cost: <action MSE with DP / without>``.
"""

from __future__ import annotations

import argparse
import sys

import _common as C


def _final(result) -> dict:
    evaluated = [r for r in result.rounds if r.get("server-eval")]
    last = evaluated[-1]
    return {
        "round": last["round"],
        "eval-action-mse": last["server-eval"]["eval-action-mse"],
        "eval-loss": last["server-eval"]["eval-loss"],
        "dp-epsilon": result.rounds[-1].get("dp-epsilon"),
    }


def main(argv: list[str] | None = None) -> int:
    """Run both federated runs and print the MSE ratio last."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", action="store_true", help="keep .zk0/bench/dp_utility")
    C.run_config_option(parser, "dp-noise-multiplier", flag="--noise-multiplier")
    C.run_config_option(parser, "dp-clipping-norm", flag="--clipping-norm", default=0.1)
    C.run_config_option(parser, "dp-delta", flag="--delta")
    args = parser.parse_args(argv)
    work = C.setup_env("dp_utility")
    try:
        from zk0_pipelines.defs.training_assets import FederatedTrainingConfig
        from zk0_pipelines.federated.launcher import run_federated

        train = [C.write_dataset(work / "data", name, **spec) for name, spec in C.DEMO_SPECS]
        evals = [C.write_dataset(work / "data", C.DEMO_EVAL_SPEC[0], **C.DEMO_EVAL_SPEC[1])]
        base = FederatedTrainingConfig(min_available_clients=len(train)).run_config()
        dp = {
            "dp": "central-client-clip",
            "dp-noise-multiplier": args.noise_multiplier,
            "dp-clipping-norm": args.clipping_norm,
            "dp-delta": args.delta,
        }
        finals = {}
        for label, extra in (("no DP", {}), ("central DP", dp)):
            seconds, result = C.timed(
                lambda extra=extra, label=label: run_federated(
                    train, evals, work / "runs" / label.replace(" ", "-"), {**base, **extra}
                )
            )
            finals[label] = _final(result)
            eps = finals[label]["dp-epsilon"]
            print(
                f"{label}: round {finals[label]['round']} eval action MSE "
                f"{finals[label]['eval-action-mse']:.6g}, eval loss {finals[label]['eval-loss']:.6g}"
                + (f", ε {eps:.4g} at δ {args.delta:g}" if eps is not None else "")
                + f" ({seconds:.0f} s)"
            )
        ratio = finals["central DP"]["eval-action-mse"] / finals["no DP"]["eval-action-mse"]
        C.print_json({"config": base, "dp": dp, **{k: v for k, v in finals.items()}})
        print(f"dp_utility_cost: {ratio:.3f}")
    finally:
        C.cleanup(work, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
