"""The robot side of lerobot's async-inference protocol, for probes and tests (no robot hardware needed).

The same calls and payloads as ``lerobot.async_inference.robot_client.RobotClient`` (``Ready``,
``SendPolicyInstructions`` with a pickled ``RemotePolicyConfig``, ``SendObservations`` with a chunked,
pickled ``TimedObservation``, ``GetActions`` answering a pickled list of ``TimedAction``), without
connecting a robot. Plaintext and pickle, as lerobot's: talk only to a server you trust.
"""

from __future__ import annotations

import json
import pickle  # nosec - lerobot's wire format
import time
from pathlib import Path
from typing import Any

from zk0_pipelines.datasets.so100 import SO100_JOINTS

STATE_KEY = "observation.state"
IMAGE_PREFIX = "observation.images."


def robot_features(policy_folder: Path, joint_names: tuple[str, ...] = SO100_JOINTS) -> dict[str, dict]:
    """The ``lerobot_features`` an SO-100 robot client sends for the policy in ``policy_folder``.

    What ``hw_to_dataset_features(robot.observation_features, "observation", use_video=False)`` gives for
    an arm whose joints are ``joint_names`` and whose cameras are the policy's image inputs.
    """
    config = json.loads((Path(policy_folder) / "config.json").read_text())
    features: dict[str, dict] = {}
    for key, feature in config["input_features"].items():
        if key == STATE_KEY:
            if tuple(feature["shape"]) != (len(joint_names),):
                raise ValueError(
                    f"{policy_folder}/config.json: {key} has shape {feature['shape']}, "
                    f"the arm has {len(joint_names)} joints"
                )
            features[key] = {"dtype": "float32", "shape": (len(joint_names),), "names": list(joint_names)}
        elif key.startswith(IMAGE_PREFIX):
            channels, height, width = feature["shape"]
            features[key] = {
                "dtype": "image",
                "shape": (height, width, channels),
                "names": ["height", "width", "channels"],
            }
    return features


def wait_until_serving(address: str, timeout_s: float) -> None:
    """Block until a gRPC server accepts connections at ``address`` (``TimeoutError`` otherwise)."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError as exc:
            raise TimeoutError(f"no policy server answered at {address} within {timeout_s:.0f} s") from exc


def request_action_chunk(
    address: str,
    observation: dict[str, Any],
    features: dict[str, dict],
    *,
    model: str,
    actions_per_chunk: int,
    device: str = "cpu",
    timeout_s: float = 120.0,
) -> list:
    """One robot-client exchange: hand-shake, ask for ``model``, send ``observation``, get a chunk.

    ``observation`` is a raw robot observation: one value per joint name, one HWC uint8 image per camera
    name, and ``task``. Returns lerobot's ``TimedAction`` list.
    """
    import grpc
    from lerobot.async_inference.helpers import RemotePolicyConfig, TimedObservation
    from lerobot.transport import services_pb2, services_pb2_grpc
    from lerobot.transport.utils import grpc_channel_options, send_bytes_in_chunks

    with grpc.insecure_channel(address, grpc_channel_options()) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        stub = services_pb2_grpc.AsyncInferenceStub(channel)
        stub.Ready(services_pb2.Empty(), timeout=timeout_s)
        setup = RemotePolicyConfig("smolvla", model, features, actions_per_chunk, device)
        stub.SendPolicyInstructions(services_pb2.PolicySetup(data=pickle.dumps(setup)), timeout=timeout_s)
        timed = TimedObservation(timestamp=time.time(), timestep=0, observation=observation, must_go=True)
        chunks = send_bytes_in_chunks(pickle.dumps(timed), services_pb2.Observation, silent=True)
        stub.SendObservations(chunks, timeout=timeout_s)
        reply = stub.GetActions(services_pb2.Empty(), timeout=timeout_s)
    if not getattr(reply, "data", b""):
        raise RuntimeError(f"policy server at {address} returned no action chunk (see its log)")
    return pickle.loads(reply.data)  # nosec - see module doc
