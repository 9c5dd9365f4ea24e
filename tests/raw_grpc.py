"""A gRPC client on raw HTTP/2 frames (hyper-h2), for requests no real client would send.

Real clients frame their messages correctly; hostile or broken ones do not. This client
sends whatever bytes a test gives it as the DATA of a gRPC call (:func:`frame` builds the
5-byte message prefix, with any flag or length) and reports what the server answered: its
headers, the messages it sent, and the grpc-status and grpc-message of its trailers, or that
it reset the stream. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from tests.helpers import TIMEOUT

__all__ = ["RawAnswer", "RawConnection", "RawStream", "frame", "unframe"]


def frame(body: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    """``body`` with the gRPC message prefix: a flag byte and a 4-byte length (``length``
    overrides the true one)."""
    size = len(body) if length is None else length
    return bytes([1 if compressed else 0]) + size.to_bytes(4, "big") + body


def unframe(data: bytes) -> list[bytes]:
    """The message bodies in ``data`` (a whole number of framed messages)."""
    messages = []
    while data:
        size = int.from_bytes(data[1:5], "big")
        messages.append(data[5 : 5 + size])
        data = data[5 + size :]
    return messages


@dataclass
class RawAnswer:
    """What the server sent on one stream."""

    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""
    #: The server reset the stream (RST_STREAM) or the connection ended without trailers.
    reset: bool = False

    @property
    def status(self) -> int | None:
        """grpc-status, from the trailers (or a trailers-only response); ``None`` if absent."""
        value = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return None if value is None else int(value)

    @property
    def message(self) -> str:
        value = self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))
        return unquote(value)

    @property
    def messages(self) -> list[bytes]:
        return unframe(self.data)


class RawStream:
    """One call: send DATA as the test likes, read what comes back."""

    def __init__(self, connection: RawConnection, stream_id: int) -> None:
        self._connection = connection
        self.id = stream_id
        self.answer = RawAnswer()
        self._buffer = b""
        self._messages: asyncio.Queue[bytes] = asyncio.Queue()
        self.ended = asyncio.Event()

    async def send(self, data: bytes, *, end: bool = False) -> None:
        await self._connection._send_data(self.id, data, end=end)

    async def end(self) -> None:
        await self._connection._send_data(self.id, b"", end=True)

    async def message(self, timeout: float = TIMEOUT) -> bytes:
        """The next message the server sent (``EOFError`` if the stream ended first)."""
        getter = asyncio.ensure_future(self._messages.get())
        ended = asyncio.ensure_future(self.ended.wait())
        try:
            done, _ = await asyncio.wait(
                (getter, ended), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ended.cancel()
            if not getter.done():
                getter.cancel()
        if getter in done:
            return getter.result()
        if not self._messages.empty():
            return self._messages.get_nowait()
        if ended in done:
            raise EOFError(f"the stream ended: {self.answer}")
        raise TimeoutError(f"no message within {timeout}s")

    async def finished(self, timeout: float = TIMEOUT) -> RawAnswer:
        """Wait (bounded) for the server to end the stream; what it sent."""
        async with asyncio.timeout(timeout):
            await self.ended.wait()
        return self.answer

    def _data(self, data: bytes) -> None:
        self.answer.data += data
        self._buffer += data
        while len(self._buffer) >= 5:
            size = int.from_bytes(self._buffer[1:5], "big")
            if len(self._buffer) < 5 + size:
                break
            self._messages.put_nowait(self._buffer[5 : 5 + size])
            self._buffer = self._buffer[5 + size :]


class RawConnection:
    """An HTTP/2 connection to a gRPC server; :meth:`open` starts calls on it."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self._streams: dict[int, RawStream] = {}
        self._window = asyncio.Event()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    async def __aenter__(self) -> Self:
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self._host, self._port), TIMEOUT
        )
        self._h2.initiate_connection()
        self._flush()
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def open(
        self, path: str, *, headers: Sequence[tuple[str, str]] = (), timeout: float | None = None
    ) -> RawStream:
        """Start a call of ``path`` (``/ChatService/Chat``) with ``headers`` added."""
        stream_id = self._h2.get_next_available_stream_id()
        request_headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"{self._host}:{self._port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *(() if timeout is None else (("grpc-timeout", f"{int(timeout * 1000)}m"),)),
            *headers,
        ]
        stream = self._streams[stream_id] = RawStream(self, stream_id)
        self._h2.send_headers(stream_id, request_headers)
        self._flush()
        return stream

    async def call(
        self,
        path: str,
        data: bytes,
        *,
        headers: Sequence[tuple[str, str]] = (),
        end: bool = True,
        timeout: float = TIMEOUT,
    ) -> RawAnswer:
        """One call: send ``data`` (then end the request, with ``end``); the whole answer."""
        stream = await self.open(path, headers=headers)
        await stream.send(data, end=end)
        return await stream.finished(timeout)

    async def _send_data(self, stream_id: int, data: bytes, *, end: bool) -> None:
        view = memoryview(data)
        while True:
            if self.closed.is_set():
                raise ConnectionError("the connection is closed")
            state = self._streams[stream_id]
            if state.ended.is_set():
                return  # the server is done with this stream: what is left goes nowhere
            try:
                window = self._h2.local_flow_control_window(stream_id)
            except h2.exceptions.StreamClosedError:
                return
            size = min(window, self._h2.max_outbound_frame_size, len(view))
            if size == 0 and view:
                self._window.clear()
                async with asyncio.timeout(TIMEOUT):
                    await self._window.wait()
                continue
            last = size == len(view)
            try:
                self._h2.send_data(stream_id, bytes(view[:size]), end_stream=end and last)
            except h2.exceptions.StreamClosedError:
                return
            self._flush()
            view = view[size:]
            if last:
                return

    def _flush(self) -> None:
        assert self._writer is not None
        data = self._h2.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while data := await self._reader.read(65536):
                try:
                    events = self._h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    self._event(event)
                self._flush()
        except OSError:
            pass
        finally:
            self.closed.set()
            self._window.set()
            for stream in self._streams.values():
                if not stream.ended.is_set():
                    stream.answer.reset = True
                    stream.ended.set()

    def _event(self, event: h2.events.Event) -> None:
        stream_id = getattr(event, "stream_id", 0)
        stream = self._streams.get(stream_id)
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            stream.answer.headers = _text(event.headers)
        elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
            stream.answer.trailers = _text(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if stream is not None:
                stream._data(event.data)
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.ended.set()
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.answer.reset = True
            stream.ended.set()
        elif isinstance(event, h2.events.WindowUpdated):
            self._window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed.set()


def _text(headers: Sequence[tuple[bytes | str, bytes | str]]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in headers
    }
