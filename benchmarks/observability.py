"""What metrics and traces cost: server CPU per chunk with both on, against both off.

A program, not a test: ``python -m benchmarks.observability [--quick] [--rounds N]``.

The server runs in this process (a real ``ChatServer`` on 127.0.0.1, echo backend, memory
store), started afresh for each run, alternately in the two variants (off, on, off, on...):

- ``off``: no metrics, no traces (access lines are written at INFO, and the run logs at
  WARNING, as the main benchmark's server does);
- ``on``: Prometheus metrics (the ``/metrics`` endpoint served, and scraped every 2 seconds,
  several times as often as Prometheus usually does) and OpenTelemetry traces with every
  span sampled, through the SDK's batch processor to an exporter that drops them (the cost of
  tracing without the cost of a collector).

The process's garbage collector is tuned as ``chat-server`` tunes its own.

Load comes from a client process (grpclib; its CPU is not counted): concurrent ``Chat``
streams each sending a 50-word message and reading its 56-chunk reply, again and again for
a fixed time. Server CPU (this process: every thread, the exporter's included) over the
chunks the client received is the figure; the median of the rounds is compared, and the
budget is 10%. Results go to ``benchmarks/results/observability.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import time
import urllib.request
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from grpclib.client import Channel

import chatpb
from chat.cli.server import _tune_gc
from chat.config import ServerConfig
from chat.server import ChatServer

RESULTS = Path(__file__).parent / "results" / "observability.md"
#: 50 words: the echo reply is 56 chunks.
TEXT = " ".join(f"word{i}" for i in range(50))
#: The largest CPU per chunk "on" may cost over "off" (the issue's budget).
BUDGET = 1.10


@dataclass(frozen=True)
class Settings:
    rounds: int
    streams: int
    seconds: float


# -- client (a separate process) ---------------------------------------------------------


async def _client(port: int, streams: int, seconds: float) -> dict[str, int]:
    chunks = replies = 0
    deadline = time.monotonic() + seconds
    async with Channel("127.0.0.1", port) as channel:
        stub = chatpb.ChatServiceStub(channel)

        async def one_stream(index: int) -> None:
            nonlocal chunks, replies
            session = await stub.create_session(chatpb.CreateSessionRequest())
            queue: asyncio.Queue[chatpb.ChatRequest | None] = asyncio.Queue()

            async def requests() -> AsyncGenerator[chatpb.ChatRequest, None]:
                while (request := await queue.get()) is not None:
                    yield request

            turn = 0
            queue.put_nowait(
                chatpb.ChatRequest(session_id=session.session_id, message=TEXT, request_id="0")
            )
            stream = cast("AsyncGenerator[chatpb.ChatResponse, None]", stub.chat(requests()))
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    if event.type == chatpb.ChatResponseType.CHUNK:
                        chunks += 1
                    elif event.type == chatpb.ChatResponseType.RESPONSE_COMPLETE:
                        replies += 1
                        turn += 1
                        if time.monotonic() >= deadline:
                            queue.put_nowait(None)
                            continue
                        queue.put_nowait(
                            chatpb.ChatRequest(
                                session_id=session.session_id, message=TEXT, request_id=str(turn)
                            )
                        )
                    elif event.type == chatpb.ChatResponseType.ERROR:
                        raise RuntimeError(event.error_message)

        await asyncio.gather(*(one_stream(i) for i in range(streams)))
    return {"chunks": chunks, "replies": replies}


def _pin(cpu: int) -> None:
    """Run this process on one CPU (of two or more): the server on the first, the client on
    the second, so that neither's caches are the other's."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None and len(cpus := sorted(affinity(0))) >= 2:
        os.sched_setaffinity(0, {cpus[cpu]})


def client_main(port: int, streams: int, seconds: float) -> None:
    _pin(1)
    print(json.dumps(asyncio.run(_client(port, streams, seconds))), flush=True)


# -- server (this process) ----------------------------------------------------------------


class _DropSpans:
    """A span exporter that drops what it is given."""

    def export(self, spans: Sequence[object]) -> object:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


#: Seconds between scrapes of /metrics during an "on" run.
SCRAPE_INTERVAL = 2.0


async def _scrape(port: int) -> None:
    url = f"http://127.0.0.1:{port}/metrics"

    def get() -> None:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()

    while True:
        await asyncio.to_thread(get)
        await asyncio.sleep(SCRAPE_INTERVAL)


