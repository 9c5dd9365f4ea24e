"""nginx as a gRPC proxy in front of test servers (``grpc_pass``), in the foreground.

The README shows the same ``upstream``/``grpc_pass`` for production; docs/operations.md the
timeouts that matter for long replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from tests.helpers import TIMEOUT


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )
    if found is None:
        pytest.fail(
            "nginx is not installed: this test runs servers behind it. "
            "Install it (Debian: apt-get install -y nginx; .ci/run does so when it is missing)."
        )
    return found


def nginx_config(
    directory: Path, listen_port: int, upstreams: list[str], read_timeout: str = "1h"
) -> str:
    """A gRPC load balancer in front of ``upstreams``, all its files in ``directory``;
    ``read_timeout`` is ``grpc_read_timeout`` (how long a stream may send nothing)."""
    servers = "\n".join(f"        server {address};" for address in upstreams)
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    upstream chat_replicas {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{listen_port} http2;
        location / {{
            grpc_pass grpc://chat_replicas;
            grpc_read_timeout {read_timeout};
            grpc_send_timeout {read_timeout};
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running_nginx(directory: Path, upstreams: list[str], read_timeout: str = "1h") -> Iterator[int]:
    """nginx in front of ``upstreams``; yields the port it listens on."""
    binary = nginx_binary()
    port = free_port()
    config = directory / "nginx.conf"
    config.write_text(nginx_config(directory, port, upstreams, read_timeout))
    process = subprocess.Popen(
        [binary, "-p", str(directory), "-c", str(config), "-e", "stderr"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield port
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=TIMEOUT)
        if process.returncode not in (0, -15):
            pytest.fail(f"nginx exited with {process.returncode}: {errors}")


async def wait_serving(port: int) -> None:
    """Until the servers answer health checks through nginx (bounded)."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                async with Channel("127.0.0.1", port) as channel:
                    reply = await HealthStub(channel).Check(HealthCheckRequest(service=""))
                if reply.status == HealthCheckResponse.SERVING:
                    return
            except (OSError, ConnectionError):
                pass
            await asyncio.sleep(0.05)  # nginx is still binding its port
