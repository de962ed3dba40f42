"""A real PostgreSQL server for the test session (Debian's package), started once and stopped at the end.

Import ``fixture_postgres`` into a test module. Data and socket live under the checkout's ``.zk0/``
(the ``postgres`` user cannot enter pytest's 0700 tmp folders) and are removed afterwards. Without the
server binaries the tests skip, unless ``ZK0_REQUIRE_POSTGRES=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from _fixtures_ui import free_port

from zk0_pipelines import env_settings
from zk0_pipelines.postgres import LocalPostgres, PostgresUnavailable, bin_dir
from zk0_pipelines.settings import REPO_ROOT


@pytest.fixture(scope="session", name="postgres")
def fixture_postgres() -> Iterator[LocalPostgres]:
    """The session's server on a free loopback port."""
    try:
        bin_dir()
    except PostgresUnavailable as exc:
        if env_settings.REQUIRE_POSTGRES.flag():
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    server = LocalPostgres(REPO_ROOT / ".zk0" / f"test-postgres-{os.getpid()}", free_port())
    try:
        server.start()
        yield server
    finally:
        server.destroy()
