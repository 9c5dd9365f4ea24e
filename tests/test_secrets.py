"""API keys never show: not in reprs, logs, errors, stats or anything sent to clients."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
from grpclib.client import Channel

import chatpb
from chat.backends.gemini import GeminiBackend
from chat.backends.openai import OpenAIBackend
from chat.backends.remote import RemoteSettings, RetryPolicy
from chat.config import ServerConfig
from chat.errors import ConfigurationError
from chat.secret import Secret, read_api_key
from chat.server import ChatServer, create_backend
from tests.fake_llm import FakeLLM, Reply, gemini_error, openai_error
from tests.helpers import ChatStream

KEY = "sk-live-DO-NOT-SHOW-7f3a9c"


def test_a_secret_shows_only_a_mask() -> None:
    secret = Secret(KEY)
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r:>40}", f"{secret:>30}"):
        assert KEY not in shown
    assert secret.reveal() == KEY
    assert secret == Secret(KEY)
    assert secret != Secret("other")
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_the_key_is_read_from_a_file_first_then_the_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}\n")
    env = {"CHAT_API_KEY": "", "OPENAI_API_KEY": "from-env"}
    from_file = read_api_key(key_file=key_file, env_vars=["OPENAI_API_KEY"], environ=env)
    assert from_file is not None
    assert from_file.reveal() == KEY
    from_env = read_api_key(key_file=None, env_vars=["CHAT_API_KEY", "OPENAI_API_KEY"], environ=env)
    assert from_env is not None
    assert from_env.reveal() == "from-env"
    assert read_api_key(key_file=None, env_vars=["NOPE"], environ=env) is None


def test_an_unusable_key_file_names_the_file_not_its_content(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(ConfigurationError, match="is empty"):
        read_api_key(key_file=empty, env_vars=[])
    with pytest.raises(ConfigurationError, match="missing"):
        read_api_key(key_file=tmp_path / "missing", env_vars=[])


def test_config_and_backends_do_not_show_the_key() -> None:
    config = ServerConfig(backend="gemini", api_key=Secret(KEY), base_url="http://127.0.0.1:9")
    assert KEY not in repr(config)
    assert KEY not in repr(config.remote_settings())
    backend = create_backend(config)
    assert KEY not in repr(backend)
    openai_backend = OpenAIBackend(RemoteSettings(api_key=Secret(KEY)))
    assert KEY not in repr(openai_backend)


def test_a_plain_string_key_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="Secret"):
        ServerConfig(api_key=KEY)  # type: ignore[arg-type]


@pytest.mark.parametrize("provider", ["openai", "gemini"])
async def test_the_key_is_in_no_log_error_or_stats(
    provider: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Upstream errors that echo the key, with every logger at DEBUG."""
    caplog.set_level(logging.DEBUG)
    async with FakeLLM(provider) as fake:  # type: ignore[arg-type]
        if provider == "openai":
            echoes = [
                Reply(status=401, error_body=openai_error(f"Incorrect API key provided: {KEY}")),
                Reply(status=400, error_body=openai_error(f"bad request from key {KEY}")),
                Reply(status=429, error_body=openai_error(f"rate limited: {KEY}")),
            ]
        else:
            echoes = [
                Reply(status=400, error_body=gemini_error(400, "INVALID_ARGUMENT", KEY)),
                Reply(status=403, error_body=gemini_error(403, "PERMISSION_DENIED", KEY)),
                Reply(status=429, error_body=gemini_error(429, "RESOURCE_EXHAUSTED", KEY)),
            ]
        fake.replies.extend(echoes)
        settings = RemoteSettings(
            base_url=fake.base_url,
            api_key=Secret(KEY),
            # A model the fake lists: the server checks its default model at start-up.
            default_model="fake-model",
            retry=RetryPolicy(attempts=1),
        )
        backend = OpenAIBackend(settings) if provider == "openai" else GeminiBackend(settings)
        config = ServerConfig(host="127.0.0.1", port=0, store="memory://")
        seen: list[str] = []
        async with (
            ChatServer(config, backend=backend) as server,
            Channel("127.0.0.1", server.port) as channel,
        ):
            stub = chatpb.ChatServiceStub(channel)
            session = await stub.create_session(chatpb.CreateSessionRequest())
            async with ChatStream(stub) as stream:
                for index in range(len(echoes)):
                    stream.message(session.session_id, "hello", f"r{index}")
                    events = await stream.until_complete(f"r{index}")
                    assert events[-1].type == chatpb.ChatResponseType.ERROR
                    seen.extend(repr(e) for e in events)
            stats = await stub.get_server_stats(chatpb.ServerStatsRequest())
            seen.append(repr(stats))
            info = await stub.get_session_info(
                chatpb.SessionInfoRequest(session_id=session.session_id, include_messages=True)
            )
            seen.append(repr(info))
        # The key was sent upstream (so it was really in use)...
        assert any(KEY in str(r.headers) for r in fake.generations)
    # ...and never came back out.
    assert all(KEY not in text for text in seen)
    assert KEY not in caplog.text
    assert any("[redacted]" in text for text in seen), "upstream text was quoted, redacted"
