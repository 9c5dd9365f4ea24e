"""The processes of a benchmark: servers it starts and measures, client processes it drives.

Every benchmark program (``benchmarks.run``, ``.secured``, ``.hardening``, ``.observability``)
measures a server's CPU and memory from ``/proc`` and drives clients the same way, so that their
numbers can be compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "ROOT",
    "Clients",
    "Server",
    "clients",
    "close_and_wait",
    "cpu_seconds",
    "log_file",
    "peak_rss_mb",
    "percentile",
    "serving_module",
    "started",
    "stop_process",
]

ROOT = Path(__file__).resolve().parent.parent
#: The line both servers print once they listen.
BANNER = re.compile(r"listening on (?P<host>[^\s:]+):(?P<port>\d+)")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
#: A client's result line holds every sample (tens of thousands of numbers).
_LINE_LIMIT = 64 * 2**20


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) of ``values``, nearest rank; NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@dataclass
class Server:
    """A server process that printed where it listens."""

    name: str
    process: asyncio.subprocess.Process
    target: str
    drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.pid)


def log_file(log_dir: Path, name: str) -> IO[bytes]:
    """Where a process's stderr goes (appended), for looking into a failed run."""
    log_dir.mkdir(parents=True, exist_ok=True)
    return open(log_dir / f"{name}.log", "ab")


@contextlib.asynccontextmanager
async def started(
    name: str,
    command: Sequence[str],
    log_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
) -> AsyncIterator[Server]:
    """A server process, once it printed ``listening on HOST:PORT``; stopped afterwards.

    Its stderr goes to ``log_dir/NAME.log``; ``env`` is added to this process's environment.
    """
    with log_file(log_dir, name) as errors:
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=errors,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    assert process.stdout is not None
    server: Server | None = None
    try:
        async with asyncio.timeout(30):
            while (match := BANNER.search((await process.stdout.readline()).decode())) is None:
                if process.stdout.at_eof():
                    raise RuntimeError(f"{name} exited; see {log_dir}/{name}.log")
        server = Server(name, process, f"{match['host']}:{match['port']}")
        # Keep reading its output, so that a full pipe never blocks it.
        server.drain = asyncio.create_task(_drain(process.stdout))
        yield server
    finally:
        await stop_process(process)
        if server is not None and server.drain is not None:
            server.drain.cancel()
            await asyncio.wait((server.drain,))


async def stop_process(
    process: asyncio.subprocess.Process, within: float = 10, *, terminate: bool = True
) -> None:
    """SIGTERM (unless ``terminate`` is false: it was asked to stop), then SIGKILL if it is
    still running ``within`` seconds later."""
    if process.returncode is None:
        if terminate:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        try:
            async with asyncio.timeout(within):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


async def serving_module(module: str, *args: str) -> tuple[asyncio.subprocess.Process, Any]:
    """Run ``python -m MODULE ARGS`` as a server that prints one JSON line once it is ready
    (and stops when its stdin closes: :func:`close_and_wait`); the process and that line."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 60)
    if not line:
        raise RuntimeError(f"{module} {' '.join(args)} did not start")
    return process, json.loads(line)


async def close_and_wait(process: asyncio.subprocess.Process, within: float = 15) -> None:
    """Close the process's stdin (it stops), then wait; SIGKILL after ``within`` seconds."""
    if process.stdin is not None:
        process.stdin.close()
    await stop_process(process, within, terminate=False)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


@dataclass
class Clients:
    """Client processes that print ``ready``, wait for ``go``, and print one JSON line.

    They are told ``stop`` (and their stdin is closed) when the group stops.
    """

    processes: list[asyncio.subprocess.Process] = field(default_factory=list)

    async def start(self, commands: Sequence[Sequence[str]], within: float) -> None:
        for command in commands:
            process = await asyncio.create_subprocess_exec(
                *command,
                cwd=ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=_LINE_LIMIT,
            )
            self.processes.append(process)
        async with asyncio.timeout(within):
            for process in self.processes:
                await self.expect(process, "ready")

    @staticmethod
    async def expect(process: asyncio.subprocess.Process, word: str) -> None:
        assert process.stdout is not None
        line = (await process.stdout.readline()).decode().strip()
        if line != word:
            raise RuntimeError(f"client said {line!r} instead of {word!r}")

    def go(self) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(b"go\n")

    async def results(self, within: float) -> list[dict[str, Any]]:
        out = []
        async with asyncio.timeout(within):
            for process in self.processes:
                assert process.stdout is not None
                line = await process.stdout.readline()
                if not line:
                    raise RuntimeError("a client exited without a result")
                out.append(json.loads(line))
        return out

    async def stop(self) -> None:
        for process in self.processes:
            if process.returncode is None and process.stdin is not None:
                with contextlib.suppress(ProcessLookupError, BrokenPipeError, ConnectionResetError):
                    process.stdin.write(b"stop\n")
                    process.stdin.close()
        for process in self.processes:
            await stop_process(process, within=15, terminate=False)


@contextlib.asynccontextmanager
async def clients(commands: Sequence[Sequence[str]], within: float) -> AsyncIterator[Clients]:
    """Start client processes and wait until each is ready; stop them afterwards."""
    group = Clients()
    try:
        await group.start(commands, within)
        yield group
    finally:
        await group.stop()
