"""Model card and Hub release: dry runs offline, and a real push to a tiny fake Hub on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from _fixtures_tracking import FAKE_TOKEN, fake_checkpoint, read_tree
from huggingface_hub import ModelCard

from zk0_pipelines.tracking.hub_release import HubReleaseError, build_model_card, release_folder

ROWS = [
    {"round": 1, "train_loss": 1.5, "eval_loss": 1.75},
    {"round": 2, "train_loss": 0.75, "eval_loss": 1.125},
]
DATASETS = [
    {"id": "client_a", "repo_id": "lerobot/svla_so100_pickplace", "revision": "a" * 40, "role": "train"},
    {"id": "client_b", "source": "synthetic", "role": "train"},
    ("lerobot/svla_so100_stacking", "b" * 40),
]


def _card(**overrides) -> str:
    kwargs = dict(
        model_name="zk0-smolvla",
        repo_id="me/zk0-smolvla",
        metrics_table=ROWS,
        rounds=2,
        clients=["client_a", "client_b"],
        datasets=DATASETS,
        dvc_md5="0123abcd.dir",
        loss_plot="loss.png",
        lineage={
            "git_commit": "f" * 40,
            "config_hash": "c" * 64,
            "hf_token": FAKE_TOKEN,
            "libraries": {"lerobot": "0.6.1"},
        },
    )
    kwargs.update(overrides)
    return build_model_card(**kwargs)


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_header_and_body() -> None:
    card = _card()
    meta = _front_matter(card)
    assert meta["library_name"] == "lerobot" and meta["pipeline_tag"] == "robotics"
    assert meta["license"] == "apache-2.0"
    assert meta["tags"] == ["lerobot", "smolvla", "so100", "federated-learning", "flower"]
    assert meta["datasets"] == ["lerobot/svla_so100_pickplace", "lerobot/svla_so100_stacking"]
    assert ModelCard(card).data.to_dict() == meta  # the Hub reads the same metadata
    body = card.split("---\n", 2)[2]
    table = re.sub(r" +", " ", body)  # tabulate pads the columns
    assert "| round | train_loss | eval_loss |" in table and "| 2 | 0.75 | 1.125 |" in table
    assert "Rounds: 2" in body and "Clients: 2 (client_a, client_b)" in body
    assert "0123abcd.dir" in body and "a" * 40 in body and "b" * 40 in body and "f" * 40 in body
    assert "![Loss per round](loss.png)" in body and "lerobot=0.6.1" in body
    assert FAKE_TOKEN not in card and "withheld" in card


def test_model_card_rejects_unnamed_dataset() -> None:
    with pytest.raises(ValueError, match=r"datasets\[0\]"):
        _card(datasets=[{"revision": "x"}])
    assert "![" not in _card(loss_plot=None) and "datasets" not in _front_matter(_card(datasets=[]))


def test_release_is_a_dry_run_without_token_or_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = fake_checkpoint(tmp_path / "release")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "x.pyc").write_bytes(b"0")
    result = release_folder(folder, "me/zk0-smolvla", None, "v1")
    assert result["dry_run"] is True and result["reason"] == "no token"
    assert result["files"] == ["README.md", "config.json", "model.safetensors"]

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = release_folder(folder, "me/zk0-smolvla", FAKE_TOKEN, "v1")
    assert offline["dry_run"] is True and offline["reason"] == "HF_HUB_OFFLINE is set"
    assert FAKE_TOKEN not in json.dumps(offline)
    with pytest.raises(ValueError, match="needs both"):
        release_folder(folder, None, FAKE_TOKEN, "v1", dry_run=False)
    with pytest.raises(FileNotFoundError):
        release_folder(tmp_path / "missing", "me/x", None, None)


# ------------------------------------------------------------------------------------------------
# A fake Hub: just the endpoints create_repo / upload_folder (regular files) / create_tag call.
# ------------------------------------------------------------------------------------------------
@dataclass
class FakeHub:
    url: str
    token: str
    repos: set[str] = field(default_factory=set)
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    unauthorized: int = 0
    unknown: list[str] = field(default_factory=list)


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            hub.unknown.append(f"GET {self.path}")
            self._reply(404, {"error": "not implemented in the fake hub"})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Authorization") != f"Bearer {hub.token}":
                hub.unauthorized += 1
                return self._reply(401, {"error": "bad token"})
            path = self.path.split("?")[0]
            if path == "/api/repos/create":
                req = json.loads(raw)
                repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                if repo in hub.repos:
                    return self._reply(
                        409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"}
                    )
                hub.repos.add(repo)
                return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
            if path == "/api/validate-yaml":
                return self._reply(200, {"errors": [], "warnings": []})
            parts = path.split("/")  # ['', 'api', 'models', owner, name, action, revision]
            if len(parts) == 7 and parts[2] == "models":
                repo, action, rev = f"{parts[3]}/{parts[4]}", parts[5], parts[6]
                if repo not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                if action == "preupload":
                    files = json.loads(raw)["files"]
                    modes = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                    return self._reply(200, {"files": modes})
                if action == "commit":
                    stored = hub.files.setdefault(repo, {})
                    for line in raw.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            stored[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    oid = hashlib.sha1(repr(sorted(stored.items())).encode()).hexdigest()
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})
                if action == "tag":
                    hub.tags.setdefault(repo, {})[json.loads(raw)["tag"]] = rev
                    return self._reply(200, {})
            hub.unknown.append(f"POST {path}")
            return self._reply(404, {"error": "not implemented in the fake hub"})

    return Handler


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the conftest sets offline mode for real hubs
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    server = ThreadingHTTPServer(("127.0.0.1", 0), None)  # type: ignore[arg-type]
    hub = FakeHub(url=f"http://127.0.0.1:{server.server_address[1]}", token=FAKE_TOKEN)
    server.RequestHandlerClass = _handler(hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_release_pushes_folder_and_tags_commit(fake_hub: FakeHub, tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path / "release")
    (folder / "README.md").write_text(_card())
    result = release_folder(folder, "me/zk0-smolvla", FAKE_TOKEN, "v1", endpoint=fake_hub.url)
    assert fake_hub.unknown == [] and fake_hub.unauthorized == 0
    assert result["dry_run"] is False and result["repo_id"] == "me/zk0-smolvla"
    assert fake_hub.files["me/zk0-smolvla"] == read_tree(folder)
    assert fake_hub.tags["me/zk0-smolvla"] == {"v1": result["commit"]}
    assert FAKE_TOKEN not in json.dumps(result)

    # A second release to the now-existing repo (create_repo answers 409, exist_ok) works too.
    (folder / "config.json").write_text('{"type": "smolvla", "seed": 1}')
    again = release_folder(folder, "me/zk0-smolvla", FAKE_TOKEN, "v2", endpoint=fake_hub.url)
    assert again["commit"] != result["commit"]
    assert fake_hub.files["me/zk0-smolvla"]["config.json"] == b'{"type": "smolvla", "seed": 1}'


def test_release_error_never_shows_the_token(fake_hub: FakeHub, tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path / "release")
    wrong = FAKE_TOKEN[:-4] + "zzzz"
    with pytest.raises(HubReleaseError) as err:
        release_folder(folder, "me/zk0-smolvla", wrong, "v1", endpoint=fake_hub.url)
    assert fake_hub.unauthorized >= 1
    text = str(err.value) + repr(err.value) + str(err.value.__cause__) + str(err.value.__context__)
    assert wrong not in text and "me/zk0-smolvla" in text
    assert err.value.__cause__ is None
