"""What ``zk0 demo`` prints: a short progress view, while everything else goes to a log file.

``logs_to_file`` points this process's stdout and stderr (file descriptors 1 and 2, so Dagster's console
logger, Flower's streamed lines, tqdm bars and native libraries all follow) at a log file and hands back a
stream on the original terminal for the progress lines. ``RoundWatcher`` prints each federated round's
server evaluation as soon as the run's ``metrics.json`` records it. ``round_table`` formats the per-round
eval loss / action MSE table (``tabulate``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

ROUND_HEADERS = ("round", "eval loss", "action MSE")


@contextlib.contextmanager
def logs_to_file(path: Path) -> Iterator[IO[str]]:
    """Send fd 1 and 2 (and ``sys.stdout``/``sys.stderr``) to ``path`` (appended); yield the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    with open(path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()


def round_row(record: dict[str, Any]) -> tuple[int, float | None, float | None] | None:
    """``(round, eval loss, action MSE)`` of one ``metrics.json`` round record, None if not evaluated."""
    evaluation = record.get("server-eval") or {}
    if evaluation.get("eval-loss") is None:
        return None
    return int(record["round"]), evaluation.get("eval-loss"), evaluation.get("eval-action-mse")


def round_table(rows: list[tuple[int, float | None, float | None]]) -> str:
    """The per-round eval loss / action MSE table (plain text)."""
    from tabulate import tabulate

    return tabulate(rows, headers=ROUND_HEADERS, floatfmt=".4g", missingval="-")


class RoundWatcher:
    """Prints each new evaluated round of the federated run started after it (polls ``metrics.json``)."""

    def __init__(self, runs_dir: Path, emit: Callable[[str], None], interval_s: float = 1.0) -> None:
        self.runs_dir = Path(runs_dir)
        self.emit = emit
        self.interval_s = interval_s
        self.since = time.time()
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="zk0-round-watcher", daemon=True)

    def __enter__(self) -> RoundWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        """Emit the rounds recorded since the last poll (newest run folder only)."""
        runs = [p for p in self.runs_dir.glob("*/metrics.json") if p.stat().st_mtime >= self.since]
        if not runs:
            return
        try:
            data = json.loads(max(runs, key=lambda p: p.stat().st_mtime).read_text())
        except (OSError, ValueError):
            return  # being replaced; the next poll reads it
        total = (data.get("config") or {}).get("num-server-rounds", "?")
        for record in data.get("rounds", []):
            row = round_row(record)
            if row is None or row[0] in self.seen:
                continue
            self.seen.add(row[0])
            mse = "-" if row[2] is None else f"{row[2]:.4g}"
            self.emit(f"      round {row[0]}/{total}: eval loss {row[1]:.4g}, action MSE {mse}")
