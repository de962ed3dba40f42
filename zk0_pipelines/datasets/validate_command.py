"""``zk0 validate PATH [PATH…] [--json FILE] [--cameras MAP]``: the ingest's checks, for dataset owners.

Each folder is checked as the ingest checks it (:func:`~zk0_pipelines.datasets.check.check_dataset`: a
v2.1 folder is converted into a temporary folder first; the folder given is only read) and its table of
checks is printed. Exit status: 0 when every dataset passes, 1 when any fails, 2 on a usage error.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _usage(message: str, err: TextIO) -> int:
    print(f"zk0 validate: error: {message}", file=err)
    return EXIT_USAGE


def run_validate(
    paths: list[str],
    json_path: str | None = None,
    cameras: str | None = None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Check every folder in ``paths``; print a table per dataset; write all reports to ``json_path``."""
    from zk0_pipelines.datasets.cameras import parse_mapping

    out = out or sys.stdout
    err = err or sys.stderr
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")  # lerobot's converter bars: only on a terminal
    try:
        mapping = parse_mapping(cameras) if cameras is not None else None
    except ValueError as exc:
        return _usage(f"--cameras: {exc}", err)
    roots = [Path(p) for p in paths]
    not_folders = [str(p) for p in roots if not p.is_dir()]
    if not_folders:
        return _usage(f"not a dataset folder: {', '.join(not_folders)}", err)
    if json_path is not None and not Path(json_path).parent.is_dir():
        return _usage(f"--json: folder {Path(json_path).parent} does not exist", err)

    reports: list[dict[str, Any]] = []
    failed = 0
    for root in roots:
        data = _check_one(root, mapping, out)
        failed += not data["passed"]
        reports.append(data)
    print(f"{len(roots) - failed} of {len(roots)} dataset(s) passed", file=out)
    if json_path is not None:
        Path(json_path).write_text(json.dumps({"datasets": reports}, indent=2, default=str) + "\n")
    return EXIT_FAILED if failed else EXIT_OK


def _check_one(root: Path, mapping: dict[str, str] | None, out: TextIO) -> dict[str, Any]:
    from zk0_pipelines.datasets.check import check_dataset

    dataset_id = root.resolve().name
    try:
        with tempfile.TemporaryDirectory(prefix="zk0-validate-") as tmp:
            checked = check_dataset(root, dataset_id, convert_dir=Path(tmp) / "v30", cameras=mapping)
            data = checked.to_dict()
            data["root"] = str(root)
            print(checked.markdown(), file=out)
            return data
    except Exception as exc:  # noqa: BLE001 - a dataset owner gets a message, never a traceback
        message = f"{dataset_id}: could not be checked: {type(exc).__name__}: {exc}"
        print(f"### {dataset_id}: FAILED\n\n{message}\n", file=out)
        return {"dataset_id": dataset_id, "root": str(root), "passed": False, "error": message}
