"""Serving: lerobot's async-inference policy server on the registry's champion, as a Dagster asset."""

from typing import Any

import dagster as dg

from zk0_pipelines.defs.resources import MlflowResource
from zk0_pipelines.serving.champion import NoServableModel, resolve_served_model
from zk0_pipelines.serving.process import start_server_process


class PolicyServerConfig(dg.Config):
    """Where the policy server listens. lerobot's protocol is pickle over plaintext gRPC: keep loopback."""

    host: str = "127.0.0.1"
    port: int = 8080
    device: str = "cpu"
    alias: str = "champion"


@dg.asset(
    group_name="serving",
    kinds={"lerobot"},
    deps=["hub_release"],
    description=(
        "lerobot's async-inference policy server (gRPC) serving the model version that holds the champion "
        "alias, from its release folder; replaces the server this project started on the same port. "
        "Insecure protocol (pickle, plaintext): bound to 127.0.0.1 by default."
    ),
)
def champion_policy_server(
    context: dg.AssetExecutionContext, config: PolicyServerConfig, mlflow: MlflowResource
) -> dict[str, Any]:
    """Resolve the alias in the registry, start the server in the background, wait until it answers."""
    try:
        served = resolve_served_model(mlflow.registry(), mlflow.model_name, config.alias)
    except NoServableModel as exc:
        raise dg.Failure(description=str(exc)) from exc
    server = start_server_process(served, host=config.host, port=config.port, device=config.device)
    context.add_output_metadata(
        {
            "address": server.address,
            "model": served.label(),
            "version": int(served.version) if served.version.isdigit() else served.version,
            "folder": dg.MetadataValue.path(str(served.folder)),
            "folder_origin": served.origin,
            "pid": server.pid,
            "log": dg.MetadataValue.path(server.log_path),
        }
    )
    return {
        "address": server.address,
        "model": served.name,
        "version": served.version,
        "folder": str(served.folder),
        "pid": server.pid,
    }


serve_champion = dg.define_asset_job(
    name="serve_champion",
    selection=dg.AssetSelection.assets("champion_policy_server"),
    description="(Re)start the policy server on the current champion (lerobot async inference, loopback).",
)
