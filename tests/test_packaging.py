"""The tox environments that run pytest can import every test module.

pytest collects all of tests/ in each of them (the upstream environment deselects by marker,
after collection), so each needs what any test module imports.
"""

from __future__ import annotations

import configparser
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tox() -> configparser.ConfigParser:
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "tox.ini", encoding="utf-8")
    return config


def _extras(section: str) -> set[str]:
    return {extra.strip() for extra in _tox()[section]["extras"].split(",")}


def test_the_upstream_environment_has_the_test_environments_extras() -> None:
    assert _extras("testenv:upstream") == _extras("testenv:tests")


def test_the_test_group_has_what_the_readme_test_imports() -> None:
    groups = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
        "dependency-groups"
    ]
    test = [entry for entry in groups["test"] if isinstance(entry, str)]
    names = {entry.split(">")[0].split("=")[0] for entry in test}
    assert "mypy" in names
