"""grpcio-tools code for ``chat.proto``, generated at run time into a cache (never committed).

The reference server and the load clients both use it: protobuf's upb messages and the
grpcio C-core stubs, the fastest Python gRPC stack available.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "chat.proto"
#: Where generated modules go; keyed by the proto's hash so an edited contract regenerates.
CACHE = ROOT / "benchmarks" / "results" / "_pb"


def load() -> tuple[ModuleType, ModuleType]:
    """``(chat_pb2, chat_pb2_grpc)``, generating them first if the cache lacks them."""
    digest = hashlib.sha256(PROTO.read_bytes()).hexdigest()[:16]
    target = CACHE / digest
    if not (target / "chat_pb2_grpc.py").exists():
        from grpc_tools import protoc

        CACHE.mkdir(parents=True, exist_ok=True)
        # Generate beside the target and rename, so concurrent processes never import a
        # half-written module.
        tmp = Path(tempfile.mkdtemp(dir=CACHE))
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"--proto_path={ROOT}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(PROTO),
            ]
        )
        if code != 0:
            raise RuntimeError(f"grpc_tools.protoc failed with exit code {code}")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "chat_pb2_grpc.py").exists():
                raise
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    return importlib.import_module("chat_pb2"), importlib.import_module("chat_pb2_grpc")
