"""The ``reproduce_model`` job: rebuild a registered version from its DVC pin and recorded config."""

from typing import Any

import dagster as dg

from zk0_pipelines.defs.resources import MlflowResource
from zk0_pipelines.reproduce import reproduce_version


class ReproduceConfig(dg.Config):
    """Which registered model version to rebuild."""

    version: str
    model_name: str = "zk0-smolvla-so100"


@dg.op(description="Restore the version's data with DVC into its own workspace, re-train, compare weights.")
def reproduce_registered_version(
    context: dg.OpExecutionContext, config: ReproduceConfig, mlflow: MlflowResource
) -> dict[str, Any]:
    """Fails (with the report) when the rebuilt weights differ from the registered ones."""
    report = reproduce_version(config.model_name, config.version, tracking_uri=mlflow.registry().tracking_uri)
    for line in report.lines():
        context.log.info(line)
    context.add_output_metadata(
        {
            "identical": report.identical,
            "original_sha256": report.original_sha256,
            "reproduced_sha256": report.reproduced_sha256,
            "max_abs_diff": report.max_abs_diff,
            "diverged_rounds": ", ".join(report.diverged_rounds) or "none",
            "workspace": dg.MetadataValue.path(report.workspace),
        }
    )
    if not report.identical:
        raise dg.Failure("\n".join(report.lines()))
    return report.to_dict()


@dg.job(description="Rebuild a registered model version from what the registry recorded; 'identical' or not.")
def reproduce_model() -> None:
    """One op: reproduce_registered_version."""
    reproduce_registered_version()
