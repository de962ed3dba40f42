"""Check one dataset folder as the ingest and ``zk0 validate`` do: convert a v2.1 copy, then validate.

A LeRobot v2.1 folder is converted (:mod:`~zk0_pipelines.datasets.conversion`) into ``convert_dir``
and the converted copy is validated; the folder given is only read. The report renders as a markdown
table (:func:`report_markdown`), shown in the Dagster metadata, next to a quarantined copy and by the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zk0_pipelines.datasets.conversion import (
    V21,
    ConversionRecord,
    DatasetConversionError,
    codebase_version,
    convert_v21_to_v30,
)
from zk0_pipelines.datasets.validation import CHECK_NAMES, CheckOutcome, ValidationReport, validate_dataset
from zk0_pipelines.markdown_tables import markdown_table


@dataclass
class DatasetCheck:
    """The report, the folder that was validated (the converted copy of a v2.1 input) and the conversion."""

    report: ValidationReport
    validated_root: Path
    conversion: ConversionRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: the report plus the conversion record."""
        data = self.report.to_dict()
        data["conversion"] = self.conversion.to_dict() if self.conversion else None
        return data

    def markdown(self) -> str:
        """The report as a markdown table (see :func:`report_markdown`)."""
        return report_markdown(self.report, self.conversion)


def _conversion_failed(root: Path, dataset_id: str, message: str) -> ValidationReport:
    first = CheckOutcome("info_json", False, message, {"conversion_failed": True})
    rest = [
        CheckOutcome(
            name, False, f"{dataset_id}: not run: the v2.1 dataset could not be converted", {"skipped": True}
        )
        for name in CHECK_NAMES[1:]
    ]
    return ValidationReport(dataset_id, root, [first, *rest], {})


def check_dataset(
    root: Path,
    dataset_id: str,
    *,
    convert_dir: Path,
    cameras: Mapping[str, str] | None = None,
    **validate_kwargs: Any,
) -> DatasetCheck:
    """Validate ``root`` (v3.0) or its v3.0 conversion written to ``convert_dir`` (v2.1).

    ``cameras`` and ``validate_kwargs`` go to :func:`~zk0_pipelines.datasets.validation.validate_dataset`.
    A v2.1 input that cannot be converted gets a failed report whose ``info_json`` message says why.
    """
    root = Path(root)
    if codebase_version(root) != V21:
        return DatasetCheck(validate_dataset(root, dataset_id, cameras=cameras, **validate_kwargs), root)
    try:
        record = convert_v21_to_v30(root, convert_dir, dataset_id)
    except DatasetConversionError as exc:
        return DatasetCheck(_conversion_failed(root, dataset_id, str(exc)), root)
    report = validate_dataset(convert_dir, dataset_id, cameras=cameras, **validate_kwargs)
    return DatasetCheck(report, Path(convert_dir), record)


def report_markdown(report: ValidationReport, conversion: ConversionRecord | None = None) -> str:
    """``# <id>: passed|FAILED``, the camera map and conversion, and a ``check | result | details`` table."""
    lines = [f"### {report.dataset_id}: {'passed' if report.passed else 'FAILED'}", ""]
    if report.cameras:
        pairs = ", ".join(f"`{src}` → `{dst}`" for src, dst in report.cameras["rename"].items())
        unused = ", ".join(f"`{k}`" for k in report.cameras.get("unused", ())) or "none"
        lines.append(f"- cameras ({report.cameras['rule']}): {pairs}; unused: {unused}")
    if conversion is not None:
        lines.append(
            f"- converted {conversion.source_version} → {conversion.target_version} with "
            f"`{conversion.converter}` ({conversion.converter_version})"
        )
    if len(lines) > 2:
        lines.append("")
    prefix = f"{report.dataset_id}: "
    rows = [
        {
            "check": outcome.name,
            "result": "pass" if outcome.passed else ("skipped" if outcome.details.get("skipped") else "FAIL"),
            "details": outcome.message.removeprefix(prefix),
        }
        for outcome in report.checks
    ]
    lines.append(markdown_table(rows))
    return "\n".join(lines) + "\n"
