"""Fixtures for the federated tests: tiny synthetic SO-100 datasets and an in-process Flower grid."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from flwr.app import Error, Message, RecordDict
from flwr.app.message import Context
from flwr.serverapp import Grid

TINY_CONFIG = {
    "num-server-rounds": 2,
    "local-steps": 2,
    "batch-size": 2,
    "chunk-size": 10,
    "min-available-clients": 2,
}
MOTIONS = ("reach", "wave", "circle", "push")


def make_datasets(
    base: Path, count: int, *, prefix: str = "client", frames: int = 20, seed0: int = 0
) -> list[Path]:
    """``count`` synthetic SO-100 datasets (1 episode x ``frames`` frames, distinct task + motion each)."""
    from zk0_pipelines.datasets.synthetic import SyntheticSpec, write_synthetic_so100

    roots = []
    for i in range(count):
        spec = SyntheticSpec(
            seed=seed0 + i,
            task=f"{MOTIONS[i % len(MOTIONS)]} the red cube {prefix} {i}",
            motion=MOTIONS[i % len(MOTIONS)],
            episodes=1,
            frames_per_episode=frames,
        )
        roots.append(write_synthetic_so100(base / f"{prefix}-{i}", f"zk0/{prefix}-{i}", spec))
    return roots


class InProcessGrid(Grid):
    """A Grid that delivers messages to a ClientApp in this process (no SuperLink, no Ray).

    Node ``i`` (id ``100 + i``) gets ``node_configs[i]`` (e.g. ``{"partition-id": i}``). A client exception
    becomes an error reply, like Flower's runtimes do. ``sent`` counts messages per message type.
    """

    def __init__(self, client_app, node_configs: list[dict], run_config: dict) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        # Flower's runtimes set the process's task identity; messages read it when created
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        self.client_app = client_app
        self.contexts = {
            100 + i: Context(
                run_id=1, node_id=100 + i, node_config=dict(nc), state=RecordDict(), run_config=run_config
            )
            for i, nc in enumerate(node_configs)
        }
        self.sent: dict[str, int] = {}

    def set_run(self, run) -> None:  # noqa: D102 - Grid API
        self._run = run

    @property
    def run(self):  # noqa: D102 - Grid API
        return getattr(self, "_run", None)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.contexts)

    def push_messages(self, messages):  # noqa: D102
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids):  # noqa: D102
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:  # noqa: D102
        replies = []
        for msg in messages:
            kind = msg.metadata.message_type
            self.sent[kind] = self.sent.get(kind, 0) + 1
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                replies.append(self.client_app(msg, context))
            except Exception as exc:  # noqa: BLE001 - mirrors Flower: errors travel as error replies
                replies.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
        return replies
