"""The ClientApp's local training step ÷ a plain lerobot training step (tiny SmolVLA, same batches).

Measured: ``zk0_pipelines.federated.task.train_local`` (what ``client_app.train`` calls once per round, with
``--local-steps`` steps, 4) with the default run config otherwise (FedAvg: no proximal term), and once more
with FedProx (``proximal-mu`` = ``--mu``). Time per step = wall time of the call ÷ steps (optimizer
creation, weight snapshot, data loader and metrics included, as in a round).

Baseline: lerobot's own training step on an identical policy, same seed, same batches: ``AdamW`` created
once per call like in a round, a ``DataLoader`` over the same frames (shuffled with the same seeded
generator, so the same batches ``train_local`` draws) cycled with lerobot's ``cycle``, then per step
``preprocessor(batch)`` and lerobot-train's ``update_policy`` (forward, ``accelerator.backward``, gradient
clipping at ``grad-clip-norm``, ``optimizer.step``, ``zero_grad``, loss/grad-norm ``.item()``), with the
CPU ``Accelerator`` lerobot-train creates.

Both sides read the same frames from memory (the client's LeRobotDataset items, decoded once beforehand), so
video decoding is excluded from both. The three variants run interleaved (rotating order), ``--reps`` times
after ``--warmup`` discarded ones; the median per-step time of each is compared. Torch runs with
``--threads`` intra-op threads (default 1, like the launcher's client processes).

    .venv/bin/python bench/client_step.py [--reps 25] [--threads 1] [--keep]

Last line: ``client_step: <fedavg median step ÷ plain median step>``.
"""

from __future__ import annotations

import argparse
import sys

import _common as C


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the FedProx ratio, then the FedAvg ratio last."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    C.run_config_option(parser, "proximal-mu", flag="--mu", default=0.01)  # the FedProx variant's
    C.run_config_option(parser, "local-steps", default=4)
    parser.add_argument("--keep", action="store_true", help="keep .zk0/bench/client_step")
    args = parser.parse_args(argv)
    work = C.setup_env("client_step")
    try:
        import torch

        from zk0_pipelines.federated import dataset_view, task
        from zk0_pipelines.federated.run_config import parse_run_config
        from zk0_pipelines.policy import build_processors

        torch.set_num_threads(args.threads)
        cfg = parse_run_config({"local-steps": args.local_steps})  # otherwise the defaults (fedavg)
        name, spec = C.DEMO_SPECS[0]
        root = C.write_dataset(work / "data", name, **spec)
        meta = task.open_metadata(root)
        stats = dataset_view.stats_from_json(
            dataset_view.stats_to_json(dataset_view.normalized_stats(meta.stats))
        )
        policies = {key: C.build_tiny_policy(meta) for key in ("fedavg", "fedprox", "plain")}
        pre = {key: build_processors(p, stats)[0] for key, p in policies.items()}
        dataset = task.open_dataset(root, policies["plain"], meta)
        frames = [dataset[i] for i in range(len(dataset))]  # decoded once: same data for every variant
        steps, batch_size = cfg.local_steps, cfg.batch_size
        print(
            f"tiny SmolVLA, {len(frames)} frames in memory, local-steps {steps}, batch {batch_size}, "
            f"torch threads {torch.get_num_threads()}"
        )

        def project(key: str, mu: float, seed: int) -> tuple[float, float]:
            seconds, result = C.timed(
                lambda: task.train_local(
                    policies[key],
                    pre[key],
                    frames,
                    steps=steps,
                    batch_size=batch_size,
                    learning_rate=cfg.learning_rate,
                    weight_decay=cfg.weight_decay,
                    grad_clip_norm=cfg.grad_clip_norm,
                    proximal_mu=mu,
                    seed=seed,
                )
            )
            return seconds / steps, result.step_time_s

        from accelerate import Accelerator
        from lerobot.scripts.lerobot_train import update_policy
        from lerobot.utils.logging_utils import AverageMeter, MetricsTracker
        from lerobot.utils.utils import cycle

        accelerator = Accelerator(cpu=True)  # what lerobot-train uses; on CPU: no autocast, no scaling

        def plain(seed: int) -> tuple[float, float]:
            """lerobot-train's loop: DataLoader ``cycle``, preprocessor, ``update_policy`` (clips grads)."""
            policy, preprocessor = policies["plain"], pre["plain"]
            params = [p for p in policy.parameters() if p.requires_grad]
            torch.manual_seed(seed)

            def run() -> None:
                optimizer = torch.optim.AdamW(
                    params, lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay
                )
                loader = torch.utils.data.DataLoader(
                    frames,
                    batch_size=batch_size,
                    shuffle=True,
                    num_workers=0,
                    generator=torch.Generator().manual_seed(seed),
                    drop_last=False,
                )
                meters = {k: AverageMeter(k, ":.3f") for k in ("loss", "grad_norm", "lr", "update_s")}
                tracker = MetricsTracker(batch_size, len(frames), 2, meters, accelerator=accelerator)
                dl_iter = cycle(loader)
                for _ in range(steps):
                    batch = preprocessor(next(dl_iter))
                    tracker, _ = update_policy(
                        tracker, policy, batch, optimizer, cfg.grad_clip_norm, accelerator=accelerator
                    )

            seconds, _ = C.timed(run)
            return seconds / steps, float("nan")

        variants = {
            "fedavg": lambda seed: project("fedavg", 0.0, seed),
            "fedprox": lambda seed: project("fedprox", args.mu, seed),
            "plain": plain,
        }
        order = list(variants)
        per_step: dict[str, list[float]] = {k: [] for k in variants}
        loop_only: dict[str, list[float]] = {k: [] for k in variants}
        for rep in range(args.warmup + args.reps):
            seed = task.mixed_seed(cfg.seed, rep, 0)
            for key in order[rep % 3 :] + order[: rep % 3]:
                wall, inner = variants[key](seed)
                if rep >= args.warmup:
                    per_step[key].append(wall)
                    loop_only[key].append(inner)
        print(C.load_note())
        med = {k: C.median(v) for k, v in per_step.items()}
        inner_med = {k: C.median(v) for k, v in loop_only.items() if k != "plain"}
        for key in variants:
            line = f"{key}: median {med[key] * 1e3:.2f} ms/step over {args.reps} calls of {steps} steps"
            if key in inner_med:
                line += f" (train_local's own step-time-s, loop only: {inner_med[key] * 1e3:.2f} ms)"
            print(line)
        ratio_avg = med["fedavg"] / med["plain"]
        ratio_prox = med["fedprox"] / med["plain"]
        C.print_json(
            {
                "ms-per-step": {k: round(v * 1e3, 3) for k, v in med.items()},
                "loop-only-ms": {k: round(v * 1e3, 3) for k, v in inner_med.items()},
                "steps": steps,
                "batch-size": batch_size,
                "reps": args.reps,
                "threads": torch.get_num_threads(),
                "proximal-mu": args.mu,
            }
        )
        print(f"client_step_fedprox: {ratio_prox:.3f}")
        print(f"client_step: {ratio_avg:.3f}")
    finally:
        C.cleanup(work, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
