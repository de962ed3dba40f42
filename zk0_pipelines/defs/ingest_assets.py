"""Ingest: fetch each registry dataset at its pinned revision, validate it, admit or quarantine it."""

import shutil
import warnings
from pathlib import Path
from typing import Any

import dagster as dg

from zk0_pipelines import settings
from zk0_pipelines.datasets.admission import admit, quarantine
from zk0_pipelines.datasets.check import DatasetCheck, check_dataset
from zk0_pipelines.datasets.registry import DatasetEntry
from zk0_pipelines.datasets.sources import DatasetRefusedError, FetchResult, fetch_dataset
from zk0_pipelines.datasets.validation import CHECK_NAMES, refused_report
from zk0_pipelines.defs.partitions import SO100_DATASETS
from zk0_pipelines.defs.resources import DatasetRegistryResource


@dg.asset(
    partitions_def=SO100_DATASETS,
    group_name="ingest",
    kinds={"lerobot", "huggingface"},
    description=(
        "One SO-100/SO-101 LeRobot dataset fetched at its pinned revision (Hub), copied (local folder) "
        "or written by the synthetic generator (offline default), into a staging folder."
    ),
)
def so100_dataset(
    context: dg.AssetExecutionContext, dataset_registry: DatasetRegistryResource
) -> dict[str, Any]:
    """Fetch the partition's dataset into ``.zk0/staging/<id>`` and record the resolved revision."""
    dataset_id = context.partition_key
    registry = dataset_registry.load()
    entry = registry.get(dataset_id)
    dest = settings.staging_dir() / dataset_id
    if dest.exists():
        shutil.rmtree(dest)  # our own staging copy of an earlier attempt, never user data
    dest.parent.mkdir(parents=True, exist_ok=True)
    result, refusal = _fetch_or_refusal(context, entry, dest)
    fetched = {
        "dataset_id": dataset_id,
        "role": entry.role,
        "source_kind": result.source_kind,
        "source": entry.source.model_dump(mode="json", exclude_none=True),
        "resolved_revision": result.resolved_revision,
        "staged_path": str(result.path),
        "refused": refusal,
        "cameras": entry.cameras,
    }
    context.add_output_metadata(
        {
            "role": entry.role,
            "source_kind": result.source_kind,
            "resolved_revision": result.resolved_revision,
            "staged_path": dg.MetadataValue.path(str(result.path)),
            "status": "refused" if refusal else "fetched",
            **({"refused": refusal} if refusal else {}),
        }
    )
    return fetched


def _fetch_or_refusal(
    context: dg.AssetExecutionContext, entry: DatasetEntry, dest: Path
) -> tuple[FetchResult, str | None]:
    """Fetch; a refused dataset (other robot, unsafe link) is kept as what was fetched, with the reason.

    The refusal is a finding about the dataset, not a failed step: ``validated_dataset`` quarantines it
    with a report like any dataset that fails validation. Unreachable sources still fail the step.
    """
    try:
        return fetch_dataset(entry, dest, keep_refused=True), None
    except DatasetRefusedError as exc:
        context.log.error(f"dataset {entry.id!r} refused: {exc}")
        result = exc.result or FetchResult(
            dataset_id=entry.id,
            path=dest,
            source_kind=entry.source.kind,
            resolved_revision="refused",
            requested_revision=entry.source.revision,
            origin=entry.source.describe(),
        )
        return result, str(exc)


def _partitioned_check_specs() -> list[dg.AssetCheckSpec]:
    """One check spec per validation check, partitioned like the asset: each dataset has its own result.

    Without the partitions the check tab shows whichever dataset was validated last.
    """
    with warnings.catch_warnings():  # partitioned asset checks are a Dagster preview feature
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return [
            dg.AssetCheckSpec(
                name=name,
                asset="validated_dataset",
                partitions_def=SO100_DATASETS,
                description=f"{name}, per dataset partition (the result names its partition)",
            )
            for name in CHECK_NAMES
        ]


