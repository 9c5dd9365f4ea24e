"""The benchmark program runs end to end (correctness only: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.generate import ROOT


@pytest.mark.slow
def test_the_benchmark_quick_mode_compares_both_servers(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only",
            "latency,throughput",
            "--output",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    metrics = report["metrics"]
    for key in ("cpu_us_per_chunk_10", "chunks_per_s_1", "idle_ping_p99_ms"):
        entry = metrics[key]
        assert entry["ours"] > 0
        assert entry["reference"] > 0
        assert entry[f"{key}_ratio"] == pytest.approx(entry["ours"] / entry["reference"])
        assert report["ratios"][f"{key}_ratio"] == entry[f"{key}_ratio"]
    assert (tmp_path / "latest.png").read_bytes().startswith(b"\x89PNG")
    assert "grpc.aio reference" in (tmp_path / "latest.md").read_text()


@pytest.mark.slow
def test_the_secured_benchmark_compares_three_servers(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.secured",
            "--quick",
            "--streams",
            "4",
            "--seconds",
            "1",
            "--output",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "secured.json").read_text())
    median = report["summary"]["median"]
    assert set(median) == {"ours-secured", "reference-secured", "ours-plain"}
    for values in median.values():
        assert values["cpu_us_per_chunk"] > 0
        assert values["loaded_ping_p99_ms"] > 0
    assert report["summary"]["ratios"]["cpu_us_per_chunk_vs_plain"] > 0
    assert "ours, secured" in (tmp_path / "secured.md").read_text()
