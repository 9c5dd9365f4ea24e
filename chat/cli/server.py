"""``chat-server``: run the grpc-chat server."""

from __future__ import annotations

import asyncio
import logging
import sys

import click

from chat._version import __version__
from chat.config import BACKENDS, ServerConfig
from chat.core import Limits
from chat.errors import ChatError
from chat.retention import Retention
from chat.server import ChatServer, serve
from chat.store import default_store_url

_LOG_LEVELS = ("debug", "info", "warning", "error")


def _banner(server: ChatServer) -> None:
    config = server.config
    core = server.core
    address = ServerConfig(host=config.host, port=server.port).address
    click.echo(
        f"chat-server {__version__} listening on {address} "
        f"(backend {core.backend.name}, model {core.backend.default_model}, "
        f"store {core.store.kind})"
    )
    click.echo(f"  sessions in: {core.store.location}")
    click.echo(f"  talk to it:  chat-client --target {address}")
    click.echo(f"  inspect it:  grpcurl -plaintext {address} describe ChatService")
    click.echo("  stop it:     Ctrl-C (replies in flight get the grace period to finish)")
    sys.stdout.flush()


@click.command(context_settings={"auto_envvar_prefix": "CHAT", "show_default": True})
@click.option("--host", default="localhost", help="Interface to listen on (0.0.0.0 for all).")
@click.option("--port", default=50051, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--backend", default="echo", type=click.Choice(BACKENDS), help="Model backend.")
@click.option("--model", default="", help="Default model for new sessions.")
@click.option(
    "--store",
    default=default_store_url,
    show_default="a SQLite file in the user data directory",
    help="Session store URL: sqlite:///PATH.db, redis://HOST:PORT/DB?prefix=NAME, memory://.",
)
@click.option(
    "--session-ttl",
    default=0.0,
    type=click.FloatRange(min=0),
    help="Delete sessions idle for this many seconds (0: keep them).",
)
@click.option(
    "--max-sessions",
    default=0,
    type=click.IntRange(min=0),
    help="Keep at most this many sessions, evicting the least recently active (0: no cap).",
)
@click.option(
    "--max-messages-per-session",
    default=0,
    type=click.IntRange(min=0),
    help="Keep at most this many messages per session, dropping the oldest (0: no cap).",
)
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
    session_ttl: float,
    max_sessions: int,
    max_messages_per_session: int,
    grace_period: float,
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
            limits=Limits(max_message_chars=max_message_chars),
            retention=Retention(
                session_ttl=session_ttl or None,
                max_sessions=max_sessions or None,
                max_messages_per_session=max_messages_per_session or None,
            ),
        )
        asyncio.run(serve(config, ready=_banner))
    except ChatError as error:
        raise click.ClickException(error.message) from error
    except OSError as error:
        raise click.ClickException(f"cannot listen on {host}:{port}: {error}") from error
