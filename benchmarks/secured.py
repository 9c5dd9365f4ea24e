"""The secured run: chat-server with TLS and bearer tokens against the grpc.aio reference
with TLS and a metadata check, and against itself with security off, in one run.

Usage (from the repository root)::

    python -m benchmarks.secured            # 3 rounds; writes docs/benchmarks/secured.{md,json}
    python -m benchmarks.secured --quick    # a short smoke run; writes benchmarks/results/

Three servers, each in its own process and started afresh per round, in turn:
``ours-secured`` (``chat-server --tls-cert/--tls-key --auth tokens``), ``reference-secured``
(:mod:`benchmarks.secured_reference`) and ``ours-plain`` (plaintext, ``--auth none``). Per
server and round: CPU per streamed chunk at ``--streams`` concurrent streams, and PING and
first-chunk p99 of a probe stream under that load. The clients are those of
:mod:`benchmarks.client` (grpcio C core); for the secured servers every call goes over TLS
with ``authorization: Bearer TOKEN`` (:mod:`benchmarks.secured_client`). Certificates are
made for the run with trustme. Targets: ours-secured / reference-secured <= 1.0 on each
metric, and ours-secured / ours-plain <= 1.3 in CPU per chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks._processes import ROOT, Clients, Server, percentile, started
from benchmarks._processes import clients as client_processes

SERVERS = ("ours-secured", "reference-secured", "ours-plain")
#: The load and probe texts of benchmarks.run: a 56-chunk and a short echo reply.
LOAD_TEXT = " ".join(f"word{i}" for i in range(50))
PROBE_TEXT = "hello there, how are you"
#: Load clients run niced, so that the probe measures the server, not its own share of CPU.
LOAD_NICE = 10
METRICS = (
    ("cpu_us_per_chunk", "server CPU per chunk", "µs"),
    ("loaded_ping_p99_ms", "PING p99 under load", "ms"),
    ("loaded_first_chunk_p99_ms", "first chunk p99 under load", "ms"),
)


@dataclass(frozen=True)
class Secrets:
    """The run's certificate files and token."""

    ca_file: str
    server_pem: str
    token: str
    token_hash: str
    tokens_file: str


def make_secrets(directory: Path) -> Secrets:
    import trustme

    from chat.auth.tokens import FileTokenStore, hash_token, new_token

    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    server = directory / "server.pem"
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(server)
    token = new_token()
    tokens_file = directory / "tokens.json"
    asyncio.run(FileTokenStore(tokens_file).add("bench", hash_token(token), admin=False))
    return Secrets(str(ca_file), str(server), token, hash_token(token), str(tokens_file))


def server_command(name: str, secrets: Secrets) -> list[str]:
    common = ["--host", "127.0.0.1", "--port", "0", "--pace", "0"]
    if name.startswith("reference"):
        return [
            sys.executable,
            "-m",
            "benchmarks.secured_reference",
            *common,
            "--tls-cert",
            secrets.server_pem,
            "--tls-key",
            secrets.server_pem,
            "--token-hash",
            secrets.token_hash,
        ]
    script = Path(sys.executable).with_name("chat-server")
    prefix = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "from chat.cli.server import main; main()"]
    )
    command = [*prefix, "--store", "memory://", "--log-level", "warning", *common]
    if name == "ours-secured":
        command += [
            "--tls-cert",
            secrets.server_pem,
            "--tls-key",
            secrets.server_pem,
            "--auth",
            "tokens",
            "--tokens-file",
            secrets.tokens_file,
        ]
    return command


def running(
    name: str, secrets: Secrets, log_dir: Path
) -> contextlib.AbstractAsyncContextManager[Server]:
    return started(name, server_command(name, secrets), log_dir / "secured")


def clients(
    params: Sequence[dict[str, Any]], secure: bool, within: float
) -> contextlib.AbstractAsyncContextManager[Clients]:
    """Load clients (``benchmarks.client``, over TLS with a token when ``secure``)."""
    module = "benchmarks.secured_client" if secure else "benchmarks.client"
    return client_processes([[sys.executable, "-m", module, json.dumps(p)] for p in params], within)


