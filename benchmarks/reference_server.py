"""The reference: the ``Chat`` behaviour written with grpc.aio and protobuf, the plain way.

Used only by the benchmarks, for comparison. It keeps sessions in memory, answers a MESSAGE
with RESPONSE_START, one CHUNK per word of the echo reply (``--pace`` seconds apart) and
RESPONSE_COMPLETE, and a PING with a PONG at once, even while a reply streams. Turns of a
stream are answered one after the other.

Usage: ``python -m benchmarks.reference_server [--port 0] [--pace 0.05]``; it prints
``listening on 127.0.0.1:PORT`` once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc

from benchmarks import _pb

pb, pb_grpc = _pb.load()

_WORD = re.compile(r"\S+\s*|\s+")
R = pb.ChatResponse


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ReferenceChat(pb_grpc.ChatServiceServicer):  # type: ignore[misc,name-defined]
    def __init__(self, pace: float) -> None:
        self.pace = pace
        # session id -> its history, as (role, text) pairs
        self.sessions: dict[str, list[tuple[str, str]]] = {}

    async def CreateSession(self, request: Any, context: Any) -> Any:
        session_id = str(uuid.uuid4())
        self.sessions[session_id] = []
        now = _now()
        info = pb.SessionInfo(
            session_id=session_id,
            title=request.title,
            model=request.model or "echo",
            created_at=now,
            last_activity=now,
        )
        return pb.CreateSessionResponse(session_id=session_id, session=info)

    async def Chat(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        out: asyncio.Queue[Any] = asyncio.Queue()
        turns: asyncio.Queue[Any] = asyncio.Queue()

        async def read() -> None:
            async for request in request_iterator:
                if request.type == pb.ChatRequest.PING:
                    out.put_nowait(
                        R(
                            type=R.PONG,
                            session_id=request.session_id,
                            request_id=request.request_id,
                            timestamp=_now(),
                        )
                    )
                else:
                    turns.put_nowait(request)
            turns.put_nowait(None)

        async def answer() -> None:
            while (request := await turns.get()) is not None:
                await self._turn(request, out)
            out.put_nowait(None)

        tasks = [asyncio.create_task(read()), asyncio.create_task(answer())]
        try:
            while (response := await out.get()) is not None:
                yield response
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _turn(self, request: Any, out: asyncio.Queue[Any]) -> None:
        received = time.monotonic()
        sid, rid = request.session_id, request.request_id
        history = self.sessions.get(sid)
        if history is None or not request.message.strip():
            out.put_nowait(
                R(
                    type=R.ERROR,
                    session_id=sid,
                    request_id=rid,
                    error_message="unknown session or empty message",
                    error_code=5,
                    timestamp=_now(),
                )
            )
            return
        context = len(history) + 1
        turn = sum(1 for role, _ in history if role == "user") + 1
        plural = "" if context == 1 else "s"
        reply = f"Echo #{turn} ({context} message{plural} in context): {request.message}"
        out.put_nowait(
            R(
                type=R.RESPONSE_START,
                session_id=sid,
                request_id=rid,
                context_messages=context,
                model="echo",
                timestamp=_now(),
            )
        )
        words = _WORD.findall(reply)
        for number, word in enumerate(words, 1):
            if self.pace and number > 1:
                await asyncio.sleep(self.pace)
            out.put_nowait(
                R(
                    type=R.CHUNK,
                    session_id=sid,
                    request_id=rid,
                    chunk_text=word,
                    chunk_number=number,
                    timestamp=_now(),
                )
            )
        history.append(("user", request.message))
        history.append(("assistant", reply))
        prompt = sum(len(text.split()) for _, text in history[:-1])
        out.put_nowait(
            R(
                type=R.RESPONSE_COMPLETE,
                session_id=sid,
                request_id=rid,
                total_chunks=len(words),
                processing_time=time.monotonic() - received,
                message_count=len(history),
                finish_reason=pb.FINISH_REASON_STOP,
                usage=pb.TokenUsage(
                    prompt_tokens=prompt,
                    completion_tokens=len(words),
                    total_tokens=prompt + len(words),
                ),
                model="echo",
                timestamp=_now(),
            )
        )


async def serve(host: str, port: int, pace: float) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ChatServiceServicer_to_server(ReferenceChat(pace), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"reference server listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pace", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.pace))


if __name__ == "__main__":
    main()