@dg.asset(
    partitions_def=SO100_DATASETS,
    group_name="ingest",
    kinds={"lerobot"},
    check_specs=_partitioned_check_specs(),
    description=(
        "The dataset after the validation suite (every video frame decoded, frame counts, timestamps, "
        "schema and camera mapping, NaN/Inf; LeRobot v2.1 input converted to v3.0 first). Passing "
        "datasets move to data/<id>; failing ones are quarantined (kept, flagged with the report, "
        "excluded from training)."
    ),
)
def validated_dataset(context: dg.AssetExecutionContext, so100_dataset: dict[str, Any]):
    """Validate the staged dataset, then admit it into ``data/`` or quarantine it."""
    dataset_id = so100_dataset["dataset_id"]
    staged = settings.staging_dir() / dataset_id
    converted = settings.staging_dir() / f".{dataset_id}.v30"
    refusal = so100_dataset.get("refused")
    if refusal:
        checked = DatasetCheck(refused_report(staged, dataset_id, refusal), staged)
    else:
        checked = check_dataset(
            staged, dataset_id, convert_dir=converted, cameras=so100_dataset.get("cameras")
        )
    report = checked.report
    conversion = checked.conversion.to_dict() if checked.conversion else None
    check_results = [
        dg.AssetCheckResult(
            check_name=outcome.name,
            passed=outcome.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description=_for_partition(dataset_id, outcome.message),
            metadata={
                "partition": dataset_id,
                **{k: _metadata_value(v) for k, v in outcome.details.items()},
            },
        )
        for outcome in report.checks
        if outcome.name in CHECK_NAMES
    ]
    evaluated = {outcome.name for outcome in report.checks}
    check_results += [
        dg.AssetCheckResult(
            check_name=name,
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            description=_for_partition(
                dataset_id, "not evaluated: the dataset failed an earlier, prerequisite check"
            ),
            metadata={"partition": dataset_id},
        )
        for name in CHECK_NAMES
        if name not in evaluated
    ]
    summary = {
        "frames": report.stats.get("frames"),
        "episodes": report.stats.get("episodes"),
    }
    if report.passed:
        provenance = {
            "dataset_id": dataset_id,
            "role": so100_dataset["role"],
            "source": so100_dataset["source"],
            "resolved_revision": so100_dataset["resolved_revision"],
            "validation": summary,
            "cameras": report.cameras,
            "conversion": conversion,
        }
        path = admit(checked.validated_root, dataset_id, provenance)
        status = "validated"
    else:
        path = quarantine(staged, dataset_id, checked.to_dict(), markdown=checked.markdown())
        status = "quarantined"
        context.log.error(
            f"dataset {dataset_id!r} quarantined at {path}: "
            + "; ".join(f"{f.name}: {f.message}" for f in report.failures)
        )
    metadata: dict[str, Any] = {
        "status": status,
        "path": dg.MetadataValue.path(str(path)),
        "resolved_revision": so100_dataset["resolved_revision"],
        "failed_checks": ", ".join(f.name for f in report.failures) or "none",
        **({"refused": refusal} if refusal else {}),
        "validation": dg.MetadataValue.md(checked.markdown()),
        "cameras": dg.MetadataValue.json(report.cameras or {}),
        "conversion": dg.MetadataValue.json(conversion or {}),
    }
    metadata.update({f"stats/{k}": _metadata_value(v) for k, v in report.stats.items()})
    if converted.exists():
        shutil.rmtree(converted)  # our own converted copy of a quarantined v2.1 dataset
    if checked.conversion is not None and report.passed and staged.exists():
        shutil.rmtree(staged)  # our staged v2.1 copy; the source itself was never touched
    value = {
        **so100_dataset,
        "status": status,
        "path": str(path),
        "stats": report.stats,
        "cameras": report.cameras,
        "conversion": conversion,
    }
    yield dg.Output(value, metadata=metadata)
    yield from check_results


def _for_partition(dataset_id: str, message: str) -> str:
    """Lead with the partition (the dataset id) so a result is never read as another dataset's."""
    return message if message.startswith(f"{dataset_id}:") else f"{dataset_id}: {message}"


def _metadata_value(value: Any) -> Any:
    """Dagster metadata accepts scalars, lists and dicts of JSON; everything else becomes text."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple, dict)):
        return dg.MetadataValue.json(value if not isinstance(value, tuple) else list(value))
    return str(value)
