"""Run the federated app on Flower's deployment runtime: a SuperLink and one SuperNode per client dataset.

``LocalDeployment`` is the deployment counterpart of ``superlink.SimulationSuperLink``: a
``superlink.TlsSuperLink`` (same launch record, process tracking, stale-launch reaping and ``flwr run``
streaming) plus SuperNodes. It starts, all on 127.0.0.1:

1. a throwaway TLS certificate authority and a server certificate for ``127.0.0.1``/``localhost``
   (``pki.write_tls_files``) and one ECDSA P-384 key pair per SuperNode (``pki.write_node_keys``, OpenSSH
   format, what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read);
2. ``flower-superlink`` with TLS (``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``) and SuperNode
   authentication (``--enable-supernode-auth``): only nodes whose public key was registered through the
   Control API may connect; ``--insecure`` is never passed;
3. the registration of every allowed node's public key (``flwr supernode register <key> <connection>``,
   the flwr CLI talking TLS to the Control API with the CA as ``root-certificates``);
4. one ``flower-supernode`` per training dataset, each given only its own dataset through its node
   config (``dataset-path``, plus ``partition-id`` = the dataset's index so per-client records sort as
   in simulation), its private key and the CA to verify the SuperLink;
5. the app, submitted with ``flwr run <app> <connection> --stream`` once every node is online.

Everything the server writes lands in the run folder exactly as in simulation (``metrics.json``,
checkpoints, ``final/``), so the Dagster assets downstream of ``federated_model`` work unchanged. Each
SuperNode's log is ``<run_dir>/logs/supernode-<name>.out``. The certificates and keys live in the
launch's own Flower home, removed after a successful run.

For machines of their own, a coordinator and the dataset owners run the same commands by hand (README,
"Federate across machines"); ``python -m zk0_pipelines.federated.deployment tls|node-key`` writes the
certificate and key files for them.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from zk0_pipelines.federated.app_folder import write_app
from zk0_pipelines.federated.launch_records import FederatedRunError, free_port, stop_tree, tool_path
from zk0_pipelines.federated.pki import DEFAULT_TLS_HOSTS, NodeKeys, write_node_keys, write_tls_files
from zk0_pipelines.federated.superlink import CONNECTION, STOP_GRACE_S, TlsSuperLink

log = logging.getLogger(__name__)


@dataclass
class SuperNodeProcess:
    """A started ``flower-supernode``: its dataset, key, log and process."""

    name: str
    dataset: Path
    keys: NodeKeys
    log_path: Path
    proc: subprocess.Popen
    partition_id: int = -1


def node_config_toml(dataset: Path, partition_id: int | None = None) -> str:
    """The SuperNode's node config file: its own dataset folder (and optionally its partition id)."""
    values: dict[str, str | int] = {"dataset-path": str(Path(dataset).resolve())}
    if partition_id is not None:
        values["partition-id"] = int(partition_id)
    return tomli_w.dumps(values)


def _json_tail(out: str) -> Any:
    """The JSON document at the end of a flwr CLI output (the CLI may print a banner first)."""
    return json.loads(out[out.index("{") :])


