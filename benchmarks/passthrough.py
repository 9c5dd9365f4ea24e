"""The pass-through scenario's helper processes: a paced fake model server, the direct client.

- ``python -m benchmarks.passthrough fake '{"tokens": 50, "pace": 0.02}'`` serves the tests'
  fake OpenAI-compatible server (:mod:`tests.fake_llm`) on 127.0.0.1, every reply ``tokens``
  pieces ``pace`` seconds apart, and prints ``listening on 127.0.0.1:PORT``.
- ``python -m benchmarks.passthrough direct '{"base_url": ..., "streams": 100, ...}'`` is the
  floor: the ``openai`` SDK reading that server itself, configured as the openai backend
  configures it. It prints ``ready``, waits for ``go``, runs ``streams`` concurrent streams of
  ``replies`` replies each (starting one after the other over ``stagger`` seconds), and prints
  one JSON line: time to first token and the gaps between tokens (seconds), as h2gen's
  ``relay`` scenario reports them through ``chat-server``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from typing import Any

MODEL = "fake-model"


def pieces(tokens: int) -> list[str]:
    """The reply's tokens: one word and a space each."""
    return [f"t{i} " for i in range(tokens)]


async def fake(p: dict[str, Any]) -> None:
    from tests.fake_llm import FakeLLM, Reply

    async with FakeLLM("openai", models=(MODEL,)) as server:
        server.default = Reply(pieces=pieces(p["tokens"]), pace=p["pace"], usage=None)
        print(f"fake openai listening on 127.0.0.1:{server.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        while not stop.is_set():
            # The fake keeps every request it saw (the tests look at them); a benchmark does not.
            server.requests.clear()
            await asyncio.wait([asyncio.ensure_future(stop.wait())], timeout=1.0)


async def direct(p: dict[str, Any]) -> dict[str, Any]:
    import httpx2
    import openai

    client = openai.AsyncOpenAI(
        api_key="benchmark",
        base_url=p["base_url"],
        timeout=httpx2.Timeout(120.0, connect=10.0),
        max_retries=0,
    )
    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0

    async def one_stream(index: int) -> None:
        nonlocal tokens
        # Stream i starts at stagger * i / streams, as h2gen's relay streams do.
        await asyncio.sleep(p.get("stagger", 0.0) * index / p["streams"])
        for _ in range(p["replies"]):
            sent = time.perf_counter()
            last = None
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "go"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            async with stream:
                async for chunk in stream:
                    if any(choice.delta and choice.delta.content for choice in chunk.choices):
                        now = time.perf_counter()
                        if last is None:
                            ttft.append(now - sent)
                        else:
                            itl.append(now - last)
                        last = now
                        tokens += 1

    # One request per stream first, so that the connection pool and the SDK are warm (as
    # chat-server is, by h2gen's warm-up reply on each stream).
    await asyncio.gather(*(_one_request(client) for _ in range(p["streams"])))
    print("ready", flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit(f"expected 'go', got {line!r}")
    cpu0 = time.process_time()
    async with asyncio.timeout(p["timeout"]):
        await asyncio.gather(*(one_stream(i) for i in range(p["streams"])))
    cpu = time.process_time() - cpu0
    await client.close()
    return {"ttft": ttft, "itl": itl, "tokens": tokens, "client_cpu_s": cpu}


async def _one_request(client: Any) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "warm"}], stream=True
    )
    async with stream:
        async for _ in stream:
            pass


def main() -> None:
    command, params = sys.argv[1], json.loads(sys.argv[2])
    try:
        import uvloop
    except ImportError:  # the same loop as chat-server's where uvloop is missing
        runner = asyncio.run
    else:
        runner = uvloop.run
    if command == "fake":
        runner(fake(params))
    elif command == "direct":
        print(json.dumps(runner(direct(params))), flush=True)
    else:
        raise SystemExit(f"unknown command {command!r}; use fake or direct")


if __name__ == "__main__":
    main()
