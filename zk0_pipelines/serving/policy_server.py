"""lerobot's async-inference policy server (``lerobot.async_inference.policy_server``), pinned to one folder.

lerobot's server loads whatever ``pretrained_name_or_path`` a robot client sends. This subclass serves one
model only (the resolved champion): it loads it at start-up, accepts a client that asks for it by any of
its names (:func:`accepted_names`) and refuses every other request with ``FAILED_PRECONDITION``.

SECURITY: lerobot's protocol is pickle over plaintext gRPC. Anyone who can reach the port can run code in
this process. The server binds to 127.0.0.1 by default; reach it from a robot through an SSH tunnel or a
private network, never an open interface.

Importing this module imports lerobot's server, which creates a ``logs/`` folder in the working directory
(a class attribute of ``PolicyServer``): :func:`serve` callers chdir to a state folder first.
"""

from __future__ import annotations

import pickle  # nosec - lerobot's wire format, see module doc
from concurrent import futures

import grpc
from lerobot.async_inference.configs import PolicyServerConfig
from lerobot.async_inference.helpers import RemotePolicyConfig
from lerobot.async_inference.policy_server import PolicyServer
from lerobot.transport import services_pb2, services_pb2_grpc

from zk0_pipelines.policy.export import load_policy_folder
from zk0_pipelines.serving.champion import ServedModel

SERVED_POLICY_TYPE = "smolvla"
LOOPBACK = "127.0.0.1"


def accepted_names(served: ServedModel) -> set[str]:
    """The ``pretrained_name_or_path`` values a client may send to get the served model."""
    return {
        str(served.folder),
        served.alias,
        f"{served.name}@{served.alias}",
        f"models:/{served.name}@{served.alias}",
        f"models:/{served.name}/{served.version}",
    }


class PinnedPolicyServer(PolicyServer):
    """A ``PolicyServer`` that serves ``served.folder`` only (see module doc)."""

    def __init__(self, config: PolicyServerConfig, served: ServedModel, device: str = "cpu"):
        super().__init__(config)
        self.served = served
        self._loaded: tuple[str, tuple] | None = None
        self._load(device, {})  # fail at start-up, not at the first robot, on a bad folder
        self.device = device
        self.policy_type = SERVED_POLICY_TYPE

    def _load(self, device: str, rename_map: dict[str, str]) -> None:
        key = (device, tuple(sorted(rename_map.items())))
        if self._loaded == key:
            return
        overrides = {"rename_observations_processor": {"rename_map": dict(rename_map)}}
        self.policy, self.preprocessor, self.postprocessor = load_policy_folder(
            self.served.folder, device=device, preprocessor_overrides=overrides
        )
        self._loaded = key
        self.logger.info(f"serving {self.served.label()} from {self.served.folder} on {device}")

    def SendPolicyInstructions(self, request, context):  # noqa: N802 - gRPC method name
        """Check the client's request against the served model, then (re)load it for its device."""
        if not self.running:
            self.logger.warning("Server is not running. Ignoring policy instructions.")
            return services_pb2.Empty()
        specs = pickle.loads(request.data)  # nosec - see module doc
        if not isinstance(specs, RemotePolicyConfig):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected RemotePolicyConfig, got {type(specs)}")
        if specs.policy_type != SERVED_POLICY_TYPE:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this server serves a {SERVED_POLICY_TYPE} policy, not {specs.policy_type!r}",
            )
        if str(specs.pretrained_name_or_path) not in accepted_names(self.served):
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this server serves {self.served.label()} only; ask for "
                f"'models:/{self.served.name}@{self.served.alias}', got {specs.pretrained_name_or_path!r}",
            )
        self._load(specs.device, dict(specs.rename_map or {}))
        self.device = specs.device
        self.lerobot_features = specs.lerobot_features
        self.actions_per_chunk = specs.actions_per_chunk
        self.logger.info(
            f"client {context.peer()}: {self.served.label()}, {specs.actions_per_chunk} actions per chunk"
        )
        return services_pb2.Empty()


def build_server(
    served: ServedModel, host: str = LOOPBACK, port: int = 8080, device: str = "cpu", fps: int = 30
) -> tuple[grpc.Server, PinnedPolicyServer]:
    """A started-later gRPC server with the pinned servicer bound to ``host:port`` (plaintext)."""
    config = PolicyServerConfig(host=host, port=port, fps=fps)
    servicer = PinnedPolicyServer(config, served, device=device)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    services_pb2_grpc.add_AsyncInferenceServicer_to_server(servicer, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"policy server: could not bind {host}:{port}")
    return server, servicer


def serve(served: ServedModel, host: str = LOOPBACK, port: int = 8080, device: str = "cpu") -> None:
    """Serve until the process is stopped (SIGINT/SIGTERM)."""
    server, servicer = build_server(served, host, port, device)
    server.start()
    print(f"zk0 serve: {served.label()} on {host}:{port} (plaintext gRPC, pickle payloads)", flush=True)
    try:
        server.wait_for_termination()
    finally:
        servicer.stop()
        server.stop(grace=1)
