"""Hugging Face Hub release of a LeRobot policy folder, with a model card.

Without a token or repo id (or with ``HF_HUB_OFFLINE=1``) a release is a dry run that lists what would
be uploaded. The token is never logged, returned, or put in an exception message.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zk0_pipelines.markdown_tables import markdown_table
from zk0_pipelines.tracking.secrets import scrub, scrub_mapping

log = logging.getLogger(__name__)

CARD_TAGS = ("lerobot", "smolvla", "so100", "federated-learning", "flower")
#: the card: Hub metadata (``ModelCardData``, YAML front matter rendered by ``ModelCard``), then the body
CARD_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}"
IGNORE_PATTERNS = (".git/*", "*/.git/*", "__pycache__/*", "*/__pycache__/*", "*.pyc", ".cache/*")


class HubReleaseError(RuntimeError):
    """A Hub release failed; the message is scrubbed of the token."""


# ------------------------------------------------------------------------------------------------
# Model card
# ------------------------------------------------------------------------------------------------
def _dataset_rows(datasets: Sequence[Mapping[str, Any] | Sequence[str]]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for i, item in enumerate(datasets):
        if isinstance(item, Mapping):
            ident = item.get("repo_id") or item.get("id")
            if not ident:
                raise ValueError(f"datasets[{i}] has neither 'repo_id' nor 'id': {sorted(item)}")
            rows.append(
                {
                    "id": str(item.get("id") or ident),
                    "repo_id": str(item.get("repo_id") or ""),
                    "revision": str(item.get("revision") or "unpinned"),
                    "role": str(item.get("role") or ""),
                    "source": str(item.get("source") or item.get("kind") or ""),
                }
            )
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) >= 1:
            rows.append(
                {
                    "id": str(item[0]),
                    "repo_id": str(item[0]) if "/" in str(item[0]) else "",
                    "revision": str(item[1]) if len(item) > 1 and item[1] else "unpinned",
                    "role": "",
                    "source": "",
                }
            )
        else:
            raise ValueError(f"datasets[{i}] must be a mapping or (id, revision) pair, got {item!r}")
    return rows


def build_model_card(
    model_name: str,
    repo_id: str | None,
    metrics_table: Sequence[Mapping[str, Any]],
    rounds: int,
    clients: int | Sequence[str],
    datasets: Sequence[Mapping[str, Any] | Sequence[str]],
    dvc_md5: str | None,
    loss_plot: str | None = None,
    lineage: Mapping[str, Any] | None = None,
    *,
    strategy: str | None = None,
    base_model: str | None = None,
) -> str:
    """The README.md of a released policy: YAML front matter for the Hub, then a Markdown body.

    ``metrics_table``: rows such as ``{"round": 1, "train_loss": ..., "eval_loss": ...}``;
    ``clients``: a count or the client ids; ``datasets``: mappings with ``id``/``repo_id``, ``revision``
    (and optional ``role``) or ``(id, revision)`` pairs; ``loss_plot``: a file name inside the released
    folder; ``lineage``: extra provenance (git commit, config hash, library versions, MLflow run...).
    Entries of ``lineage`` whose key or value looks like a credential are left out.
    """
    from huggingface_hub import ModelCard, ModelCardData

    ds_rows = _dataset_rows(datasets)
    hub_datasets = sorted({r["repo_id"] for r in ds_rows if r["repo_id"] and "/" in r["repo_id"]})
    card_data = ModelCardData(
        library_name="lerobot",
        license="apache-2.0",
        pipeline_tag="robotics",
        tags=list(CARD_TAGS),
        datasets=hub_datasets or None,
        base_model=base_model or None,
    )

    client_ids = [str(c) for c in clients] if not isinstance(clients, int) else []
    n_clients = clients if isinstance(clients, int) else len(client_ids)
    title = repo_id or model_name
    body = [
        f"# {title}",
        "",
        f"SmolVLA policy for the SO-100 arm, fine-tuned with federated learning (Flower) over {n_clients} "
        f"client dataset(s) for {rounds} round(s). Model `{model_name}`"
        + (f", aggregation `{strategy}`." if strategy else "."),
        "",
        "Load it with LeRobot:",
        "",
        "```python",
        "from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy",
        "",
        f'policy = SmolVLAPolicy.from_pretrained("{repo_id or "<this folder>"}")',
        "```",
        "",
        "## Training",
        "",
        f"- Rounds: {rounds}",
        f"- Clients: {n_clients}" + (f" ({', '.join(client_ids)})" if client_ids else ""),
    ]
    if strategy:
        body.append(f"- Strategy: {strategy}")
    body += ["", "## Metrics", "", markdown_table(metrics_table, empty="_no metrics recorded_"), ""]
    if loss_plot:
        body += [f"![Loss per round]({loss_plot})", ""]
    body += ["## Datasets", "", markdown_table(ds_rows, empty="_no datasets recorded_"), ""]
    body += ["## Lineage", "", f"- DVC data snapshot (md5 of `data/`): `{dvc_md5 or 'unknown'}`"]
    kept, dropped = scrub_mapping(dict(lineage or {}))
    for key, value in kept.items():
        if isinstance(value, Mapping):
            inner = ", ".join(f"{k}={v}" for k, v in value.items())
            body.append(f"- {key}: {scrub(inner)}")
        else:
            body.append(f"- {key}: `{scrub(value)}`")
    if dropped:
        body.append(f"- ({len(dropped)} credential-like lineage entries withheld)")
    body.append("")
    return str(ModelCard.from_template(card_data, template_str=CARD_TEMPLATE, body="\n".join(body)))


# ------------------------------------------------------------------------------------------------
# Release
# ------------------------------------------------------------------------------------------------
def _ignored(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, pat) for pat in IGNORE_PATTERNS)


def list_release_files(folder: Path) -> list[str]:
    """Relative POSIX paths of the files a release of ``folder`` uploads (sorted)."""
    folder = Path(folder)
    return sorted(
        rel
        for rel in (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        if not _ignored(rel)
    )


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def release_folder(
    folder: Path,
    repo_id: str | None,
    token: str | None,
    tag: str | None,
    dry_run: bool | None = None,
    endpoint: str | None = None,
    *,
    private: bool | None = None,
    commit_message: str | None = None,
) -> dict[str, Any]:
    """Push ``folder`` to the Hub model repo ``repo_id`` and tag the commit.

    ``dry_run=None`` decides by itself: a dry run when the token or repo id is missing or the Hub is
    in offline mode. A dry run returns ``{"dry_run": True, "folder", "files", "repo_id", "reason"}``;
    a push returns ``{"dry_run": False, "repo_id", "commit", "commit_url", "tag", "files", "folder"}``.
    The token never appears in the result, the logs or an exception message.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"release folder {folder} does not exist")
    files = list_release_files(folder)
    if not files:
        raise ValueError(f"release folder {folder} is empty")
    if "README.md" not in files:
        log.warning("hub release: %s has no README.md model card", folder)

    reason = ""
    if dry_run is None:
        if not token:
            reason = "no token"
        elif not repo_id:
            reason = "no repo id"
        elif _offline() and endpoint is None:
            reason = "HF_HUB_OFFLINE is set"
        dry_run = bool(reason)
    elif dry_run:
        reason = "dry_run requested"
    elif not token or not repo_id:
        raise ValueError("release_folder(dry_run=False) needs both a repo_id and a token")

    if dry_run:
        log.info("hub release (dry run, %s): %d files from %s -> %s", reason, len(files), folder, repo_id)
        return {
            "dry_run": True,
            "reason": reason,
            "folder": str(folder),
            "files": files,
            "repo_id": repo_id,
            "tag": tag,
        }

    assert token and repo_id
    failure: str | None = None
    try:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=commit_message or (f"Release {tag}" if tag else "Release"),
            ignore_patterns=list(IGNORE_PATTERNS),
        )
        commit = getattr(info, "oid", None)
        if tag:
            api.create_tag(repo_id, tag=tag, revision=commit, repo_type="model", exist_ok=True)
    except Exception as exc:
        failure = scrub(f"{type(exc).__name__}: {exc}", extra=[token])
    if failure is not None:
        # Raised outside the except block: no chained exception (which may carry request headers).
        raise HubReleaseError(f"Hub release of {folder} to {repo_id} failed: {failure}")
    result = {
        "dry_run": False,
        "folder": str(folder),
        "files": files,
        "repo_id": repo_id,
        "commit": commit,
        "commit_url": scrub(str(getattr(info, "commit_url", "")), extra=[token]),
        "tag": tag,
    }
    log.info("hub release: %s@%s (%d files, tag %s)", repo_id, commit, len(files), tag)
    return result
