"""What live sessions cost: CPU per delivered chunk with watchers, resume latency, memory of
the replay log.

A program, not a test: ``python -m benchmarks.live [--quick] [--rounds N]``.

- **Watchers.** A server in its own process (a real ``ChatServer`` on 127.0.0.1, echo
  backend, memory store, the garbage collector tuned as ``chat-server`` tunes it) and a load
  client in another (grpclib; its CPU is not counted). The client keeps ``--senders`` streams
  busy, each on a session of its own, sending a 50-word message and reading its 56-chunk
  reply again and again; each session has 0, 1, 10 or 100 watching streams (``WATCH``), which
  read every event. Each round gives the server's CPU time (from ``/proc``) over the chunks
  the senders received, and over all chunks delivered (senders' and watchers'). The cost of a
  watcher is set against the cost of a stream today: ``(cpu(W) - cpu(0)) / W`` per sent chunk
  against ``cpu(0)`` per sent chunk (the issue's target is that the first is no more than the
  second).
- **Resume latency.** A turn of 56 chunks is stored; then, again and again, a new connection
  is made and a ``RESUME`` after its first event sent: the time from opening the connection
  to the first replayed chunk, p50 and p99.
- **Memory per replayed event.** In this process: the replay log's allocation (tracemalloc)
  for 100,000 chunk events of one word, per event, against the size the log counts for its
  byte bound.

Results go to ``benchmarks/results/live.{md,json}`` (``--output`` for another directory).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import statistics
import sys
import time
import tracemalloc
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from grpclib.client import Channel

import chatpb
from benchmarks._processes import (
    ROOT,
    Server,
    close_and_wait,
    cpu_seconds,
    percentile,
    serving_module,
    started,
)
from benchmarks.hardening import export_base, server_command
from chat.cli.server import _tune_gc
from chat.config import ServerConfig
from chat.events import Event, EventKind, ReplyCounter
from chat.outbox import stamp
from chat.replay import MemoryReplayLog, ReplaySettings, event_size
from chat.server import ChatServer

RESULTS = Path(__file__).parent / "results"
#: 50 words: the echo reply is 56 chunks.
TEXT = " ".join(f"word{i}" for i in range(50))
WATCHERS = (0, 1, 10, 100)
#: main before live sessions (issue 11) were merged into it.
DEFAULT_BASE = "2ee9c9c"
_PER_CONNECTION = 50


@dataclass(frozen=True)
class Settings:
    rounds: int
    senders: int
    seconds: float
    resumes: int
    events: int
    #: The server's ``--store`` (memory by default; a ``redis://`` URL puts the replay log
    #: in Redis too, whose own CPU is not counted).
    store: str = "memory://"


# -- the server (a process of its own) -------------------------------------------------------


async def _serve(store: str) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, store=store, grace_period=1.0)
    loop = asyncio.get_running_loop()
    async with ChatServer(config) as server:
        print(json.dumps({"port": server.port}), flush=True)
        # Until the benchmark closes our stdin.
        await loop.run_in_executor(None, sys.stdin.read)


def serve_main(store: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    _tune_gc()
    asyncio.run(_serve(store))


# -- the load client (a process of its own) --------------------------------------------------


def _requests(
    queue: asyncio.Queue[chatpb.ChatRequest | None],
) -> AsyncGenerator[chatpb.ChatRequest, None]:
    async def requests() -> AsyncGenerator[chatpb.ChatRequest, None]:
        while (request := await queue.get()) is not None:
            yield request

    return requests()


async def _load(port: int, senders: int, watchers: int, seconds: float) -> dict[str, int]:
    counts = {"sent": 0, "watched": 0}
    async with Channel("127.0.0.1", port) as channel:
        stub = chatpb.ChatServiceStub(channel)
        sessions = [
            (await stub.create_session(chatpb.CreateSessionRequest())).session_id
            for _ in range(senders)
        ]
        stop = asyncio.Event()

        async def watch(
            watch_stub: chatpb.ChatServiceStub, session_id: str, ready: asyncio.Event
        ) -> None:
            queue: asyncio.Queue[chatpb.ChatRequest | None] = asyncio.Queue()
            queue.put_nowait(
                chatpb.ChatRequest(type=chatpb.ChatRequestType.WATCH, session_id=session_id)
            )
            stream = cast(
                "AsyncGenerator[chatpb.ChatResponse, None]", watch_stub.chat(_requests(queue))
            )
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    if event.type == chatpb.ChatResponseType.STATUS:
                        ready.set()
                    elif event.type == chatpb.ChatResponseType.CHUNK and not stop.is_set():
                        counts["watched"] += 1

        async def send(session_id: str, deadline: float) -> None:
            queue: asyncio.Queue[chatpb.ChatRequest | None] = asyncio.Queue()
            turn = 0

            def ask() -> None:
                queue.put_nowait(
                    chatpb.ChatRequest(session_id=session_id, message=TEXT, request_id=str(turn))
                )

            ask()
            stream = cast("AsyncGenerator[chatpb.ChatResponse, None]", stub.chat(_requests(queue)))
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    if event.type == chatpb.ChatResponseType.CHUNK:
                        counts["sent"] += 1
                    elif event.type == chatpb.ChatResponseType.RESPONSE_COMPLETE:
                        turn += 1
                        if time.monotonic() >= deadline:
                            queue.put_nowait(None)
                        else:
                            ask()
                    elif event.type == chatpb.ChatResponseType.ERROR:
                        raise RuntimeError(event.error_message)

        readies = []
        watching = []
        # HTTP/2 caps the streams of a connection (100 by default): watchers get their own,
        # _PER_CONNECTION streams each.
        channels: list[Channel] = []
        for session_id in sessions:
            for n in range(watchers):
                if n % _PER_CONNECTION == 0:
                    channels.append(Channel("127.0.0.1", port))
                    watch_stub = chatpb.ChatServiceStub(channels[-1])
                ready = asyncio.Event()
                readies.append(ready)
                watching.append(asyncio.create_task(watch(watch_stub, session_id, ready)))
        await asyncio.gather(*(r.wait() for r in readies))
        # The watchers are all in place: count from here (the caller reads /proc now).
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(send(s, deadline) for s in sessions))
        stop.set()
        print(json.dumps(counts), flush=True)
        for task in watching:
            task.cancel()
        await asyncio.gather(*watching, return_exceptions=True)
        for watch_channel in channels:
            watch_channel.close()
    return counts


def client_main(spec: str) -> None:
    port, senders, watchers, seconds = spec.split(",")
    asyncio.run(_load(int(port), int(senders), int(watchers), float(seconds)))


# -- resume latency (from this process) ------------------------------------------------------


async def _resume_latency(port: int, resumes: int) -> list[float]:
    async with Channel("127.0.0.1", port) as channel:
        stub = chatpb.ChatServiceStub(channel)
        session_id = (await stub.create_session(chatpb.CreateSessionRequest())).session_id
        queue: asyncio.Queue[chatpb.ChatRequest | None] = asyncio.Queue()
        queue.put_nowait(chatpb.ChatRequest(session_id=session_id, message=TEXT, request_id="r"))
        queue.put_nowait(None)
        turn_id = ""
        stream = cast("AsyncGenerator[chatpb.ChatResponse, None]", stub.chat(_requests(queue)))
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                turn_id = turn_id or event.turn_id
    latencies = []
    for _ in range(resumes):
        started = time.perf_counter()
        async with Channel("127.0.0.1", port) as channel:
            stub = chatpb.ChatServiceStub(channel)
            queue = asyncio.Queue()
            queue.put_nowait(
                chatpb.ChatRequest(
                    type=chatpb.ChatRequestType.RESUME,
                    session_id=session_id,
                    turn_id=turn_id,
                    after_seq=1,
                )
            )
            stream = cast("AsyncGenerator[chatpb.ChatResponse, None]", stub.chat(_requests(queue)))
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    if event.type == chatpb.ChatResponseType.CHUNK:
                        latencies.append(time.perf_counter() - started)
                        break
                    if event.type == chatpb.ChatResponseType.ERROR:
                        raise RuntimeError(event.error_message)
            queue.put_nowait(None)
    return latencies


# -- memory per replayed event (in this process) ---------------------------------------------


def memory_per_event(events: int) -> dict[str, float]:
    """What the in-process log keeps per chunk event of a running turn: allocated while the
    events are made and logged (as the server does, each chunk's text made by the
    backend), then the events themselves let go, so that only what the log keeps counts."""
    log = MemoryReplayLog(ReplaySettings(max_bytes=2**40))
    reply = ReplyCounter(turn_id="t" * 16)
    reply.log = log.begin("s" * 36, reply.turn_id, "r")
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    counted = text = 0
    for n in range(events):
        word = f"w{n % 1000} "
        event = Event(
            EventKind.CHUNK, session_id="s" * 36, request_id="r", chunk_text=word, reply=reply
        )
        stamp(event, reply)
        counted += event_size(event)
        text += len(word)
    del event, word
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "bytes_per_event": (after - before) / events,
        "counted_bytes_per_event": counted / events,
        "text_bytes_per_event": text / events,
    }


# -- the benchmark ---------------------------------------------------------------------------


@dataclass
class _Server:
    process: asyncio.subprocess.Process
    port: int

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)


async def _start(store: str) -> _Server:
    process, ready = await serving_module("benchmarks.live", "--serve", "--store", store)
    return _Server(process, ready["port"])


async def _stop(server: _Server) -> None:
    await close_and_wait(server.process)


class _Measured(Protocol):
    @property
    def port(self) -> int: ...

    def cpu_seconds(self) -> float: ...


async def _round(server: _Measured, watchers: int, s: Settings) -> dict[str, float]:
    spec = f"{server.port},{s.senders},{watchers},{s.seconds}"
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.live",
        "--client",
        spec,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert client.stdin is not None
    assert client.stdout is not None
    try:
        ready = await asyncio.wait_for(client.stdout.readline(), 120)
        if ready.strip() != b"ready":
            raise RuntimeError("the load client did not get its watchers in place")
        before = server.cpu_seconds()
        client.stdin.write(b"go\n")
        await client.stdin.drain()
        line = await asyncio.wait_for(client.stdout.readline(), s.seconds + 120)
        after = server.cpu_seconds()
        await asyncio.wait_for(client.wait(), 60)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    if client.returncode != 0 or not line:
        raise RuntimeError(f"the load client failed ({client.returncode})")
    counts = json.loads(line)
    if not counts["sent"]:
        raise RuntimeError("the senders received no chunks")
    cpu = after - before
    return {
        "watchers": watchers,
        "cpu_us_per_sent_chunk": cpu / counts["sent"] * 1e6,
        "cpu_us_per_delivered_chunk": cpu / (counts["sent"] + counts["watched"]) * 1e6,
        "sent_chunks_per_s": counts["sent"] / s.seconds,
        "watched_chunks": counts["watched"],
    }


@dataclass
class _CliServer:
    """A ``chat-server`` of some tree (ours, or the base's), started by ``_processes``."""

    server: Server

    @property
    def port(self) -> int:
        return int(self.server.target.rsplit(":", 1)[1])

    def cpu_seconds(self) -> float:
        return self.server.cpu_seconds()


async def compare(s: Settings, base: str, output: Path) -> list[dict[str, float]]:
    """Nobody watching: this tree's server against ``base``'s, loaded at the same time."""
    trees = {"ours": ROOT, "base": export_base(base, output)}
    rounds = []
    async with contextlib.AsyncExitStack() as stack:
        servers = {}
        for name, tree in trees.items():
            command, env = server_command(tree)
            running = await stack.enter_async_context(
                started(name, command, output / "logs", env=env, cwd=tree)
            )
            servers[name] = _CliServer(running)
        warm = Settings(1, s.senders, 1.0, 0, 0)
        await asyncio.gather(*(_round(server, 0, warm) for server in servers.values()))
        for n in range(s.rounds):
            ours, theirs = await asyncio.gather(
                _round(servers["ours"], 0, s), _round(servers["base"], 0, s)
            )
            ratio = ours["cpu_us_per_sent_chunk"] / theirs["cpu_us_per_sent_chunk"]
            rounds.append(
                {
                    "ours_cpu_us_per_chunk": ours["cpu_us_per_sent_chunk"],
                    "base_cpu_us_per_chunk": theirs["cpu_us_per_sent_chunk"],
                    "ratio": ratio,
                }
            )
            print(f"round {n + 1}, nobody watching: ours/base {ratio:.3f}", file=sys.stderr)
    return rounds


async def run(s: Settings) -> dict[str, Any]:
    server = await _start(s.store)
    rounds: dict[str, list[dict[str, float]]] = {str(w): [] for w in WATCHERS}
    try:
        await _round(server, 0, Settings(1, s.senders, 1.0, 0, 0))  # warm up, not counted
        for n in range(s.rounds):
            for watchers in WATCHERS:
                result = await _round(server, watchers, s)
                rounds[str(watchers)].append(result)
                print(
                    f"round {n + 1}, {watchers} watchers: "
                    f"{result['cpu_us_per_sent_chunk']:.1f} us/sent chunk, "
                    f"{result['cpu_us_per_delivered_chunk']:.1f} us/delivered chunk",
                    file=sys.stderr,
                    flush=True,
                )
        latencies = await _resume_latency(server.port, s.resumes)
    finally:
        await _stop(server)
    return {"watchers": rounds, "resume_s": latencies, "memory": memory_per_event(s.events)}


def report(results: dict[str, Any], s: Settings) -> str:
    rounds = results["watchers"]

    def median(watchers: int, key: str) -> float:
        return float(statistics.median(r[key] for r in rounds[str(watchers)]))

    stream = median(0, "cpu_us_per_sent_chunk")
    lines = [
        "# Live sessions",
        "",
        f"`python -m benchmarks.live` — {s.rounds} rounds of {s.seconds:g} s, {s.senders} "
        "sending streams (a session each), each session with 0, 1, 10 or 100 watching "
        "streams; medians of the rounds."
        + (
            ""
            if s.store == "memory://"
            else f" Store `{s.store.partition('?')[0]}` (the replay log in it; Redis's own CPU "
            "not counted)."
        ),
        "",
        "| watchers per session | CPU per sent chunk | CPU per delivered chunk | "
        "CPU per watcher per sent chunk | sent chunks/s |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for watchers in WATCHERS:
        sent = median(watchers, "cpu_us_per_sent_chunk")
        per_watcher = f"{(sent - stream) / watchers:.1f} µs" if watchers else "—"
        delivered = median(watchers, "cpu_us_per_delivered_chunk")
        rate = median(watchers, "sent_chunks_per_s")
        lines.append(
            f"| {watchers} | {sent:.1f} µs | {delivered:.1f} µs | {per_watcher} | {rate:.0f} |"
        )
    latencies = results["resume_s"]
    memory = results["memory"]
    if compared := results.get("compare"):
        ratios = [r["ratio"] for r in compared]
        lines += [
            "",
            f"Nobody watching, against {results['base']} (before live sessions), both "
            f"servers loaded at the same time: ours "
            f"{statistics.median(r['ours_cpu_us_per_chunk'] for r in compared):.1f} µs, base "
            f"{statistics.median(r['base_cpu_us_per_chunk'] for r in compared):.1f} µs per "
            f"chunk; ours/base {statistics.median(ratios):.3f} (rounds: "
            + ", ".join(f"{r:.3f}" for r in ratios)
            + ").",
        ]
    lines += [
        "",
        f"A stream today (no watchers) costs {stream:.1f} µs of server CPU per chunk; a "
        "watcher costs the figure in the fourth column per chunk of the turn it watches.",
        "",
        f"Resume latency (new connection to the first replayed chunk, {len(latencies)} "
        f"resumes): p50 {percentile(latencies, 50) * 1e3:.2f} ms, "
        f"p99 {percentile(latencies, 99) * 1e3:.2f} ms.",
        "",
        f"Memory per replayed event (one-word chunks, in the in-process replay log): "
        f"{memory['bytes_per_event']:.0f} bytes allocated, of which "
        f"{memory['text_bytes_per_event']:.1f} text; the log counts "
        f"{memory['counted_bytes_per_event']:.0f} bytes per event against --replay-max-bytes.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.live", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="directory for live.{md,json}")
    parser.add_argument(
        "--store",
        default="memory://",
        help="the server's --store (redis://...?prefix=NAME: the replay log in Redis too)",
    )
    parser.add_argument(
        "--base",
        default=DEFAULT_BASE,
        help="git ref to compare a session nobody watches with (default: main before live "
        "sessions); 'none' to skip",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_main(args.store)
        return
    if args.client:
        client_main(args.client)
        return
    settings = Settings(
        rounds=args.rounds or (1 if args.quick else 3),
        senders=2 if args.quick else 4,
        seconds=0.5 if args.quick else 3.0,
        resumes=20 if args.quick else 300,
        events=10_000 if args.quick else 100_000,
        store=args.store,
    )
    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(settings))
    if args.base != "none":
        results["base"] = args.base
        results["compare"] = asyncio.run(compare(settings, args.base, output))
    text = report(results, settings)
    (output / "live.md").write_text(text)
    (output / "live.json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)
    print(f"wrote {output}/live.md and live.json")


if __name__ == "__main__":
    main()