def split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def measure(server: Server, secrets: Secrets, s: argparse.Namespace) -> dict[str, float]:
    """Throughput (CPU per chunk) at ``s.streams``, then PING / first chunk under that load."""
    secure = server.name != "ours-plain"
    extra = {"ca_file": secrets.ca_file, "token": secrets.token} if secure else {}
    setup = 30.0 + s.streams * 0.02
    load = [
        {
            "scenario": "throughput",
            "target": server.target,
            "streams": n,
            "text": LOAD_TEXT,
            "duration": s.seconds,
            **extra,
        }
        for n in split(s.streams, 2)
    ]
    async with clients(load, secure, setup) as group:
        cpu0 = server.cpu_seconds()
        group.go()
        await asyncio.sleep(s.seconds)
        cpu = server.cpu_seconds() - cpu0
        results = await group.results(s.seconds + 30)
    chunks = sum(r["chunks"] for r in results)
    failures = [f for r in results for f in r["failures"]]
    if failures or not chunks:
        raise RuntimeError(f"the load on {server.name} failed: {failures[:3]}")
    out = {"cpu_us_per_chunk": cpu / chunks * 1e6, "chunks_per_s": chunks / s.seconds}

    loaded = [{**p, "duration": s.seconds + 1.5, "nice": LOAD_NICE} for p in load]
    probe = {
        "scenario": "probe",
        "target": server.target,
        "text": PROBE_TEXT,
        "duration": s.seconds,
        "gap": 0.01,
        **extra,
    }
    async with (
        clients(loaded, secure, setup) as loading,
        clients([probe], secure, 30) as probing,
    ):
        loading.go()
        await asyncio.sleep(0.5)
        probing.go()
        (result,) = await probing.results(s.seconds + 60)
        await loading.results(s.seconds + 60)
    out["loaded_ping_p99_ms"] = percentile(result["ping"], 99) * 1e3
    out["loaded_first_chunk_p99_ms"] = percentile(result["first_chunk"], 99) * 1e3
    return out


async def run(secrets: Secrets, s: argparse.Namespace, log_dir: Path) -> dict[str, list[Any]]:
    rounds: dict[str, list[Any]] = {name: [] for name in SERVERS}
    for number in range(1, s.rounds + 1):
        for name in SERVERS:
            async with running(name, secrets, log_dir) as server:
                values = await measure(server, secrets, s)
            rounds[name].append(values)
            shown = ", ".join(f"{k} {v:.1f}" for k, v in values.items())
            print(f"round {number} {name}: {shown}", file=sys.stderr, flush=True)
    return rounds


def summarize(rounds: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    median = {
        name: {key: statistics.median(r[key] for r in runs) for key, _, _ in METRICS}
        for name, runs in rounds.items()
    }
    ours, reference, plain = (median[n] for n in SERVERS)
    ratios = {f"{key}_vs_reference": ours[key] / reference[key] for key, _, _ in METRICS}
    ratios["cpu_us_per_chunk_vs_plain"] = ours["cpu_us_per_chunk"] / plain["cpu_us_per_chunk"]
    return {"median": median, "ratios": ratios}


def markdown(report: dict[str, Any]) -> str:
    median, ratios = report["summary"]["median"], report["summary"]["ratios"]
    lines = [
        "# Secured benchmark: TLS and bearer tokens",
        "",
        f"`{report['command']}`, {report['finished']}, {report['rounds']} round(s), "
        f"{report['streams']}-stream load, median of the rounds. Machine: "
        f"{report['machine']}.",
        "",
        "| metric | ours, secured | reference, secured | ratio (target ≤ 1.0) "
        "| ours, plain | secured / plain (target ≤ 1.3) |",
        "|---|---|---|---|---|---|",
    ]
    for key, label, unit in METRICS:
        vs_plain = (
            f"{ratios['cpu_us_per_chunk_vs_plain']:.2f}×" if key == "cpu_us_per_chunk" else "—"
        )
        lines.append(
            f"| {label} | {median['ours-secured'][key]:.1f} {unit} "
            f"| {median['reference-secured'][key]:.1f} {unit} "
            f"| {ratios[f'{key}_vs_reference']:.2f}× "
            f"| {median['ours-plain'][key]:.1f} {unit} | {vs_plain} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.secured", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short round, 20 streams")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    parser.add_argument("--streams", type=int, default=None, help="load streams (default 100)")
    parser.add_argument("--seconds", type=float, default=None, help="per measurement (6)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.streams = args.streams or (20 if args.quick else 100)
    args.seconds = args.seconds or (2.0 if args.quick else 6.0)
    output = args.output or (
        ROOT / "benchmarks" / "results" / "quick" if args.quick else ROOT / "docs" / "benchmarks"
    )
    from benchmarks import _pb

    _pb.load()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="grpc-chat-secured-") as directory:
        secrets = make_secrets(Path(directory))
        rounds = asyncio.run(run(secrets, args, ROOT / "benchmarks" / "results" / "logs"))
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python -m benchmarks.secured", *given])
    report = {
        "command": command,
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.monotonic() - started, 1),
        "rounds": args.rounds,
        "streams": args.streams,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "summary": summarize(rounds),
        "raw": rounds,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "secured.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (output / "secured.md").write_text(text)
    print(text)
    print(f"wrote {output}/secured.md and secured.json in {report['seconds']} s")


if __name__ == "__main__":
    main()
