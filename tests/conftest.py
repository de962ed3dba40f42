"""Test-wide settings: never touch the Hub, keep every write inside pytest's tmp folders."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def _no_leaked_dagster_state_storage() -> Iterator[None]:
    """Each test starts and ends with no current Dagster definitions-state storage.

    Entering a DagsterInstance sets a context-wide "current" state storage. A sensor/schedule context built
    with resources and not used as a context manager enters them on an exit stack nobody closes, so the
    storage of an instance that is later garbage collected stays current, and a later ``dg.materialize``
    fails with "Attempted to resolve undefined DagsterInstance weakref" (seen in the full suite: depends on
    test order and GC). Scoping it per test undoes such leaks whatever the test did.
    """
    from dagster._core.storage.defs_state.base import set_defs_state_storage

    with set_defs_state_storage(None):
        yield
