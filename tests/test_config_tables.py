"""The generated configuration text (pyproject app table, README tables) and the ZK0_* catalogue."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zk0_pipelines import cli, config_tables, env_settings
from zk0_pipelines.federated.run_config import KEYS

REPO = Path(__file__).resolve().parents[1]
ZK0_NAME = re.compile(r"\bZK0_[A-Z0-9_]*[A-Z0-9]\b")
#: Where ZK0_* variables are read or set: the package, tests, benches, make/CI, deployment, Dagster.
SOURCES = ("zk0_pipelines", "tests", "bench", "deploy", "dagster_home", "Makefile", ".ci/run")


def _source_files() -> list[Path]:
    files = []
    for name in SOURCES:
        path = REPO / name
        files += [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    suffixes = ("", ".py", ".yaml", ".yml", ".example", ".md")
    return [p for p in files if p.suffix in suffixes and p.resolve() != Path(__file__).resolve()]


def test_readme_tables_are_the_rendered_ones():
    readme = (REPO / "README.md").read_text()
    assert config_tables.readme_table(readme, "env-settings") == env_settings.render_table(), (
        "run `make config`"
    )
    assert config_tables.readme_table(readme, "run-config") == config_tables.run_config_table()
    assert config_tables.stale_files(REPO) == []


def test_run_config_table_lists_every_key_once():
    rows = config_tables.run_config_table().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == list(KEYS)


def test_write_generated_repairs_a_drifted_copy(tmp_path):
    for name in ("pyproject.toml", "README.md"):
        (tmp_path / name).write_text((REPO / name).read_text())
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("local-steps = 2", "local-steps = 4"))
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text().replace("`ZK0_ROOT`", "`ZK0_OLD`", 1))
    assert config_tables.stale_files(tmp_path) == ["pyproject.toml", "README.md"]
    assert config_tables.write_generated(tmp_path) == ["pyproject.toml", "README.md"]
    assert config_tables.stale_files(tmp_path) == []
    assert pyproject.read_text() == (REPO / "pyproject.toml").read_text()


def test_readme_without_markers_is_refused():
    with pytest.raises(ValueError, match="env-settings"):
        config_tables.readme_table("# no tables\n", "env-settings")


def test_every_zk0_variable_in_the_project_is_catalogued():
    catalogued = {s.name for s in env_settings.CATALOGUE}
    used = {name for path in _source_files() for name in ZK0_NAME.findall(path.read_text(errors="replace"))}
    assert used - catalogued == set()
    assert len(catalogued) == len(env_settings.CATALOGUE)


def test_zk0_variables_are_read_only_through_the_catalogue():
    direct = re.compile(r"""(environ\.get\(|environ\[|getenv\()\s*["']ZK0_""")
    offenders = [
        str(p.relative_to(REPO))
        for p in _source_files()
        if p.suffix == ".py" and p.name != "env_settings.py" and direct.search(p.read_text())
    ]
    assert offenders == []


def test_accessors(monkeypatch):
    setting = env_settings.CLIENT_CACHE_SIZE
    monkeypatch.delenv(setting.name, raising=False)
    assert setting.integer() == 4 and setting.raw() is None
    monkeypatch.setenv(setting.name, "  ")  # empty counts as unset
    assert setting.integer() == 4
    monkeypatch.setenv(setting.name, "many")
    with pytest.raises(ValueError, match=setting.name):
        setting.integer()
    monkeypatch.setenv(env_settings.MLFLOW_BUSY_TIMEOUT_S.name, "soon")
    with pytest.raises(ValueError, match="ZK0_MLFLOW_BUSY_TIMEOUT_S"):
        env_settings.MLFLOW_BUSY_TIMEOUT_S.number()
    for value, expected in (("1", True), ("Yes", True), ("0", False), ("", False)):
        monkeypatch.setenv(env_settings.NIGHTLY_FORCE.name, value)
        assert env_settings.NIGHTLY_FORCE.flag() is expected


def test_zk0_config_command(capsys):
    assert cli.main(["config"]) == 0
    assert "| `local-steps` | `2` |" in re.sub(r" +", " ", capsys.readouterr().out)  # tabulate pads
    assert cli.main(["config", "--env"]) == 0
    assert "`ZK0_DEPLOYMENT`" in capsys.readouterr().out
    assert cli.main(["config", "--pyproject"]) == 0
    assert capsys.readouterr().out.startswith("[tool.flwr.app.config]\n")
    assert cli.main(["config", "--check"]) == 0
