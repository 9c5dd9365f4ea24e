"""A redis-server of a test's own, to kill and restart (the shared one is never touched)."""

from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path
from types import TracebackType
from typing import Self

import redis.asyncio as aioredis

from tests.helpers import TIMEOUT, eventually


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class OwnRedis:
    """``redis-server`` on a free port, persisting every write (AOF, fsync always) in
    ``directory``, so that a restart after SIGKILL has everything that was acknowledged."""

    def __init__(self, directory: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed (the store tests need it)")
        self._command = [
            executable,
            "--bind",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ]
        self.port = int(self._command[4])
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            *self._command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        await eventually(self._answers, f"redis-server on port {self.port} to answer")

    async def kill(self) -> None:
        """SIGKILL: no shutdown, no last save (the AOF has every acknowledged write)."""
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await asyncio.wait_for(self._process.wait(), TIMEOUT)

    async def _answers(self) -> bool:
        client = aioredis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            return bool(await client.ping())
        except (OSError, aioredis.ConnectionError):
            return False
        finally:
            await client.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kill()
