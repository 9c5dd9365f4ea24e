"""Benchmark our ``chat-server`` against the grpc.aio reference, side by side in one run.

Usage (from the repository root)::

    python -m benchmarks            # full run, writes docs/benchmarks/latest.{md,json,png}
    python -m benchmarks --quick    # smoke run: small and short, writes to benchmarks/results/
    tox -e bench                    # the full run in its own environment

Each server runs in its own process, started afresh for each scenario; the load comes from
client processes (:mod:`benchmarks.client`, grpcio C core). The servers alternate (ours,
reference, ours, reference, ...) for ``--rounds`` rounds; the report gives the median of
the rounds and the ratio ours/reference. Server CPU time and RSS are read from
``/proc/<pid>`` (Linux). All traffic is on 127.0.0.1, and every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("ours", "reference")
_BANNER = re.compile(r"listening on (?P<host>[^\s:]+):(?P<port>\d+)")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

#: 50 words: the echo reply is 56 chunks (RESPONSE_START and RESPONSE_COMPLETE besides).
LOAD_TEXT = " ".join(f"word{i}" for i in range(50))
#: 14 words: the echo reply ("Echo #k (m messages in context): ...") is 20 chunks.
PACED_TEXT = " ".join(f"w{i}" for i in range(14))
PACED_CHUNKS = 20
PROBE_TEXT = "hello there, how are you"
#: The load clients of the latency-under-load scenario run at this nice level, so that the
#: probe client is not starved of CPU by them on a two-core machine: the probe then measures
#: how the server answers under load, not the client's share of the machine.
LOAD_NICE = 10
SCENARIOS = ("latency", "throughput", "loaded", "paced", "rss", "hold")


@dataclass(frozen=True)
class Settings:
    """How big and how long; ``--quick`` shrinks everything."""

    rounds: int
    quick: bool
    throughput_streams: tuple[int, ...]
    throughput_seconds: float
    probe_seconds: float
    load_streams: int
    paced_steps: tuple[int, ...]
    paced_messages: int
    paced_interval: float
    paced_pace: float
    rss_streams: int
    hold_streams: int
    answer_limit: float
    scenarios: tuple[str, ...]
    client_processes: int = 2

    @classmethod
    def make(cls, quick: bool, rounds: int | None, scenarios: Sequence[str]) -> Settings:
        if quick:
            return cls(
                rounds=rounds or 1,
                quick=True,
                throughput_streams=(1, 10),
                throughput_seconds=1.0,
                probe_seconds=1.0,
                load_streams=10,
                paced_steps=(10, 20),
                paced_messages=2,
                paced_interval=1.0,
                paced_pace=0.05,
                rss_streams=100,
                hold_streams=200,
                answer_limit=1.2,
                scenarios=tuple(scenarios),
            )
        return cls(
            rounds=rounds or 3,
            quick=False,
            throughput_streams=(1, 10, 100, 1000),
            throughput_seconds=4.0,
            probe_seconds=4.0,
            load_streams=100,
            paced_steps=(25, 50, 100, 200, 300, 400, 600, 800, 1000, 1200, 1500, 2000),
            paced_messages=5,
            paced_interval=1.0,
            paced_pace=0.05,
            rss_streams=2000,
            hold_streams=10_000,
            answer_limit=1.2,
            scenarios=tuple(scenarios),
        )


def raise_fd_limit() -> int:
    """Raise the soft limit of open files to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- servers ---------------------------------------------------------------------------------


def server_command(name: str, pace: float) -> list[str]:
    common = ["--host", "127.0.0.1", "--port", "0", "--pace", str(pace)]
    if name == "ours":
        script = Path(sys.executable).with_name("chat-server")
        prefix = (
            [str(script)]
            if script.exists()
            else [sys.executable, "-c", "from chat.cli.server import main; main()"]
        )
        # The memory store, as the reference keeps its sessions in memory too (the default
        # store is SQLite on disk).
        return [
            *prefix,
            "--backend",
            "echo",
            "--store",
            "memory://",
            "--log-level",
            "warning",
            *common,
        ]
    return [sys.executable, "-m", "benchmarks.reference_server", *common]


@dataclass
class Server:
    name: str
    process: asyncio.subprocess.Process
    target: str
    drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (all its threads)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE


