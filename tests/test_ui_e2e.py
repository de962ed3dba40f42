"""The Dagster UI end to end: a real ``dagster dev`` (webserver + daemon) on an isolated project root,
driven by a browser (Playwright + Debian's chromium) and by files dropped into the drop folder.

1. The registry's tiny datasets are ingested, the lineage is shown (screenshot in ``test-artifacts/``) and
   ``federated_training`` is launched from its Launchpad without editing any YAML: the run page reaches
   "Success".
2. A new SO-100 dataset moved into the drop folder, and nothing else: ``new_so100_datasets`` adds its
   partition and ingests it, ``validated_datasets_changed`` requests one training run, and the registered
   MLflow model version names the new dataset in its ``datasets.train`` tag.

Loopback only; every wait is bounded. Run alone with ``pytest tests/test_ui_e2e.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from _fixtures_lineage import LINEAGE
from _fixtures_ui import (
    CHECKOUT,
    CHROMIUM,
    EVAL_ID,
    LOCATION,
    REPOSITORY,
    TRAIN_IDS,
    DagsterDev,
    Project,
    chromium_page,
    dagster_dev,
    make_project,
    wait_for,
)

from zk0_pipelines import env_settings

pytestmark = pytest.mark.e2e

ARTIFACTS = CHECKOUT / "test-artifacts"
DROPPED_NAME = "lab_wave"
DROPPED_ID = f"drop-{DROPPED_NAME}"
TERMINAL = ("Success", "Failure", "Canceled")
TERMINAL_API = ("SUCCESS", "FAILURE", "CANCELED")
# Upper bounds, not expectations: a tiny federated run takes ~3-4 min on 2 idle cores (most of it
# process start-up), an ingest run ~1 min; a machine shared with other jobs can take 3x as long.
RUN_TIMEOUT_S = 900
INGEST_TIMEOUT_S = 600

if not Path(CHROMIUM).exists():
    _reason = f"Debian's chromium is not installed at {CHROMIUM} (apt-get install -y chromium)"
    if env_settings.REQUIRE_BROWSER.flag():  # CI installs it: missing there is a failure, not a skip
        pytest.fail(_reason, pytrace=False)
    pytest.skip(_reason, allow_module_level=True)


@dataclass
class Stack:
    """The running system under test."""

    project: Project
    server: DagsterDev
    page: Any  # playwright.sync_api.Page
    instance: dg.DagsterInstance


def _sensor(server: DagsterDev, name: str) -> dict[str, Any]:
    query = """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {
        __typename ... on Sensor { id sensorState { status } } ... on PythonError { message } } }"""
    selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "sensorName": name}
    sensor = server.graphql(query, {"s": selector})["sensorOrError"]
    assert sensor["__typename"] == "Sensor", sensor
    return sensor


def _stop_sensor(server: DagsterDev, name: str) -> None:
    mutation = """mutation($id: String!) { stopSensor(id: $id) { __typename
        ... on StopSensorMutationResult { instigationState { status } } ... on PythonError { message } } }"""
    result = server.graphql(mutation, {"id": _sensor(server, name)["id"]})["stopSensor"]
    assert result["__typename"] == "StopSensorMutationResult", result
    assert result["instigationState"]["status"] == "STOPPED"


def _seed_tiny_vlm(project: Project) -> None:
    """Put the deterministic tiny SmolVLM into the project's cache (copied when the checkout has it)."""
    from zk0_pipelines.policy.tiny_vlm import ensure_tiny_vlm, is_current

    target = project.root / ".zk0" / "cache" / "tiny-smolvlm"
    cached = CHECKOUT / ".zk0" / "cache" / "tiny-smolvlm"
    if is_current(cached):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(cached, target)
    ensure_tiny_vlm(target)


def _ingest_registry(instance: dg.DagsterInstance) -> None:
    """Ingest the registry's datasets into the project (partition + run each, recorded in the instance)."""
    from zk0_pipelines.definitions import build_definitions, build_resources

    defs = build_definitions(build_resources("offline"))
    ids = [entry.id for entry in defs.resources["dataset_registry"].load().entries]
    assert sorted(ids) == sorted([*TRAIN_IDS, EVAL_ID])
    instance.add_dynamic_partitions("so100_datasets", ids)
    job = defs.resolve_job_def("ingest_datasets")
    for dataset_id in ids:
        result = job.execute_in_process(instance=instance, partition_key=dataset_id)
        assert result.output_for_node("validated_dataset")["status"] == "validated", dataset_id


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """dagster dev on a fresh project whose registry datasets are ingested; a browser page on it.

    ``validated_datasets_changed`` is stopped before any dataset is admitted, so the only training run of
    the first test is the one launched from the Launchpad; the second test turns it on in the UI.
    """
    base = tmp_path_factory.mktemp("ui")
    project = make_project(base)
    log_path = base / "dagster-dev.log"
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with (
            project.activated(),
            dagster_dev(project, log_path) as server,
            dg.DagsterInstance.get() as instance,
        ):
            _stop_sensor(server, "validated_datasets_changed")
            _seed_tiny_vlm(project)
            _ingest_registry(instance)
            with chromium_page(base / "chromium") as page:
                yield Stack(project, server, page, instance)
    finally:
        if log_path.exists():
            shutil.copy2(log_path, ARTIFACTS / "dagster-dev.log")


