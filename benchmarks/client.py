"""A grpcio load client process, driven over stdin/stdout by :mod:`benchmarks.secured`.

:mod:`benchmarks.run` drives its servers with ``h2gen`` (:mod:`benchmarks.h2gen`), which costs
a few microseconds per message but speaks plaintext HTTP/2 only; the secured run needs TLS,
so it keeps these clients (:mod:`benchmarks.secured_client` adds TLS and a bearer token).

Usage: ``python -m benchmarks.client '<json parameters>'``. The client uses grpcio's C core
(``grpc.aio``) and protobuf's upb messages: the fastest Python gRPC client there is, so that
the client costs as little of the machine's two cores as it can. It connects, sets up its
streams, prints ``ready``, waits for ``go`` on stdin, runs its scenario (bounded in time),
prints one JSON line of results, and exits (an ``idle`` client first waits for ``stop``).

Scenarios:

- ``throughput``: each stream sends a MESSAGE and reads its reply to RESPONSE_COMPLETE,
  again and again for ``duration`` seconds; counts CHUNK events and replies in the window.
- ``probe``: one stream alternates a PING (round trip to its PONG) and a short MESSAGE (time
  to its first CHUNK), ``gap`` seconds apart, for ``duration`` seconds.
- ``paced``: each stream sends one MESSAGE every ``interval`` seconds (staggered) for
  ``duration`` seconds and records each answer time (send to RESPONSE_COMPLETE).
- ``idle``: opens ``streams`` streams, each answering one PING, and holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from benchmarks import _pb

pb, pb_grpc = _pb.load()
Q = pb.ChatRequest
R = pb.ChatResponse
CHUNK, COMPLETE, ERROR, PONG = R.CHUNK, R.RESPONSE_COMPLETE, R.ERROR, R.PONG

#: Streams per connection: grpclib's HTTP/2 default limit of concurrent streams, applied to
#: both servers so that they see the same connections.
STREAMS_PER_CHANNEL = 100


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Counts:
    chunks: int = 0
    replies: int = 0
    errors: list[str] = field(default_factory=list)


class Failure(Exception):
    pass


async def _read(call: Any) -> Any:
    response = await call.read()
    if response is grpc.aio.EOF:
        raise Failure("the server ended the stream")
    if response.type == ERROR:
        raise Failure(f"ERROR event: {response.error_message}")
    return response


class Client:
    def __init__(self, target: str, streams: int) -> None:
        self.target = target
        self.channels = [
            grpc.aio.insecure_channel(
                target,
                # A connection of its own per channel (grpcio shares one by default).
                options=[("grpc.use_local_subchannel_pool", 1)],
            )
            for _ in range(max(1, -(-streams // STREAMS_PER_CHANNEL)))
        ]
        self.stubs = [pb_grpc.ChatServiceStub(channel) for channel in self.channels]

    def stub(self, index: int) -> Any:
        return self.stubs[index // STREAMS_PER_CHANNEL]

    async def sessions(self, count: int) -> list[str]:
        async def one(i: int) -> str:
            response = await self.stub(i).CreateSession(pb.CreateSessionRequest(title="bench"))
            return str(response.session_id)

        ids: list[str] = []
        for start in range(0, count, 200):  # bounded concurrency while setting up
            ids += await asyncio.gather(*(one(i) for i in range(start, min(count, start + 200))))
        return ids

    async def open(self, index: int) -> Any:
        """A Chat stream that has answered one PING (so it is open on the server)."""
        call = self.stub(index).Chat()
        await call.write(Q(type=Q.PING, request_id="open"))
        while (await _read(call)).type != PONG:
            pass
        return call

    async def open_many(self, count: int) -> list[Any]:
        calls: list[Any] = []
        for start in range(0, count, 200):
            batch = range(start, min(count, start + 200))
            calls += await asyncio.gather(*(self.open(i) for i in batch))
        return calls

    async def close(self, calls: list[Any]) -> None:
        for call in calls:
            call.cancel()
        await asyncio.gather(*(channel.close() for channel in self.channels))


async def _throughput_stream(
    call: Any, session: str, text: str, go: float, end: float, counts: Counts
) -> None:
    n = 0
    while time.monotonic() < end:
        n += 1
        await call.write(Q(session_id=session, message=text, request_id=str(n)))
        while True:
            response = await _read(call)
            kind = response.type
            if kind == CHUNK:
                if time.monotonic() <= end:
                    counts.chunks += 1
            elif kind == COMPLETE:
                if time.monotonic() <= end:
                    counts.replies += 1
                break


def _line(stream: Any) -> str:
    return str(stream.readline()).strip()


async def _wait_go() -> None:
    print("ready", flush=True)
    line = await asyncio.to_thread(_line, sys.stdin)
    if line != "go":
        raise SystemExit(f"expected 'go', got {line!r}")


async def throughput(p: dict[str, Any]) -> dict[str, Any]:
    client = Client(p["target"], p["streams"])
    sessions = await client.sessions(p["streams"])
    calls = await client.open_many(p["streams"])
    counts = Counts()
    # Warm up: one reply per stream, not counted.
    await asyncio.gather(
        *(_one_reply(call, s, p["text"]) for call, s in zip(calls, sessions, strict=True))
    )
    await _wait_go()
    go = time.monotonic()
    cpu0 = time.process_time()
    end = go + p["duration"]
    tasks = [
        asyncio.create_task(_throughput_stream(call, s, p["text"], go, end, counts))
        for call, s in zip(calls, sessions, strict=True)
    ]
    done, pending = await asyncio.wait(tasks, timeout=p["duration"] + p.get("drain", 10.0))
    for task in pending:
        task.cancel()
    cpu = time.process_time() - cpu0
    failures = [str(t.exception()) for t in done if t.exception() is not None]
    await client.close(calls)
    return {
        "client_cpu_s": cpu,
        "chunks": counts.chunks,
        "replies": counts.replies,
        "seconds": p["duration"],
        "unfinished": len(pending),
        "failures": failures[:5],
    }


async def _one_reply(call: Any, session: str, text: str) -> None:
    await call.write(Q(session_id=session, message=text, request_id="warm"))
    while (await _read(call)).type != COMPLETE:
        pass


async def probe(p: dict[str, Any]) -> dict[str, Any]:
    client = Client(p["target"], 1)
    (session,) = await client.sessions(1)
    call = await client.open(0)
    await _wait_go()
    pings: list[float] = []
    firsts: list[float] = []
    end = time.monotonic() + p["duration"]
    n = 0
    while time.monotonic() < end and len(pings) < p.get("max_samples", 10_000):
        n += 1
        sent = time.perf_counter()
        await call.write(Q(type=Q.PING, session_id=session, request_id=f"p{n}"))
        while (await _read(call)).type != PONG:
            pass
        pings.append(time.perf_counter() - sent)
        await asyncio.sleep(p["gap"])
        sent = time.perf_counter()
        await call.write(Q(session_id=session, message=p["text"], request_id=f"m{n}"))
        first = None
        while (response := await _read(call)).type != COMPLETE:
            if first is None and response.type == CHUNK:
                first = time.perf_counter() - sent
        if first is not None:
            firsts.append(first)
        await asyncio.sleep(p["gap"])
    await client.close([call])
    return {"ping": pings, "first_chunk": firsts}


async def _paced_stream(
    call: Any, session: str, p: dict[str, Any], start: float, answers: list[float]
) -> int:
    """Send on schedule, record answer times; return how many messages went unanswered."""
    interval, count = p["interval"], p["messages"]
    sent: dict[str, float] = {}
    answered = 0
    writer_done = asyncio.Event()

    async def reader() -> None:
        nonlocal answered
        while sent or not writer_done.is_set():
            response = await _read(call)
            if response.type == COMPLETE:
                answers.append(time.monotonic() - sent.pop(response.request_id))
                answered += 1

    reading = asyncio.create_task(reader())
    try:
        for k in range(count):
            delay = start + k * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if reading.done():
                break
            rid = str(k)
            sent[rid] = time.monotonic()
            await call.write(Q(session_id=session, message=p["text"], request_id=rid))
        writer_done.set()
        # Answers still due get a bounded grace period; what is left is starved.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reading), p["grace"])
    finally:
        reading.cancel()
        with contextlib.suppress(BaseException):
            await reading
    return int(count) - answered


async def paced(p: dict[str, Any]) -> dict[str, Any]:
    client = Client(p["target"], p["streams"])
    sessions = await client.sessions(p["streams"])
    calls = await client.open_many(p["streams"])
    await _wait_go()
    go = time.monotonic()
    answers: list[float] = []
    streams = p["streams"]
    tasks = [
        asyncio.create_task(_paced_stream(call, s, p, go + p["interval"] * i / streams, answers))
        for i, (call, s) in enumerate(zip(calls, sessions, strict=True))
    ]
    budget = p["interval"] * p["messages"] + p["grace"] + 10.0
    done, pending = await asyncio.wait(tasks, timeout=budget)
    for task in pending:
        task.cancel()
    failed = [str(t.exception()) for t in done if t.exception() is not None]
    unanswered = sum(t.result() for t in done if t.exception() is None)
    unanswered += p["messages"] * (len(pending) + len(failed))
    starved = sum(1 for t in done if t.exception() is not None or t.result()) + len(pending)
    await client.close(calls)
    return {
        "answers": answers,
        "expected": streams * p["messages"],
        "unanswered": unanswered,
        "starved_streams": starved,
        "failures": failed[:5],
    }


async def idle(p: dict[str, Any]) -> dict[str, Any]:
    client = Client(p["target"], p["streams"])
    opened: list[Any] = []
    failures: list[str] = []
    try:
        async with asyncio.timeout(p["setup_timeout"]):
            opened = await client.open_many(p["streams"])
    except (grpc.aio.AioRpcError, Failure, TimeoutError, OSError) as error:  # a result
        failures.append(f"{type(error).__name__}: {error}")
    await _wait_go()
    # Every stream answers a PING again while all are held.
    answered = 0

    async def ping(call: Any) -> None:
        nonlocal answered
        await call.write(Q(type=Q.PING, request_id="again"))
        while (await _read(call)).type != PONG:
            pass
        answered += 1

    if opened:
        try:
            async with asyncio.timeout(p["setup_timeout"]):
                await asyncio.gather(*(ping(call) for call in opened))
        except (grpc.aio.AioRpcError, Failure, TimeoutError, OSError) as error:
            failures.append(f"{type(error).__name__}: {error}")
    print(json.dumps({"opened": len(opened), "answered": answered, "failures": failures}))
    print("holding", flush=True)
    await asyncio.to_thread(_line, sys.stdin)  # "stop" or EOF
    await client.close(opened)
    return {}


SCENARIOS = {"throughput": throughput, "probe": probe, "paced": paced, "idle": idle}


def main() -> None:
    raise_fd_limit()
    params = json.loads(sys.argv[1])
    if params.get("nice"):
        os.nice(params["nice"])
    scenario = SCENARIOS[params["scenario"]]
    result = asyncio.run(scenario(params))
    if result:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
