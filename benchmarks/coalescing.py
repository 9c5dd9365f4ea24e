"""What the coalescing window costs and saves: messages sent and server CPU per token.

A program, not a test: ``python benchmarks/coalescing.py [--quick]``.

The server runs in this process (a real ``ChatServer`` on 127.0.0.1) with a synthetic
backend that produces tokens the way remote models deliver them: steadily, one delta per
token, or in bursts (several server-sent events parsed from one network read, which the SDK
yields back to back). A client in a separate process (so that its CPU is not counted) runs
concurrent ``Chat`` streams and records the chunks it receives and each reply's timing.

For each pattern, the window 0 (every delta is its own chunk) is the reference; the table
shows chunks per reply, server CPU per token, and the reply's time to first chunk and total
duration as the client saw them. Results go to ``benchmarks/results/coalescing.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from grpclib.client import Channel

import chatpb
from chat.backends import Delta, GenerationRequest
from chat.backends.coalesce import CoalescingBackend
from chat.config import ServerConfig
from chat.server import ChatServer
from chat.types import FinishReason, Usage

RESULTS = Path(__file__).parent / "results" / "coalescing.md"


@dataclass(frozen=True)
class Pattern:
    """How the synthetic model delivers its tokens."""

    name: str
    #: Deltas delivered together (back to back, no pause between them).
    burst: int
    #: Seconds between bursts.
    gap: float


PATTERNS = (
    Pattern("steady, 1 token / 5 ms", burst=1, gap=0.005),
    Pattern("steady, 1 token / 1 ms", burst=1, gap=0.001),
    Pattern("bursts of 8 tokens / 20 ms", burst=8, gap=0.020),
    Pattern("all tokens at once", burst=1_000_000, gap=0.0),
)
WINDOWS = (0.0, 0.002, 0.005, 0.010)


class SyntheticBackend:
    """Streams ``tokens`` deltas of 4 characters, ``burst`` at a time, ``gap`` apart."""

    name = "synthetic"
    default_model = "synthetic"

    def __init__(self, pattern: Pattern, tokens: int) -> None:
        self._pattern = pattern
        self._tokens = tokens

    async def list_models(self) -> Sequence[str] | None:
        return None

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        for index in range(self._tokens):
            if index and index % self._pattern.burst == 0:
                await asyncio.sleep(self._pattern.gap)
            yield Delta("tok ")
        yield Delta(finish_reason=FinishReason.STOP, usage=Usage(1, self._tokens))

    async def aclose(self) -> None:
        return None


# -- client (a separate process) ---------------------------------------------------------


async def _client(port: int, streams: int, turns: int) -> dict[str, list[float]]:
    chunks: list[float] = []
    first: list[float] = []
    total: list[float] = []
    async with Channel("127.0.0.1", port) as channel:
        stub = chatpb.ChatServiceStub(channel)

        async def one_stream() -> None:
            session = await stub.create_session(chatpb.CreateSessionRequest())
            for turn in range(turns):
                sent = time.perf_counter()
                count = 0
                first_at = None

                async def requests(turn: int = turn) -> AsyncGenerator[chatpb.ChatRequest, None]:
                    yield chatpb.ChatRequest(
                        session_id=session.session_id, message="go", request_id=str(turn)
                    )

                stream = cast("AsyncGenerator[chatpb.ChatResponse, None]", stub.chat(requests()))
                async with contextlib.aclosing(stream) as events:
                    async for event in events:
                        if event.type == chatpb.ChatResponseType.CHUNK:
                            count += 1
                            if first_at is None:
                                first_at = time.perf_counter()
                        elif event.type in (
                            chatpb.ChatResponseType.RESPONSE_COMPLETE,
                            chatpb.ChatResponseType.ERROR,
                        ):
                            break
                done = time.perf_counter()
                chunks.append(count)
                first.append((first_at or done) - sent)
                total.append(done - sent)

        await asyncio.gather(*(one_stream() for _ in range(streams)))
    return {"chunks": chunks, "first": first, "total": total}


# -- server and the table -----------------------------------------------------------------


@dataclass
class Row:
    pattern: str
    window: float
    chunks_per_reply: float
    cpu_us_per_token: float
    first_ms: float
    total_ms: float


async def _measure(pattern: Pattern, window: float, streams: int, turns: int, tokens: int) -> Row:
    backend = SyntheticBackend(pattern, tokens)
    served = CoalescingBackend(backend, window=window) if window > 0 else backend
    config = ServerConfig(host="127.0.0.1", port=0, store="memory://")
    async with ChatServer(config, backend=served) as server:
        cpu_before = time.process_time()
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--client",
            str(server.port),
            str(streams),
            str(turns),
            stdout=subprocess.PIPE,
        )
        output, _ = await client.communicate()
        cpu = time.process_time() - cpu_before
    if client.returncode != 0:
        raise RuntimeError(f"the client failed with {client.returncode}")
    result = json.loads(output)
    replies = len(result["chunks"])
    return Row(
        pattern=pattern.name,
        window=window,
        chunks_per_reply=statistics.fmean(result["chunks"]),
        cpu_us_per_token=cpu / (replies * tokens) * 1e6,
        first_ms=statistics.median(result["first"]) * 1e3,
        total_ms=statistics.median(result["total"]) * 1e3,
    )


def _table(rows: list[Row], tokens: int) -> str:
    lines = [
        f"| pattern | window | chunks per reply ({tokens} tokens) | server CPU per token "
        "| vs. no window | time to first chunk (median) | reply duration (median) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    reference: dict[str, Row] = {}
    for row in rows:
        base = reference.setdefault(row.pattern, row)
        change = (row.cpu_us_per_token / base.cpu_us_per_token - 1) * 100
        lines.append(
            f"| {row.pattern} | {row.window * 1000:g} ms | {row.chunks_per_reply:.1f} "
            f"| {row.cpu_us_per_token:.0f} µs | {change:+.0f}% | {row.first_ms:.1f} ms "
            f"| {row.total_ms:.0f} ms |"
        )
    return "\n".join(lines)


def _median_row(runs: list[Row]) -> Row:
    return Row(
        pattern=runs[0].pattern,
        window=runs[0].window,
        chunks_per_reply=statistics.median(r.chunks_per_reply for r in runs),
        cpu_us_per_token=statistics.median(r.cpu_us_per_token for r in runs),
        first_ms=statistics.median(r.first_ms for r in runs),
        total_ms=statistics.median(r.total_ms for r in runs),
    )


async def _main(quick: bool) -> None:
    streams, turns, tokens, rounds = (4, 2, 100, 1) if quick else (12, 3, 200, 3)
    runs: dict[tuple[str, float], list[Row]] = {}
    # Rounds interleave the configurations, so that a burst of load from elsewhere on the
    # machine spreads over all of them instead of skewing one; each figure is a median.
    for round_number in range(rounds):
        for pattern in PATTERNS:
            for window in WINDOWS:
                row = await _measure(pattern, window, streams, turns, tokens)
                runs.setdefault((pattern.name, window), []).append(row)
                print(
                    f"round {round_number + 1}: {row.pattern:<28} window "
                    f"{row.window * 1000:>4g} ms: {row.chunks_per_reply:6.1f} chunks/reply, "
                    f"{row.cpu_us_per_token:5.0f} µs CPU/token",
                    file=sys.stderr,
                )
    rows = [_median_row(found) for found in runs.values()]
    table = _table(rows, tokens)
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        "# Coalescing window benchmark\n\n"
        f"`python benchmarks/coalescing.py{' --quick' if quick else ''}`: {streams} concurrent "
        f"streams x {turns} replies of {tokens} tokens per row, medians of {rounds} "
        "interleaved rounds; server CPU is the server process's (the client runs in another "
        "process). Times are the client's, from sending the message.\n\n" + table + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, for a smoke test")
    parser.add_argument(
        "--client", nargs=3, metavar=("PORT", "STREAMS", "TURNS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.client:
        port, streams, turns = (int(value) for value in args.client)
        print(json.dumps(asyncio.run(_client(port, streams, turns))))
        return
    asyncio.run(_main(args.quick))


if __name__ == "__main__":
    main()
