"""Shared fixtures: a core without sockets, an in-process server, and Hypothesis profiles.

Tests marked ``upstream`` need a real OpenAI-compatible server (``transformers serve``, with
torch): they run with ``--upstream`` (``tox -e upstream``) and are deselected without it, so
the normal suite needs neither. With it they must pass: a server that cannot start fails them.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from chat import ChatCore, ChatServer, EchoBackend, MemoryStore, ServerConfig
from tests.helpers import ISSUED_TOKENS
from tests.upstream import Upstream, running_upstream

settings.register_profile(
    "ci",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=20, deadline=None)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("CHAT_TEST_HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--upstream",
        action="store_true",
        help="also run the tests marked upstream, against transformers serve (tox -e upstream)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--upstream"):
        return
    # Deselected (and counted as such), not skipped: they cannot fail here, and must not
    # look as if they passed.
    deselected = [item for item in items if item.get_closest_marker("upstream")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("upstream")]


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """transformers serve on tiny models built now (see tests/upstream.py)."""
    home: Path = tmp_path_factory.mktemp("upstream")
    with running_upstream(home) as running:
        yield running


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


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    """chat-server's CLI tunes the garbage collector of its process: undo it after a test."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _TokenLeaks(logging.Handler):
    """Sees every log record of the suite; keeps those that contain a token a test minted."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not ISSUED_TOKENS:
            return
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        if any(token in text for token in ISSUED_TOKENS):
            self.leaks.append(f"{record.name}: {text[:300]}")


_LEAKS = _TokenLeaks()


def pytest_configure(config: pytest.Config) -> None:
    # Every record the suite's loggers make (at the levels each test sets; tests of tokens
    # log at DEBUG) passes here. Logger levels are left alone: raising them would change
    # what the CLIs under test print.
    logging.getLogger().addHandler(_LEAKS)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    logging.getLogger().removeHandler(_LEAKS)
    if _LEAKS.leaks:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("log records that contain a bearer token:", red=True)
            for leak in _LEAKS.leaks:
                reporter.write_line(f"  {leak}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