def _run_status_in_ui(stack: Stack, run_id: str, timeout_s: float) -> str:
    """Wait for the run to end through the webserver's GraphQL API (what the UI itself reads), then open its
    run page and return the terminal status its header shows.

    The tab stays blank while the run goes on: a live run page (Gantt chart, log stream) costs a CPU core of
    its own on a 2-core machine, and a slow run starved by it got slower still.
    """
    query = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"

    def ended() -> bool:
        return stack.server.graphql(query, {"id": run_id})["runOrError"]["status"] in TERMINAL_API

    try:
        wait_for(f"run {run_id} to end", ended, timeout_s, interval_s=3)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.server.log_tail()}") from None
    page = stack.page
    page.goto(f"{stack.server.url}/runs/{run_id}")
    page.get_by_text(run_id[:8], exact=True).first.wait_for()
    header_status = page.locator("[class*='PageHeader_titleAndTags'] .BaseTag").first
    status = wait_for(
        "the run page's header to show the run's end",
        lambda: (text := header_status.inner_text().strip()) in TERMINAL and text,
        timeout_s=60,
        interval_s=1,
    )
    page.goto("about:blank")
    return status


def _run_failure(stack: Stack, run_id: str) -> str:
    """The step failures of a run, for assertion messages."""
    query = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status
        eventConnection { events { __typename ... on ExecutionStepFailureEvent {
        stepKey error { message } } } } } } }"""
    run = stack.server.graphql(query, {"id": run_id})["runOrError"]
    failures = [e for e in run["eventConnection"]["events"] if e["__typename"] == "ExecutionStepFailureEvent"]
    return "\n".join(f"{f['stepKey']}: {f['error']['message']}" for f in failures) or str(run["status"])


def _expand_and_screenshot_lineage(stack: Stack, path: Path) -> None:
    page = stack.page
    page.goto(f"{stack.server.url}/asset-groups")
    group = page.get_by_text("training", exact=True).last
    group.wait_for()
    box = group.bounding_box()
    assert box is not None
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] - 150, button="right")  # the empty canvas
    page.get_by_role("menuitem", name="Expand all groups").click()
    for name in LINEAGE:
        page.get_by_text(name, exact=True).first.wait_for(state="visible")
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(path))
    page.goto("about:blank")  # an open asset graph keeps polling


def test_launchpad_run_of_federated_training_succeeds_in_the_ui(stack: Stack) -> None:
    page, server = stack.page, stack.server
    page.goto(f"{server.url}/locations/{LOCATION}/jobs/federated_training/playground")
    launch = page.get_by_role("button", name="Launch Run")
    launch.wait_for()
    page.get_by_text("No errors").first.wait_for()  # the default config is valid as it stands
    launch.click()
    page.wait_for_url(re.compile(r".*/runs/[0-9a-f-]{36}"), timeout=60_000)
    run_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)
    run = stack.instance.get_run_by_id(run_id)
    assert run is not None and run.job_name == "federated_training"
    assert run.tags.get("dagster/from_ui") == "true"

    status = _run_status_in_ui(stack, run_id, RUN_TIMEOUT_S)
    assert status == "Success", _run_failure(stack, run_id)

    # The run materialised the whole training lineage, on exactly the registry's datasets.
    for key in ("dataset_snapshot", "federated_model", "server_evaluation", "registered_model"):
        event = stack.instance.get_latest_materialization_event(dg.AssetKey(key))
        assert event is not None and event.run_id == run_id, key
    snapshot = stack.instance.get_latest_materialization_event(dg.AssetKey("dataset_snapshot"))
    excluded = snapshot.asset_materialization.metadata["excluded"].value
    assert excluded == {}

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "asset_graph.png"
    _expand_and_screenshot_lineage(stack, shot)
    assert shot.stat().st_size > 10_000


def _turn_sensor_on_in_ui(stack: Stack, name: str) -> None:
    page = stack.page
    page.goto(f"{stack.server.url}/locations/{LOCATION}/sensors/{name}")
    switch = page.get_by_role("checkbox")  # the "Running" switch: a hidden input inside its label
    switch.wait_for(state="attached")
    assert not switch.is_checked()
    page.locator("label").filter(has=switch).click()
    wait_for(
        f"sensor {name} to be RUNNING",
        lambda: _sensor(stack.server, name)["sensorState"]["status"] == "RUNNING",
        timeout_s=30,
        interval_s=1,
    )
    page.goto("about:blank")


def _drop_dataset(project: Project) -> Path:
    """Write a new SO-100 dataset beside the drop folder, age it past the settle window, move it in."""
    from zk0_pipelines.datasets.synthetic import SyntheticSpec, write_synthetic_so100

    incoming = project.root / ".zk0" / "incoming" / DROPPED_NAME
    write_synthetic_so100(
        incoming,
        "lab/wave",
        SyntheticSpec(seed=11, task="wave at the camera", motion="wave", episodes=1, frames_per_episode=20),
    )
    old = time.time() - 120
    for path in [incoming, *incoming.rglob("*")]:
        os.utime(path, (old, old))
    target = project.drop_folder / DROPPED_NAME
    os.rename(incoming, target)  # same file system: the folder appears complete, at once
    return target


def _runs(instance: dg.DagsterInstance, job: str, tags: dict[str, str]) -> list[dg.DagsterRun]:
    return [r.dagster_run for r in instance.get_run_records(dg.RunsFilter(job_name=job, tags=tags))]


def _finished(stack: Stack, what: str, job: str, tags: dict[str, str], timeout_s: float) -> dg.DagsterRun:
    """Wait for exactly one run of ``job`` with ``tags`` to finish; fail fast on failure."""

    def probe() -> dg.DagsterRun | None:
        runs = _runs(stack.instance, job, tags)
        assert len(runs) <= 1, f"{what}: more than one run requested: {[r.run_id for r in runs]}"
        if runs and runs[0].status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
            raise AssertionError(f"{what} {runs[0].status.value}: {_run_failure(stack, runs[0].run_id)}")
        return runs[0] if runs and runs[0].status == dg.DagsterRunStatus.SUCCESS else None

    try:
        return wait_for(what, probe, timeout_s, interval_s=3)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- dagster dev log ---\n{stack.server.log_tail()}") from None


def test_dataset_dropped_into_the_folder_is_ingested_and_triggers_retraining(stack: Stack) -> None:
    from mlflow import MlflowClient

    from zk0_pipelines.tracking.mlflow_store import default_tracking_uri

    instance = stack.instance
    assert DROPPED_ID not in instance.get_dynamic_partitions("so100_datasets")
    # Trained already on the registry's datasets: turning the trigger on must not retrain that same set.
    _turn_sensor_on_in_ui(stack, "validated_datasets_changed")
    _drop_dataset(stack.project)

    wait_for(
        f"partition {DROPPED_ID}",
        lambda: DROPPED_ID in instance.get_dynamic_partitions("so100_datasets"),
        timeout_s=120,
    )
    ingest = _finished(
        stack,
        f"ingest run of {DROPPED_ID}",
        "ingest_datasets",
        {"dagster/partition": DROPPED_ID, "dagster/sensor_name": "new_so100_datasets"},
        timeout_s=INGEST_TIMEOUT_S,
    )
    (record,) = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("validated_dataset"), asset_partitions=[DROPPED_ID]),
        limit=1,
    ).records
    assert record.run_id == ingest.run_id
    assert record.asset_materialization.metadata["status"].value == "validated"

    training = _finished(
        stack,
        "federated_training run requested by validated_datasets_changed",
        "federated_training",
        {"dagster/sensor_name": "validated_datasets_changed"},
        timeout_s=RUN_TIMEOUT_S + 60,
    )
    assert training.tags["zk0/trigger"] == "validated_datasets_changed"
    assert _run_status_in_ui(stack, training.run_id, 60) == "Success"

    registered = instance.get_latest_materialization_event(dg.AssetKey("registered_model"))
    assert registered is not None and registered.run_id == training.run_id
    metadata = registered.asset_materialization.metadata
    client = MlflowClient(default_tracking_uri())
    version = client.get_model_version(metadata["model_name"].value, str(metadata["version"].value))
    assert set(version.tags["datasets.train"].split(",")) == {*TRAIN_IDS, DROPPED_ID}
    assert version.tags["datasets.eval"] == EVAL_ID
    assert version.tags[f"revision.{DROPPED_ID}"]
    # One training run per validated set: the Launchpad's and this one, nothing else.
    assert len(_runs(instance, "federated_training", {})) == 2
