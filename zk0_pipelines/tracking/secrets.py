"""Keep credentials out of logs, tracking stores, model cards and error messages.

Two rules are applied everywhere the tracking layer writes something:

- a *key* that names a credential (``HF_TOKEN``, ``*token*``, ``*password*``, ``*secret*``, ...) is
  never logged, whatever its value;
- a *value* that is (or contains) a live credential is never logged: the values of the credential
  variables in the process environment, Hugging Face style tokens (``hf_...``) and the user-info part
  of URLs (``https://user:pass@host``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

REDACTED = "***"

# Keys (param names, tag names, env names) that name a credential.
_SECRET_KEY_RE = re.compile(
    r"(token|passw(or)?d|secret|api[_-]?key|access[_-]?key|private[_-]?key|credential|auth)",
    re.IGNORECASE,
)
# Keys that match the pattern above but are known not to hold credentials.
_NOT_SECRET_KEYS = frozenset(
    {
        "tokenizers_parallelism",
        "tokenizer",
        "tokenizer_name",
        "max_tokens",
        "tokenizer_max_length",
        "author",
        "authors",
    }
)
# Environment variables always treated as credentials.
SECRET_ENV_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HUGGINGFACE_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GITHUB_TOKEN",
)
# Environment variables whose *value* is scrubbed: a tighter rule than for keys, so that e.g.
# XAUTHORITY or SSH_AUTH_SOCK (paths) are not treated as credentials.
_SECRET_ENV_RE = re.compile(r"(TOKEN|PASSWORD|PASSWD|SECRET|API_KEY|ACCESS_KEY|PRIVATE_KEY)", re.IGNORECASE)
_NOT_SECRET_ENV_RE = re.compile(r"(TOKENIZERS|_(SOCK|FILE|PATH|DIR|URL|ENDPOINT|HOME)$)", re.IGNORECASE)
_MIN_SECRET_LEN = 6
_HF_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")
_URL_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s:]+(:[^/@\s]*)?)@")


def is_secret_key(key: str) -> bool:
    """True when ``key`` names a credential (``HF_TOKEN``, ``db_password``, ``client_secret``...)."""
    normalized = str(key).strip().lower()
    leaf = re.split(r"[./]", normalized)[-1]
    if normalized in _NOT_SECRET_KEYS or leaf in _NOT_SECRET_KEYS:
        return False
    return bool(_SECRET_KEY_RE.search(normalized))


def secret_values(extra: Iterable[str | None] = ()) -> list[str]:
    """Credential values currently in the environment (plus ``extra``), longest first.

    Values shorter than a few characters are ignored: scrubbing ``"1"`` everywhere would mangle text
    without protecting anything.
    """
    found: set[str] = set()
    for name, value in os.environ.items():
        named = name in SECRET_ENV_VARS or (
            _SECRET_ENV_RE.search(name) and not _NOT_SECRET_ENV_RE.search(name)
        )
        if named and value and len(value) >= _MIN_SECRET_LEN:
            found.add(value)
    for value in extra:
        if value and len(value) >= _MIN_SECRET_LEN:
            found.add(value)
    return sorted(found, key=len, reverse=True)


def looks_like_secret_value(value: object, extra: Iterable[str | None] = ()) -> bool:
    """True when ``value`` is or contains a credential (env secret value, ``hf_`` token, URL password)."""
    text = str(value)
    if _HF_TOKEN_RE.search(text):
        return True
    if any(m.group("userinfo") and ":" in m.group("userinfo") for m in _URL_USERINFO_RE.finditer(text)):
        return True
    return any(secret in text for secret in secret_values(extra))


def scrub(text: object, extra: Iterable[str | None] = ()) -> str:
    """Return ``text`` with every credential value replaced by ``***``."""
    out = str(text)
    for secret in secret_values(extra):
        out = out.replace(secret, REDACTED)
    out = _HF_TOKEN_RE.sub(REDACTED, out)
    return _URL_USERINFO_RE.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", out)


def scrub_mapping(
    data: dict[str, object], extra: Iterable[str | None] = ()
) -> tuple[dict[str, object], list[str]]:
    """Drop entries whose key names a credential or whose value carries one.

    Returns the kept entries and the (sorted) list of dropped keys, so callers can record *that*
    something was withheld without recording *what*.
    """
    extra = list(extra)
    kept: dict[str, object] = {}
    dropped: list[str] = []
    for key, value in data.items():
        if is_secret_key(key) or looks_like_secret_value(value, extra):
            dropped.append(str(key))
        else:
            kept[key] = value
    return kept, sorted(dropped)