def _log_file(log_dir: Path, name: str) -> IO[bytes]:
    """Where a server's stderr goes (appended), for looking into a failed run."""
    log_dir.mkdir(parents=True, exist_ok=True)
    return open(log_dir / f"{name}.log", "ab")


@contextlib.asynccontextmanager
async def running(name: str, pace: float, log_dir: Path) -> AsyncIterator[Server]:
    with _log_file(log_dir, name) as errors:
        process = await asyncio.create_subprocess_exec(
            *server_command(name, pace),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=errors,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(30):
            while (match := _BANNER.search((await process.stdout.readline()).decode())) is None:
                if process.stdout.at_eof():
                    raise RuntimeError(f"{name} server exited; see {log_dir}/{name}.log")
        server = Server(name, process, f"{match['host']}:{match['port']}")
        # Keep reading its output, so that a full pipe never blocks it.
        server.drain = asyncio.create_task(_drain(process.stdout))
        yield server
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


# -- clients ---------------------------------------------------------------------------------


@dataclass
class Clients:
    """Client processes that print ``ready``, wait for ``go``, and print one JSON line."""

    processes: list[asyncio.subprocess.Process] = field(default_factory=list)

    async def start(self, params: Sequence[dict[str, Any]], within: float) -> None:
        for p in params:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "benchmarks.client",
                json.dumps(p),
                cwd=ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            self.processes.append(process)
        async with asyncio.timeout(within):
            for process in self.processes:
                await self._expect(process, "ready")

    @staticmethod
    async def _expect(process: asyncio.subprocess.Process, word: str) -> None:
        assert process.stdout is not None
        line = (await process.stdout.readline()).decode().strip()
        if line != word:
            raise RuntimeError(f"client said {line!r} instead of {word!r}")

    def go(self) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(b"go\n")

    async def results(self, within: float) -> list[dict[str, Any]]:
        out = []
        async with asyncio.timeout(within):
            for process in self.processes:
                assert process.stdout is not None
                line = await process.stdout.readline()
                if not line:
                    raise RuntimeError("a client exited without a result")
                out.append(json.loads(line))
        return out

    async def stop(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError, BrokenPipeError):
                    assert process.stdin is not None
                    process.stdin.write(b"stop\n")
                    process.stdin.close()
        for process in self.processes:
            try:
                async with asyncio.timeout(15):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


@contextlib.asynccontextmanager
async def clients(params: Sequence[dict[str, Any]], within: float) -> AsyncIterator[Clients]:
    group = Clients()
    try:
        await group.start(params, within)
        yield group
    finally:
        await group.stop()


def split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# -- scenarios (one server each) -----------------------------------------------------------


def _setup_timeout(streams: int) -> float:
    return 30.0 + streams * 0.02


async def throughput(server: Server, streams: int, s: Settings) -> dict[str, float]:
    params = [
        {
            "scenario": "throughput",
            "target": server.target,
            "streams": n,
            "text": LOAD_TEXT,
            "duration": s.throughput_seconds,
        }
        for n in split(streams, s.client_processes)
    ]
    async with clients(params, _setup_timeout(streams)) as group:
        cpu0, t0 = server.cpu_seconds(), time.monotonic()
        group.go()
        await asyncio.sleep(s.throughput_seconds)
        cpu1, t1 = server.cpu_seconds(), time.monotonic()
        results = await group.results(s.throughput_seconds + 30)
    chunks = sum(r["chunks"] for r in results)
    replies = sum(r["replies"] for r in results)
    failures = [f for r in results for f in r["failures"]]
    if failures or not chunks:
        raise RuntimeError(f"throughput run failed on {server.name}: {failures[:3]}")
    cpu = cpu1 - cpu0
    return {
        "chunks_per_s": chunks / s.throughput_seconds,
        "replies_per_s": replies / s.throughput_seconds,
        "cpu_us_per_chunk": cpu / chunks * 1e6,
        "cpu_us_per_reply": cpu / max(1, replies) * 1e6,
        "server_cpu_share": cpu / (t1 - t0),
    }


def _probe_params(server: Server, s: Settings) -> dict[str, Any]:
    return {
        "scenario": "probe",
        "target": server.target,
        "text": PROBE_TEXT,
        "duration": s.probe_seconds,
        "gap": 0.01,
    }


def _latencies(result: dict[str, Any], prefix: str) -> dict[str, float]:
    return {
        f"{prefix}ping_p50_ms": percentile(result["ping"], 50) * 1e3,
        f"{prefix}ping_p99_ms": percentile(result["ping"], 99) * 1e3,
        f"{prefix}first_chunk_p50_ms": percentile(result["first_chunk"], 50) * 1e3,
        f"{prefix}first_chunk_p99_ms": percentile(result["first_chunk"], 99) * 1e3,
    }


async def idle_latency(server: Server, s: Settings) -> dict[str, float]:
    async with clients([_probe_params(server, s)], 30) as group:
        group.go()
        (result,) = await group.results(s.probe_seconds + 30)
    return _latencies(result, "idle_")


async def loaded_latency(server: Server, s: Settings) -> dict[str, float]:
    # The load runs a little longer than the probe, so the probe only sees steady load.
    load = [
        {
            "scenario": "throughput",
            "target": server.target,
            "streams": n,
            "text": LOAD_TEXT,
            "duration": s.probe_seconds + 1.5,
            "nice": LOAD_NICE,
        }
        for n in split(s.load_streams, s.client_processes)
    ]
    async with (
        clients(load, _setup_timeout(s.load_streams)) as loading,
        clients([_probe_params(server, s)], 30) as probing,
    ):
        loading.go()
        await asyncio.sleep(0.5)
        probing.go()
        (result,) = await probing.results(s.probe_seconds + 60)
        await loading.results(s.probe_seconds + 60)
    return _latencies(result, "loaded_")


async def paced_step(server: Server, streams: int, s: Settings) -> dict[str, Any]:
    params = [
        {
            "scenario": "paced",
            "target": server.target,
            "streams": n,
            "text": PACED_TEXT,
            "messages": s.paced_messages,
            "interval": s.paced_interval,
            "grace": 3.0,
        }
        for n in split(streams, s.client_processes)
    ]
    async with clients(params, _setup_timeout(streams)) as group:
        cpu0 = server.cpu_seconds()
        group.go()
        results = await group.results(s.paced_interval * s.paced_messages + 60)
        cpu = server.cpu_seconds() - cpu0
    answers = [a for r in results for a in r["answers"]]
    p99 = percentile(answers, 99)
    unanswered = sum(r["unanswered"] for r in results)
    starved = sum(r["starved_streams"] for r in results)
    return {
        "streams": streams,
        "answer_p50_s": percentile(answers, 50),
        "answer_p99_s": p99,
        "unanswered": unanswered,
        "starved_streams": starved,
        "server_cpu_s": cpu,
        "ok": bool(answers) and unanswered == 0 and starved == 0 and p99 <= s.answer_limit,
    }


async def paced_capacity(name: str, s: Settings, log_dir: Path) -> dict[str, Any]:
    """The largest step of the ladder served within the limit (each step a fresh server)."""
    held, steps = 0, []
    for streams in s.paced_steps:
        # A step that fails is tried once more: on a shared machine one noisy second can
        # push a p99 over the line.
        for _attempt in range(2):
            async with running(name, s.paced_pace, log_dir) as server:
                step = await paced_step(server, streams, s)
            steps.append(step)
            log(
                f"    paced {name} {streams:5d} streams: p99 {step['answer_p99_s']:.3f}s, "
                f"unanswered {step['unanswered']}, starved {step['starved_streams']} "
                f"-> {'ok' if step['ok'] else 'over'}"
            )
            if step["ok"]:
                break
        if not step["ok"]:
            break
        held = streams
    return {"paced_capacity_streams": held, "paced_steps": steps}


async def idle_streams(server: Server, streams: int) -> dict[str, Any]:
    """Open ``streams`` idle streams; RSS growth per stream, and whether all are held."""
    rss0 = server.rss_bytes()
    params = [
        {
            "scenario": "idle",
            "target": server.target,
            "streams": n,
            "setup_timeout": _setup_timeout(streams),
        }
        for n in split(streams, 2 if streams > 1000 else 1)
    ]
    async with clients(params, _setup_timeout(streams) + 30) as group:
        group.go()
        results = await group.results(_setup_timeout(streams) + 30)
        for process in group.processes:
            await Clients._expect(process, "holding")
        rss1 = server.rss_bytes()
    opened = sum(r["opened"] for r in results)
    answered = sum(r["answered"] for r in results)
    return {
        "streams": streams,
        "opened": opened,
        "answered": answered,
        "rss_bytes_per_stream": (rss1 - rss0) / max(1, answered),
        "held": answered == streams,
        "failures": [f for r in results for f in r["failures"]][:3],
    }


# -- the run ---------------------------------------------------------------------------------


async def one_round(name: str, s: Settings, log_dir: Path, first: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    wanted = s.scenarios
    if {"latency", "throughput", "loaded"} & set(wanted):
        async with running(name, 0.0, log_dir) as server:
            if "latency" in wanted:
                out.update(await idle_latency(server, s))
                log(f"    idle latency {name}: {_short(out, 'idle_')}")
            if "throughput" in wanted:
                for streams in s.throughput_streams:
                    result = await throughput(server, streams, s)
                    for key, value in result.items():
                        out[f"{key}_{streams}"] = value
                    log(
                        f"    throughput {name} {streams:5d} streams: "
                        f"{result['chunks_per_s']:8.0f} chunks/s, "
                        f"{result['cpu_us_per_chunk']:6.1f} µs CPU/chunk"
                    )
        if "loaded" in wanted:
            async with running(name, 0.0, log_dir) as server:
                out.update(await loaded_latency(server, s))
                log(f"    loaded latency {name}: {_short(out, 'loaded_')}")
    if "rss" in wanted:
        async with running(name, 0.0, log_dir) as server:
            result = await idle_streams(server, s.rss_streams)
        out["idle_rss_kib_per_stream"] = result["rss_bytes_per_stream"] / 1024
        out["idle_rss_held"] = result["held"]
        log(f"    idle RSS {name}: {out['idle_rss_kib_per_stream']:.1f} KiB/stream")
    if "hold" in wanted and first:
        async with running(name, 0.0, log_dir) as server:
            result = await idle_streams(server, s.hold_streams)
        out["hold_streams_held"] = result["answered"]
        out["hold_detail"] = result
        log(f"    {s.hold_streams} idle streams {name}: {result['answered']} held")
    if "paced" in wanted:
        out.update(await paced_capacity(name, s, log_dir))
    return out


def _short(values: dict[str, Any], prefix: str) -> str:
    return ", ".join(
        f"{key.removeprefix(prefix)} {value:.1f}"
        for key, value in values.items()
        if key.startswith(prefix)
    )


async def run(s: Settings, log_dir: Path) -> dict[str, list[dict[str, Any]]]:
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in SERVERS}
    for index in range(s.rounds):
        for name in SERVERS:
            log(f"round {index + 1}/{s.rounds}: {name}")
            rounds[name].append(await one_round(name, s, log_dir, first=index == 0))
    return rounds


# -- the report ------------------------------------------------------------------------------

Metric = tuple[str, str, str, str, float | None]  # key, label, unit, better, target ratio


def metrics(s: Settings) -> list[Metric]:
    found: list[Metric] = []
    if "throughput" in s.scenarios:
        load = 100 if 100 in s.throughput_streams else s.throughput_streams[-1]
        found += [
            (
                f"cpu_us_per_chunk_{load}",
                f"server CPU per chunk, {load} streams",
                "µs",
                "lower",
                1.0,
            ),
            (
                f"cpu_us_per_reply_{load}",
                f"server CPU per 56-chunk reply, {load} streams",
                "µs",
                "lower",
                None,
            ),
        ]
        found += [
            (
                f"chunks_per_s_{n}",
                f"chunks/s, {n} stream{'s' if n > 1 else ''}",
                "/s",
                "higher",
                None,
            )
            for n in s.throughput_streams
        ]
    for prefix, when in (("idle_", "idle"), ("loaded_", f"under {s.load_streams}-stream load")):
        if (prefix == "idle_" and "latency" in s.scenarios) or (
            prefix == "loaded_" and "loaded" in s.scenarios
        ):
            target = 1.0 if prefix == "loaded_" else None
            found += [
                (f"{prefix}ping_p50_ms", f"PING p50, {when}", "ms", "lower", None),
                (f"{prefix}ping_p99_ms", f"PING p99, {when}", "ms", "lower", target),
                (f"{prefix}first_chunk_p50_ms", f"first chunk p50, {when}", "ms", "lower", None),
                (f"{prefix}first_chunk_p99_ms", f"first chunk p99, {when}", "ms", "lower", target),
            ]
    if "paced" in s.scenarios:
        found.append(
            (
                "paced_capacity_streams",
                "paced streams held (p99 answer ≤ 1.2 s)",
                "streams",
                "higher",
                1.0,
            )
        )
    if "rss" in s.scenarios:
        found.append(
            (
                "idle_rss_kib_per_stream",
                f"RSS per idle stream ({s.rss_streams} streams)",
                "KiB",
                "lower",
                1.0,
            )
        )
    if "hold" in s.scenarios:
        found.append(
            (
                "hold_streams_held",
                f"idle streams held (of {s.hold_streams})",
                "streams",
                "higher",
                None,
            )
        )
    return found


def summarize(rounds: dict[str, list[dict[str, Any]]], s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, label, unit, better, target in metrics(s):
        values = {
            name: [r[key] for r in rounds[name] if isinstance(r.get(key), int | float)]
            for name in SERVERS
        }
        medians = {name: statistics.median(v) if v else None for name, v in values.items()}
        ours, ref = medians["ours"], medians["reference"]
        ratio = ours / ref if ours is not None and ref else None
        met = None
        if ratio is not None and target is not None:
            met = ratio <= target if better == "lower" else ratio >= target
        out[key] = {
            "label": label,
            "unit": unit,
            "better": better,
            "ours": ours,
            "reference": ref,
            f"{key}_ratio": ratio,
            "target_ratio": target,
            "target_met": met,
            "rounds": values,
        }
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        memory = int(f.readline().split()[1]) * 1024
    versions = {}
    for package in ("grpc-chat", "grpclib", "betterproto2", "grpcio", "protobuf", "uvloop", "h2"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "packages": versions,
    }


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit in ("streams", "/s") or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Benchmark: grpc-chat vs a grpc.aio reference",
        "",
        f"Run {report['finished']} with `{report['command']}`: {report['rounds']} round(s), "
        "servers alternating (ours, reference, ...); each figure is the median of the rounds, "
        "the ratio is ours / reference from the same run.",
        "",
        "| metric | ours | grpc.aio reference | ours / ref | target | met |",
        "|---|---:|---:|---:|---:|:-:|",
    ]
    for key, entry in report["metrics"].items():
        ratio = entry[f"{key}_ratio"]
        target = entry["target_ratio"]
        sign = "≤" if entry["better"] == "lower" else "≥"
        met = {True: "yes", False: "**no**", None: ""}[entry["target_met"]]
        lines.append(
            f"| {entry['label']} ({entry['unit']}) | {_fmt(entry['ours'], entry['unit'])} "
            f"| {_fmt(entry['reference'], entry['unit'])} "
            f"| {'–' if ratio is None else f'{ratio:.2f}×'} "
            f"| {'' if target is None else f'{sign} {target:.1f}×'} | {met} |"
        )
    lines += [
        "",
        "Spread of the rounds (min–max), a measure of the noise:",
        "",
        "| metric | ours | reference |",
        "|---|---|---|",
    ]
    for entry in report["metrics"].values():
        cells = []
        for name in SERVERS:
            values = entry["rounds"][name]
            cells.append(
                f"{_fmt(min(values), entry['unit'])}–{_fmt(max(values), entry['unit'])}"
                if values
                else "–"
            )
        lines.append(f"| {entry['label']} | {cells[0]} | {cells[1]} |")
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    lines += [
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; memory {m['memory_gib']} GiB; {m['os']}",
        f"- Python {m['python']}; {packages}",
        f"- load average when the run started: {m['load_average_at_start']}",
        "",
        "## What is measured",
        "",
        "- Servers: ours is `chat-server --backend echo --store memory:// --pace 0` (grpclib, "
        "uvloop where installed); the reference is "
        "`benchmarks/reference_server.py` (grpc.aio + protobuf, the same Chat behaviour). "
        "Each runs in its own process, started afresh per scenario.",
        "- Clients: separate processes using grpcio's C core (`grpc.aio`) with protobuf "
        "messages, at most 100 streams per connection; they share the machine with the "
        "server, which is why server CPU per chunk (from `/proc/<pid>/stat`) is the fair "
        "figure.",
        "- Throughput: each stream sends a 50-word message and reads the 56-chunk reply, again "
        "and again.",
        "- Latency: a probe stream on its own connection alternates PING (round trip to PONG) "
        "and a short message (time to its first chunk), idle and while "
        f"{report['settings']['load_streams']} streams run the throughput load (those load "
        f"clients at nice {LOAD_NICE}, so that on two cores the probe client is not starved "
        "of CPU by them and the figure is the server's).",
        "- Paced capacity: each stream sends one message per second; the reply is 20 chunks "
        "50 ms apart (`--pace 0.05`); a step passes when every message is answered, no "
        "stream starves, and p99 answer time is ≤ 1.2 s. The steps are "
        f"{', '.join(map(str, report['settings']['paced_steps']))} streams.",
        "- Idle streams: streams that each answered one PING; RSS growth of the server per "
        "stream, and whether all of the largest number of streams answer a PING again.",
        "",
        "![chart](latest.png)",
        "",
    ]
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [
        (e["label"], e[f"{k}_ratio"], e["better"], e["target_met"])
        for k, e in report["metrics"].items()
        if e[f"{k}_ratio"] is not None
    ]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(entries) + 1.6))
    labels = [
        f"{label} ({'lower' if b == 'lower' else 'higher'} is better)" for label, _, b, _ in entries
    ]
    ratios = [r for _, r, _, _ in entries]
    good = [(r <= 1.0) if b == "lower" else (r >= 1.0) for _, r, b, _ in entries]
    colors = ["#2a9d8f" if g else "#e76f51" for g in good]
    ax.barh(range(len(entries)), ratios, color=colors)
    ax.set_yticks(range(len(entries)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ticks = [
        t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50) if min(ratios) / 2 <= t <= max(ratios) * 2
    ]
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("ours / grpc.aio reference (log scale; green: ours is better or equal)")
    for i, r in enumerate(ratios):
        ax.text(r, i, f" {r:.2f}×", va="center", fontsize=8)
    ax.set_title(f"grpc-chat vs grpc.aio, {report['finished']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out / "latest.md").write_text(markdown(report))
    chart(report, out / "latest.png")


def print_table(report: dict[str, Any], write: Callable[[str], None] = print) -> None:
    write(f"{'metric':58} {'ours':>12} {'reference':>12} {'ratio':>8}")
    for key, entry in report["metrics"].items():
        ratio = entry[f"{key}_ratio"]
        write(
            f"{entry['label'] + ' (' + entry['unit'] + ')':58} "
            f"{_fmt(entry['ours'], entry['unit']):>12} "
            f"{_fmt(entry['reference'], entry['unit']):>12} "
            f"{'' if ratio is None else f'{ratio:.2f}x':>8}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small, short smoke run")
    parser.add_argument("--rounds", type=int, help="rounds of A B alternation (default 3)")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios among {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--streams", help="comma-separated stream counts for the throughput scenario"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="directory for latest.{md,json,png} (default: docs/benchmarks, "
        "or benchmarks/results/quick with --quick)",
    )
    args = parser.parse_args(argv)
    scenarios = tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    settings = Settings.make(args.quick, args.rounds, scenarios)
    if args.streams:
        settings = dataclasses.replace(
            settings, throughput_streams=tuple(int(x) for x in args.streams.split(","))
        )
    output = args.output or (
        ROOT / "benchmarks" / "results" / "quick" if args.quick else ROOT / "docs" / "benchmarks"
    )
    raise_fd_limit()
    # Generate the reference's protobuf code once, before processes race to do it.
    from benchmarks import _pb

    _pb.load()
    started = time.monotonic()
    mach = machine()
    rounds = asyncio.run(run(settings, ROOT / "benchmarks" / "results" / "logs"))
    summary = summarize(rounds, settings)
    report: dict[str, Any] = {
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks"
        + (" --quick" if args.quick else "")
        + (f" --rounds {args.rounds}" if args.rounds else "")
        + (f" --only {args.only}" if set(scenarios) != set(SCENARIOS) else ""),
        "seconds": round(time.monotonic() - started, 1),
        "rounds": settings.rounds,
        "settings": {
            "load_streams": settings.load_streams,
            "throughput_streams": list(settings.throughput_streams),
            "paced_steps": list(settings.paced_steps),
            "rss_streams": settings.rss_streams,
            "hold_streams": settings.hold_streams,
            "client": "grpcio C core (grpc.aio) + protobuf upb messages",
        },
        "machine": mach,
        "metrics": summary,
        "ratios": {f"{k}_ratio": e[f"{k}_ratio"] for k, e in summary.items()},
        "raw": rounds,
    }
    write_report(report, output)
    print_table(report)
    print(f"\nwrote {output}/latest.md, latest.json, latest.png in {report['seconds']} s")


if __name__ == "__main__":
    main()