class LocalDeployment(TlsSuperLink):
    """A TLS + node-authenticated SuperLink and one SuperNode per dataset on 127.0.0.1 (module doc).

    ``start()`` brings up the SuperLink, registers the nodes' keys and starts the SuperNodes; ``run_app``
    submits the app; ``stop()`` stops the SuperNodes (SIGTERM, so they deactivate), then the SuperLink and
    anything left of the launch.
    """

    def __init__(
        self,
        run_dir: Path,
        train_roots: Sequence[Path] = (),
        *,
        startup_timeout_s: float = 60.0,
        nodes_timeout_s: float = 120.0,
        torch_threads: int = 1,
        tls_hosts: Sequence[str] = DEFAULT_TLS_HOSTS,
    ) -> None:
        super().__init__(
            run_dir, startup_timeout_s=startup_timeout_s, torch_threads=torch_threads, tls_hosts=tls_hosts
        )
        self.train_roots = [Path(p).resolve() for p in train_roots]
        self.nodes_timeout_s = nodes_timeout_s
        self.keys_dir = self.flwr_home / "keys"
        self.supernodes: list[SuperNodeProcess] = []
        self.node_ids: dict[str, int] = {}

    def start(self) -> None:
        """SuperLink (TLS + node auth), then register and start one SuperNode per training dataset."""
        self.start_superlink()
        keys = [write_node_keys(self.keys_dir, f"node-{i}") for i in range(len(self.train_roots))]
        # one `flwr supernode register` process per node, all at once (each is mostly interpreter start-up)
        with ThreadPoolExecutor(max_workers=max(1, len(keys))) as pool:
            node_ids = list(pool.map(self.register_node, keys))
        for index, (root, key, node_id) in enumerate(zip(self.train_roots, keys, node_ids, strict=True)):
            self.node_ids[key.name] = node_id
            self.start_supernode(root, key, partition_id=index)
        if self.train_roots:
            self.wait_nodes_online(list(self.node_ids.values()), self.nodes_timeout_s)

    def start_superlink(self) -> None:
        """Start ``flower-superlink`` with TLS and SuperNode authentication; wait for its health check."""
        super().start()

    # -- nodes -------------------------------------------------------------------------------------------
    def register_node(self, keys: NodeKeys) -> int:
        """Register ``keys``' public key with the SuperLink (Control API); returns the new node id."""
        out = self._cli(
            "supernode", "register", str(keys.public_key), CONNECTION, "--name", keys.name, "--format", "json"
        )
        node_id = int(_json_tail(out)["node-id"])
        log.info("registered SuperNode %s as node %d", keys.name, node_id)
        return node_id

    def list_nodes(self) -> list[dict[str, Any]]:
        """The SuperLink's nodes as ``flwr supernode list --format json`` reports them."""
        out = self._cli("supernode", "list", CONNECTION, "--format", "json")
        return list(_json_tail(out).get("nodes", []))

    def wait_nodes_online(self, node_ids: list[int], timeout_s: float) -> None:
        """Wait until every node in ``node_ids`` is ``online``; ``FederatedRunError`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        wanted = {int(n) for n in node_ids}
        while True:
            online = {int(n["node-id"]) for n in self.list_nodes() if n.get("status") == "online"}
            if wanted <= online:
                return
            dead = [s.name for s in self.supernodes if s.proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"SuperNode(s) {dead} exited" if dead else f"not all online after {timeout_s:.0f}s"
                tails = "\n".join(f"--- {s.name}:\n{self.supernode_log(s)[-1500:]}" for s in self.supernodes)
                raise FederatedRunError(f"{why} (online: {sorted(online)}, wanted {sorted(wanted)})\n{tails}")
            time.sleep(0.5)

    def start_supernode(
        self, dataset: Path, keys: NodeKeys, *, partition_id: int | None = None, max_wait_s: float = 120.0
    ) -> SuperNodeProcess:
        """Start a ``flower-supernode`` for ``dataset`` authenticating with ``keys`` (TLS, CA-verified).

        Its node config (a TOML file next to its key) names only its own dataset. It gives up
        reconnecting to the SuperLink after ``max_wait_s``.
        """
        if self.tls is None or self.port is None:
            raise FederatedRunError("start the SuperLink before its SuperNodes")
        node_config = self.keys_dir / f"{keys.name}.node-config.toml"
        node_config.write_text(node_config_toml(dataset, partition_id))
        log_path = self.logs_dir / f"supernode-{keys.name}.out"
        cmd = [
            tool_path("flower-supernode"),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--root-certificates",
            str(self.tls.ca_cert),
            "--auth-supernode-private-key",
            str(keys.private_key),
            "--node-config",
            str(node_config),
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--max-wait-time",
            str(max_wait_s),
        ]
        proc = self._popen(cmd, log_path)
        node = SuperNodeProcess(
            keys.name, Path(dataset), keys, log_path, proc, -1 if partition_id is None else partition_id
        )
        self.supernodes.append(node)
        log.info("SuperNode %s pid %d for %s", keys.name, proc.pid, dataset)
        return node

    @staticmethod
    def supernode_log(node: SuperNodeProcess) -> str:
        """The SuperNode's output so far."""
        return node.log_path.read_text(errors="replace") if node.log_path.is_file() else ""

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the SuperNodes (they deactivate), then stop the SuperLink and the rest of the launch."""
        for node in self.supernodes:
            stop_tree(node.proc, grace_s=min(grace_s, 10.0))
        super().stop(grace_s)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zk0_pipelines.federated.deployment",
        description="Write the TLS, SuperNode key and app files of a Flower deployment (README).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tls = sub.add_parser(
        "tls", help="a new CA + SuperLink server certificate (ca.crt, server.pem, server.key)"
    )
    tls.add_argument("folder", type=Path)
    tls.add_argument(
        "--host", action="append", help="IP or DNS name the SuperLink is reached at (repeatable)"
    )
    tls.add_argument("--days", type=int, default=365)
    key = sub.add_parser("node-key", help="a SuperNode key pair <name> + <name>.pub (ECDSA P-384, OpenSSH)")
    key.add_argument("folder", type=Path)
    key.add_argument("name")
    app = sub.add_parser("app", help="the Flower app folder to submit with `flwr run <folder> <connection>`")
    app.add_argument("folder", type=Path)
    app.add_argument("--config", default="{}", help="run config as JSON, e.g. '{\"num-server-rounds\": 5}'")
    args = parser.parse_args(argv)
    if args.command == "tls":
        # the SuperLink's own SuperExec reaches it on loopback: 127.0.0.1/localhost are always named
        hosts = list(dict.fromkeys([*(args.host or []), *DEFAULT_TLS_HOSTS]))
        files = write_tls_files(args.folder, hosts, days=args.days)
        print(f"CA certificate (give it to every SuperNode): {files.ca_cert}")
        print(f"SuperLink certificate / key: {files.server_cert} / {files.server_key}")
    elif args.command == "app":
        path = write_app(args.folder, json.loads(args.config))
        print(f"app (submit with `flwr run {args.folder} <connection> --stream`): {path}")
    else:
        keys = write_node_keys(args.folder, args.name)
        print(f"private key (stays on this machine): {keys.private_key}")
        print(f"public key (send it to the coordinator): {keys.public_key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
