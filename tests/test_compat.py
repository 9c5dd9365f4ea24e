"""What chat/_compat.py relies on in grpclib is still there, and nothing else reaches in.

When grpclib changes, these fail with a message that names what changed: the version range,
an attribute that is gone, or a module outside _compat that touches grpclib's private names.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grpclib
import pytest

from chat import _compat

ROOT = Path(__file__).resolve().parent.parent


def _pinned_range() -> str:
    pyproject = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"grpclib([^"]*)"', pyproject)
    assert match is not None, "grpclib is not a dependency in pyproject.toml"
    return match.group(1)


def test_the_installed_grpclib_is_the_supported_one() -> None:
    major, minor = _compat.GRPCLIB_SUPPORTED
    assert _compat.grpclib_version() == (major, minor), (
        f"grpclib {grpclib.__version__} is installed; chat/_compat.py is written for "
        f"{major}.{minor}.x: check every name in RELIED_ON, then update GRPCLIB_SUPPORTED"
    )
    # pyproject.toml pins the same range.
    assert f"<{major}.{minor + 1}" in _pinned_range(), _pinned_range()
    assert f">={major}.{minor}" in _pinned_range(), _pinned_range()


@pytest.mark.parametrize("owner", sorted(_compat.RELIED_ON))
def test_every_private_attribute_relied_on_exists(owner: str) -> None:
    target, names = _compat.RELIED_ON[owner]
    missing = [name for name in names if not _has(target, name)]
    assert not missing, f"grpclib changed: {owner} no longer has {missing} (see chat/_compat.py)"


def _has(target: object, name: str) -> bool:
    if hasattr(target, name):
        return True
    # Instance attributes set in __init__ are not on the class: look for the assignment.
    init = getattr(target, "__init__", None)
    code = getattr(init, "__code__", None)
    return code is not None and name in code.co_names


def test_no_other_module_touches_grpclibs_private_names() -> None:
    offenders = []
    for path in sorted((ROOT / "chat").rglob("*.py")):
        if path.name == "_compat.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("grpclib"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if "._" in f".{node.module}" or private:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"grpclib private API outside chat/_compat.py: {offenders}"
