"""Shared fixtures: a core without sockets, an in-process server, and Hypothesis profiles."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, settings

from chat import ChatCore, ChatServer, EchoBackend, MemoryStore, ServerConfig

settings.register_profile(
    "ci",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=20, deadline=None)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("CHAT_TEST_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _private_data_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep the default SQLite store (and anything else in the data directory) out of $HOME.

    Servers started without ``--store``, in this process or as subprocesses, write there.
    """
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data-home")))


@pytest.fixture
def core() -> ChatCore:
    """A core over a memory store and the echo backend (no pacing)."""
    return ChatCore(MemoryStore(), EchoBackend())


@pytest.fixture
async def server() -> AsyncIterator[ChatServer]:
    """A real server on 127.0.0.1 with an ephemeral port, in this process."""
    config = ServerConfig(host="127.0.0.1", port=0, store="memory://", grace_period=1.0)
    async with ChatServer(config) as running:
        yield running
