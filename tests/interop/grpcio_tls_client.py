"""A grpcio (C core) client over TLS, in its own process (see grpcio_client.py for why).

Usage: ``python grpcio_tls_client.py TARGET GENERATED_DIR CA_FILE [CERT KEY]``; the bearer
token, if any, comes from the ``CHAT_TOKEN`` variable and goes as ``authorization`` metadata
on every call. Prints JSON: health, WhoAmI, a turn's event kinds, and, for each failure, the
status code name.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(target: str, generated: str, ca_file: str, cert: str = "", key: str = "") -> None:
    sys.path.insert(0, generated)
    pb = importlib.import_module("chat_pb2")
    rpc = importlib.import_module("chat_pb2_grpc")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )
    token = os.environ.get("CHAT_TOKEN", "")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    result: dict[str, Any] = {}
    # The certificate names localhost; the channel connects to 127.0.0.1.
    options = (("grpc.ssl_target_name_override", "localhost"),)
    with grpc.secure_channel(target, credentials, options=options) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
            result["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as error:
            result["health"] = error.code().name
        stub = rpc.ChatServiceStub(channel)
        try:
            me = stub.WhoAmI(pb.WhoAmIRequest(), timeout=10, metadata=metadata)
            result["whoami"] = {"identity": me.identity, "admin": me.admin, "auth": me.auth}
            session = stub.CreateSession(pb.CreateSessionRequest(), timeout=10, metadata=metadata)
            request = pb.ChatRequest(session_id=session.session_id, message="hi", request_id="r")
            events = stub.Chat(iter([request]), timeout=30, metadata=metadata)
            result["turn"] = [pb.ChatResponse.Type.Name(e.type) for e in events]
        except grpc.RpcError as error:
            result["error"] = error.code().name
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
