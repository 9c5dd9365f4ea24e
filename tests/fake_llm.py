"""A local HTTP server that speaks the streaming wire formats of OpenAI and Gemini.

The real SDKs talk to it over real HTTP/1.1 on 127.0.0.1, so the backends are tested with
everything but the provider: request encoding, server-sent events, status codes, headers,
timeouts and connection handling.

- OpenAI: ``POST /v1/chat/completions`` answers ``data: {chunk}`` events, a usage chunk
  (``choices: []``) when ``stream_options.include_usage`` is set, then ``data: [DONE]``;
  ``GET /v1/models`` lists models.
- Gemini: ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse`` answers
  ``data: {GenerateContentResponse}`` events, the last with ``finishReason`` and
  ``usageMetadata``; ``GET /v1beta/models`` lists models.

Each generation request takes the next :class:`Reply` from :attr:`FakeLLM.replies` (or
:attr:`FakeLLM.default`). A reply can be paced, fail with a status, stall, break off, or hold after
some pieces until :attr:`FakeLLM.release` is set or the client goes away; a client that
closes a connection while its reply is held or stalled sets :attr:`FakeLLM.disconnected`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import urlsplit

Provider = Literal["openai", "gemini"]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


@dataclass
class Reply:
    """How the fake answers one generation request."""

    pieces: Sequence[str] = ("Hello", ", ", "world", "!")
    #: ``stop`` or ``length`` (OpenAI's names; mapped to ``STOP``/``MAX_TOKENS`` for Gemini).
    finish: str = "stop"
    #: (prompt tokens, completion tokens), or ``None`` to report no usage.
    usage: tuple[int, int] | None = (11, 4)
    #: An error status: the reply is ``error_body`` (or a provider-style error) instead.
    status: int = 200
    error_body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: After this many pieces, wait for :attr:`FakeLLM.release` or the client leaving.
    hold_after: int | None = None
    #: After this many pieces, drop the connection without ending the response.
    drop_after: int | None = None
    #: Send nothing at all (not even headers) until released or the client leaves.
    stall: bool = False
    #: After the pieces, send an error event inside the stream (HTTP 200 already sent).
    stream_error: str | None = None
    #: Send this as the in-stream error event instead of a provider-style one.
    stream_error_body: Any = None
    #: Gemini: refuse the prompt with this ``promptFeedback.blockReason`` (no candidates).
    blocked: str | None = None
    #: Seconds between pieces, like a model emitting tokens at a fixed rate (the benchmarks'
    #: pass-through scenario); 0 sends them back to back.
    pace: float = 0.0


@dataclass
class Recorded:
    """One request the fake received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeLLM:
    """The fake server; ``async with FakeLLM("openai") as fake: fake.base_url``."""

    def __init__(
        self,
        provider: Provider,
        *,
        models: Sequence[str] = ("fake-model", "llama3.2:latest"),
        models_status: int = 200,
    ) -> None:
        self.provider = provider
        self.models = list(models)
        self.models_status = models_status
        self.replies: deque[Reply] = deque()
        self.default = Reply()
        self.requests: list[Recorded] = []
        self.release = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.held = asyncio.Event()
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def base_url(self) -> str:
        """What to pass as ``--base-url``."""
        suffix = "/v1" if self.provider == "openai" else ""
        return f"http://127.0.0.1:{self.port}{suffix}"

    @property
    def generations(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST"]

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        # Ending the connections ends their handlers (cancelling them would make asyncio's
        # stream callback log the CancelledError).
        for writer in list(self._writers):
            writer.transport.abort()
        if self._handlers:
            _, stuck = await asyncio.wait(self._handlers, timeout=5.0)
            for task in stuck:
                task.cancel()
        await self._server.wait_closed()

    # -- connections -------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; ``False`` once the connection is to be closed."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        length = int(headers.get("content-length", "0"))
        raw = await reader.readexactly(length) if length else b""
        body = json.loads(raw) if raw else None
        self.requests.append(Recorded(method, target, headers, body))
        path = urlsplit(target).path
        if method == "GET" and path.rstrip("/") in ("/v1/models", "/v1beta/models"):
            await self._send_models(writer)
            return True
        if method == "POST" and (
            path == "/v1/chat/completions" or path.endswith(":streamGenerateContent")
        ):
            reply = self.replies.popleft() if self.replies else self.default
            return await self._send_reply(reply, body, reader, writer)
        await self._send_json(writer, 404, {"error": {"message": f"no route {path}"}})
        return True

    async def _send_json(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: Any,
        headers: dict[str, str] | None = None,
    ) -> None:
        data = json.dumps(body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n{extra}\r\n".encode()
            + data
        )
        await writer.drain()

    async def _send_models(self, writer: asyncio.StreamWriter) -> None:
        if self.models_status != 200:
            await self._send_json(writer, self.models_status, self._error(self.models_status))
        elif self.provider == "openai":
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models
            ]
            await self._send_json(writer, 200, {"object": "list", "data": data})
        else:
            models = [{"name": f"models/{m}", "displayName": m} for m in self.models]
            await self._send_json(writer, 200, {"models": models})

    def _error(self, status: int, message: str = "") -> dict[str, Any]:
        message = message or f"fake failure {status}"
        if self.provider == "openai":
            return {"error": {"message": message, "type": "fake_error", "code": None}}
        google = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}
        return {
            "error": {
                "code": status,
                "message": message,
                "status": google.get(
                    status, "RESOURCE_EXHAUSTED" if status == 429 else "UNAVAILABLE"
                ),
            }
        }

    async def _wait_release_or_leave(self, reader: asyncio.StreamReader) -> bool:
        """``True`` when released; ``False`` (and :attr:`disconnected` set) if the client left."""
        self.held.set()
        released = asyncio.ensure_future(self.release.wait())
        left = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait((released, left), return_when=asyncio.FIRST_COMPLETED)
        finally:
            released.cancel()
            left.cancel()
        if left.done() and not left.cancelled() and left.result() == b"":
            self.disconnected.set()
            return False
        return True

    async def _send_reply(
        self,
        reply: Reply,
        request: Any,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        if reply.stall and not await self._wait_release_or_leave(reader):
            return False
        limit = self.reply_limit(request)
        if limit is not None and limit < len(reply.pieces):
            # One piece counts as one token: the reply stops at the limit, as a model's does.
            usage = (reply.usage[0], limit) if reply.usage is not None else None
            reply = dataclasses.replace(
                reply, pieces=reply.pieces[:limit], finish="length", usage=usage
            )
        if reply.status != 200:
            body = reply.error_body if reply.error_body is not None else self._error(reply.status)
            await self._send_json(writer, reply.status, body, reply.headers)
            return True
        extra = "".join(f"{k}: {v}\r\n" for k, v in reply.headers.items())
        writer.write(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            f"Transfer-Encoding: chunked\r\n{extra}\r\n".encode()
        )
        include_usage = bool(((request or {}).get("stream_options") or {}).get("include_usage"))
        if reply.blocked is not None:
            await self._event(writer, {"promptFeedback": {"blockReason": reply.blocked}})
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        for index, piece in enumerate(reply.pieces):
            if reply.pace and index:
                await asyncio.sleep(reply.pace)
            if reply.drop_after is not None and index == reply.drop_after:
                await writer.drain()
                writer.transport.abort()
                return False
            if (
                reply.hold_after is not None
                and index == reply.hold_after
                and not await self._wait_release_or_leave(reader)
            ):
                return False
            await self._event(writer, self._piece(piece, request))
        if reply.stream_error_body is not None:
            await self._event(writer, reply.stream_error_body)
        elif reply.stream_error is not None:
            await self._event(writer, self._error(500, reply.stream_error))
        else:
            for event in self._ending(reply, request, include_usage):
                await self._event(writer, event)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    def reply_limit(self, request: Any) -> int | None:
        """The reply length limit a generation request asked for, in the provider's field."""
        body = request or {}
        if self.provider == "openai":
            value = body.get("max_completion_tokens", body.get("max_tokens"))
        else:
            value = (body.get("generationConfig") or {}).get("maxOutputTokens")
        return int(value) if value is not None else None

    async def _event(self, writer: asyncio.StreamWriter, event: Any) -> None:
        payload = event if isinstance(event, str) else json.dumps(event)
        separator = "\n\n" if self.provider == "openai" else "\r\n\r\n"
        data = f"data: {payload}{separator}".encode()
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()

    def _piece(self, text: str, request: Any) -> dict[str, Any]:
        if self.provider == "openai":
            return _openai_chunk(request, {"content": text}, None)
        return {
            "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}],
            "modelVersion": "fake",
        }

    def _ending(self, reply: Reply, request: Any, include_usage: bool) -> list[Any]:
        if self.provider == "openai":
            events: list[Any] = [_openai_chunk(request, {}, reply.finish)]
            if include_usage and reply.usage is not None:
                prompt, completion = reply.usage
                usage = {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                }
                events.append({**_openai_chunk(request, {}, None), "choices": [], "usage": usage})
            events.append("[DONE]")
            return events
        finish = {"stop": "STOP", "length": "MAX_TOKENS"}.get(reply.finish, reply.finish.upper())
        last: dict[str, Any] = {
            "candidates": [
                {
                    "content": {"parts": [{"text": ""}], "role": "model"},
                    "finishReason": finish,
                    "index": 0,
                }
            ],
            "modelVersion": "fake",
        }
        if reply.usage is not None:
            prompt, completion = reply.usage
            last["usageMetadata"] = {
                "promptTokenCount": prompt,
                "candidatesTokenCount": completion,
                "totalTokenCount": prompt + completion,
            }
        return [last]


def _openai_chunk(request: Any, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": (request or {}).get("model", "fake-model"),
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def openai_error(message: str, code: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": "invalid_request_error", "code": code}}


def gemini_error(
    status: int, grpc_status: str, message: str, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A Google API error body."""
    error: dict[str, Any] = {"code": status, "message": message, "status": grpc_status}
    if details is not None:
        error["details"] = details
    return {"error": error}
