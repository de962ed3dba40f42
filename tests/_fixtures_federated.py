"""Fixtures for the federated tests: tiny synthetic SO-100 datasets and an in-process Flower grid."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
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


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a test module (import it there): OpenMP spin-waiting on a busy 2-core machine
    slows training steps 10x."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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

    #: the ServerApp then evaluates the baseline before round 1 (``server_app.clients_run_elsewhere``)
    runs_clients_in_process = True

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


_LAUNCH_SCRIPT = """
import json, sys
from pathlib import Path
from zk0_pipelines.federated.launcher import run_federated
a = json.loads(sys.argv[1])
run_federated([Path(p) for p in a["train"]], [Path(p) for p in a["eval"]], Path(a["run_dir"]), a["config"],
              timeout_s=a["timeout_s"])
"""


def start_launcher_subprocess(
    train: list[Path], evals: list[Path], run_dir: Path, config: dict, *, timeout_s: float = 900
) -> subprocess.Popen:
    """``run_federated`` in a child Python process leading its own session (so it can be ``killpg``-ed).

    Its output goes to ``<run_dir>.launcher.log``.
    """
    args = {
        "train": [str(p) for p in train],
        "eval": [str(p) for p in evals],
        "run_dir": str(run_dir),
        "config": config,
        "timeout_s": timeout_s,
    }
    log = open(f"{run_dir}.launcher.log", "wb")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            [sys.executable, "-c", _LAUNCH_SCRIPT, json.dumps(args)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        log.close()


def wait_until(predicate, proc: subprocess.Popen, timeout_s: float, what: str, log_path: Path) -> None:
    """Poll ``predicate`` every 0.2 s; fail if ``proc`` exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(
                f"launcher exited ({proc.returncode}) before {what}:\n{log_path.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


class FakeGrid:
    """What a strategy's ``configure_train`` needs from a Grid: the connected node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Flower's task identity that messages built outside a run need (import it in the test module)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
