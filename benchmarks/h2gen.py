"""The load generator, ``h2gen.c``: built at run time, told the wire format by ``chat.proto``.

``h2gen`` is a gRPC client on raw HTTP/2 frames (see the top of ``h2gen.c`` for why it is in C
and what it leaves undecoded). :func:`binary` compiles it with ``gcc -O2`` into
``benchmarks/results/h2gen/`` (keyed by the source's hash, never committed);
:func:`command` builds its command line, the protobuf field numbers and enum values read
from the descriptors of the protoc-generated ``chat_pb2``, so the C code hard-codes none.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks import _pb

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path(__file__).with_name("h2gen.c")
CACHE = ROOT / "benchmarks" / "results" / "h2gen"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11")


class BuildError(RuntimeError):
    """``h2gen.c`` could not be compiled (no C compiler, or it failed)."""


def binary() -> Path:
    """The compiled generator, building it first if the cache lacks this source's build."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    target = CACHE / digest / "h2gen"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise BuildError("the benchmarks need a C compiler (gcc or cc) to build benchmarks/h2gen.c")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so that concurrent runs never execute half a file.
    fd, tmp = tempfile.mkstemp(dir=target.parent)
    os.close(fd)
    try:
        completed = subprocess.run(
            [compiler, *CFLAGS, "-o", tmp, str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if completed.returncode != 0:
            raise BuildError(f"{compiler} failed on {SOURCE}:\n{completed.stderr[-3000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def wire() -> dict[str, Any]:
    """What ``h2gen`` needs to know of ``chat.proto``: field numbers, enum values, paths."""
    pb, _ = _pb.load()
    request, response = pb.ChatRequest, pb.ChatResponse
    service = pb.DESCRIPTOR.services_by_name["ChatService"]

    def number(message: Any, name: str) -> int:
        return int(message.DESCRIPTOR.fields_by_name[name].number)

    def path(method: str) -> str:
        return f"/{service.full_name}/{service.methods_by_name[method].name}"

    return {
        "f_req_type": number(request, "type"),
        "f_req_session": number(request, "session_id"),
        "f_req_message": number(request, "message"),
        "f_req_request_id": number(request, "request_id"),
        "v_req_ping": int(request.PING),
        "f_resp_type": number(response, "type"),
        "v_chunk": int(response.CHUNK),
        "v_complete": int(response.RESPONSE_COMPLETE),
        "v_error": int(response.ERROR),
        "v_pong": int(response.PONG),
        "f_resp_error_message": number(response, "error_message"),
        "f_create_title": number(pb.CreateSessionRequest, "title"),
        "f_create_resp_session": number(pb.CreateSessionResponse, "session_id"),
        "path_chat": path("Chat"),
        "path_create": path("CreateSession"),
    }


def command(params: Mapping[str, Any]) -> list[str]:
    """The command line that runs one generator process with ``params``.

    ``params`` holds ``target`` (``host:port``), ``scenario`` and the scenario's settings
    (see ``struct config`` in ``h2gen.c``); ``nice`` runs it at that nice level.
    """
    host, _, port = str(params["target"]).rpartition(":")
    args = {**wire(), "host": host, "port": port}
    for key, value in params.items():
        if key in ("target", "nice"):
            continue
        args[key] = int(value) if isinstance(value, bool) else value
    argv = [str(binary()), *(f"{key}={value}" for key, value in args.items())]
    nice = int(params.get("nice", 0))
    return ["nice", "-n", str(nice), *argv] if nice else argv
