"""Symbolic links inside a dataset folder: which ones can be followed safely, which ones cannot.

A file link is resolved (its content is what counts), wherever it points, as long as it resolves: the
Hugging Face cache lays out snapshots as links into its blob store. A link is unsafe when it

- does not resolve: broken (its target is missing) or a loop (it leads back to itself);
- is a folder link that points outside the dataset (copying it could pull in any tree);
- is a folder link that leads back into a folder it sits in (following it never ends).

The ingest refuses a dataset with an unsafe link; the validator reports each one, naming the link.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class UnsafeLink:
    """One link that cannot be followed safely: where it is, what it says, and why it is unsafe."""

    rel: str
    target: str
    reason: str

    def message(self) -> str:
        """``<rel>: symlink to '<target>' <reason>`` (the form the fetch error and the checks use)."""
        return f"{self.rel}: symlink to {self.target!r} {self.reason}"


def _read_link(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _unresolvable(path: Path) -> str | None:
    """Why ``path`` (a link) does not resolve, or None when it does."""
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python 3.12: "Symlink loop from ..."
        return "is a loop (it leads back to itself)"
    except FileNotFoundError:
        return "is broken (its target does not exist)"
    except OSError as exc:  # ELOOP on newer Pythons, permission errors
        if exc.errno == 40:
            return "is a loop (it leads back to itself)"
        return f"cannot be resolved ({exc.strerror or exc})"
    return None


def find_unsafe_links(root: Path) -> list[UnsafeLink]:
    """Every unsafe link under ``root`` (sorted by path), following the safe folder links once."""
    root = Path(root)
    root_real = root.resolve()
    found: list[UnsafeLink] = []

    def walk(folder: Path, rel: str, chain: frozenset[Path]) -> None:
        try:
            children = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return  # unreadable folders are the validator's business, not a link problem
        for child in children:
            child_rel = f"{rel}{child.name}"
            path = Path(child.path)
            if not child.is_symlink():
                if child.is_dir(follow_symlinks=False):
                    walk(path, child_rel + "/", chain | {path.resolve()})
                continue
            target = _read_link(path)
            reason = _unresolvable(path)
            if reason is None and path.is_dir():
                real = path.resolve()
                if real in chain:
                    reason = "is a loop (it leads back to a folder that contains it)"
                elif not real.is_relative_to(root_real):
                    reason = "points to a folder outside the dataset"
                else:
                    walk(real, child_rel + "/", chain | {real})
            if reason is not None:
                found.append(UnsafeLink(child_rel, target, reason))

    walk(root, "", frozenset({root_real}))
    return sorted(found, key=lambda link: link.rel)
