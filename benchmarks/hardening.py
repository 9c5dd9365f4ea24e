"""Issue 12's benchmark: what the hardening costs, and what hostile requests cost others.

Usage (from the repository root)::

    python -m benchmarks.hardening                  # full run; docs/benchmarks/hardening.*
    python -m benchmarks.hardening --quick          # smoke run; benchmarks/results/hardening/
    python -m benchmarks.hardening --only cost      # one scenario (cost or hostile)
    python -m benchmarks.hardening --base REF       # the code to compare with (a git ref)

Two servers, each ``chat-server --backend echo --store memory://`` in its own process,
started afresh for every scenario and round, alternating: ``ours`` (this tree) and ``base``
(``--base``, by default the commit before issue 12's work, exported with ``git archive``
and run with this environment's packages). Every client is grpcio (C core) in a process
of its own, run from this module (``--role``).

- ``cost``: ``--streams`` streams each ask for a 50-word echo reply again and again for
  ``--seconds``; a probe stream alternates a PING and a short message. Reported: server CPU
  per streamed chunk, and PING and first-chunk p50/p99 under that load. The hardening's
  claim is "unchanged within noise": ours/base about 1.0.
- ``hostile``: the probe stream runs alone while a hostile client sends, one after the
  other, GetSessionInfo with a session id of ``--id-chars`` characters, CreateSession with a
  title of ``--title-mb`` MB and a few hundred malformed bodies. Reported: the probe's PING
  p99 and worst case meanwhile, how long each hostile request took to be answered and with
  which status, and the server's peak RSS.

Servers run on 127.0.0.1; every wait is bounded; load clients run niced so that the probe
measures the server rather than its own share of two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks._processes import ROOT, Server, percentile, started

SERVERS = ("ours", "base")
SCENARIOS = ("cost", "hostile")
#: main before issue 12's work (the merge base of work/hardening).
DEFAULT_BASE = "fde3b9c"
#: A 56-chunk echo reply, as in benchmarks.run.
LOAD_TEXT = " ".join(f"word{i}" for i in range(50))
PROBE_TEXT = "hello there, how are you"
LOAD_NICE = 10


# -- the code under test ---------------------------------------------------------


def export_base(ref: str, into: Path) -> Path:
    """``ref``'s tree (``git archive``) under ``into``; reused when already there."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    tree = into / f"base-{commit[:12]}"
    if (tree / "chat" / "__init__.py").exists():
        return tree
    tree.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit], cwd=ROOT, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    return tree


def server_command(tree: Path) -> tuple[list[str], dict[str, str]]:
    """How to run ``chat-server`` of ``tree``, and its environment."""
    command = [
        sys.executable,
        "-c",
        "from chat.cli.server import main; main()",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--backend",
        "echo",
        "--store",
        "memory://",
        "--log-level",
        "warning",
    ]
    # The tree first: its chat and chatpb, not the installed ones.
    env = {**os.environ, "PYTHONPATH": f"{tree}:{tree / 'gen'}", "PYTHONUNBUFFERED": "1"}
    return command, env


def running(name: str, tree: Path, log_dir: Path) -> contextlib.AbstractAsyncContextManager[Server]:
    command, env = server_command(tree)
    return started(name, command, log_dir, env=env, cwd=tree)


def _flag(path: Path, *, up: bool) -> None:
    """Create (``up``) or remove the file that tells a probe to stop."""
    if up:
        path.touch()
    else:
        path.unlink(missing_ok=True)


def _flagged(path: str | None) -> bool:
    return path is not None and os.path.exists(path)


