"""A real ``chat-server --metrics-port`` scraped after real turns; promtool checks the scrape."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from grpclib.client import Channel
from prometheus_client.parser import text_string_to_metric_families

import chatpb
from tests.helpers import TIMEOUT, ChatStream, ServerProcess, eventually, running_server_process

pytestmark = pytest.mark.slow

_METRICS_URL = re.compile(r"metrics: +(?P<url>http://\S+/metrics)")


def promtool() -> str:
    found = shutil.which("promtool") or next(
        (p for p in ("/usr/bin/promtool", "/usr/local/bin/promtool") if Path(p).exists()), None
    )
    if found is None:
        pytest.fail(
            "promtool is not installed: this test checks the scrape with it. Install it "
            "(Debian: apt-get install -y prometheus; .ci/run does so when it is missing)."
        )
    return found


async def metrics_url(server: ServerProcess) -> str:
    """The /metrics URL the banner shows (its lines arrive after the first one)."""
    found: list[str] = []

    async def shown() -> bool:
        found[:] = [m["url"] for line in server.output if (m := _METRICS_URL.search(line))]
        return bool(found)

    await eventually(shown, "the banner's metrics URL")
    return found[0]


async def scrape(url: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            return str(response.read().decode())

    return await asyncio.to_thread(get)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


async def test_a_scrape_after_real_turns_counts_them_and_passes_promtool() -> None:
    with running_server_process(
        "--store", "memory://", "--metrics-port", "0", "--log-format", "json"
    ) as server:
        url = await metrics_url(server)
        async with Channel(server.host, server.port) as channel:
            stub = chatpb.ChatServiceStub(channel)
            session = await stub.create_session(chatpb.CreateSessionRequest(title="scraped"))
            with pytest.raises(Exception, match="not found"):
                await stub.get_session_info(chatpb.SessionInfoRequest(session_id="nope"))
            chunks = output_tokens = 0
            async with ChatStream(stub) as stream:
                for n in range(3):
                    stream.message(session.session_id, f"turn number {n}", f"r{n}")
                    events = await stream.until_complete(f"r{n}")
                    chunks += sum(e.type == chatpb.ChatResponseType.CHUNK for e in events)
                    usage = events[-1].usage
                    assert usage is not None
                    output_tokens += usage.completion_tokens
                stream.message("no-such-session", "lost", "bad")
                await stream.until_complete("bad")
                open_scrape = samples(await scrape(url))
            chat = {
                "grpc_type": "bidi_stream",
                "grpc_service": "ChatService",
                "grpc_method": "Chat",
            }

            async def stream_handled() -> bool:
                scraped = samples(await scrape(url))
                # The test client ends its stream by resetting it: the client's doing.
                return any(
                    value(scraped, "grpc_server_handled_total", **chat, grpc_code=code) == 1
                    for code in ("OK", "Canceled")
                )

            await eventually(stream_handled, "the end of the stream to be counted")
            text = await scrape(url)
        scraped = samples(text)

        # What the server did, as the client saw it.
        turns = {"finish_reason": "stop", "gen_ai_request_model": "echo"}
        assert value(scraped, "chat_turns_total", outcome="success", **turns) == 3
        assert value(
            scraped, "chat_turns_total", outcome="error", finish_reason="error",
            gen_ai_request_model="",
        ) == 1  # fmt: skip
        assert value(scraped, "chat_chunks_sent_total") == chunks
        labels = {
            "gen_ai_operation_name": "chat",
            "gen_ai_provider_name": "echo",
            "gen_ai_request_model": "echo",
        }
        assert value(
            scraped, "gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="output"
        ) == output_tokens  # fmt: skip
        assert value(scraped, "gen_ai_server_time_to_first_token_seconds_count", **labels) == 3
        assert value(
            scraped, "gen_ai_server_time_to_first_token_seconds_bucket", **labels, le="+Inf"
        ) == 3  # fmt: skip
        unary = {"grpc_type": "unary", "grpc_service": "ChatService"}
        assert value(
            scraped, "grpc_server_handled_total", **unary, grpc_method="GetSessionInfo",
            grpc_code="NotFound",
        ) == 1  # fmt: skip
        assert value(
            scraped, "grpc_server_msg_received_total", **unary, grpc_method="CreateSession"
        ) == 1  # fmt: skip
        assert value(open_scrape, "chat_streams_open") == 1
        assert value(open_scrape, "grpc_server_msg_received_total", **chat) == 4
        assert value(open_scrape, "grpc_server_msg_sent_total", **chat) == len(stream.received)
        assert value(scraped, "grpc_server_handling_seconds_count", **chat) == 1
        assert value(scraped, "chat_streams_open") == 0
        # Bounded labels: no ids.
        assert session.session_id not in text
        assert "r1" not in re.findall(r'"([^"]*)"', text)

        # The Prometheus project's own linter accepts the scrape.
        check = await asyncio.to_thread(
            subprocess.run,
            [promtool(), "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert check.returncode == 0, check.stdout + check.stderr

        # --log-format json: one object per line, access lines with their context.
        def access_lines() -> list[dict[str, object]]:
            lines = [json.loads(line) for line in server.output if line.startswith("{")]
            return [line for line in lines if line.get("logger") == "chat.access"]

        async def turns_logged() -> bool:
            return sum(line.get("event") == "turn" for line in access_lines()) == 4

        await eventually(turns_logged, "the access lines of the four turns")
        lines = access_lines()
        (created,) = [line for line in lines if line.get("method") == "CreateSession"]
        assert created["grpc_code"] == "OK"
        assert created["level"] == "INFO"
        first = next(line for line in lines if line.get("request_id") == "r0")
        assert (first["session_id"], first["outcome"]) == (session.session_id, "success")
