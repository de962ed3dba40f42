"""Work done ahead, in a background thread, while a process would otherwise wait for the federation.

- Server (``ServerPrewarm``): while the clients start and answer the query round, import the policy stack,
  build the global SmolVLA from the first eval dataset's features and open the eval datasets. After the
  query round ``take_policy`` hands the policy over only if the clients' features are exactly those;
  otherwise the server builds from the clients' features as before. ``build_policy`` seeds a private RNG,
  so a policy built early is bit-identical to one built later.
- Client (``prewarm_client_imports``): after answering the query round, import the policy and dataset
  stacks while the server builds, so round 1 only builds the (cached) runtime. Only imports: a policy
  build seeds torch's global RNG, which must not race with another thread of the process; and the train
  and evaluate handlers first wait for these imports to end (``wait_for_client_prewarm``), so nothing runs
  beside a seeded training step (a resumed run must retrain to the same bits).
- Server (``BackgroundCall``): the baseline (round-0) evaluation, which depends only on the initial weights,
  runs while the clients train round 1; round 1's evaluation first waits for it (``server_app``).

A prewarm failure is only logged: the normal path builds the same things again and reports the error. The
server's threads run at a lower CPU priority (Linux: niceness is per thread), so on a busy machine they only
take CPU time the start-up itself leaves idle (Ray's raylet must register within a fixed 30 s). The client's
import thread does not: Ray already runs its workers niced, and that import is what round 1 waits for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


#: How much nicer than its process a prewarm thread runs.
NICENESS = 10


def lower_thread_priority(by: int = NICENESS) -> None:
    """Make the calling thread ``by`` nicer (Linux: ``setpriority`` on the thread id; elsewhere nothing)."""
    if not hasattr(os, "setpriority"):
        return
    with contextlib.suppress(OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))


def _canonical(features: dict[str, Any]) -> str:
    return json.dumps(json.loads(json.dumps(features, default=list)), sort_keys=True)


class BackgroundCall:
    """``fn()`` in a lower-priority thread started at once; :meth:`result` waits for it and returns its value
    or raises its exception."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self._fn = fn
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        lower_thread_priority()
        try:
            self._value = self._fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by result()
            self._error = exc

    def result(self) -> Any:
        """The call's return value, once it has ended (raises what it raised)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class ServerPrewarm:
    """Builds the server's policy and opens its eval datasets in a background thread (module doc)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.features: dict[str, Any] | None = None
        self.policy: Any = None
        self.datasets: dict[Path, Any] = {}
        self.error: str | None = None
        self._call = BackgroundCall(self._work, name="zk0-server-prewarm")

    def _work(self) -> None:
        try:
            from zk0_pipelines.federated import dataset_view, task
            from zk0_pipelines.policy import build_policy

            if not self.cfg.eval_paths:
                return
            metas = {root: task.open_metadata(root) for root in self.cfg.eval_paths}
            first = self.cfg.eval_paths[0]
            features = dict(dataset_view.policy_view(first, metas[first])[0])  # camera names as the policy's
            policy = build_policy(self.cfg.policy_spec(), task.PolicyMeta(features=features, stats=None))
            self.datasets = {root: task.open_dataset(root, policy, meta) for root, meta in metas.items()}
            self.features, self.policy = features, policy
        except Exception as exc:  # noqa: BLE001 - the normal path rebuilds and reports
            self.error = f"{type(exc).__name__}: {exc}"
            log.info("server prewarm skipped: %s", self.error)

    def take_policy(self, features: dict[str, Any]) -> tuple[Any, dict[Path, Any]]:
        """``(policy, opened eval datasets)`` built ahead for ``features``, or ``(None, {})`` if not built
        for exactly those features. Waits for the background work to finish."""
        self._call.result()
        if self.policy is None or self.features is None or _canonical(self.features) != _canonical(features):
            return None, {}
        policy, datasets = self.policy, self.datasets
        self.policy, self.datasets = None, {}
        return policy, datasets


_CLIENT_THREADS: list[threading.Thread] = []


def wait_for_client_prewarm() -> None:
    """Wait until every client prewarm thread of this process has ended."""
    while _CLIENT_THREADS:
        _CLIENT_THREADS.pop().join()


#: Modules a client's first training round needs beyond what the query round imported.
CLIENT_MODULES = (
    "lerobot.policies.factory",
    "lerobot.policies.smolvla.modeling_smolvla",
    "lerobot.datasets.factory",
    "lerobot.datasets.lerobot_dataset",
)


def prewarm_client_imports(modules: tuple[str, ...] = CLIENT_MODULES) -> threading.Thread:
    """Import ``modules`` in a background thread (module doc)."""
    import importlib

    def work() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - the train handler imports again and reports
                log.info("client prewarm of %s skipped: %s: %s", name, type(exc).__name__, exc)

    thread = threading.Thread(target=work, name="zk0-client-prewarm", daemon=True)
    thread.start()
    _CLIENT_THREADS.append(thread)
    return thread
