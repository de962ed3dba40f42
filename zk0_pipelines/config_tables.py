"""Committed text generated from the typed configuration, so that it never drifts from the code.

- ``pyproject.toml``'s ``[tool.flwr.app.config]`` table: ``run_config.pyproject_app_config()``;
- the README's table of run-config keys (``run_config_table``) and of ``ZK0_*`` settings
  (``env_settings.render_table``), each between ``<!-- generated:NAME -->`` and ``<!-- end:NAME -->``.

``zk0 config --write`` rewrites them; ``stale_files`` lists what differs (tests assert it is empty).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from zk0_pipelines import env_settings
from zk0_pipelines.federated.run_config import RunConfig, describe, kebab, pyproject_app_config

APP_CONFIG_HEADER = "[tool.flwr.app.config]\n"


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value == "":
        return "empty"
    return f"`{value}`"


def run_config_table() -> str:
    """Every run-config key with its default and meaning, as a Markdown table."""
    from zk0_pipelines.markdown_tables import markdown_table

    rows = [
        {"key": f"`{kebab(name)}`", "default": _shown(field.default), "meaning": describe(name)}
        for name, field in RunConfig.model_fields.items()
    ]
    return markdown_table(rows) + "\n"


README_TABLES: dict[str, Callable[[], str]] = {
    "run-config": run_config_table,
    "env-settings": env_settings.render_table,
}


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- generated:{name} (zk0 config --write) -->\n", f"<!-- end:{name} -->"


def readme_table(text: str, name: str) -> str:
    """The generated table ``name`` as committed in README ``text`` (``ValueError`` without markers)."""
    begin, end = _markers(name)
    if begin not in text or end not in text:
        raise ValueError(f"README has no generated block {name!r} ({begin.strip()} ... {end})")
    return text.split(begin, 1)[1].split(end, 1)[0]


def with_readme_tables(text: str) -> str:
    """README ``text`` with every generated table rendered afresh."""
    for name, render in README_TABLES.items():
        begin, end = _markers(name)
        readme_table(text, name)  # both markers present
        head, rest = text.split(begin, 1)
        text = head + begin + render() + end + rest.split(end, 1)[1]
    return text


def _app_config_span(text: str) -> tuple[int, int]:
    start = text.index(APP_CONFIG_HEADER)
    end = text.find("\n[", start)
    return start, len(text) if end < 0 else end


def pyproject_app_table(text: str) -> str:
    """The ``[tool.flwr.app.config]`` table as committed in pyproject ``text`` (header to the next table)."""
    start, end = _app_config_span(text)
    return text[start:end]


def with_pyproject_app_table(text: str) -> str:
    """Pyproject ``text`` with ``[tool.flwr.app.config]`` rendered from ``RunConfig``'s defaults."""
    start, end = _app_config_span(text)
    return text[:start] + pyproject_app_config() + text[end:]


_FILES: dict[str, Callable[[str], str]] = {
    "pyproject.toml": with_pyproject_app_table,
    "README.md": with_readme_tables,
}


def stale_files(root: Path) -> list[str]:
    """The files under ``root`` whose generated parts differ from what the code renders."""
    return [name for name, render in _FILES.items() if render(text := (root / name).read_text()) != text]


def write_generated(root: Path) -> list[str]:
    """Rewrite the generated parts of the files under ``root``; returns the files that changed."""
    changed = stale_files(root)
    for name in changed:
        path = root / name
        path.write_text(_FILES[name](path.read_text()))
    return changed
