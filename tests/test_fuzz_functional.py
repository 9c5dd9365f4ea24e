"""The fuzz suite (issue 12): hostile requests against a real ``chat-server``.

Hypothesis makes request bodies for every RPC, Chat included (random bytes, mutated valid
messages, extreme values) and frames them well or badly (lengths that lie, a compressed
flag without an encoding, gzip, corrupt gzip, an encoding nobody knows, a 4 GiB prefix, two
messages, a prefix cut short, no message at all). Each goes out as raw HTTP/2 frames. Then:

- every answer is a documented status (OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED,
  FAILED_PRECONDITION, UNIMPLEMENTED), on the Chat stream every ERROR event too: never
  UNKNOWN or INTERNAL, never a stream reset without a status, never an exception's text;
- the server answers a probe (GetServerStats on a connection of its own) after every call;
- the sessions stored before are byte-identical after;
- the server's log has one WARNING line at most per malformed call, and no traceback.
"""

from __future__ import annotations

import asyncio
import gzip
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from grpclib.client import Channel
from hypothesis import HealthCheck, given, settings

import chatpb
from tests.helpers import ChatStream, ServerProcess, running_server_process
from tests.raw_grpc import RawAnswer, RawConnection, frame
from tests.strategies import WireCase, wire_cases

pytestmark = pytest.mark.slow

T = chatpb.ChatResponseType
#: The statuses a hostile call may get (documented for ChatService: chat.proto, README).
DOCUMENTED = {0, 3, 5, 8, 9, 12}
#: What the text of a Python exception (or of a library's) looks like in a message.
EXCEPTION_TEXT = re.compile(
    r"Traceback|codec can't|argument must be|Error parsing|Exception|object has no|"
    r"Internal Server Error|0x[0-9a-f]{2}|File \""
)
#: The bound on the probe's answer: generous, so that only a stalled server misses it.
PROBE_WITHIN = 5.0
#: A call gets its whole answer within this (the server's own bound for a unary request
#: that does not end is 5 s; these calls all end).
CALL_WITHIN = 10.0


def _framed(case: WireCase) -> tuple[bytes, list[tuple[str, str]]]:
    """The DATA to send for ``case``, and the extra headers."""
    headers: list[tuple[str, str]] = []
    bodies = case.bodies
    framing = case.framing
    if framing == "none":
        return b"", headers
    if framing == "gzip":
        headers.append(("grpc-encoding", "gzip"))
        return b"".join(frame(gzip.compress(b), compressed=True) for b in bodies), headers
    if framing == "gzip-corrupt":
        headers.append(("grpc-encoding", "gzip"))
        return b"".join(frame(b + b"\x1f", compressed=True) for b in bodies), headers
    if framing == "unknown-encoding":
        headers.append(("grpc-encoding", "snappy"))
        return b"".join(frame(b, compressed=True) for b in bodies), headers
    if framing == "flag-only":
        return b"".join(frame(b, compressed=True) for b in bodies), headers
    if framing == "huge-prefix":
        return frame(b"", length=0xFFFFFFFF) + bodies[0][:64], headers
    if framing == "long":
        return frame(bodies[0], length=len(bodies[0]) + 7), headers
    if framing == "short":
        return frame(bodies[0], length=max(0, len(bodies[0]) - 3)), headers
    if framing == "cut-prefix":
        return frame(bodies[0])[:3], headers
    if framing == "two":
        return b"".join(frame(b) for b in (*bodies, bodies[0])), headers
    return b"".join(frame(b) for b in bodies), headers


def _check(case: WireCase, answer: RawAnswer) -> None:
    assert answer.status is not None, f"no grpc-status for {case}: {answer}"
    assert answer.status in DOCUMENTED, f"{case}: {answer.status} {answer.message!r}"
    assert not EXCEPTION_TEXT.search(answer.message), f"{case}: {answer.message!r}"
    if case.rpc != "Chat" or answer.status != 0:
        return
    for body in answer.messages:
        event = chatpb.ChatResponse.parse(body)
        if event.type == T.ERROR:
            assert event.error_code in DOCUMENTED - {0}, f"{case}: {event}"
            assert not EXCEPTION_TEXT.search(event.error_message), f"{case}: {event}"


async def _one(server: ServerProcess, case: WireCase) -> None:
    data, headers = _framed(case)
    async with RawConnection(server.host, server.port) as connection:
        answer = await connection.call(
            f"/ChatService/{case.rpc}", data, headers=headers, timeout=CALL_WITHIN
        )
    _check(case, answer)
    await _probe(server)


async def _probe(server: ServerProcess) -> None:
    async with Channel(server.host, server.port) as channel:
        stub = chatpb.ChatServiceStub(channel)
        await stub.get_server_stats(chatpb.ServerStatsRequest(), timeout=PROBE_WITHIN)


async def _stored_sessions(server: ServerProcess, ids: Sequence[str]) -> list[bytes]:
    async with Channel(server.host, server.port) as channel:
        stub = chatpb.ChatServiceStub(channel)
        return [
            bytes(
                await stub.get_session_info(
                    chatpb.SessionInfoRequest(session_id=session_id, include_messages=True)
                )
            )
            for session_id in ids
        ]


async def _sessions_with_turns(server: ServerProcess) -> list[str]:
    async with Channel(server.host, server.port) as channel:
        stub = chatpb.ChatServiceStub(channel)
        ids = []
        for n in range(3):
            session = await stub.create_session(chatpb.CreateSessionRequest(title=f"kept {n}"))
            async with ChatStream(stub) as stream:
                for turn in range(2):
                    stream.message(session.session_id, f"turn {turn}", f"r{turn}")
                    await stream.until_complete(f"r{turn}")
            ids.append(session.session_id)
        return ids


def test_hostile_requests_get_documented_answers_and_change_nothing_stored(
    tmp_path: Path,
) -> None:
    store = f"sqlite://{tmp_path / 'fuzz.db'}"
    calls = 0
    with (
        running_server_process("--store", store, "--max-receive-bytes", "65536") as server,
        asyncio.Runner() as runner,
    ):
        ids = runner.run(_sessions_with_turns(server))
        before = runner.run(_stored_sessions(server, ids))

        @settings(
            # Six times the profile's count (ci: 300 calls; thorough: 3,000).
            max_examples=settings().max_examples * 6,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(case=wire_cases())
        def hostile(case: WireCase) -> None:
            nonlocal calls
            calls += 1
            runner.run(_one(server, case))

        hostile()
        after = runner.run(_stored_sessions(server, ids))
        log = list(server.output)
    assert after == before
    assert not [line for line in log if "Traceback" in line or " ERROR " in line]
    refused = [line for line in log if "refused a malformed request" in line]
    assert 0 < len(refused) <= calls
    assert all("WARNING" in line for line in refused)
