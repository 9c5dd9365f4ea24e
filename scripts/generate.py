"""Regenerate the typed messages and grpclib stubs in ``gen/chatpb`` from ``chat.proto``.

Usage: ``python scripts/generate.py [OUTPUT_DIR]`` (default ``gen/chatpb``).
Run through tox: ``tox -e proto``. The test suite calls :func:`generate` into a temporary
directory and fails when the committed ``gen/`` differs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "chat.proto"
OUTPUT = ROOT / "gen" / "chatpb"
DESCRIPTOR_SET = "chat.binpb"
OPTIONS = "client_generation=async,server_generation=async,google_protobuf_descriptors"


def generate(output: Path) -> None:
    """Write the generated package for ``chat.proto`` into ``output`` (replacing it)."""
    # The compiler formats its output with ruff, found on PATH: make this environment's
    # scripts directory (where the pinned ruff is installed) come first.
    env = dict(os.environ)
    scripts = sysconfig.get_path("scripts")
    env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")])
    if shutil.which("ruff", path=env["PATH"]) is None:
        raise RuntimeError("ruff is not installed: the betterproto2 compiler needs it on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"--proto_path={ROOT}",
                f"--python_betterproto2_out={tmp}",
                f"--python_betterproto2_opt={OPTIONS}",
                str(PROTO),
            ],
            check=True,
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        # The same file with its comments (source info), served by server reflection so that
        # `grpcurl describe` shows the API reference; the embedded descriptors have none.
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"--proto_path={ROOT}",
                "--include_source_info",
                f"--descriptor_set_out={Path(tmp) / DESCRIPTOR_SET}",
                str(PROTO),
            ],
            check=True,
            cwd=ROOT,
        )
        if output.exists():
            shutil.rmtree(output)
        shutil.copytree(tmp, output)


def main() -> None:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT
    generate(output)
    print(f"generated {output}")


if __name__ == "__main__":
    main()