async def client(role: str, target: str, *args: str, nice: int = 0, within: float) -> Any:
    """Run this module as a client process; its one JSON line of results."""
    process = await asyncio.create_subprocess_exec(
        *(["nice", "-n", str(nice)] if nice else []),
        sys.executable,
        "-m",
        "benchmarks.hardening",
        "--role",
        role,
        "--target",
        target,
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(within):
        out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{role} client failed ({process.returncode})")
    return json.loads(out.decode().strip().splitlines()[-1])


# -- scenarios ---------------------------------------------------------


async def cost(server: Server, s: argparse.Namespace) -> dict[str, float]:
    seconds = str(s.seconds)
    cpu = server.cpu_seconds()
    load, probe = await asyncio.gather(
        client(
            "load",
            server.target,
            "--streams",
            str(s.streams),
            "--seconds",
            seconds,
            nice=LOAD_NICE,
            within=s.seconds + 60,
        ),
        client("probe", server.target, "--seconds", seconds, within=s.seconds + 60),
    )
    cpu = server.cpu_seconds() - cpu
    return {
        "chunks": load["chunks"],
        "cpu_us_per_chunk": 1e6 * cpu / max(1, load["chunks"]),
        "ping_p50_ms": percentile(probe["ping"], 50),
        "ping_p99_ms": percentile(probe["ping"], 99),
        "first_chunk_p50_ms": percentile(probe["first_chunk"], 50),
        "first_chunk_p99_ms": percentile(probe["first_chunk"], 99),
    }


async def hostile(server: Server, s: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    stop = log_dir / f"stop-probe-{server.process.pid}"
    _flag(stop, up=False)
    probe_task = asyncio.ensure_future(
        client("probe", server.target, "--seconds", "600", "--stop-file", str(stop), within=660)
    )
    try:
        # The probe first settles in; then the hostile requests, one after the other.
        await asyncio.sleep(0.5)
        attack = await client(
            "hostile",
            server.target,
            "--id-chars",
            str(s.id_chars),
            "--title-mb",
            str(s.title_mb),
            "--junk",
            str(s.junk),
            within=600,
        )
    finally:
        _flag(stop, up=True)
    probe = await probe_task
    _flag(stop, up=False)
    return {
        "probe_ping_p99_ms": percentile(probe["ping"], 99),
        "probe_ping_max_ms": max(probe["ping"], default=float("nan")),
        "probe_pings": len(probe["ping"]),
        "calls": attack["calls"],
        "peak_rss_mb": server.peak_rss_mb(),
    }


async def run(s: argparse.Namespace, trees: dict[str, Path], log_dir: Path) -> dict[str, Any]:
    results: dict[str, dict[str, list[Any]]] = {n: {"cost": [], "hostile": []} for n in SERVERS}
    for round_ in range(s.rounds):
        # Alternate who goes first, so that neither always runs on a warmer machine.
        order = SERVERS if round_ % 2 == 0 else tuple(reversed(SERVERS))
        for scenario in s.only:
            for name in order:
                print(f"round {round_ + 1}: {scenario} on {name}", file=sys.stderr, flush=True)
                async with running(name, trees[name], log_dir) as server:
                    if scenario == "cost":
                        result = await cost(server, s)
                    else:
                        result = await hostile(server, s, log_dir)
                    results[name][scenario].append(result)
    return results


COST_METRICS = (
    ("cpu_us_per_chunk", "server CPU per chunk", "µs"),
    ("ping_p50_ms", "PING p50 under load", "ms"),
    ("ping_p99_ms", "PING p99 under load", "ms"),
    ("first_chunk_p50_ms", "first chunk p50 under load", "ms"),
    ("first_chunk_p99_ms", "first chunk p99 under load", "ms"),
)
HOSTILE_METRICS = (
    ("probe_ping_p99_ms", "probe PING p99 meanwhile", "ms"),
    ("probe_ping_max_ms", "probe PING worst meanwhile", "ms"),
    ("peak_rss_mb", "server peak RSS", "MB"),
)


def _median(rounds: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rounds) if rounds else float("nan")


def markdown(report: dict[str, Any]) -> str:
    results = report["results"]
    lines = [
        "# Hardening (issue 12): cost and hostile requests",
        "",
        f"`{report['command']}` on {report['machine']}, {report['when']}. "
        f"ours = {report['ours']}, base = {report['base']}; medians of {report['rounds']} "
        "rounds.",
        "",
    ]
    for scenario, metrics in (("cost", COST_METRICS), ("hostile", HOSTILE_METRICS)):
        if not results["ours"][scenario]:
            continue
        lines += [f"## {scenario}", "", "| metric | ours | base | ours/base |", "|---|---|---|---|"]
        for key, label, unit in metrics:
            ours = _median(results["ours"][scenario], key)
            base = _median(results["base"][scenario], key)
            ratio = ours / base if base else float("nan")
            lines.append(f"| {label} | {ours:.2f} {unit} | {base:.2f} {unit} | {ratio:.2f} |")
        lines.append("")
        if scenario == "hostile":
            lines += ["| hostile request | ours | base |", "|---|---|---|"]
            first = {n: results[n]["hostile"][0]["calls"] for n in SERVERS}
            for mine, theirs in zip(first["ours"], first["base"], strict=True):
                lines.append(
                    f"| {mine['what']} | {mine['status']} in {mine['seconds']:.3f} s | "
                    f"{theirs['status']} in {theirs['seconds']:.3f} s |"
                )
            lines.append("")
    return "\n".join(lines)


# -- clients (run as processes of their own) -------------------------------------------------------


def _stubs() -> tuple[Any, Any]:
    from benchmarks import _pb

    return _pb.load()


async def _load(target: str, streams: int, seconds: float) -> dict[str, Any]:
    import grpc

    pb, pb_grpc = _stubs()
    counts = {"chunks": 0, "replies": 0}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ChatServiceStub(channel)
        sessions = [
            (await stub.CreateSession(pb.CreateSessionRequest())).session_id for _ in range(streams)
        ]
        deadline = time.monotonic() + seconds

        async def one(session_id: str) -> None:
            call = stub.Chat()
            try:
                while time.monotonic() < deadline:
                    await call.write(pb.ChatRequest(session_id=session_id, message=LOAD_TEXT))
                    while True:
                        event = await call.read()
                        if event.type == pb.ChatResponse.CHUNK:
                            counts["chunks"] += 1
                        elif event.type in (
                            pb.ChatResponse.RESPONSE_COMPLETE,
                            pb.ChatResponse.ERROR,
                        ):
                            counts["replies"] += 1
                            break
            finally:
                call.cancel()

        await asyncio.gather(*(one(session_id) for session_id in sessions))
    return counts


async def _probe(target: str, seconds: float, stop_file: str | None) -> dict[str, Any]:
    import grpc

    pb, pb_grpc = _stubs()
    pings: list[float] = []
    firsts: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ChatServiceStub(channel)
        session_id = (await stub.CreateSession(pb.CreateSessionRequest())).session_id
        call = stub.Chat()
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                if _flagged(stop_file):
                    break
                start = time.perf_counter()
                await call.write(pb.ChatRequest(type=pb.ChatRequest.PING))
                while (await call.read()).type != pb.ChatResponse.PONG:
                    pass
                pings.append(1000 * (time.perf_counter() - start))
                start = time.perf_counter()
                await call.write(pb.ChatRequest(session_id=session_id, message=PROBE_TEXT))
                first = None
                while True:
                    event = await call.read()
                    if event.type == pb.ChatResponse.CHUNK and first is None:
                        first = 1000 * (time.perf_counter() - start)
                    if event.type in (pb.ChatResponse.RESPONSE_COMPLETE, pb.ChatResponse.ERROR):
                        break
                if first is not None:
                    firsts.append(first)
                await asyncio.sleep(0.02)
        finally:
            call.cancel()
    return {"ping": pings, "first_chunk": firsts}


async def _hostile(target: str, id_chars: int, title_mb: float, junk: int) -> dict[str, Any]:
    import grpc

    pb, pb_grpc = _stubs()
    calls: list[dict[str, Any]] = []
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.ChatServiceStub(channel)
        raw = channel.unary_unary(
            "/ChatService/GetSessionInfo",
            request_serializer=lambda body: body,
            response_deserializer=lambda body: body,
        )

        async def timed(what: str, call: Any) -> None:
            start = time.perf_counter()
            try:
                await call
                status = "OK"
            except grpc.aio.AioRpcError as error:
                status = error.code().name
            calls.append({"what": what, "status": status, "seconds": time.perf_counter() - start})

        await timed(
            f"GetSessionInfo, {id_chars:,}-character id",
            stub.GetSessionInfo(pb.SessionInfoRequest(session_id="x" * id_chars), timeout=300),
        )
        await timed(
            f"CreateSession, {title_mb:g} MB title",
            stub.CreateSession(
                pb.CreateSessionRequest(title="t" * int(title_mb * 2**20)), timeout=300
            ),
        )
        start = time.perf_counter()
        statuses: dict[str, int] = {}
        for n in range(junk):
            body = bytes((n * 37 + k * 101) % 256 for k in range(64))
            try:
                await raw(body, timeout=30)
                status = "OK"
            except grpc.aio.AioRpcError as error:
                status = error.code().name
            statuses[status] = statuses.get(status, 0) + 1
        shown = ", ".join(f"{k} ×{v}" for k, v in sorted(statuses.items()))
        calls.append(
            {
                "what": f"{junk} malformed GetSessionInfo bodies",
                "status": shown,
                "seconds": time.perf_counter() - start,
            }
        )
    return {"calls": calls}


# -- the program ---------------------------------------------------------


def machine() -> str:
    cpus = os.cpu_count() or 0
    return (
        f"{platform.system()} {platform.machine()}, {cpus} CPUs, Python {platform.python_version()}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hardening")
    parser.add_argument("--quick", action="store_true", help="a small, short smoke run")
    parser.add_argument("--rounds", type=int, help="rounds of ours/base alternation")
    parser.add_argument("--only", help=f"comma-separated scenarios of {', '.join(SCENARIOS)}")
    parser.add_argument("--base", default=DEFAULT_BASE, help="git ref to compare with")
    parser.add_argument("--out", type=Path, help="where to write the report")
    parser.add_argument("--role", choices=("load", "probe", "hostile"), help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--id-chars", type=int)
    parser.add_argument("--title-mb", type=float)
    parser.add_argument("--junk", type=int)
    parser.add_argument("--stop-file", help=argparse.SUPPRESS)
    s = parser.parse_args(argv)

    if s.role is not None:
        target = s.target
        if s.role == "load":
            result = asyncio.run(_load(target, s.streams, s.seconds))
        elif s.role == "probe":
            result = asyncio.run(_probe(target, s.seconds, s.stop_file))
        else:
            result = asyncio.run(_hostile(target, s.id_chars, s.title_mb, s.junk))
        print(json.dumps(result))
        return

    s.rounds = s.rounds or (1 if s.quick else 3)
    s.only = tuple(s.only.split(",")) if s.only else SCENARIOS
    if unknown := set(s.only) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    s.streams = s.streams or (10 if s.quick else 100)
    s.seconds = s.seconds or (2.0 if s.quick else 6.0)
    s.id_chars = s.id_chars or (100_000 if s.quick else 300_000)
    s.title_mb = s.title_mb or (10 if s.quick else 100)
    s.junk = s.junk or (50 if s.quick else 250)
    results_dir = ROOT / "benchmarks" / "results" / "hardening"
    out = s.out or (results_dir if s.quick else ROOT / "docs" / "benchmarks")
    trees = {"ours": ROOT, "base": export_base(s.base, results_dir)}
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results = asyncio.run(run(s, trees, results_dir / "logs"))
    report = {
        "command": "python -m benchmarks.hardening"
        + (" --quick" if s.quick else "")
        + (f" --only {','.join(s.only)}" if s.only != SCENARIOS else "")
        + (f" --base {s.base}" if s.base != DEFAULT_BASE else ""),
        "machine": machine(),
        "when": started,
        "ours": "this tree",
        "base": s.base,
        "rounds": s.rounds,
        "settings": {
            k: getattr(s, k) for k in ("streams", "seconds", "id_chars", "title_mb", "junk")
        },
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "hardening.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "hardening.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
