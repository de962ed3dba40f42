"""Deployment mode: the Flower app on a TLS, node-authenticated SuperLink + one SuperNode per dataset.

Everything runs on 127.0.0.1 with free ports and throwaway certificates/keys (``deployment`` module):

- TLS is really on (plain HTTP is refused, the launch's CA is needed) and a SuperNode whose public key was
  not registered is refused: it exits with Flower's activation error and the SuperLink never lists it;
- the Dagster ``federated_model`` asset with ``federation: local-deployment`` trains the demo-size
  federation on 3 SuperNodes (each given only its own dataset), one of which is SIGKILLed (with its
  SuperExec and ClientApp) in round 2: the round completes with the quorum of 2 of 3, and
  ``server_evaluation`` + ``registered_model`` register the model in MLflow unchanged.
"""

from __future__ import annotations

import json
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import psutil
import pytest
from _fixtures_federated import make_datasets

from zk0_pipelines.federated import launch_records, launcher, superlink
from zk0_pipelines.federated.deployment import LocalDeployment
from zk0_pipelines.federated.pki import write_node_keys


def _missing_tools() -> list[str]:
    missing = []
    for name in ("flower-superlink", "flower-supernode", "flwr"):
        try:
            launch_records.tool_path(name)
        except FileNotFoundError:
            missing.append(name)
    return missing


_MISSING = _missing_tools()
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"Flower deployment executables not installed: {', '.join(_MISSING)}"
)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    base = tmp_path_factory.mktemp("federated-deployment")
    return make_datasets(base / "data", 3), make_datasets(base / "data", 1, prefix="eval", seed0=10)


def test_tls_is_on_and_an_unregistered_supernode_is_refused(
    datasets: tuple[list[Path], list[Path]], tmp_path: Path
) -> None:
    from zk0_pipelines.settings import configure_local_env

    configure_local_env()
    train, _ = datasets
    dep = LocalDeployment(tmp_path / "run", train[:1])
    try:
        dep.start()  # registers node-0's key and waits until its SuperNode is online
        (registered,) = dep.node_ids.values()
        cmd = psutil.Process(dep.superlink.pid).cmdline()
        assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
        conf = tomllib.loads((dep.flwr_home / "config.toml").read_text())["superlink"][superlink.CONNECTION]
        assert conf["root-certificates"] == str(dep.tls.ca_cert.resolve()) and "insecure" not in conf
        # TLS: plain HTTP gets no answer, HTTPS is trusted only with this launch's CA
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{dep.port}/health", timeout=5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(dep.health_url(), timeout=5)
        assert httpx.get(dep.health_url(), verify=dep.ssl_context(), timeout=5).is_success

        intruder = dep.start_supernode(train[0], write_node_keys(dep.keys_dir, "intruder"), max_wait_s=30)
        rc = intruder.proc.wait(timeout=120)
        intruder_log = dep.supernode_log(intruder)
        assert rc != 0, intruder_log
        assert "Failed to activate SuperNode" in intruder_log
        nodes = dep.list_nodes()
        assert [int(n["node-id"]) for n in nodes] == [registered]
        assert nodes[0]["status"] == "online"
        superlink_log = (dep.logs_dir / "superlink.out").read_text(errors="replace")
        assert "No SuperNode found with the given public key" in superlink_log
    finally:
        dep.stop()
        dep.cleanup()  # the launch's Flower home: certificates, keys, node configs
    assert not launch_records.launch_processes(dep.launch_id)
    assert not dep.flwr_home.exists()


class _KillSupernodeInRoundTwo(threading.Thread):
    """Watches the runs folder; once round 2 is sampled, SIGKILLs ``victim``'s SuperNode process tree.

    Also records every SuperNode's node-config file and command line (they live in the launch's Flower
    home, removed after a successful run), and bounds the run: after ``timeout_s`` it stops every process
    of the launch, which makes the asset fail.
    """

    def __init__(self, runs_dir: Path, victim: str, timeout_s: float) -> None:
        super().__init__(daemon=True)
        self.runs_dir, self.victim, self.timeout_s = runs_dir, victim, timeout_s
        self.stop_event = threading.Event()
        self.killed: list[int] = []
        self.node_configs: dict[str, dict[str, Any]] = {}
        self.cmdlines: dict[str, list[str]] = {}
        self.pids: dict[str, int] = {}
        self.error: str | None = None

    def _round_two_run(self) -> Path | None:
        for metrics in self.runs_dir.glob("*/metrics.json"):
            rounds = json.loads(metrics.read_text()).get("rounds", [])
            if any(r["round"] == 2 and "num-sampled" in r for r in rounds):
                return metrics.parent
        return None

    def _snapshot_nodes(self, launch_id: str, flwr_home: Path) -> None:
        for path in (flwr_home / "keys").glob("*.node-config.toml"):
            self.node_configs[path.name.split(".")[0]] = tomllib.loads(path.read_text())
        for proc in launch_records.launch_processes(launch_id):
            try:
                cmd = proc.cmdline()
            except psutil.Error:
                continue
            if any(part.endswith("flower-supernode") for part in cmd[:2]):
                name = Path(cmd[cmd.index("--auth-supernode-private-key") + 1]).name
                self.cmdlines[name], self.pids[name] = cmd, proc.pid

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            if self.killed or (run_dir := self._round_two_run()) is None:
                time.sleep(0.2)
                continue
            (record,) = (run_dir / "logs").glob("launch-*.json")
            info = json.loads(record.read_text())
            self._snapshot_nodes(info["launch-id"], Path(info["flwr-home"]))
            target = psutil.Process(self.pids[self.victim])
            tree = [target, *target.children(recursive=True)]
            for proc in tree:
                proc.kill()
            psutil.wait_procs(tree, timeout=10)
            self.killed = [p.pid for p in tree]
        if self.stop_event.is_set():
            if not self.killed:
                self.error = "the run ended before round 2 was sampled"
            return
        # the bound of the whole test: stop every process of the launch, so the asset fails now
        self.error = (
            f"the deployment run exceeded {self.timeout_s:.0f}s (killed SuperNode: {bool(self.killed)})"
        )
        for record in self.runs_dir.glob("*/logs/launch-*.json"):
            launch_records.kill_processes(
                launch_records.launch_processes(json.loads(record.read_text())["launch-id"])
            )


