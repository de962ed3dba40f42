"""Run the whole lineage through Dagster jobs, as a user would from the UI, on a given instance.

Used by ``make demo`` (instance = dagster_home) and by the end-to-end test (``instance_for_test``).
``progress`` receives one short line per stage (``zk0 demo`` prints them; ``demo_console``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from zk0_pipelines.defs.partitions import SO100_DATASETS


@dataclass
class LineageSummary:
    """What a lineage run produced: per-dataset ingest status and the registered model."""

    ingest: dict[str, str] = field(default_factory=dict)
    snapshot: dict[str, Any] | None = None
    federated: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    registered: dict[str, Any] | None = None
    release: dict[str, Any] | None = None
    rollout: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when a model version was registered and released (or dry-run)."""
        return self.registered is not None and self.release is not None and not self.errors

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [f"ingest {k}: {v}" for k, v in self.ingest.items()]
        if self.snapshot:
            out.append(f"data.dvc md5: {self.snapshot['dvc_md5']}")
        if self.evaluation:
            out.extend(self.round_table().splitlines())
            ev = self.evaluation
            out.append(f"best round by {ev['selection_metric']}: {ev['best_round']}")
        if self.registered:
            r = self.registered
            out.append(f"registered model: {r['model_name']} version {r['version']} aliases {r['aliases']}")
            if r.get("decision"):
                out.append(f"  alias decision: {r['decision']}")
            out.append(f"  tag dvc_md5 = {r['tags']['dvc_md5']}")
        if self.rollout and not self.rollout.get("skipped"):
            f = self.rollout["final"]
            out.append(
                f"rollout success rate: {f['success_rate']:.3f} (95% CI {f['success_rate_ci_low']:.3f}-"
                f"{f['success_rate_ci_high']:.3f}, round {self.rollout['final_round']}, labs "
                f"{', '.join(lab['lab_id'] for lab in self.rollout['labs'])})"
            )
        if self.release:
            out.append(f"release folder: {self.release['folder']} (dry_run={self.release.get('dry_run')})")
        out.extend(f"error: {e}" for e in self.errors)
        return out

    def round_table(self) -> str:
        """Per-round server eval loss / action MSE (from ``server_evaluation``'s rows)."""
        from zk0_pipelines.demo_console import round_table

        rows = [
            (int(r["round"]), r.get("eval_loss"), r.get("eval_action_mse"))
            for r in (self.evaluation or {}).get("rounds", [])
        ]
        return round_table(rows)


def _quiet(line: str) -> None:
    """The default ``progress``: print nothing."""


def _output(result: dg.ExecuteInProcessResult, asset: str) -> Any:
    return result.output_for_node(asset)


def run_lineage(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    training_config: dict[str, Any] | None = None,
    progress: Callable[[str], None] = _quiet,
) -> LineageSummary:
    """Ingest every registry dataset (one partition each), then train, register and release."""
    summary = LineageSummary()
    entries = defs.resources["dataset_registry"].load().entries
    ids = [e.id for e in entries]
    known = set(instance.get_dynamic_partitions(SO100_DATASETS.name))
    new = [i for i in ids if i not in known]
    if new:
        instance.add_dynamic_partitions(SO100_DATASETS.name, new)

    ingest = defs.resolve_job_def("ingest_datasets")
    progress(f"[1/3] ingest_datasets: fetch + validate {len(ids)} dataset(s)")
    for dataset_id in ids:
        started = time.monotonic()
        result = ingest.execute_in_process(instance=instance, partition_key=dataset_id, raise_on_error=False)
        if result.success:
            summary.ingest[dataset_id] = _output(result, "validated_dataset")["status"]
        else:
            summary.ingest[dataset_id] = "failed"
            summary.errors.append(f"ingest of {dataset_id} failed: {_first_error(result)}")
        progress(f"      {dataset_id}: {summary.ingest[dataset_id]} ({time.monotonic() - started:.0f} s)")

    run_config = None
    if training_config:
        run_config = {"ops": {"federated_model": {"config": training_config}}}
    progress("[2/3] federated_training: DVC snapshot, Flower run, server evaluation, MLflow registration")
    started = time.monotonic()
    training = defs.resolve_job_def("federated_training").execute_in_process(
        instance=instance, run_config=run_config, raise_on_error=False
    )
    if not training.success:
        summary.errors.append(f"federated_training failed: {_first_error(training)}")
        progress(f"      failed: {summary.errors[-1]}")
        return summary
    summary.snapshot = _output(training, "dataset_snapshot")
    summary.federated = _output(training, "federated_model")
    summary.evaluation = _output(training, "server_evaluation")
    summary.registered = _output(training, "registered_model")
    summary.rollout = _output(training, "rollout_evaluation")
    reg = summary.registered
    progress(
        f"      {reg['model_name']} version {reg['version']} registered, aliases {reg['aliases']} "
        f"({time.monotonic() - started:.0f} s)"
    )

    progress("[3/3] release: lerobot folder + model card (Hub push for the champion when configured)")
    released = defs.resolve_job_def("release").execute_in_process(instance=instance, raise_on_error=False)
    if not released.success:
        summary.errors.append(f"release failed: {_first_error(released)}")
        return summary
    summary.release = _output(released, "hub_release")
    progress(f"      {summary.release['folder']} (dry_run={summary.release.get('dry_run')})")
    return summary


def _first_error(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_failure and event.step_failure_data is not None:
            return str(event.step_failure_data.error.message).strip()
    return "unknown error"