async def one_run(variant: str, s: Settings) -> dict[str, float]:
    provider = None
    if variant in ("on", "traces"):
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(cast(SpanExporter, _DropSpans())))
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        store="memory://",
        grace_period=1.0,
        metrics_port=0 if variant in ("on", "metrics") else None,
    )
    try:
        async with ChatServer(config, tracer_provider=provider) as server:
            scraper = None
            if server.metrics_port is not None:
                scraper = asyncio.create_task(_scrape(server.metrics_port))
            try:
                client = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "benchmarks.observability",
                    "--client",
                    f"{server.port},{s.streams},{s.seconds}",
                    stdout=asyncio.subprocess.PIPE,
                )
                cpu0 = time.process_time()
                out, _ = await asyncio.wait_for(client.communicate(), s.seconds + 60)
                cpu = time.process_time() - cpu0
            finally:
                if scraper is not None:
                    scraper.cancel()
                    await asyncio.wait((scraper,))
            if client.returncode != 0:
                raise RuntimeError(f"the client failed ({client.returncode})")
    finally:
        if provider is not None:
            provider.shutdown()
    result = json.loads(out)
    if not result["chunks"]:
        raise RuntimeError("no chunks received")
    return {
        "cpu_us_per_chunk": cpu / result["chunks"] * 1e6,
        "chunks_per_s": result["chunks"] / s.seconds,
        "replies": result["replies"],
    }


async def run(s: Settings) -> dict[str, list[dict[str, float]]]:
    rounds: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for n in range(s.rounds):
        # Alternate which goes first, so that neither always runs on a warmer machine.
        for variant in ("off", "on") if n % 2 == 0 else ("on", "off"):
            result = await one_run(variant, s)
            rounds[variant].append(result)
            print(
                f"round {n + 1} {variant:>3}: {result['cpu_us_per_chunk']:.1f} us/chunk, "
                f"{result['chunks_per_s']:.0f} chunks/s",
                file=sys.stderr,
                flush=True,
            )
    return rounds


def report(rounds: dict[str, list[dict[str, float]]], s: Settings) -> tuple[str, bool]:
    off = statistics.median(r["cpu_us_per_chunk"] for r in rounds["off"])
    on = statistics.median(r["cpu_us_per_chunk"] for r in rounds["on"])
    # Each round runs both, one after the other: the ratio within a round is less exposed
    # to what else the machine does than the ratio of the medians.
    ratios = [
        b["cpu_us_per_chunk"] / a["cpu_us_per_chunk"]
        for a, b in zip(rounds["off"], rounds["on"], strict=True)
    ]
    ratio = statistics.median(ratios)
    within = ratio <= BUDGET
    lines = [
        "# Observability overhead",
        "",
        f"`python -m benchmarks.observability` — {s.rounds} rounds, {s.streams} streams, "
        f"{s.seconds:g} s each; median of the rounds.",
        "",
        "| variant | server CPU per chunk | chunks/s |",
        "| --- | ---: | ---: |",
        f"| metrics and traces off | {off:.1f} µs | "
        f"{statistics.median(r['chunks_per_s'] for r in rounds['off']):.0f} |",
        f"| metrics and traces on (no-op exporter) | {on:.1f} µs | "
        f"{statistics.median(r['chunks_per_s'] for r in rounds['on']):.0f} |",
        "",
        f"On costs {ratio:.3f}x the CPU per chunk of off (median of the rounds' ratios; "
        f"{on / off:.3f}x from the medians above; rounds: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + "): "
        + ("within" if within else "OVER")
        + f" the {BUDGET - 1:.0%} budget.",
    ]
    return "\n".join(lines) + "\n", within


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.observability", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, help="rounds of off/on (default 7, quick 1)")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        port, streams, seconds = args.client.split(",")
        client_main(int(port), int(streams), float(seconds))
        return
    logging.basicConfig(level=logging.WARNING)
    _tune_gc()
    _pin(0)
    settings = Settings(
        rounds=args.rounds or (1 if args.quick else 7),
        streams=10 if args.quick else 50,
        seconds=1.0 if args.quick else 4.0,
    )
    text, within = report(asyncio.run(run(settings)), settings)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)
    print(f"wrote {RESULTS}")
    if not within:
        sys.exit(1)


if __name__ == "__main__":
    main()
