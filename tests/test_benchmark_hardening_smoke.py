"""benchmarks.hardening runs end to end (correctness only: no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_benchmark

pytestmark = pytest.mark.slow


def test_the_hardening_benchmark_compares_ours_with_the_base(tmp_path: Path) -> None:
    run_benchmark(
        "benchmarks.hardening",
        "--quick",
        # This tree against itself: a base that is there in any checkout.
        "--base",
        "HEAD",
        "--seconds",
        "0.5",
        "--streams",
        "2",
        "--id-chars",
        "5000",
        "--title-mb",
        "0.1",
        "--junk",
        "3",
        "--out",
        str(tmp_path),
        timeout=300,
    )
    report = json.loads((tmp_path / "hardening.json").read_text())
    for name in ("ours", "base"):
        (cost,) = report["results"][name]["cost"]
        assert cost["chunks"] > 0
        assert cost["cpu_us_per_chunk"] > 0
        (hostile,) = report["results"][name]["hostile"]
        assert [call["status"] for call in hostile["calls"]] == [
            "INVALID_ARGUMENT",
            # 0.1 MB is within the 4 MiB receive limit and over the title's.
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT ×3",
        ]
        assert hostile["probe_pings"] > 0
    assert "| server CPU per chunk |" in (tmp_path / "hardening.md").read_text()
