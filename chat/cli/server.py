"""``chat-server``: run the grpc-chat server."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys

import click

from chat._version import __version__
from chat.config import BACKENDS, EVENT_LOOPS, ServerConfig
from chat.core import Limits
from chat.errors import ChatError
from chat.server import ChatServer, event_loop_factory, serve

_LOG_LEVELS = ("debug", "info", "warning", "error")


def _banner(server: ChatServer) -> None:
    config = server.config
    core = server.core
    address = ServerConfig(host=config.host, port=server.port).address
    click.echo(
        f"chat-server {__version__} listening on {address} "
        f"(backend {core.backend.name}, model {core.backend.default_model}, "
        f"store {config.store})"
    )
    click.echo(f"  talk to it:  chat-client --target {address}")
    click.echo(f"  inspect it:  grpcurl -plaintext {address} describe ChatService")
    click.echo("  stop it:     Ctrl-C (replies in flight get the grace period to finish)")
    sys.stdout.flush()


def _tune_gc() -> None:
    """Make the cyclic garbage collector cheaper for a long-running server process.

    Everything imported so far lives as long as the process: freezing it keeps full
    collections from walking it again and again. A server allocates many short-lived
    objects per streamed chunk, so young collections are made less frequent (700 objects by
    default): measured under a 100-stream load, GC time fell from ~5% of the server's CPU to
    under 1%, and the longest pause from ~40 ms to ~10 ms.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


@click.command(context_settings={"auto_envvar_prefix": "CHAT", "show_default": True})
@click.option("--host", default="localhost", help="Interface to listen on (0.0.0.0 for all).")
@click.option("--port", default=50051, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--backend", default="echo", type=click.Choice(BACKENDS), help="Model backend.")
@click.option("--model", default="", help="Default model for new sessions.")
@click.option("--store", default="memory://", help="Session store URL.")
@click.option(
    "--pace", default=0.0, type=click.FloatRange(min=0), help="Echo backend: seconds per word."
)
@click.option(
    "--max-message-chars",
    default=Limits().max_message_chars,
    type=click.IntRange(min=1),
    help="Longest message accepted.",
)
@click.option(
    "--grace-period",
    default=10.0,
    type=click.FloatRange(min=0),
    help="Seconds replies in flight get to finish on shutdown.",
)
@click.option(
    "--event-loop",
    default="auto",
    type=click.Choice(EVENT_LOOPS),
    help="asyncio event loop: uvloop (faster) when installed with auto.",
)
@click.option("--log-level", default="info", type=click.Choice(_LOG_LEVELS))
@click.version_option(__version__, prog_name="chat-server")
def main(
    host: str,
    port: int,
    backend: str,
    model: str,
    store: str,
    pace: float,
    max_message_chars: int,
    grace_period: float,
    event_loop: str,
    log_level: str,
) -> None:
    """Run the grpc-chat server (gRPC service ChatService, with health and reflection).

    Every option can also be set with an environment variable: CHAT_PORT, CHAT_BACKEND,
    CHAT_MODEL, CHAT_STORE, and so on.
    """
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = ServerConfig(
            host=host,
            port=port,
            backend=backend,
            model=model,
            store=store,
            pace=pace,
            grace_period=grace_period,
            event_loop=event_loop,
            limits=Limits(max_message_chars=max_message_chars),
        )
        _tune_gc()
        with asyncio.Runner(loop_factory=event_loop_factory(config.event_loop)) as runner:
            runner.run(serve(config, ready=_banner))
    except ChatError as error:
        raise click.ClickException(error.message) from error
    except OSError as error:
        raise click.ClickException(f"cannot listen on {host}:{port}: {error}") from error
