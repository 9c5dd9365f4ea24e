"""The grpc.aio reference (:mod:`benchmarks.reference_server`) with security on: TLS and a
bearer-token check on every call, the plain grpc.aio way (a server interceptor).

Usage: ``python -m benchmarks.secured_reference --tls-cert PEM --tls-key PEM --token-hash
SHA256 [--port 0] [--pace 0]``. The token is compared by its SHA-256 in constant time, as
chat-server does; a call without it ends with UNAUTHENTICATED.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from benchmarks.reference_server import ReferenceChat, pb_grpc


class TokenCheck(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls whose ``authorization`` metadata is not ``Bearer <the token>``."""

    def __init__(self, token_hash: str) -> None:
        self._hash = token_hash.encode()

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")

        self._refusal = grpc.unary_unary_rpc_method_handler(refuse)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = dict(details.invocation_metadata or ())
        scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
        digest = hashlib.sha256(token.encode()).hexdigest().encode()
        if scheme.lower() == "bearer" and hmac.compare_digest(digest, self._hash):
            return await continuation(details)
        return self._refusal


async def serve(args: argparse.Namespace, key: bytes, chain: bytes) -> None:
    server = grpc.aio.server(interceptors=[TokenCheck(args.token_hash)])
    pb_grpc.add_ChatServiceServicer_to_server(ReferenceChat(args.pace), server)
    credentials = grpc.ssl_server_credentials([(key, chain)])
    bound = server.add_secure_port(f"{args.host}:{args.port}", credentials)
    await server.start()
    print(f"secured reference server listening on {args.host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--tls-cert", required=True)
    parser.add_argument("--tls-key", required=True)
    parser.add_argument("--token-hash", required=True)
    args = parser.parse_args()
    key, chain = Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes()
    asyncio.run(serve(args, key, chain))


if __name__ == "__main__":
    main()
