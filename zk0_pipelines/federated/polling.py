"""A ``Grid`` wrapper whose ``send_and_receive`` notices replies within milliseconds.

Flower 1.41's ``HttpGrid`` (the grid a deployment ``flwr-serverapp`` process gets from the SuperLink) pushes
the messages and then pulls replies every **3 s**: a round whose clients finish after 4.1 s is seen at 6 s;
the simulation's ``InMemoryGrid`` pulls every 0.1 s.
``PollingGrid`` delegates everything to the wrapped grid except ``send_and_receive``, which pulls with a
short, backed-off interval (``min_interval`` doubling up to ``max_interval``, reset whenever replies
arrive), with the same timeout semantics. A pull is one small request to the SuperLink, so polling at
20 Hz while clients train costs nothing measurable.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class PollingGrid(Grid):
    """``grid`` with a fast-polling ``send_and_receive`` (module doc); every other call is delegated."""

    def __init__(self, grid: Grid, *, min_interval: float = 0.005, max_interval: float = 0.05) -> None:
        self.inner = grid
        self.min_interval = min_interval
        self.max_interval = max_interval

    def set_run(self, run) -> None:  # noqa: ANN001 - flwr's Run
        """Delegated."""
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: ANN201 - flwr's Run
        """Delegated."""
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:
        """Delegated."""
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """Delegated."""
        return self.inner.get_node_ids()

    def get_nodes(self):  # noqa: ANN201 - flwr's NodeInfo list
        """Delegated."""
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegated."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegated."""
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and pull their replies until all arrived or ``timeout`` seconds passed."""
        pending = set(self.inner.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        interval = self.min_interval
        while pending:
            got = list(self.inner.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            interval = self.min_interval if got else min(self.max_interval, 2 * interval)
            time.sleep(interval if deadline is None else min(interval, max(0.0, deadline - now)))
        return replies
