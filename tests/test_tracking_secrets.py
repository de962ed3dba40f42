"""Credential detection and scrubbing shared by the DVC, MLflow and Hub code."""

from __future__ import annotations

import pytest
from _fixtures_tracking import FAKE_PASSWORD, FAKE_TOKEN

from zk0_pipelines.tracking.secrets import (
    is_secret_key,
    looks_like_secret_value,
    scrub,
    scrub_mapping,
    secret_values,
)


@pytest.mark.parametrize(
    "key", ["HF_TOKEN", "hub.api_token", "db_password", "client_secret", "AWS_SECRET_ACCESS_KEY", "api-key"]
)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["lr", "tokenizer", "policy.tokenizer_max_length", "author", "num_steps"])
def test_plain_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_env_values_are_scrubbed_but_not_paths_of_auth_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("MY_SERVICE_PASSWORD", FAKE_PASSWORD)
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/ssh-agent.sock")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false-ish")
    values = secret_values()
    assert FAKE_TOKEN in values and FAKE_PASSWORD in values
    assert "/tmp/ssh-agent.sock" not in values and "false-ish" not in values
    text = f"push {FAKE_TOKEN} to https://me:{FAKE_PASSWORD}@host/x with key=abcd"
    out = scrub(text)
    assert FAKE_TOKEN not in out and FAKE_PASSWORD not in out and "https://***@host/x" in out
    assert out.endswith("with key=abcd")


def test_token_shapes_and_extra_values_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert looks_like_secret_value(f"x {FAKE_TOKEN} y")  # an hf_ token, even when not in the env
    assert looks_like_secret_value("http://u:p@h/")
    assert not looks_like_secret_value("ssh://git@github.com/x")
    assert looks_like_secret_value("uses custom-credential-123", extra=["custom-credential-123"])
    assert scrub("uses custom-credential-123", extra=["custom-credential-123"]) == "uses ***"
    kept, dropped = scrub_mapping({"a": 1, "token": "x", "b": f"{FAKE_TOKEN}"})
    assert kept == {"a": 1} and dropped == ["b", "token"]
