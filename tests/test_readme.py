"""The README's Python examples pass ``mypy --strict``, as a user of the package would run it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from mypy import api

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def test_the_readme_has_python_examples() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.slow
def test_every_python_example_of_the_readme_is_strict_clean(tmp_path: Path) -> None:
    files = []
    for number, example in enumerate(EXAMPLES, 1):
        file = tmp_path / f"readme_example_{number}.py"
        file.write_text(example, encoding="utf-8")
        files.append(str(file))
    # The user's view: the installed packages, strict settings, none of this project's.
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nstrict = True\n", encoding="utf-8")
    out, err, status = api.run(
        [
            "--config-file",
            str(config),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--python-executable",
            sys.executable,
            *files,
        ]
    )
    assert status == 0, out + err
