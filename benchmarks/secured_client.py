"""The load client of :mod:`benchmarks.client`, over TLS with a bearer token.

Usage: ``python -m benchmarks.secured_client '<json parameters>'``: the parameters of
``benchmarks.client`` plus ``ca_file`` (PEM) and ``token``. Every channel that client opens
is a TLS channel that sends ``authorization: Bearer TOKEN`` on each call (grpcio's call
credentials), so the scenarios are exactly those of the plaintext runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import grpc


def _secure(ca_file: str, token: str) -> Any:
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes()),
        grpc.access_token_call_credentials(token),
    )

    def channel(target: str, options: Any = None, **kwargs: Any) -> Any:
        # The certificate names localhost; the target is 127.0.0.1.
        options = [*(options or ()), ("grpc.ssl_target_name_override", "localhost")]
        return grpc.aio.secure_channel(target, credentials, options=options, **kwargs)

    return channel


def main() -> None:
    params = json.loads(sys.argv[1])
    # This process only runs the benchmark client: its insecure channels become secure ones.
    grpc.aio.insecure_channel = _secure(params.pop("ca_file"), params.pop("token"))
    sys.argv[1] = json.dumps(params)
    from benchmarks import client

    client.main()


if __name__ == "__main__":
    main()
