"""Test-wide settings: never touch the Hub, keep every write inside pytest's tmp folders."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def _no_leaked_dagster_state_storage() -> Iterator[None]:
    """Each test starts and ends with no current Dagster definitions-state storage.

    Entering a DagsterInstance sets a context-wide "current" state storage (a ContextVar, reset by token on
    exit). A schedule/sensor/asset context that is not used as a context manager opens an instance on an
    exit stack nobody closes; when that is garbage collected later, in some other test, its token reset
    puts back the storage that was current when it was opened, by then an instance long disposed, and the
    next ``dg.materialize`` fails with "Attempted to resolve undefined DagsterInstance weakref" (seen in the
    full suite). The tests therefore close every context they build (``with dg.build_*_context(...)``), and
    this fixture scopes the storage per test as a second line.
    """
    from dagster._core.storage.defs_state.base import set_defs_state_storage

    with set_defs_state_storage(None):
        yield


_NORMAL_POLICIES = {getattr(os, n) for n in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE") if hasattr(os, n)}


def reset_realtime_scheduling() -> bool:
    """Put this thread back on the normal time-sharing policy if something made it real-time.

    Seen once on a CI machine: the pytest process had been switched to SCHED_FIFO priority 99 mid-run (not by
    this project). Everything it starts inherits that, so a browser renderer busy at 100 % real-time starved
    the Flower clients of a Dagster run for good. Returns True when the policy was reset.
    """
    if not hasattr(os, "sched_getscheduler"):
        return False
    try:
        if os.sched_getscheduler(0) in _NORMAL_POLICIES:
            return False
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError:
        return False
    return True


@pytest.fixture(autouse=True)
def _normal_scheduling() -> None:
    """Each test (and what it starts) runs under SCHED_OTHER: see :func:`reset_realtime_scheduling`."""
    if reset_realtime_scheduling():
        warnings.warn("pytest ran under a real-time scheduling policy; reset to SCHED_OTHER", stacklevel=1)


#: Modules whose tests wait on wall-clock events (sensor ticks in a live Dagster, SuperNode heartbeats, a
#: run killed mid-round): they share one xdist group, so they run one after another on one worker.
TIMING_SENSITIVE = frozenset({"test_ui_e2e.py", "test_federated_deployment.py", "test_federated_e2e.py"})


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``make test`` runs two pytest-xdist workers (``--dist loadgroup --no-loadscope-reorder``): one group
    per module, so its module- and session-scoped fixtures are set up once in one process, and one group
    for ``TIMING_SENSITIVE``, collected first so that its long serial run starts at once on one worker
    while the other worker takes everything else."""
    items.sort(key=lambda item: item.path.name not in TIMING_SENSITIVE)  # stable: module order kept
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("timing-sensitive" if name in TIMING_SENSITIVE else name))
