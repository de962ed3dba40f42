"""``zk0 demo``'s short progress view: output to a log file, the round table, rounds shown as recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from zk0_pipelines.demo_console import RoundWatcher, round_table


def test_process_and_native_output_go_to_the_log_and_progress_to_the_terminal(tmp_path: Path) -> None:
    log_path = tmp_path / "logs" / "demo.log"
    script = (
        "import os, sys, logging\n"
        "from pathlib import Path\n"
        "from zk0_pipelines.demo_console import logs_to_file\n"
        f"with logs_to_file(Path({str(log_path)!r})) as terminal:\n"
        "    logging.basicConfig(level=logging.DEBUG)\n"
        "    logging.getLogger('dagster').debug('DEBUG noise')\n"
        "    print('print noise')\n"
        "    os.write(2, b'native noise\\n')\n"
        "    print('[1/3] progress', file=terminal)\n"
        "print('after')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[1/3] progress", "after"]
    assert out.stderr == ""
    logged = log_path.read_text()
    assert all(n in logged for n in ("DEBUG noise", "print noise", "native noise"))
    assert "progress" not in logged


def test_round_table_and_watcher_show_each_evaluated_round_once(tmp_path: Path) -> None:
    table = round_table([(0, 4.5, 769.2), (1, 4.25, None)])
    assert table.splitlines()[0].split() == ["round", "eval", "loss", "action", "MSE"]
    assert "769.2" in table and table.splitlines()[-1].rstrip().endswith("-")

    lines: list[str] = []
    watcher = RoundWatcher(tmp_path, lines.append, interval_s=3600)
    metrics = tmp_path / "run-a" / "metrics.json"
    metrics.parent.mkdir()

    def record(rounds: list[dict]) -> None:
        metrics.write_text(json.dumps({"config": {"num-server-rounds": 2}, "rounds": rounds}))
        os.utime(metrics, (watcher.since + 1, watcher.since + 1))

    r0 = {"round": 0, "server-eval": {"eval-loss": 4.5, "eval-action-mse": 769.2}}
    record([r0])
    watcher.poll()
    record([r0, {"round": 1, "server-eval": None}, {"round": 2, "server-eval": {"eval-loss": 4.25}}])
    watcher.poll()
    watcher.poll()
    assert lines == [
        "      round 0/2: eval loss 4.5, action MSE 769.2",
        "      round 2/2: eval loss 4.25, action MSE -",
    ]
