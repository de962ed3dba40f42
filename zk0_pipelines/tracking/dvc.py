"""DVC snapshots of the validated-data folder, driven through the DVC command line.

DVC lives in its own tool environment (``.tools/dvc``): its hydra/omegaconf pins break Dagster, so
it is never imported here, only run as a subprocess.

How ``dvc init`` is chosen (DVC refuses a plain init outside a Git work tree):

- ``root`` is the top of a Git work tree            → ``dvc init``
- ``root`` is inside a Git work tree, not ignored   → ``dvc init --subdir``
- anything else (no Git, or a folder Git ignores,   → ``dvc init --no-scm``
  e.g. a pytest tmp dir under ``.zk0/``)

The default remote is ``<root>/.zk0/dvc-remote``; it is written to ``.dvc/config`` relative to
``.dvc/`` (``../.zk0/dvc-remote``), so the committed config works in any clone.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from zk0_pipelines import env_settings
from zk0_pipelines.settings import repo_root
from zk0_pipelines.tracking.secrets import scrub

log = logging.getLogger(__name__)

DEFAULT_REMOTE_NAME = "local"
DEFAULT_REMOTE_DIR = Path(".zk0") / "dvc-remote"
_PUSHED_MARKER_DIR = Path("tmp") / "zk0-pushed"  # under .dvc/, which DVC already gitignores


class DvcError(RuntimeError):
    """A DVC command failed; the message names the command, its exit code and (scrubbed) stderr."""

    def __init__(self, args: list[str], returncode: int, stderr: str, cwd: Path):
        self.args_list = [scrub(a) for a in args]
        self.returncode = returncode
        self.stderr = scrub(stderr).strip()
        self.cwd = cwd
        super().__init__(
            f"`{shlex.join(self.args_list)}` failed with exit code {returncode} in {cwd}:\n{self.stderr}"
        )


def dvc_executable() -> str:
    """The DVC command: env ``ZK0_DVC``, else ``<repo_root>/.tools/dvc/bin/dvc``, else ``dvc`` on PATH."""
    env = env_settings.DVC.raw()
    if env:
        return env
    candidates = [repo_root() / ".tools" / "dvc" / "bin" / "dvc"]
    # A reproduction workspace (ZK0_ROOT elsewhere) still finds the checkout's tool environment.
    candidates.append(Path(__file__).resolve().parents[2] / ".tools" / "dvc" / "bin" / "dvc")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("dvc")
    if found:
        return found
    raise FileNotFoundError(
        "DVC not found: set ZK0_DVC, or create the tool environment .tools/dvc "
        "(see tools/dvc-requirements.lock), or put `dvc` on PATH"
    )


@dataclass
class Snapshot:
    """The state of a DVC-tracked folder after ``snapshot``."""

    md5: str
    nfiles: int
    size: int
    changed: bool
    dvc_file: Path

    def to_dict(self) -> dict:
        """JSON-friendly form (for Dagster metadata / MLflow tags)."""
        return {
            "md5": self.md5,
            "nfiles": self.nfiles,
            "size": self.size,
            "changed": self.changed,
            "dvc_file": str(self.dvc_file),
        }


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("DO_NOT_TRACK", "1")
    # Keep DVC from asking questions or paging output.
    env["DVC_NO_PAGER"] = "1"
    env.setdefault("GIT_TERMINAL_PROMPT", "0")
    return env


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=False, timeout=60
    )


def _scm_mode(root: Path) -> str:
    """``"git"``, ``"subdir"`` or ``"no-scm"``: how ``dvc init`` must be called for ``root``."""
    if shutil.which("git") is None:
        return "no-scm"
    top = _git(root, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        return "no-scm"
    if Path(top.stdout.strip()).resolve() == root.resolve():
        return "git"
    if _git(root, "check-ignore", "-q", str(root)).returncode == 0:
        return "no-scm"  # an ignored folder inside a repo: Git cannot track its .dvc files
    return "subdir"


def _config_value(config_text: str, section: str, key: str) -> str | None:
    """``[section] key`` from the text of a DVC config file (read without running DVC).

    Section headers look like ``[core]`` or ``['remote "local"']``.
    """
    current = None
    for raw in config_text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]").strip("'").replace('"', "").strip()
            continue
        if current == section:
            name, _, value = line.partition("=")
            if name.strip() == key and value.strip():
                return value.strip().strip("'\"")
    return None


def _core_remote(config_text: str) -> str | None:
    """``core.remote`` (the default remote's name) from a DVC config file's text."""
    return _config_value(config_text, "core", "remote")


def _read_dvc_file(path: Path) -> dict:
    try:
        doc = yaml.safe_load(path.read_text())
        out = doc["outs"][0]
        md5 = out.get("md5") or out.get("hash")
        if not isinstance(md5, str):
            raise KeyError("md5")
        return {"md5": md5, "nfiles": int(out.get("nfiles", 1)), "size": int(out.get("size", 0))}
    except FileNotFoundError:
        raise
    except (yaml.YAMLError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a DVC file with outs[0].md5 ({exc!r})") from exc


class DvcRepo:
    """A DVC project rooted at ``root`` (usually the checkout itself)."""

    def __init__(self, root: Path, *, timeout_s: float = 3600.0):
        self.root = Path(root).resolve()
        self.timeout_s = timeout_s

    # -- command runner -------------------------------------------------------------------------
    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``dvc <args>`` in ``root``; a failure raises :class:`DvcError` (when ``check``)."""
        cmd = [dvc_executable(), *args]
        log.info("dvc: %s (cwd=%s)", scrub(shlex.join(["dvc", *args])), self.root)
        try:
            proc = subprocess.run(
                cmd,
                cwd=self.root,
                env=_subprocess_env(),
                capture_output=True,
                text=True,
                check=False,
                timeout=self.timeout_s,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise DvcError(["dvc", *args], -1, f"timed out after {self.timeout_s:.0f} s", self.root) from exc
        if check and proc.returncode != 0:
            raise DvcError(["dvc", *args], proc.returncode, proc.stderr or proc.stdout, self.root)
        return proc

    # -- setup ----------------------------------------------------------------------------------
    @property
    def dvc_dir(self) -> Path:
        """The ``.dvc`` folder."""
        return self.root / ".dvc"

    def is_initialized(self) -> bool:
        """True when ``root`` already holds a DVC project (``.dvc/config`` present, e.g. in a clone)."""
        return (self.dvc_dir / "config").is_file()

    def ensure_initialized(self, remote_url: str | None = None) -> None:
        """Make ``root`` a DVC project with analytics off and a default remote.

        ``remote_url`` replaces the default remote when given (an S3/SSH/... URL or a local folder);
        otherwise an existing default remote is kept, or ``<root>/.zk0/dvc-remote`` is added.
        Idempotent; a clone that only has ``.dvc/config`` counts as initialized.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.is_initialized():
            mode = _scm_mode(self.root)
            flags = {"git": [], "subdir": ["--subdir"], "no-scm": ["--no-scm"]}[mode]
            self.run("init", "-q", *flags)
            self.run("config", "core.analytics", "false")
            log.info("dvc: initialized %s (%s)", self.root, mode)
        if remote_url is not None:
            self._set_default_remote(remote_url)
        elif self.default_remote() is None:
            self._set_default_remote(str(self.root / DEFAULT_REMOTE_DIR))

    def default_remote(self) -> str | None:
        """Name of the default remote (``core.remote`` in ``.dvc/config`` or ``config.local``), or None."""
        name = None
        for config in (self.dvc_dir / "config", self.dvc_dir / "config.local"):
            if config.is_file():
                name = _core_remote(config.read_text()) or name
        return name

    def remote_url(self, name: str = DEFAULT_REMOTE_NAME) -> str | None:
        """The URL of remote ``name`` as configured (local paths resolved to absolute), or None."""
        url = None
        for config in (self.dvc_dir / "config", self.dvc_dir / "config.local"):
            if config.is_file():
                url = _config_value(config.read_text(), f"remote {name}", "url") or url
        if url is None or "://" in url:
            return url
        path = Path(url).expanduser()
        return str(path if path.is_absolute() else (self.dvc_dir / path).resolve())

    def _set_default_remote(self, url: str) -> None:
        cli_url = url
        if "://" not in url:
            path = Path(url).expanduser()
            path = (path if path.is_absolute() else self.root / path).resolve()
            url = str(path)
            # DVC stores a relative CLI path relative to .dvc/: a remote inside the checkout stays
            # portable across clones; one outside it is kept absolute.
            cli_url = os.path.relpath(path, self.root) if path.is_relative_to(self.root) else url
        if self.default_remote() == DEFAULT_REMOTE_NAME and self.remote_url() == url:
            return  # already configured: no subprocess, and the push marker stays valid
        self.run("remote", "add", "--force", "--default", DEFAULT_REMOTE_NAME, cli_url)
        # A new remote has none of our pushes yet.
        shutil.rmtree(self.dvc_dir / _PUSHED_MARKER_DIR, ignore_errors=True)

    # -- snapshots ------------------------------------------------------------------------------
    def dvc_file(self, target: str = "data") -> Path:
        """The ``<target>.dvc`` file that pins ``target``."""
        return self.root / f"{target}.dvc"

    def current_md5(self, target: str = "data") -> str | None:
        """The md5 recorded in ``<target>.dvc`` (``"<hex>.dir"`` for a folder), or None if untracked."""
        try:
            return _read_dvc_file(self.dvc_file(target))["md5"]
        except FileNotFoundError:
            return None

    def snapshot(self, target: str = "data") -> Snapshot:
        """``dvc add <target>`` then ``dvc push`` (skipped when nothing changed and it was pushed).

        ``changed`` is False when the md5 equals the one recorded before the call.
        """
        if not self.is_initialized():
            raise RuntimeError(f"{self.root} is not a DVC project: call ensure_initialized() first")
        if not (self.root / target).exists():
            raise FileNotFoundError(f"DVC snapshot target {self.root / target} does not exist")
        before = self.current_md5(target)
        self.run("add", "-q", target)
        info = _read_dvc_file(self.dvc_file(target))
        changed = info["md5"] != before
        # A marker of the last successful push: an unchanged snapshot whose push failed earlier is
        # pushed again instead of being silently skipped.
        marker = self.dvc_dir / _PUSHED_MARKER_DIR / target.replace("/", "__")
        pushed = marker.read_text().strip() if marker.is_file() else None
        if changed or pushed != info["md5"]:
            self.run("push", "-q", self.dvc_file(target).name)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(info["md5"] + "\n")
        return Snapshot(
            md5=info["md5"],
            nfiles=info["nfiles"],
            size=info["size"],
            changed=changed,
            dvc_file=self.dvc_file(target),
        )

    def pull(self, target: str | None = None) -> None:
        """``dvc pull`` (all tracked outputs, or the one pinned by ``<target>.dvc``)."""
        if not self.is_initialized():
            raise RuntimeError(f"{self.root} is not a DVC project (no .dvc/config)")
        args = ["pull", "-q"]
        if target is not None:
            args.append(self.dvc_file(target).name)
        self.run(*args)

    def status_cloud(self) -> str:
        """``dvc status --cloud`` output (what the remote lacks)."""
        return self.run("status", "--cloud").stdout
