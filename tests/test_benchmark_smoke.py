"""The benchmark program runs end to end (correctness only: no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import run
from tests.helpers import run_benchmark


def run_quick(output: Path, scenarios: str) -> dict[str, Any]:
    run_benchmark(
        "benchmarks",
        "--quick",
        "--only",
        scenarios,
        "--output",
        output,
        timeout=240,
    )
    report: dict[str, Any] = json.loads((output / "latest.json").read_text())
    assert (output / "latest.png").read_bytes().startswith(b"\x89PNG")
    return report


def assert_compared(report: dict[str, Any], key: str) -> None:
    """Both sides measured, the ratio is ours / reference, and listed under ``ratios``."""
    entry = report["metrics"][key]
    assert entry["ours"] > 0
    assert entry["reference"] > 0
    assert entry[f"{key}_ratio"] == pytest.approx(entry["ours"] / entry["reference"])
    assert report["ratios"][f"{key}_ratio"] == entry[f"{key}_ratio"]


@pytest.mark.slow
def test_the_benchmark_quick_mode_compares_both_servers(tmp_path: Path) -> None:
    report = run_quick(tmp_path, "latency,throughput")
    for key in (
        "cpu_us_per_chunk_10",
        "chunks_per_s_1",
        "idle_ping_p99_ms",
        "generator_cpu_us_per_message_10",
    ):
        assert_compared(report, key)
    # The load generator (h2gen) counted every chunk: all 56 of each reply it saw complete
    # within the one-second window, and at most one reply in progress per stream besides.
    for name in ("ours", "reference"):
        (figures,) = report["raw"][name]
        chunks, replies = figures["chunks_per_s_10"], figures["replies_per_s_10"]
        assert 56 * replies <= chunks <= 56 * (replies + 10)
    assert "grpc.aio reference" in (tmp_path / "latest.md").read_text()


@pytest.mark.slow
def test_the_benchmark_measures_pass_through_stores_and_replicas(tmp_path: Path) -> None:
    report = run_quick(tmp_path, "passthrough,stores,replicas")
    for key in (
        "pt_ttft_p50_ms_1",
        "pt_itl_p99_ms_4",
        "pt_cpu_us_per_token_4",
        "store_sqlite_full_turns_per_s",
        "store_sqlite_normal_commit_p99_ms",
        "store_redis_turns_per_s",
    ):
        assert_compared(report, key)
    # Through chat-server every reply carried the fake model's 10 tokens, in at most 10
    # chunks (the coalescing window may merge tokens that arrive together).
    (ours,) = report["raw"]["ours"]
    assert 1 <= ours["pt_chunks_per_reply_1"] <= 10
    # The paced load went through nginx to 2 replicas (ours) and to 1 (reference).
    for name in ("ours", "reference"):
        (figures,) = report["raw"][name]
        (step, *_) = figures["replicas_steps"]
        assert step["streams"] == 10
        assert step["answer_p50_s"] > 0
    markdown = (tmp_path / "latest.md").read_text()
    for title in ("Pass-through", "Session stores", "Replicas behind nginx"):
        assert title in markdown


def test_a_finished_run_updates_the_readme_between_its_markers(tmp_path: Path) -> None:
    entry = {
        "label": "server CPU per chunk, 100 streams",
        "unit": "µs",
        "better": "lower",
        "section": "servers",
        "ours": 20.0,
        "reference": 80.0,
        "cpu_us_per_chunk_100_ratio": 0.25,
        "added": -60.0,
        "target_ratio": 1.0,
        "target_value": None,
        "target_added": None,
        "target_met": True,
        "rounds": {"ours": [20.0], "reference": [80.0]},
    }
    report = {
        "finished": "2026-12-01 12:00 UTC",
        "command": "python -m benchmarks",
        "rounds": 3,
        "seconds": 900.0,
        "machine": {"cpu": "AMD EPYC", "cores": 2, "load_average_at_start": [0.1, 0.1, 0.1]},
        "metrics": {"cpu_us_per_chunk_100": entry},
    }
    readme = tmp_path / "README.md"
    readme.write_text(
        "before\n<!-- benchmark-table: python -m benchmarks --table -->\nold\n"
        "<!-- /benchmark-table -->\nafter\n"
    )
    assert run.update_readme(report, readme)
    text = readme.read_text()
    assert "old" not in text
    assert text.startswith("before\n")
    assert text.endswith("<!-- /benchmark-table -->\nafter\n")
    assert "| server CPU per chunk, 100 streams (µs) | 20.0 | 80.0 | 0.25× | ≤ 1.0× | yes |" in text
    # Without the markers nothing is written.
    readme.write_text("no markers\n")
    assert not run.update_readme(report, readme)
    assert readme.read_text() == "no markers\n"


@pytest.mark.slow
def test_the_secured_benchmark_compares_three_servers(tmp_path: Path) -> None:
    run_benchmark(
        "benchmarks.secured",
        "--quick",
        "--streams",
        "4",
        "--seconds",
        "1",
        "--output",
        str(tmp_path),
        timeout=180,
    )
    report = json.loads((tmp_path / "secured.json").read_text())
    median = report["summary"]["median"]
    assert set(median) == {"ours-secured", "reference-secured", "ours-plain"}
    for values in median.values():
        assert values["cpu_us_per_chunk"] > 0
        assert values["loaded_ping_p99_ms"] > 0
    assert report["summary"]["ratios"]["cpu_us_per_chunk_vs_plain"] > 0
    assert "ours, secured" in (tmp_path / "secured.md").read_text()


@pytest.mark.slow
def test_the_observability_benchmark_loads_both_servers(tmp_path: Path) -> None:
    run_benchmark(
        "benchmarks.observability",
        "--quick",
        "--output",
        tmp_path,
        timeout=240,
    )
    rounds = json.loads((tmp_path / "observability.json").read_text())
    assert set(rounds) == {"off", "on"}
    for results in rounds.values():
        (result,) = results
        assert result["cpu_us_per_chunk"] > 0
        assert result["chunks_per_s"] > 0
    assert "CPU per chunk of off" in (tmp_path / "observability.md").read_text()


@pytest.mark.slow
def test_the_live_benchmark_measures_watchers_resumes_and_memory(tmp_path: Path) -> None:
    run_benchmark(
        "benchmarks.live",
        "--quick",
        "--output",
        tmp_path,
        timeout=240,
    )
    results = json.loads((tmp_path / "live.json").read_text())
    assert set(results["watchers"]) == {"0", "1", "10", "100"}
    for watchers, rounds in results["watchers"].items():
        (result,) = rounds
        assert result["cpu_us_per_sent_chunk"] > 0
        assert (result["watched_chunks"] > 0) == (watchers != "0")
    assert results["resume_s"]
    assert results["memory"]["bytes_per_event"] > 0
    (compared,) = results["compare"]
    assert compared["ours_cpu_us_per_chunk"] > 0
    assert compared["base_cpu_us_per_chunk"] > 0
    assert "Resume latency" in (tmp_path / "live.md").read_text()
