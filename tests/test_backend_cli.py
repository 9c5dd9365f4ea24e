"""Choosing and configuring a backend: chat-server options, missing extras, a real process."""

from __future__ import annotations

import asyncio
import importlib
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from grpclib.client import Channel

import chatpb
from chat.backends.coalesce import CoalescingBackend
from chat.backends.echo import EchoBackend
from chat.cli.server import main
from chat.config import ServerConfig
from chat.errors import ConfigurationError, MissingExtra
from chat.secret import Secret
from chat.server import create_backend
from tests.fake_llm import FakeLLM, Reply
from tests.helpers import ChatStream, reply_text, running_server_process

KEY = "sk-process-test-SHOULD-NOT-APPEAR"


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    # Keys from the developer's environment must not leak into these tests.
    clean = {name: "" for name in ("OPENAI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY")}
    result = CliRunner().invoke(main, list(args), env={**clean, "CHAT_API_KEY": "", **(env or {})})
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("module", "backend", "extra"),
    [("openai", "openai", "openai"), ("google.genai", "gemini", "gemini")],
)
def test_a_backend_without_its_extra_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, backend: str, extra: str
) -> None:
    # As if the SDK were not installed: importing it fails.
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delitem(sys.modules, f"chat.backends.{backend}", raising=False)
    config = ServerConfig(backend=backend, base_url="http://127.0.0.1:9", api_key=Secret("k"))
    with pytest.raises(MissingExtra, match=rf"pip install 'grpc-chat\[{extra}\]'"):
        create_backend(config)
    code, output = run_cli(
        "--backend", backend, "--base-url", "http://127.0.0.1:9", env={"CHAT_API_KEY": "k"}
    )
    assert code == 1
    assert (
        f"Error: the {backend} backend needs the optional dependencies of grpc-chat[{extra}]"
        in output
    )
    # The real module again, for the tests that follow.
    monkeypatch.undo()
    importlib.import_module(f"chat.backends.{backend}")


def test_openai_without_a_key_or_base_url_is_a_clear_error() -> None:
    code, output = run_cli("--backend", "openai")
    assert code == 1
    assert "needs an API key for api.openai.com" in output
    assert "--base-url" in output


def test_gemini_without_a_key_is_a_clear_error() -> None:
    code, output = run_cli("--backend", "gemini")
    assert code == 1
    assert "GEMINI_API_KEY" in output


def test_a_bad_base_url_is_a_clear_error() -> None:
    code, output = run_cli("--backend", "openai", "--base-url", "localhost:11434")
    assert code == 1
    assert "http:// or https:// URL" in output


def test_an_api_key_file_that_cannot_be_read_is_a_clear_error(tmp_path: Path) -> None:
    code, output = run_cli("--backend", "gemini", "--api-key-file", str(tmp_path / "nope"))
    assert code == 1
    assert "cannot read the API key file" in output


def test_create_backend_applies_the_coalescing_window_per_backend() -> None:
    assert isinstance(create_backend(ServerConfig()), EchoBackend)
    coalesced = create_backend(ServerConfig(coalesce_window=0.01))
    assert isinstance(coalesced, CoalescingBackend)
    assert coalesced.window == 0.01
    remote = create_backend(
        ServerConfig(backend="openai", base_url="http://127.0.0.1:9", coalesce_window=None)
    )
    assert isinstance(remote, CoalescingBackend)
    assert remote.window == 0.005
    assert remote.name == "openai"
    assert isinstance(
        create_backend(ServerConfig(backend="openai", base_url="http://x:1", coalesce_window=0)),
        type(remote.inner),
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"connect_timeout": 0.0},
        {"read_timeout": float("inf")},
        {"retries": -1},
        {"coalesce_window": 2.0},
        {"backend": "llama"},
        {"base_url": "ftp://example.com"},
    ],
)
def test_bad_backend_settings_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        ServerConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.slow
async def test_chat_server_process_streams_from_an_openai_compatible_server() -> None:
    """As a user would: ``chat-server --backend openai --base-url ...`` and a Chat stream."""
    async with FakeLLM("openai") as fake:
        fake.replies.extend([Reply(pieces=("Streaming ", "from ", "the ", "fake.")), Reply()])
        env = {"OPENAI_API_KEY": KEY, "CHAT_API_KEY": ""}
        args = ("--backend", "openai", "--base-url", fake.base_url, "--model", "fake-model")
        # Waiting for the banner blocks: do it off the event loop the fake server runs on.
        process = running_server_process(*args, "--log-level", "debug", env=env)
        server = await asyncio.to_thread(process.__enter__)
        try:
            async with Channel(server.host, server.port) as channel:
                stub = chatpb.ChatServiceStub(channel)
                created = await stub.create_session(chatpb.CreateSessionRequest())
                assert created.session is not None
                assert created.session.model == "fake-model"
                async with ChatStream(stub) as stream:
                    stream.message(created.session_id, "hello", "r1")
                    events = await stream.until_complete("r1")
            assert reply_text(events) == "Streaming from the fake."
            complete = events[-1]
            assert complete.type == chatpb.ChatResponseType.RESPONSE_COMPLETE
            assert complete.finish_reason == chatpb.FinishReason.STOP
            assert complete.usage is not None
            assert complete.usage.total_tokens == 15
            assert await asyncio.to_thread(server.terminate) == 0
        finally:
            await asyncio.to_thread(process.__exit__, None, None, None)
        assert fake.generations[0].headers["authorization"] == f"Bearer {KEY}"
    banner = "".join(server.output)
    assert "backend openai, model fake-model" in banner
    assert KEY not in banner, "the key was logged"
