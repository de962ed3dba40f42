"""Every ``ZK0_*`` environment variable the project reads: one catalogue, typed accessors.

Code reads a setting through its ``EnvSetting`` (``DEPLOYMENT.text()``, ``CLIENT_CACHE_SIZE.integer()``),
never ``os.environ`` directly; code that sets one for a child process uses its ``name``. An empty value
counts as unset. ``render_table()`` is the README's table of them (a test keeps the two equal).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TRUE_WORDS = ("1", "true", "yes")


@dataclass(frozen=True)
class EnvSetting:
    """One ``ZK0_*`` variable: its name, its default (``None``: unset means ``when_unset``), its meaning."""

    name: str
    meaning: str
    default: str | None = None
    when_unset: str = "unset"
    scope: str = "runtime"

    def raw(self) -> str | None:
        """The variable's value, or ``None`` when unset or empty."""
        value = os.environ.get(self.name, "").strip()
        return value or None

    def text(self) -> str | None:
        """The value, else the default (``None`` when neither)."""
        return self.raw() or self.default

    def flag(self) -> bool:
        """True when the value (else the default) is 1, true or yes (any case)."""
        return (self.text() or "").lower() in TRUE_WORDS

    def integer(self) -> int:
        """The value (else the default) as an integer; ``ValueError`` naming the variable."""
        value = self.text()
        try:
            return int(value or "")
        except ValueError:
            raise ValueError(f"{self.name} must be an integer, got {value!r}") from None

    def number(self) -> float | None:
        """The value (else the default) as a float, ``None`` when neither; ``ValueError`` naming it."""
        value = self.text()
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{self.name} must be a number, got {value!r}") from None

    def shown_default(self) -> str:
        """The default as the README shows it."""
        return f"`{self.default}`" if self.default is not None else self.when_unset


ROOT = EnvSetting(
    "ZK0_ROOT",
    "project root whose `data/`, `.zk0/` and `dagster_home/` are used (tests, reproduction workspaces; "
    "the launcher passes it to its Flower processes)",
    when_unset="the checkout",
)
DEPLOYMENT = EnvSetting(
    "ZK0_DEPLOYMENT", "resources: `offline` (synthetic data, tiny SmolVLA) or `production`", "offline"
)
DATASET_REGISTRY = EnvSetting(
    "ZK0_DATASET_REGISTRY",
    "dataset registry YAML (relative to the root)",
    when_unset="`configs/datasets.demo.yaml` (offline), `configs/datasets.so100.yaml` (production)",
)
DROP_FOLDER = EnvSetting(
    "ZK0_DROP_FOLDER", "local drop folder the `new_so100_datasets` sensor watches", ".zk0/drop"
)
HUB_SEARCH = EnvSetting(
    "ZK0_HUB_SEARCH", "`so100`: the sensor also searches the Hugging Face Hub", when_unset="unset (no search)"
)
SENSOR_INTERVAL_S = EnvSetting(
    "ZK0_SENSOR_INTERVAL_S",
    "minimum seconds between two evaluations of each dataset sensor (drop folder / Hub, re-training)",
    "30",
)
NIGHTLY_FORCE = EnvSetting(
    "ZK0_NIGHTLY_FORCE", "`1`: the nightly schedule trains even when the data did not change", "0"
)
NIGHTLY_TIMEZONE = EnvSetting("ZK0_NIGHTLY_TIMEZONE", "timezone of the nightly schedule's cron", "UTC")
DVC = EnvSetting(
    "ZK0_DVC",
    "the DVC command (the Makefile sets it to `.tools/dvc/bin/dvc`)",
    when_unset="`.tools/dvc/bin/dvc`, else `dvc` on PATH",
)
DVC_REMOTE = EnvSetting(
    "ZK0_DVC_REMOTE", "production: DVC remote URL to push snapshots to", when_unset="`.dvc/config`'s default"
)
SMOLVLA_REVISION = EnvSetting(
    "ZK0_SMOLVLA_REVISION", "production: pinned revision of `lerobot/smolvla_base`", when_unset="unpinned"
)
HUB_REPO_ID = EnvSetting(
    "ZK0_HUB_REPO_ID", "production: Hub model repo of the release", when_unset="unset (dry run)"
)
MLFLOW_BUSY_TIMEOUT_S = EnvSetting(
    "ZK0_MLFLOW_BUSY_TIMEOUT_S",
    "seconds a locked sqlite MLflow store is waited for",
    when_unset="MLflow's 20 s",
)
CLIENT_CACHE_SIZE = EnvSetting(
    "ZK0_CLIENT_CACHE_SIZE", "client runtimes (policy + dataset) a Flower client process keeps", "4"
)
LAUNCH_ID = EnvSetting(
    "ZK0_LAUNCH_ID",
    "set by the launcher on every process of a launch, to find and stop them later (not set by hand)",
    when_unset="set per launch",
)
STORAGE = EnvSetting(
    "ZK0_STORAGE", "`postgres`: `zk0` commands use the checkout's PostgreSQL instead of sqlite", "sqlite"
)
DAGSTER_PG_URL = EnvSetting(
    "ZK0_DAGSTER_PG_URL",
    "PostgreSQL URL of Dagster's storage (`dagster_home/postgres/dagster.yaml`)",
    when_unset="set by `ZK0_STORAGE=postgres`",
)
PG_PORT = EnvSetting("ZK0_PG_PORT", "port of the checkout's PostgreSQL server", "55432")
PG_BIN = EnvSetting(
    "ZK0_PG_BIN",
    "folder with PostgreSQL's `initdb` and `pg_ctl`",
    when_unset="newest `/usr/lib/postgresql/*/bin`",
)
REQUIRE_BROWSER = EnvSetting(
    "ZK0_REQUIRE_BROWSER", "`1`: a missing chromium fails the browser test instead of skipping", scope="tests"
)
REQUIRE_SIMULATOR = EnvSetting(
    "ZK0_REQUIRE_SIMULATOR",
    "`1`: a simulator that cannot render fails its tests instead of skipping",
    scope="tests",
)
REQUIRE_POSTGRES = EnvSetting(
    "ZK0_REQUIRE_POSTGRES",
    "`1`: missing PostgreSQL binaries fail its tests instead of skipping",
    scope="tests",
)
CHROMIUM = EnvSetting("ZK0_CHROMIUM", "the browser the UI test drives", "/usr/bin/chromium", scope="tests")

CATALOGUE: tuple[EnvSetting, ...] = (
    ROOT,
    DEPLOYMENT,
    DATASET_REGISTRY,
    DROP_FOLDER,
    HUB_SEARCH,
    SENSOR_INTERVAL_S,
    NIGHTLY_FORCE,
    NIGHTLY_TIMEZONE,
    DVC,
    DVC_REMOTE,
    SMOLVLA_REVISION,
    HUB_REPO_ID,
    MLFLOW_BUSY_TIMEOUT_S,
    CLIENT_CACHE_SIZE,
    LAUNCH_ID,
    STORAGE,
    DAGSTER_PG_URL,
    PG_PORT,
    PG_BIN,
    REQUIRE_BROWSER,
    REQUIRE_SIMULATOR,
    REQUIRE_POSTGRES,
    CHROMIUM,
)


def render_table() -> str:
    """The catalogue as a Markdown table (the README's)."""
    from zk0_pipelines.markdown_tables import markdown_table

    rows = [
        {
            "variable": f"`{setting.name}`",
            "default": setting.shown_default(),
            "meaning": setting.meaning + (" (tests)" if setting.scope == "tests" else ""),
        }
        for setting in CATALOGUE
    ]
    return markdown_table(rows) + "\n"