def _snapshot_asset(train: list[Path], evals: list[Path]) -> dg.AssetsDefinition:
    """A stand-in for ``dataset_snapshot`` (DVC is tested elsewhere): the datasets as validated."""
    datasets = [
        {"id": p.name, "role": role, "path": str(p), "resolved_revision": "synthetic:test", "source": {}}
        for role, paths in (("train", train), ("eval", evals))
        for p in paths
    ]

    @dg.asset(name="dataset_snapshot", group_name="training")
    def snapshot() -> dict[str, Any]:
        return {
            "dvc_md5": "d41d8cd98f00b204e9800998ecf8427e.dir",
            "data_fingerprint": "deployment-test",
            "changed": False,
            "datasets": datasets,
            "excluded": {},
        }

    return snapshot


def test_dagster_deployment_run_registers_a_model_and_tolerates_a_killed_supernode(
    datasets: tuple[list[Path], list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from zk0_pipelines.defs.release_assets import registered_model
    from zk0_pipelines.defs.resources import MlflowResource, PolicyResource
    from zk0_pipelines.defs.training_assets import federated_model, server_evaluation

    train, evals = datasets
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    monkeypatch.setenv("ZK0_ROOT", str(workspace))
    watcher = _KillSupernodeInRoundTwo(workspace / ".zk0" / "runs", "node-2", timeout_s=1200)
    watcher.start()
    config = {
        "num_server_rounds": 2,
        "local_steps": 1,
        "batch_size": 2,
        "chunk_size": 10,
        "min_available_clients": 3,
        "min_replies": 2,
        "federation": "local-deployment",
    }
    t0 = time.monotonic()
    try:
        result = dg.materialize(
            [_snapshot_asset(train, evals), federated_model, server_evaluation, registered_model],
            resources={"policy": PolicyResource(source="tiny"), "mlflow": MlflowResource()},
            run_config={"ops": {"federated_model": {"config": config}}},
            raise_on_error=False,
        )
    finally:
        watcher.stop_event.set()
        watcher.join(timeout=30)
    elapsed = time.monotonic() - t0
    assert watcher.error is None and watcher.killed, watcher.error
    assert result.success, [e.message for e in result.all_events if e.is_failure]

    # each SuperNode was given only its own dataset (and its own key)
    assert sorted(watcher.node_configs) == ["node-0", "node-1", "node-2"]
    for index, root in enumerate(train):
        node_config = watcher.node_configs[f"node-{index}"]
        assert node_config == {"dataset-path": str(root.resolve()), "partition-id": index}
        cmd = " ".join(watcher.cmdlines[f"node-{index}"])
        assert "--root-certificates" in cmd and "--insecure" not in cmd
        assert all(str(other) not in cmd for other in train if other != root)

    fm = result.output_for_node("federated_model")
    run_dir = Path(fm["run_dir"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    rounds = {r["round"]: r for r in metrics["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    assert rounds[1]["num-accepted"] == 3 and rounds[1]["dropped"] == []
    assert rounds[2]["num-accepted"] == 2
    # the SuperLink answers for the dead node (heartbeat missed); the strategy books it on that node
    (dropped,) = rounds[2]["dropped"]
    assert dropped["dataset"] == str(train[2].resolve()) and dropped["partition-id"] == 2
    assert "Node Unavailable" in dropped["reason"]
    trained = {(c["round"], c["partition-id"]) for c in metrics["clients"] if c.get("status") == "accepted"}
    assert trained == {(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)}
    assert all((run_dir / "logs" / f"supernode-node-{i}.out").stat().st_size > 0 for i in range(3))

    evaluation = result.output_for_node("server_evaluation")
    assert evaluation["final_eval_loss"] == pytest.approx(rounds[2]["server-eval"]["eval-loss"])
    registered = result.output_for_node("registered_model")
    client = MlflowClient(MlflowResource().registry().tracking_uri)
    version = client.get_model_version(registered["model_name"], registered["version"])
    assert version.tags["dvc_md5"] == "d41d8cd98f00b204e9800998ecf8427e.dir"
    assert version.tags["datasets.train"] == "client-0,client-1,client-2"
    assert "challenger" in registered["aliases"]

    launch = json.loads(next((run_dir / "logs").glob("launch-*.json")).read_text())
    assert launch["status"] == "stopped"
    assert not launch_records.launch_processes(launch["launch-id"])
    assert not Path(launch["flwr-home"]).exists()  # certificates and keys removed after success
    print(f"deployment-mode Dagster run: {elapsed:.0f}s")


def test_an_unknown_federation_is_refused_before_anything_starts(
    datasets: tuple[list[Path], list[Path]], tmp_path: Path
) -> None:
    train, evals = datasets
    with pytest.raises(ValueError, match="federation must be one of simulation, local-deployment"):
        launcher.run_federated(train, evals, tmp_path / "run", {}, federation="remote")
    assert not (tmp_path / "run").exists()
