"""Benchmark our ``chat-server`` against the grpc.aio reference, side by side in one run.

Usage (from the repository root)::

    python -m benchmarks            # full run, writes docs/benchmarks/latest.{md,json,png}
    python -m benchmarks --quick    # smoke run: small and short, writes to benchmarks/results/
    tox -e bench                    # the full run in its own environment

Each server runs in its own process, started afresh for each scenario; the load comes from
``h2gen`` (:mod:`benchmarks.h2gen`), a gRPC client on raw HTTP/2 frames in C that costs a few
microseconds per message, so that the servers, not their clients, bound what is measured.
Each round runs "ours" then "reference" for every scenario; the report gives the median of
the rounds and the ratio ours/reference. Beside the two servers it compares, in the same
rounds: the openai backend's pass-through against the openai SDK reading the model server
directly, each session store against the raw writes it makes, and two replicas behind nginx
against one. Server CPU time and RSS are read from ``/proc/<pid>`` (Linux). All traffic is on
127.0.0.1, and every wait is bounded.
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
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import h2gen
from benchmarks._processes import (
    ROOT,
    Clients,
    Server,
    clients,
    cpu_seconds,
    log_file,
    percentile,
    started,
    stop_process,
)

SERVERS = ("ours", "reference")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

#: 50 words: the echo reply is 56 chunks (RESPONSE_START and RESPONSE_COMPLETE besides).
LOAD_TEXT = " ".join(f"word{i}" for i in range(50))
#: 14 words: the echo reply ("Echo #k (m messages in context): ...") is 20 chunks.
PACED_TEXT = " ".join(f"w{i}" for i in range(14))
PACED_CHUNKS = 20
PROBE_TEXT = "hello there, how are you"
#: The load generator of the latency-under-load scenario runs at this nice level, so that the
#: probe is not starved of CPU by it on a two-core machine: the probe then measures how the
#: server answers under load, not the client's share of the machine.
LOAD_NICE = 10
SCENARIOS = (
    "latency",
    "throughput",
    "loaded",
    "paced",
    "rss",
    "hold",
    "passthrough",
    "stores",
    "replicas",
)

#: What "ours" and "reference" are in each section of the report.
SECTIONS: dict[str, tuple[str, str, str]] = {
    # name: (title, ours, reference)
    "servers": ("grpc-chat against a grpc.aio reference", "ours", "grpc.aio reference"),
    "passthrough": (
        "Pass-through of the openai backend",
        "through chat-server",
        "openai SDK direct",
    ),
    "stores": ("Session stores against their raw floor", "store layer", "raw floor"),
    "replicas": ("Replicas behind nginx, Redis store", "2 replicas", "1 replica"),
}


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
    passthrough_streams: tuple[int, ...]
    passthrough_replies: tuple[int, ...]
    #: Tokens per reply and seconds between them, per level of passthrough_streams. The openai
    #: SDK spends about half a millisecond of CPU per token it parses (on either side, and
    #: a few milliseconds per request), so 100 streams at 50 tokens/s would need more than
    #: two cores for the SDK alone: the 100-stream level runs 5 tokens/s per stream, 500 in
    #: all, which leaves the server room, so that what is measured is the relay, not a queue.
    passthrough_tokens: tuple[int, ...]
    passthrough_pace: tuple[float, ...]
    #: Seconds over which the streams of a level start (one after the other, evenly): time to
    #: first token then measures a steady arrival of requests, not the queue of a burst.
    passthrough_stagger: tuple[float, ...]
    store_turns: int
    replica_steps: tuple[int, ...]
    scenarios: tuple[str, ...]
    store_sessions: int = 20
    #: Later rounds start the paced ladder this many steps below round 1's capacity.
    ladder_back: int = 2

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
                passthrough_streams=(1, 4),
                passthrough_replies=(1, 1),
                passthrough_stagger=(0.0, 0.2),
                passthrough_tokens=(10, 10),
                passthrough_pace=(0.02, 0.05),
                store_turns=30,
                replica_steps=(10,),
                scenarios=tuple(scenarios),
                store_sessions=3,
            )
        return cls(
            rounds=rounds or 3,
            quick=False,
            throughput_streams=(1, 10, 100, 1000),
            throughput_seconds=4.0,
            probe_seconds=4.0,
            load_streams=100,
            paced_steps=(100, 200, 300, 400, 500, 600, 800, 1000, 1200, 1500, 2000, 2500, 3000),
            paced_messages=5,
            paced_interval=1.0,
            paced_pace=0.05,
            rss_streams=2000,
            hold_streams=10_000,
            answer_limit=1.2,
            passthrough_streams=(1, 100),
            passthrough_replies=(3, 1),
            passthrough_stagger=(0.0, 2.0),
            passthrough_tokens=(50, 25),
            passthrough_pace=(0.02, 0.2),
            store_turns=500,
            replica_steps=(100, 200, 300, 400, 500, 600, 800, 1000, 1200, 1500, 2000),
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


def _chat_server() -> list[str]:
    script = Path(sys.executable).with_name("chat-server")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from chat.cli.server import main; main()"]


def server_command(name: str, pace: float, store: str = "memory://") -> list[str]:
    common = ["--host", "127.0.0.1", "--port", "0", "--pace", str(pace)]
    if name == "ours":
        # The memory store by default, as the reference keeps its sessions in memory too
        # (chat-server's default store is SQLite on disk).
        return [
            *_chat_server(),
            "--backend",
            "echo",
            "--store",
            store,
            "--log-level",
            "warning",
            *common,
        ]
    return [sys.executable, "-m", "benchmarks.reference_server", *common]


def running(
    name: str, pace: float, log_dir: Path, store: str = "memory://"
) -> contextlib.AbstractAsyncContextManager[Server]:
    """One of the two servers with the echo backend, ``pace`` seconds per word."""
    return started(name, server_command(name, pace, store), log_dir)


# -- clients ---------------------------------------------------------------------------------


def generator(
    params: Mapping[str, Any], within: float
) -> contextlib.AbstractAsyncContextManager[Clients]:
    """One ``h2gen`` process running ``params``."""
    return clients([h2gen.command(params)], within)


def _failed(result: Mapping[str, Any], what: str) -> None:
    if result.get("failed_streams"):
        raise RuntimeError(
            f"{what}: {result['failed_streams']} streams failed: {result['failures']}"
        )


# -- scenarios (one server each) -----------------------------------------------------------


def _setup_timeout(streams: int) -> float:
    return 30.0 + streams * 0.02


async def throughput(server: Server, streams: int, s: Settings) -> dict[str, float]:
    params = {
        "scenario": "throughput",
        "target": server.target,
        "streams": streams,
        "text": LOAD_TEXT,
        "duration": s.throughput_seconds,
    }
    async with generator(params, _setup_timeout(streams)) as group:
        cpu0, t0 = server.cpu_seconds(), time.monotonic()
        group.go()
        await asyncio.sleep(s.throughput_seconds)
        cpu1, t1 = server.cpu_seconds(), time.monotonic()
        (result,) = await group.results(s.throughput_seconds + 30)
    _failed(result, f"throughput on {server.name}")
    chunks, replies = result["chunks"], result["replies"]
    if not chunks:
        raise RuntimeError(f"throughput run on {server.name} received no chunk")
    cpu = cpu1 - cpu0
    return {
        "chunks_per_s": chunks / s.throughput_seconds,
        "replies_per_s": replies / s.throughput_seconds,
        "cpu_us_per_chunk": cpu / chunks * 1e6,
        "cpu_us_per_reply": cpu / max(1, replies) * 1e6,
        "server_cpu_share": cpu / (t1 - t0),
        "generator_cpu_us_per_message": result["client_cpu_s"] / max(1, result["messages"]) * 1e6,
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
    async with generator(_probe_params(server, s), 30) as group:
        cpu0 = server.cpu_seconds()
        group.go()
        (result,) = await group.results(s.probe_seconds + 30)
        cpu = server.cpu_seconds() - cpu0
    _failed(result, f"idle probe on {server.name}")
    # Less noisy than the latencies on a shared machine: what one PING and one message
    # (with its reply) cost the server.
    cycles = max(1, len(result["first_chunk"]))
    return {**_latencies(result, "idle_"), "idle_cpu_us_per_cycle": cpu / cycles * 1e6}


async def loaded_latency(server: Server, s: Settings) -> dict[str, float]:
    # The load runs a little longer than the probe, so the probe only sees steady load.
    load = {
        "scenario": "throughput",
        "target": server.target,
        "streams": s.load_streams,
        "text": LOAD_TEXT,
        "duration": s.probe_seconds + 1.5,
        "nice": LOAD_NICE,
    }
    async with (
        generator(load, _setup_timeout(s.load_streams)) as loading,
        generator(_probe_params(server, s), 30) as probing,
    ):
        loading.go()
        await asyncio.sleep(0.5)
        probing.go()
        (result,) = await probing.results(s.probe_seconds + 60)
        (loaded,) = await loading.results(s.probe_seconds + 60)
    _failed(result, f"loaded probe on {server.name}")
    _failed(loaded, f"load on {server.name}")
    return _latencies(result, "loaded_")


async def paced_step(
    targets: Sequence[str], pids: Sequence[int], streams: int, s: Settings
) -> dict[str, Any]:
    """``streams`` paced streams against ``targets[0]``; ``pids``: whose CPU to count."""
    params = {
        "scenario": "paced",
        "target": targets[0],
        "streams": streams,
        "text": PACED_TEXT,
        "messages": s.paced_messages,
        "interval": s.paced_interval,
        "grace": 3.0,
        "setup_timeout": _setup_timeout(streams),
    }
    async with generator(params, _setup_timeout(streams) + 10) as group:
        cpu0 = sum(cpu_seconds(pid) for pid in pids)
        group.go()
        (result,) = await group.results(s.paced_interval * s.paced_messages + 60)
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu0
    answers = result["answers"]
    p99 = percentile(answers, 99)
    messages = max(1, result["messages"])
    return {
        "streams": streams,
        "answer_p50_s": percentile(answers, 50),
        "answer_p99_s": p99,
        "unanswered": result["unanswered"],
        "starved_streams": result["starved_streams"],
        "failures": result["failures"],
        "server_cpu_s": cpu,
        "server_cpu_share": cpu / max(1e-9, result["seconds"]),
        "server_cpu_us_per_message": cpu / messages * 1e6,
        "generator_cpu_us_per_message": result["client_cpu_s"] / messages * 1e6,
        "ok": bool(answers)
        and result["unanswered"] == 0
        and result["starved_streams"] == 0
        and p99 <= s.answer_limit,
    }


StepRunner = Callable[[int], "contextlib.AbstractAsyncContextManager[tuple[list[str], list[int]]]"]


async def ladder(
    what: str, steps: Sequence[int], start: int, deploy: StepRunner, s: Settings
) -> dict[str, Any]:
    """Climb ``steps`` from ``start``: the largest served within the limit.

    Each step gets a fresh deployment from ``deploy`` (targets and the pids whose CPU counts).
    A step that fails is tried once more: on a shared machine one noisy second can push a p99
    over the line.
    """
    held = steps[start - 1] if start > 0 else 0
    tried = []
    best: dict[str, Any] | None = None
    for streams in steps[start:]:
        for _attempt in range(2):
            async with deploy(streams) as (targets, pids):
                step = await paced_step(targets, pids, streams, s)
            tried.append(step)
            log(
                f"    paced {what} {streams:5d} streams: p99 {step['answer_p99_s']:.3f}s, "
                f"unanswered {step['unanswered']}, starved {step['starved_streams']}, "
                f"server CPU {step['server_cpu_share']:.0%}, "
                f"{step['server_cpu_us_per_message']:.0f} µs/message (generator "
                f"{step['generator_cpu_us_per_message']:.1f}) -> "
                f"{'ok' if step['ok'] else 'over'}"
            )
            if step["ok"]:
                break
        if not step["ok"]:
            break
        held, best = streams, step
    return {"held": held, "steps": tried, "at_capacity": best}


async def paced_capacity(name: str, s: Settings, log_dir: Path, start: int) -> dict[str, Any]:
    @contextlib.asynccontextmanager
    async def deploy(streams: int) -> AsyncIterator[tuple[list[str], list[int]]]:
        async with running(name, s.paced_pace, log_dir) as server:
            yield [server.target], [server.pid]

    result = await ladder(name, s.paced_steps, start, deploy, s)
    out: dict[str, Any] = {"paced_capacity_streams": result["held"], "paced_steps": result["steps"]}
    if result["at_capacity"] is not None:
        at = result["at_capacity"]
        out["paced_server_cpu_us_per_message"] = at["server_cpu_us_per_message"]
        out["paced_generator_cpu_us_per_message"] = at["generator_cpu_us_per_message"]
    return out


async def idle_streams(server: Server, streams: int) -> dict[str, Any]:
    """Open ``streams`` idle streams; RSS growth per stream, and whether all are held."""
    rss0 = server.rss_bytes()
    params = {
        "scenario": "idle",
        "target": server.target,
        "streams": streams,
        "setup_timeout": _setup_timeout(streams),
    }
    async with generator(params, _setup_timeout(streams) + 30) as group:
        group.go()
        (result,) = await group.results(_setup_timeout(streams) + 30)
        await Clients.expect(group.processes[0], "holding")
        rss1 = server.rss_bytes()
    answered = result["answered"]
    return {
        "streams": streams,
        "opened": result["opened"],
        "answered": answered,
        "rss_bytes_per_stream": (rss1 - rss0) / max(1, answered),
        "held": answered == streams,
        "failures": result["failures"],
    }


# -- pass-through: the openai backend against the SDK reading the model server directly ------


@contextlib.asynccontextmanager
async def fake_model(tokens: int, pace: float, log_dir: Path) -> AsyncIterator[Server]:
    params = {"tokens": tokens, "pace": pace}
    command = [sys.executable, "-m", "benchmarks.passthrough", "fake", json.dumps(params)]
    async with started("fake-openai", command, log_dir) as fake:
        yield fake


def _stream_stats(ttft: Sequence[float], itl: Sequence[float]) -> dict[str, float]:
    return {
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "itl_p50_ms": percentile(itl, 50) * 1e3,
        "itl_p99_ms": percentile(itl, 99) * 1e3,
    }


async def passthrough(name: str, s: Settings, log_dir: Path) -> dict[str, Any]:
    """ours: h2gen through chat-server --backend openai; reference: the openai SDK direct."""
    out: dict[str, Any] = {}
    levels = zip(
        s.passthrough_streams,
        s.passthrough_replies,
        s.passthrough_tokens,
        s.passthrough_pace,
        s.passthrough_stagger,
        strict=True,
    )
    for streams, replies, tokens, pace, stagger in levels:
        budget = replies * (tokens * pace + 5) + stagger + 30
        async with fake_model(tokens, pace, log_dir) as fake:
            base_url = f"http://{fake.target}/v1"
            if name == "ours":
                result = await _through_server(
                    base_url, streams, replies, stagger, tokens, budget, log_dir
                )
            else:
                result = await _direct(base_url, streams, replies, stagger, budget)
        for key, value in result.items():
            out[f"pt_{key}_{streams}"] = value
        log(
            f"    pass-through {name} {streams:3d} streams: "
            f"ttft p50 {result['ttft_p50_ms']:.1f} ms p99 {result['ttft_p99_ms']:.1f} ms, "
            f"inter-token p50 {result['itl_p50_ms']:.2f} ms p99 {result['itl_p99_ms']:.2f} ms"
            + f", {result['cpu_us_per_token']:.0f} µs CPU/token"
            + (f", {result['chunks_per_reply']:.1f} chunks/reply" if name == "ours" else "")
        )
    return out


async def _through_server(
    base_url: str,
    streams: int,
    replies: int,
    stagger: float,
    tokens: int,
    budget: float,
    log_dir: Path,
) -> dict[str, float]:
    command = [
        *_chat_server(),
        "--backend",
        "openai",
        "--base-url",
        base_url,
        "--model",
        "fake-model",
        "--store",
        "memory://",
        "--log-level",
        "warning",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]
    async with started(
        "ours-openai", command, log_dir, env={"CHAT_API_KEY": "benchmark"}
    ) as server:
        params = {
            "scenario": "relay",
            "target": server.target,
            "streams": streams,
            "messages": replies,
            "stagger": stagger,
            "text": "go",
            "duration": budget,
            "setup_timeout": _setup_timeout(streams),
        }
        async with generator(params, _setup_timeout(streams) + 10) as group:
            cpu0 = server.cpu_seconds()
            group.go()
            (result,) = await group.results(budget + 30)
            cpu = server.cpu_seconds() - cpu0
    _failed(result, "pass-through through chat-server")
    # Tokens, not chunks: the coalescing window may merge tokens that arrive together.
    relayed = tokens * result["replies"]
    return {
        **_stream_stats(result["ttft"], result["itl"]),
        "chunks_per_reply": result["chunks"] / max(1, result["replies"]),
        "cpu_us_per_token": cpu / max(1, relayed) * 1e6,
    }


async def _direct(
    base_url: str, streams: int, replies: int, stagger: float, budget: float
) -> dict[str, float]:
    params = {
        "base_url": base_url,
        "streams": streams,
        "replies": replies,
        "stagger": stagger,
        "timeout": budget,
    }
    command = [sys.executable, "-m", "benchmarks.passthrough", "direct", json.dumps(params)]
    async with clients([command], budget) as group:
        group.go()
        (result,) = await group.results(budget + 30)
    return {
        **_stream_stats(result["ttft"], result["itl"]),
        "cpu_us_per_token": result["client_cpu_s"] / max(1, result["tokens"]) * 1e6,
    }


# -- stores -----------------------------------------------------------------------------------


STORE_KINDS = ("sqlite_full", "sqlite_normal", "redis")


async def stores(name: str, s: Settings) -> dict[str, float]:
    """ours: the store layer; reference: the same writes through sqlite3 / redis-py directly."""
    params = {
        "side": "store" if name == "ours" else "floor",
        "turns": s.store_turns,
        "sessions": s.store_sessions,
        "kinds": list(STORE_KINDS),
        "redis_url": REDIS_URL,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.stores",
        json.dumps(params),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(120):
            stdout, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"benchmarks.stores exited with {process.returncode}")
    result = json.loads(stdout)
    out = {}
    for kind, figures in result.items():
        for key, value in figures.items():
            out[f"store_{kind}_{key}"] = value
        log(
            f"    store {kind:13} {name}: {figures['turns_per_s']:7.0f} turns/s, "
            f"commit p50 {figures['commit_p50_ms']:.2f} ms p99 {figures['commit_p99_ms']:.2f} ms"
        )
    return out


# -- replicas behind nginx ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def nginx_config(directory: Path, port: int, upstreams: Sequence[str], connections: int) -> str:
    """nginx as a gRPC load balancer, as the README shows, sized for ``connections``.

    grpc_pass opens one upstream connection per call, so every paced stream is a connection
    to a replica; the worker gets enough of them (and open files) for the largest step.
    """
    servers = "\n".join(f"        server {address};" for address in upstreams)
    return f"""
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {4 * connections + 1024};
pid {directory}/nginx.pid;
error_log stderr warn;
events {{ worker_connections {2 * connections + 512}; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    upstream chat_replicas {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{
            grpc_pass grpc://chat_replicas;
            grpc_read_timeout 1h;
            grpc_send_timeout 1h;
        }}
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )
    if found is None:
        raise RuntimeError("the replicas scenario needs nginx (Debian: apt-get install nginx)")
    return found


@contextlib.asynccontextmanager
async def nginx(
    upstreams: Sequence[str], connections: int, log_dir: Path
) -> AsyncIterator[tuple[str, int]]:
    binary = nginx_binary()
    directory = Path(tempfile.mkdtemp(prefix="grpc-chat-nginx-"))
    port = _free_port()
    config = directory / "nginx.conf"
    config.write_text(nginx_config(directory, port, upstreams, connections))
    try:
        with log_file(log_dir, "nginx") as errors:
            process = await asyncio.create_subprocess_exec(
                binary, "-p", str(directory), "-c", str(config), "-e", "stderr", stderr=errors
            )
        try:
            async with asyncio.timeout(10):
                while True:  # until nginx listens
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", port)
                    except OSError:
                        if process.returncode is not None:
                            raise RuntimeError(f"nginx exited; see {log_dir}/nginx.log") from None
                        await asyncio.sleep(0.02)
                        continue
                    writer.close()
                    break
            yield f"127.0.0.1:{port}", process.pid
        finally:
            await stop_process(process)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def replicas(name: str, s: Settings, log_dir: Path, start: int) -> dict[str, Any]:
    """Paced capacity of 2 (ours) or 1 (reference) replicas of chat-server behind nginx."""
    count = 2 if name == "ours" else 1
    prefix = f"grpc-chat-bench-{uuid.uuid4().hex[:12]}"
    separator = "&" if "?" in REDIS_URL else "?"
    store = f"{REDIS_URL}{separator}prefix={prefix}"

    @contextlib.asynccontextmanager
    async def deploy(streams: int) -> AsyncIterator[tuple[list[str], list[int]]]:
        async with contextlib.AsyncExitStack() as stack:
            fleet = [
                await stack.enter_async_context(running("ours", s.paced_pace, log_dir, store))
                for _ in range(count)
            ]
            target, nginx_pid = await stack.enter_async_context(
                nginx([r.target for r in fleet], streams, log_dir)
            )
            yield [target], [nginx_pid, *(r.pid for r in fleet)]

    try:
        result = await ladder(f"{count} replica(s)", s.replica_steps, start, deploy, s)
    finally:
        await _delete_prefix(prefix)
    out: dict[str, Any] = {
        "replicas_paced_capacity_streams": result["held"],
        "replicas_steps": result["steps"],
    }
    if result["at_capacity"] is not None:
        out["replicas_cpu_us_per_message"] = result["at_capacity"]["server_cpu_us_per_message"]
    return out


async def _delete_prefix(prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Progress:
    """What later rounds start from: the first round's paced capacities, per side."""

    held: dict[str, int] = field(default_factory=dict)

    def start(self, key: str, steps: Sequence[int], back: int) -> int:
        if key not in self.held or self.held[key] not in steps:
            return 0
        return max(0, steps.index(self.held[key]) - back + 1)


async def one_round(
    name: str, s: Settings, log_dir: Path, first: bool, progress: Progress
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    wanted = s.scenarios
    if {"latency", "throughput"} & set(wanted):
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
                        f"{result['cpu_us_per_chunk']:6.1f} µs CPU/chunk "
                        f"(generator {result['generator_cpu_us_per_message']:.2f} µs/message)"
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
        key = f"paced/{name}"
        result = await paced_capacity(
            name, s, log_dir, progress.start(key, s.paced_steps, s.ladder_back)
        )
        progress.held.setdefault(key, int(result["paced_capacity_streams"]))
        out.update(result)
    if "passthrough" in wanted:
        out.update(await passthrough(name, s, log_dir))
    if "stores" in wanted:
        out.update(await stores(name, s))
    if "replicas" in wanted:
        key = f"replicas/{name}"
        result = await replicas(
            name, s, log_dir, progress.start(key, s.replica_steps, s.ladder_back)
        )
        progress.held.setdefault(key, int(result["replicas_paced_capacity_streams"]))
        out.update(result)
    return out


def _short(values: dict[str, Any], prefix: str) -> str:
    return ", ".join(
        f"{key.removeprefix(prefix)} {value:.2f}"
        for key, value in values.items()
        if key.startswith(prefix)
    )


async def run(s: Settings, log_dir: Path) -> dict[str, list[dict[str, Any]]]:
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in SERVERS}
    progress = Progress()
    for index in range(s.rounds):
        for name in SERVERS:
            log(f"round {index + 1}/{s.rounds}: {name}")
            rounds[name].append(
                await one_round(name, s, log_dir, first=index == 0, progress=progress)
            )
    return rounds


# -- the report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One row of the report: a figure of "ours" and of the section's reference."""

    key: str
    label: str
    unit: str
    better: str  # "lower" or "higher"
    section: str = "servers"
    #: ours / reference must be at most (lower is better) or at least (higher) this.
    target_ratio: float | None = None
    #: ours itself must be at most (lower) or at least (higher) this.
    target_value: float | None = None
    #: ours - reference must be at most this (what ours adds to the reference).
    target_added: float | None = None


def metrics(s: Settings) -> list[Metric]:
    found: list[Metric] = []
    wanted = s.scenarios
    if "throughput" in wanted:
        load = 100 if 100 in s.throughput_streams else s.throughput_streams[-1]
        found += [
            Metric(
                f"cpu_us_per_chunk_{load}",
                f"server CPU per chunk, {load} streams",
                "µs",
                "lower",
                target_ratio=1.0,
            ),
            Metric(
                f"cpu_us_per_reply_{load}",
                f"server CPU per 56-chunk reply, {load} streams",
                "µs",
                "lower",
            ),
            Metric(
                f"generator_cpu_us_per_message_{load}",
                f"load generator's own CPU per message, {load} streams",
                "µs",
                "lower",
            ),
        ]
        found += [
            Metric(
                f"chunks_per_s_{n}", f"chunks/s, {n} stream{'s' if n > 1 else ''}", "/s", "higher"
            )
            for n in s.throughput_streams
        ]
    for prefix, when, scenario in (
        ("idle_", "idle", "latency"),
        ("loaded_", f"under {s.load_streams}-stream load", "loaded"),
    ):
        if scenario not in wanted:
            continue
        # Idle, issue 16 asks for p50 and p99 at most the reference's; under load, p99.
        p50_target = 1.0 if prefix == "idle_" else None
        found += [
            *(
                [
                    Metric(
                        "idle_cpu_us_per_cycle",
                        "server CPU per idle PING + message (with its reply)",
                        "µs",
                        "lower",
                    )
                ]
                if prefix == "idle_"
                else []
            ),
            Metric(
                f"{prefix}ping_p50_ms", f"PING p50, {when}", "ms", "lower", target_ratio=p50_target
            ),
            Metric(f"{prefix}ping_p99_ms", f"PING p99, {when}", "ms", "lower", target_ratio=1.0),
            Metric(
                f"{prefix}first_chunk_p50_ms",
                f"first chunk p50, {when}",
                "ms",
                "lower",
                target_ratio=p50_target,
            ),
            Metric(
                f"{prefix}first_chunk_p99_ms",
                f"first chunk p99, {when}",
                "ms",
                "lower",
                target_ratio=1.0,
            ),
        ]
    if "paced" in wanted:
        found += [
            Metric(
                "paced_capacity_streams",
                f"paced streams held (p99 answer ≤ {s.answer_limit} s)",
                "streams",
                "higher",
                target_ratio=1.0,
                target_value=1000 if not s.quick else None,
            ),
            Metric(
                "paced_server_cpu_us_per_message",
                "server CPU per message at its paced capacity",
                "µs",
                "lower",
            ),
            Metric(
                "paced_generator_cpu_us_per_message",
                "load generator's own CPU per message, paced",
                "µs",
                "lower",
            ),
        ]
    if "rss" in wanted:
        found.append(
            Metric(
                "idle_rss_kib_per_stream",
                f"RSS per idle stream ({s.rss_streams} streams)",
                "KiB",
                "lower",
                target_ratio=1.0,
            )
        )
    if "hold" in wanted:
        found.append(
            Metric(
                "hold_streams_held",
                f"idle streams held (of {s.hold_streams})",
                "streams",
                "higher",
            )
        )
    if "passthrough" in wanted:
        for n in s.passthrough_streams:
            streams = f"{n} stream{'s' if n > 1 else ''}"
            found += [
                Metric(f"pt_ttft_p50_ms_{n}", f"time to first token p50, {streams}", "ms", "lower",
                       "passthrough"),
                Metric(f"pt_ttft_p99_ms_{n}", f"time to first token p99, {streams}", "ms", "lower",
                       "passthrough"),
                Metric(f"pt_itl_p50_ms_{n}", f"inter-token gap p50, {streams}", "ms", "lower",
                       "passthrough"),
                Metric(f"pt_itl_p99_ms_{n}", f"inter-token gap p99, {streams}", "ms", "lower",
                       "passthrough",
                       target_added=2.0 if n == max(s.passthrough_streams) else None),
                Metric(f"pt_cpu_us_per_token_{n}",
                       f"CPU per token (chat-server relaying / SDK reading), {streams}", "µs",
                       "lower", "passthrough"),
            ]  # fmt: skip
    if "stores" in wanted:
        for kind, title in (
            ("sqlite_full", "SQLite synchronous=FULL"),
            ("sqlite_normal", "SQLite synchronous=NORMAL"),
            ("redis", "Redis"),
        ):
            found += [
                Metric(f"store_{kind}_turns_per_s", f"{title}: turns committed/s", "/s",
                       "higher", "stores", target_ratio=1 / 1.2),
                Metric(f"store_{kind}_commit_p50_ms", f"{title}: commit p50", "ms", "lower",
                       "stores"),
                Metric(f"store_{kind}_commit_p99_ms", f"{title}: commit p99", "ms", "lower",
                       "stores", target_ratio=1.2),
            ]  # fmt: skip
    if "replicas" in wanted:
        found += [
            Metric("replicas_paced_capacity_streams",
                   f"paced streams held through nginx (p99 answer ≤ {s.answer_limit} s)",
                   "streams", "higher", "replicas"),
            Metric("replicas_cpu_us_per_message",
                   "CPU of replicas + nginx per message at capacity", "µs", "lower",
                   "replicas"),
        ]  # fmt: skip
    return found


def _met(metric: Metric, ours: float | None, ref: float | None) -> bool | None:
    checks = []
    lower = metric.better == "lower"
    if metric.target_ratio is not None and ours is not None and ref:
        ratio = ours / ref
        checks.append(ratio <= metric.target_ratio if lower else ratio >= metric.target_ratio)
    if metric.target_value is not None and ours is not None:
        value = metric.target_value
        checks.append(ours <= value if lower else ours >= value)
    if metric.target_added is not None and ours is not None and ref is not None:
        checks.append(ours - ref <= metric.target_added)
    return all(checks) if checks else None


def summarize(rounds: dict[str, list[dict[str, Any]]], s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric in metrics(s):
        key = metric.key
        values = {
            name: [
                r[key]
                for r in rounds[name]
                if isinstance(r.get(key), int | float) and r[key] == r[key]  # not NaN
            ]
            for name in SERVERS
        }
        medians = {name: statistics.median(v) if v else None for name, v in values.items()}
        ours, ref = medians["ours"], medians["reference"]
        out[key] = {
            "label": metric.label,
            "unit": metric.unit,
            "better": metric.better,
            "section": metric.section,
            "ours": ours,
            "reference": ref,
            f"{key}_ratio": ours / ref if ours is not None and ref else None,
            "added": ours - ref if ours is not None and ref is not None else None,
            "target_ratio": metric.target_ratio,
            "target_value": metric.target_value,
            "target_added": metric.target_added,
            "target_met": _met(metric, ours, ref),
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
    for package in (
        "grpc-chat",
        "grpclib",
        "betterproto2",
        "grpcio",
        "protobuf",
        "uvloop",
        "h2",
        "openai",
        "redis",
    ):
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


def _target(entry: dict[str, Any]) -> str:
    lower = entry["better"] == "lower"
    sign = "≤" if lower else "≥"
    parts = []
    if entry["target_ratio"] is not None:
        parts.append(f"{sign} {entry['target_ratio']:.2f}×".replace(".00×", ".0×"))
    if entry["target_value"] is not None:
        parts.append(f"ours {sign} {_fmt(entry['target_value'], entry['unit'])}")
    if entry["target_added"] is not None:
        parts.append(f"adds ≤ {entry['target_added']:g} {entry['unit']}")
    return ", ".join(parts)


#: The rows of the README's summary (``python -m benchmarks --table``), by section.
README_ROWS = (
    "cpu_us_per_chunk_100",
    "generator_cpu_us_per_message_100",
    "chunks_per_s_1",
    "chunks_per_s_100",
    "chunks_per_s_1000",
    "idle_ping_p50_ms",
    "idle_ping_p99_ms",
    "idle_first_chunk_p50_ms",
    "idle_first_chunk_p99_ms",
    "loaded_ping_p99_ms",
    "loaded_first_chunk_p99_ms",
    "paced_capacity_streams",
    "paced_server_cpu_us_per_message",
    "paced_generator_cpu_us_per_message",
    "idle_rss_kib_per_stream",
    "hold_streams_held",
    "pt_ttft_p50_ms_1",
    "pt_ttft_p99_ms_100",
    "pt_itl_p99_ms_1",
    "pt_itl_p99_ms_100",
    "pt_cpu_us_per_token_100",
    "store_sqlite_full_turns_per_s",
    "store_sqlite_full_commit_p99_ms",
    "store_sqlite_normal_turns_per_s",
    "store_sqlite_normal_commit_p99_ms",
    "store_redis_turns_per_s",
    "store_redis_commit_p99_ms",
    "replicas_paced_capacity_streams",
)


def section_tables(
    report: dict[str, Any], heading: str, keys: Sequence[str] | None = None
) -> list[str]:
    """One markdown table per section of the report (only ``keys``, if given)."""
    lines: list[str] = []
    for section, (title, ours_label, ref_label) in SECTIONS.items():
        entries = {
            k: e
            for k, e in report["metrics"].items()
            if e["section"] == section and (keys is None or k in keys)
        }
        if not entries:
            continue
        lines += [
            "",
            f"{heading} {title}",
            "",
            f"| metric | {ours_label} | {ref_label} | ratio | target | met |",
            "|---|---:|---:|---:|---:|:-:|",
        ]
        for key, entry in entries.items():
            ratio = entry[f"{key}_ratio"]
            met = {True: "yes", False: "**no**", None: ""}[entry["target_met"]]
            unit = entry["unit"]
            shown = "–" if ratio is None else f"{ratio:.2f}×"
            if entry["target_added"] is not None and entry["added"] is not None:
                shown += f" (adds {entry['added']:.2f} {unit})"
            lines.append(
                f"| {entry['label']} ({unit}) | {_fmt(entry['ours'], unit)} "
                f"| {_fmt(entry['reference'], unit)} | {shown} | {_target(entry)} | {met} |"
            )
    return lines


def readme_table(report: dict[str, Any]) -> str:
    """The README's summary of a report: its headline rows, one table per section."""
    m = report["machine"]
    lines = [
        f"Latest run ({report['finished']}, `{report['command']}`, {report['rounds']} rounds, "
        f"{report['seconds'] / 60:.0f} minutes; {m['cpu']}, {m['cores']} cores, load average "
        f"{m['load_average_at_start'][0]} at the start; medians, ratios from the same run):",
    ]
    if m["load_average_at_start"][0] > 1.0:
        lines += [
            "",
            "*Other work was running on the machine during this run: the latencies and the "
            "paced capacities are noisy (their spread is in latest.md).*",
        ]
    lines += section_tables(report, "####", README_ROWS)
    return "\n".join(lines) + "\n"


README = ROOT / "README.md"
_README_TABLE = re.compile(
    r"(<!-- benchmark-table: python -m benchmarks --table -->\n).*?(<!-- /benchmark-table -->)",
    re.DOTALL,
)


def update_readme(report: dict[str, Any], readme: Path = README) -> bool:
    """Put the report's summary tables between the README's benchmark-table markers."""
    text = readme.read_text()
    table = readme_table(report)
    updated, count = _README_TABLE.subn(lambda m: m[1] + table + m[2], text)
    if count != 1:
        return False
    readme.write_text(updated)
    return True


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    settings = report["settings"]
    lines = [
        "# Benchmark: grpc-chat vs a grpc.aio reference",
        "",
        f"Run {report['finished']} with `{report['command']}` in {report['seconds'] / 60:.1f} "
        f'minutes: {report["rounds"]} round(s), each running every scenario for "ours" then '
        "for the reference; each figure is the median of the rounds, the ratio is "
        "ours / reference from the same run.",
    ]
    lines += section_tables(report, "##")
    lines += [
        "",
        "## Spread of the rounds (min–max), a measure of the noise",
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
        "- Load: `benchmarks/h2gen.c`, a gRPC client on raw HTTP/2 frames (built with gcc at "
        "run time), one process, at most 100 streams per connection. It reads only the `type` "
        "of each response and never decodes headers, so it costs a few µs of CPU per message "
        '(the rows "load generator\'s own CPU per message") where the servers spend tens: '
        "what is measured is bounded by the servers. Server CPU comes from "
        "`/proc/<pid>/stat`.",
        "- Throughput: each stream sends a 50-word message and reads the 56-chunk reply, again "
        "and again.",
        "- Latency: a probe stream on its own connection alternates PING (round trip to PONG) "
        "and a short message (time to its first chunk), 10 ms apart, idle and while "
        f"{settings['load_streams']} streams run the throughput load (that load generator at "
        f"nice {LOAD_NICE}, so that on two cores the probe is not starved of CPU by it).",
        "- Paced capacity: each stream sends one message per second; the reply is 20 chunks "
        "50 ms apart (`--pace 0.05`); a step passes when every message is answered, no "
        f"stream starves, and p99 answer time is ≤ {settings['answer_limit']} s. A fresh "
        "server per step; a failed step is tried once more; rounds after the first start "
        f"{settings['ladder_back']} steps below the first round's capacity. The steps are "
        f"{', '.join(map(str, settings['paced_steps']))} streams.",
        "- Idle streams: streams that each answered one PING; RSS growth of the server per "
        "stream, and whether all of the largest number of streams answer a PING again.",
        "- Pass-through: the tests' fake OpenAI-compatible server (`tests/fake_llm.py`, in its "
        "own process) streams replies of "
        + " and ".join(
            f"{tokens} tokens {pace * 1e3:.0f} ms apart at {n} stream(s)"
            for n, tokens, pace in zip(
                settings["passthrough_streams"],
                settings["passthrough_tokens"],
                settings["passthrough_pace"],
                strict=True,
            )
        )
        + " (the openai SDK costs about half a millisecond of CPU per token it parses, on "
        "either side, so two cores do not hold 100 streams at 50 tokens/s). Direct: the `openai` "
        "SDK (configured as the openai backend configures it) reads it, one task per stream. "
        "Through chat-server: `chat-server --backend openai` (default coalescing window) "
        "relays it to h2gen. Time to first token is from sending the request; inter-token "
        "gaps are between consecutive tokens (chunks) of a reply; at "
        f"{', '.join(map(str, settings['passthrough_streams']))} concurrent streams.",
        "- Stores: one writer commits turns (a user message and its reply) in a row: the "
        "store layer (`await store.append(...)`, as the server does at the end of a turn) "
        "against the raw floor, the same rows and counters written directly with sqlite3 "
        "(one transaction, same WAL file settings) or redis-py (one MULTI/EXEC); "
        f"{settings['store_turns']} turns after a warm-up, no server.",
        "- Replicas: the paced load through nginx (`grpc_pass`, one worker) to 1 or 2 "
        "`chat-server` replicas on one Redis store; the CPU row adds up the replicas and "
        "nginx. Everything (Redis and the load generator too) shares the same two cores, so "
        "a second replica adds an event loop, not a core.",
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
        (e["label"], e[f"{k}_ratio"], e["better"], e["section"])
        for k, e in report["metrics"].items()
        if e[f"{k}_ratio"] is not None and e[f"{k}_ratio"] > 0
    ]
    if not entries:
        return
    fig, ax = plt.subplots(figsize=(10, 0.36 * len(entries) + 1.6))
    labels = [
        f"{label} [{SECTIONS[section][1]} / {SECTIONS[section][2]}]"
        for label, _, _, section in entries
    ]
    ratios = [r for _, r, _, _ in entries]
    good = [(r <= 1.0) if b == "lower" else (r >= 1.0) for _, r, b, _ in entries]
    colors = ["#2a9d8f" if g else "#e76f51" for g in good]
    ax.barh(range(len(entries)), ratios, color=colors)
    ax.set_yticks(range(len(entries)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ticks = [
        t
        for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
        if min(ratios) / 2 <= t <= max(ratios) * 2
    ]
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("ratio (log scale; green: the first of the pair is better or equal)")
    for i, r in enumerate(ratios):
        ax.text(r, i, f" {r:.2f}×", va="center", fontsize=7)
    ax.set_title(f"grpc-chat benchmark, {report['finished']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out / "latest.md").write_text(markdown(report))
    chart(report, out / "latest.png")


def print_table(report: dict[str, Any], write: Callable[[str], None] = print) -> None:
    write(f"{'metric':64} {'ours':>12} {'reference':>12} {'ratio':>8}")
    for key, entry in report["metrics"].items():
        ratio = entry[f"{key}_ratio"]
        write(
            f"{entry['label'] + ' (' + entry['unit'] + ')':64} "
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
        "--paced-steps", help="comma-separated stream counts of the paced (and replicas) ladder"
    )
    parser.add_argument(
        "--table",
        nargs="?",
        const=ROOT / "docs" / "benchmarks" / "latest.json",
        type=Path,
        metavar="JSON",
        help="print the README's summary tables of a finished run (default: "
        "docs/benchmarks/latest.json) and exit, running nothing",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="directory for latest.{md,json,png} (default: docs/benchmarks, "
        "or benchmarks/results/quick with --quick)",
    )
    args = parser.parse_args(argv)
    if args.table is not None:
        print(readme_table(json.loads(args.table.read_text())), end="")
        return
    scenarios = tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    settings = Settings.make(args.quick, args.rounds, scenarios)
    if args.streams:
        settings = dataclasses.replace(
            settings, throughput_streams=tuple(int(x) for x in args.streams.split(","))
        )
    if args.paced_steps:
        steps = tuple(int(x) for x in args.paced_steps.split(","))
        settings = dataclasses.replace(settings, paced_steps=steps, replica_steps=steps)
    output = args.output or (
        ROOT / "benchmarks" / "results" / "quick" if args.quick else ROOT / "docs" / "benchmarks"
    )
    raise_fd_limit()
    # Generate the reference's protobuf code and build the load generator once, before
    # processes race to do it.
    from benchmarks import _pb

    _pb.load()
    h2gen.binary()
    started_at = time.monotonic()
    mach = machine()
    rounds = asyncio.run(run(settings, ROOT / "benchmarks" / "results" / "logs"))
    summary = summarize(rounds, settings)
    report: dict[str, Any] = {
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks"
        + (" --quick" if args.quick else "")
        + (f" --rounds {args.rounds}" if args.rounds else "")
        + (f" --only {args.only}" if set(scenarios) != set(SCENARIOS) else "")
        + (f" --streams {args.streams}" if args.streams else "")
        + (f" --paced-steps {args.paced_steps}" if args.paced_steps else ""),
        "seconds": round(time.monotonic() - started_at, 1),
        "rounds": settings.rounds,
        "settings": {
            "load_streams": settings.load_streams,
            "throughput_streams": list(settings.throughput_streams),
            "paced_steps": list(settings.paced_steps),
            "replica_steps": list(settings.replica_steps),
            "ladder_back": settings.ladder_back,
            "answer_limit": settings.answer_limit,
            "rss_streams": settings.rss_streams,
            "hold_streams": settings.hold_streams,
            "passthrough_streams": list(settings.passthrough_streams),
            "passthrough_tokens": list(settings.passthrough_tokens),
            "passthrough_pace": list(settings.passthrough_pace),
            "passthrough_stagger": list(settings.passthrough_stagger),
            "store_turns": settings.store_turns,
            "client": "h2gen (benchmarks/h2gen.c): raw HTTP/2 frames, gcc -O2",
        },
        "sections": {
            name: {"title": title, "ours": ours, "reference": ref}
            for name, (title, ours, ref) in SECTIONS.items()
        },
        "machine": mach,
        "metrics": summary,
        "ratios": {f"{k}_ratio": e[f"{k}_ratio"] for k, e in summary.items()},
        "raw": rounds,
    }
    write_report(report, output)
    # The full run into docs/benchmarks: the README shows its tables.
    full = args.output is None and not args.quick and set(scenarios) == set(SCENARIOS)
    if full and not update_readme(report):
        log(f"{README} has no benchmark-table markers: its tables were not updated")
    print_table(report)
    print(f"\nwrote {output}/latest.md, latest.json, latest.png in {report['seconds']} s")


if __name__ == "__main__":
    main()
