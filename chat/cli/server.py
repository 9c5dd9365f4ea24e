"""``chat-server``: run the grpc-chat server."""

from __future__ import annotations

import asyncio
import errno
import gc
import sys
from collections.abc import Callable
from typing import Any

import click

from chat._defaults import default_of
from chat._version import __version__
from chat.auth import AUTH_MODES
from chat.auth.jwts import JwtSettings
from chat.auth.tokens import TokenRecord, TokenStore, hash_token, new_token, open_token_store
from chat.config import (
    API_KEY_ENV_VARS,
    BACKENDS,
    DISCONNECT_POLICIES,
    EVENT_LOOPS,
    MODEL_CHECKS,
    REFLECTION_MODES,
    ServerConfig,
)
from chat.context import ContextSettings
from chat.core import Limits
from chat.errors import ChatError
from chat.logs import LOG_FORMATS
from chat.logs import configure as configure_logging
from chat.quota import Quotas, Rate
from chat.replay import EVENT_OVERHEAD, ReplaySettings
from chat.retention import Retention
from chat.secret import read_api_key
from chat.server import ChatServer, event_loop_factory, exposure_warning, serve
from chat.store import default_store_url
from chat.store.sqlite import SqliteStore
from chat.types import ContextPolicy

_LOG_LEVELS = ("debug", "info", "warning", "error")


def _server_default(name: str) -> object:
    """The default of ``ServerConfig.<name>``: the options show what the config uses."""
    return default_of(ServerConfig, name)


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
    if isinstance(core.store, SqliteStore) and core.store.opened_elsewhere:
        # Servers started without --store by one user all use the default file.
        click.echo(
            "  note:        another process has this file open too: its sessions are "
            "shared with this server (--store picks another)"
        )
    security = "TLS" + (" with client certificates" if config.tls_client_ca else "")
    click.echo(
        f"  security:    {security if config.tls else 'plaintext (no TLS)'}, --auth {config.auth}"
    )
    if (warning := exposure_warning(config)) is not None:
        click.echo(f"  WARNING:     {warning}")
    tls = " --tls" if config.tls else ""
    click.echo(f"  talk to it:  chat-client --target {address}{tls}")
    grpcurl = "-cacert CA.pem" if config.tls else "-plaintext"
    click.echo(f"  inspect it:  grpcurl {grpcurl} {address} describe ChatService")
    if server.metrics_port is not None:
        metrics = ServerConfig(host=config.metrics_host or config.host, port=server.metrics_port)
        click.echo(f"  metrics:     http://{metrics.address}/metrics")
    click.echo(
        "  stop it:     Ctrl-C (replies in flight get the grace period to finish; "
        "Ctrl-C again stops at once)"
    )
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


def _prepare_telemetry(config: ServerConfig) -> None:
    """What this process does for metrics and traces, before the collector freezes memory.

    The OpenTelemetry SDK is imported now, so that its modules are frozen with the rest
    (``--otel`` without the extra fails here, with the extra to install). The ``_created``
    series of every counter and histogram are left out of ``/metrics``: Prometheus does not
    use them, and they make each scrape twice as long to write.
    """
    if config.otel:
        import chat.tracing  # noqa: F401
    if config.metrics_port is not None:
        import prometheus_client

        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


def _rate(ctx: click.Context, param: click.Parameter, value: str | None) -> Rate | None:
    if not value:
        return None
    try:
        return Rate.parse(value)
    except ChatError as error:
        raise click.BadParameter(error.message) from error


@click.group(
    invoke_without_command=True,
    context_settings={"auto_envvar_prefix": "CHAT", "show_default": True},
)
@click.option(
    "--host", default=_server_default("host"), help="Interface to listen on (0.0.0.0 for all)."
)
@click.option(
    "--port",
    default=_server_default("port"),
    type=click.IntRange(0, 65535),
    help="0 picks a free port.",
)
@click.option(
    "--backend",
    default=_server_default("backend"),
    type=click.Choice(BACKENDS),
    help="Model backend.",
)
@click.option(
    "--model",
    default=_server_default("model"),
    help="Default model for new sessions [default: echo, gpt-4o-mini or gemini-2.0-flash]",
    show_default=False,
)
@click.option(
    "--model-check",
    default=None,
    type=click.Choice(MODEL_CHECKS),
    help="Model names (--model at start-up, and each session's) that the backend does not "
    "list: refuse them, accept them with a warning, or do not list models at all "
    "[default: strict for OpenAI's and Gemini's own APIs, warn for other servers, which "
    "may list only the models they have loaded]",
    show_default=False,
)
@click.option(
    "--base-url",
    default=_server_default("base_url"),
    help="OpenAI-compatible or Gemini endpoint, e.g. http://localhost:11434/v1 for Ollama "
    "[default: the provider's public endpoint]",
    show_default=False,
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="File holding the API key (default: CHAT_API_KEY, then OPENAI_API_KEY, or "
    "GOOGLE_API_KEY/GEMINI_API_KEY for gemini).",
)
@click.option(
    "--connect-timeout",
    default=_server_default("connect_timeout"),
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds to wait for a connection to the model server.",
)
@click.option(
    "--read-timeout",
    default=_server_default("read_timeout"),
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds to wait for each read from the model server (the first token included).",
)
@click.option(
    "--retries",
    default=_server_default("retries"),
    type=click.IntRange(0, 10),
    help="Retries of a transient model server failure before the first token.",
)
@click.option(
    "--coalesce-window",
    default=None,
    type=click.FloatRange(0, 1),
    help="Merge deltas arriving within this many seconds "
    "[default: 0 for echo, 0.005 for openai and gemini]",
    show_default=False,
)
@click.option(
    "--context-window",
    default=None,
    type=click.IntRange(min=16),
    help="Context window (tokens) of every model, overriding the built-in table "
    "[default: known models' own, else 8192]",
    show_default=False,
)
@click.option(
    "--reply-reserve",
    default=default_of(ContextSettings, "reply_reserve"),
    type=click.IntRange(min=0),
    help="Tokens of the context window kept free for the reply, and the longest reply "
    "the model is asked for (0: no limit is sent).",
)
@click.option(
    "--context-policy",
    default=default_of(ContextSettings, "default_policy").name.lower(),
    type=click.Choice(["truncate", "reject"]),
    help="When history outgrows the context window, for sessions that choose no policy: "
    "leave the oldest messages out, or refuse the turn.",
)
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
    "--pace",
    default=_server_default("pace"),
    type=click.FloatRange(min=0),
    help="Echo backend: seconds per word.",
)
@click.option(
    "--max-message-chars",
    default=default_of(Limits, "max_message_chars"),
    type=click.IntRange(min=1),
    help="Longest message accepted.",
)
@click.option(
    "--max-receive-bytes",
    default=default_of(Limits, "max_receive_bytes"),
    type=click.IntRange(min=1024),
    help="Largest request message accepted (bytes, after decompression); larger ones are "
    "refused with RESOURCE_EXHAUSTED before they are read.",
)
@click.option(
    "--store-check-interval",
    default=_server_default("store_check_interval"),
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds between probes of the session store: health is NOT_SERVING while it "
    "does not answer.",
)
@click.option(
    "--grace-period",
    default=_server_default("grace_period"),
    type=click.FloatRange(min=0),
    help="Seconds replies in flight get to finish on shutdown.",
)
@click.option(
    "--event-loop",
    default=_server_default("event_loop"),
    type=click.Choice(EVENT_LOOPS),
    help="asyncio event loop: uvloop (faster) when installed with auto.",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False),
    default=None,
    help="PEM certificate (chain): serve over TLS (reloaded on SIGHUP).",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False),
    default=None,
    help="PEM private key of --tls-cert.",
)
@click.option(
    "--tls-client-ca",
    type=click.Path(dir_okay=False),
    default=None,
    help="PEM CA(s): require client certificates they signed (mTLS).",
)
@click.option(
    "--auth",
    default=_server_default("auth"),
    type=click.Choice(AUTH_MODES),
    help="How callers are identified: nobody (everyone is 'anonymous'), bearer "
    "tokens (chat-server tokens add), client certificates, or JWTs.",
)
@click.option(
    "--tokens-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="--auth tokens: keep token hashes in this file [default: in the store].",
)
@click.option(
    "--jwt-secret-file",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="--auth jwt: HS256 shared secret (32 characters or more).",
)
@click.option(
    "--jwt-jwks",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="--auth jwt: JWKS file with the RS256/ES256 public keys.",
)
@click.option("--jwt-audience", default=None, help="--auth jwt: required aud claim.")
@click.option("--jwt-issuer", default=None, help="--auth jwt: required iss claim.")
@click.option(
    "--admin-identity",
    multiple=True,
    help="--auth mtls: an identity that is an administrator (repeatable).",
)
@click.option(
    "--reflection",
    default=_server_default("reflection"),
    type=click.Choice(REFLECTION_MODES),
    help="Who may use server reflection: anyone, authenticated callers, nobody.",
)
@click.option(
    "--rate-limit-messages",
    default=None,
    callback=_rate,
    metavar="N/PERIOD",
    help="Per identity: messages per period, e.g. 20/60s (PERIOD: s, m, h, d).",
)
@click.option(
    "--token-budget",
    default=None,
    callback=_rate,
    metavar="N/PERIOD",
    help="Per identity: model tokens per period, e.g. 100000/1d.",
)
@click.option(
    "--max-streams-per-identity",
    default=None,
    type=click.IntRange(min=1),
    help="Per identity: Chat streams open at once.",
)
@click.option(
    "--max-sessions-per-identity",
    default=None,
    type=click.IntRange(min=1),
    help="Per identity: sessions stored.",
)
@click.option(
    "--metrics-port",
    default=None,
    type=click.IntRange(0, 65535),
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port) "
    "[default: no metrics]",
    show_default=False,
)
@click.option(
    "--metrics-host",
    default=_server_default("metrics_host"),
    help="Interface of the metrics endpoint [default: the same as --host]",
    show_default=False,
)
@click.option(
    "--otel/--no-otel",
    default=_server_default("otel"),
    help="Record OpenTelemetry traces, exported as the standard OTEL_* variables say "
    "(OTEL_EXPORTER_OTLP_ENDPOINT...); needs grpc-chat[otel].",
)
@click.option(
    "--keepalive-time",
    default=_server_default("keepalive_time"),
    type=click.FloatRange(min=0),
    help="Seconds between HTTP/2 PINGs on connections with open streams (0: none).",
)
@click.option(
    "--keepalive-timeout",
    default=_server_default("keepalive_timeout"),
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a PING may go unanswered before the connection is closed.",
)
@click.option(
    "--max-connection-age",
    default=_server_default("max_connection_age"),
    type=click.FloatRange(min=0),
    help="Retire connections after this many seconds, so that clients reconnect and a load "
    "balancer spreads them again (0: never).",
)
@click.option(
    "--max-connection-age-grace",
    default=_server_default("max_connection_age_grace"),
    type=click.FloatRange(min=0),
    help="Seconds a retired connection keeps its open streams.",
)
@click.option(
    "--heartbeat",
    default=_server_default("heartbeat"),
    type=click.FloatRange(min=0),
    help="Send a heartbeat on Chat streams silent for this many seconds, for proxies that "
    "close silent streams (0: never).",
)
@click.option(
    "--on-disconnect",
    default=_server_default("on_disconnect"),
    type=click.Choice(DISCONNECT_POLICIES),
    help="What a reply does when its client goes away (sessions may say otherwise): "
    "continue runs it to its end and stores it, so a client that reconnects resumes it; "
    "cancel stops the model at once.",
)
@click.option(
    "--replay-window",
    default=ReplaySettings().window,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a reply stays resumable (RESUME) after it ends; also how long a "
    "client_message_id is remembered.",
)
@click.option(
    "--replay-max-bytes",
    default=ReplaySettings().max_bytes,
    type=click.IntRange(min=EVENT_OVERHEAD),
    help="Most bytes the replay log holds (event text plus a fixed overhead per event); "
    "over it, the oldest ended replies go first.",
)
@click.option("--log-level", default="info", type=click.Choice(_LOG_LEVELS))
@click.option(
    "--log-format",
    default="text",
    type=click.Choice(LOG_FORMATS),
    help="text: one line per record; json: one JSON object per line.",
)
@click.version_option(__version__, prog_name="chat-server")
@click.pass_context
def main(
    ctx: click.Context,
    host: str,
    port: int,
    backend: str,
    model: str,
    model_check: str | None,
    base_url: str,
    api_key_file: str | None,
    connect_timeout: float,
    read_timeout: float,
    retries: int,
    coalesce_window: float | None,
    context_window: int | None,
    reply_reserve: int,
    context_policy: str,
    store: str,
    pace: float,
    max_message_chars: int,
    max_receive_bytes: int,
    store_check_interval: float,
    session_ttl: float,
    max_sessions: int,
    max_messages_per_session: int,
    grace_period: float,
    event_loop: str,
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    auth: str,
    tokens_file: str | None,
    jwt_secret_file: str | None,
    jwt_jwks: str | None,
    jwt_audience: str | None,
    jwt_issuer: str | None,
    admin_identity: tuple[str, ...],
    reflection: str,
    rate_limit_messages: Rate | None,
    token_budget: Rate | None,
    max_streams_per_identity: int | None,
    max_sessions_per_identity: int | None,
    metrics_port: int | None,
    metrics_host: str,
    otel: bool,
    keepalive_time: float,
    keepalive_timeout: float,
    max_connection_age: float,
    max_connection_age_grace: float,
    heartbeat: float,
    on_disconnect: str,
    replay_window: float,
    replay_max_bytes: int,
    log_level: str,
    log_format: str,
) -> None:
    """Run the grpc-chat server (gRPC service ChatService, with health and reflection).

    Every option can also be set with an environment variable: CHAT_PORT, CHAT_BACKEND,
    CHAT_MODEL, CHAT_BASE_URL, CHAT_STORE, and so on. API keys are read from a file
    (--api-key-file) or the environment, never from the command line.

    `chat-server tokens ...` manages the bearer tokens of --auth tokens.
    """
    if ctx.invoked_subcommand is not None:
        return
    configure_logging(log_level, log_format, sys.stderr)
    try:
        api_key = (
            read_api_key(key_file=api_key_file, env_vars=API_KEY_ENV_VARS[backend])
            if backend != "echo"
            else None
        )
        config = ServerConfig(
            host=host,
            port=port,
            backend=backend,
            model=model,
            model_check=model_check,
            base_url=base_url,
            api_key=api_key,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries=retries,
            coalesce_window=coalesce_window,
            context=ContextSettings(
                context_window=context_window,
                reply_reserve=reply_reserve,
                default_policy=ContextPolicy[context_policy.upper()],
            ),
            store=store,
            pace=pace,
            grace_period=grace_period,
            event_loop=event_loop,
            limits=Limits(max_message_chars=max_message_chars, max_receive_bytes=max_receive_bytes),
            store_check_interval=store_check_interval,
            retention=Retention(
                session_ttl=session_ttl or None,
                max_sessions=max_sessions or None,
                max_messages_per_session=max_messages_per_session or None,
            ),
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            auth=auth,
            tokens_file=tokens_file,
            jwt=(
                JwtSettings.from_files(
                    secret_file=jwt_secret_file,
                    jwks_file=jwt_jwks,
                    audience=jwt_audience,
                    issuer=jwt_issuer,
                )
                if auth == "jwt"
                else None
            ),
            admin_identities=admin_identity,
            reflection=reflection,
            quotas=Quotas(
                messages=rate_limit_messages,
                tokens=token_budget,
                max_streams=max_streams_per_identity,
                max_sessions=max_sessions_per_identity,
            ),
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            otel=otel,
            keepalive_time=keepalive_time,
            keepalive_timeout=keepalive_timeout,
            max_connection_age=max_connection_age,
            max_connection_age_grace=max_connection_age_grace,
            heartbeat=heartbeat,
            on_disconnect=on_disconnect,
            replay=ReplaySettings(window=replay_window, max_bytes=replay_max_bytes),
        )
        _prepare_telemetry(config)
        _tune_gc()
        with asyncio.Runner(loop_factory=event_loop_factory(config.event_loop)) as runner:
            runner.run(serve(config, ready=_banner))
    except ChatError as error:
        # The operator is told all (where the store is, say), not just what a client sees.
        raise click.ClickException(error.detail) from error
    except OSError as error:
        message = f"cannot listen on {ServerConfig(host=host, port=port).address}: {error}"
        if error.errno == errno.EADDRINUSE:
            message += (
                "\n  another server may be running there: choose another port with --port N "
                "(--port 0 picks a free one)"
            )
        raise click.ClickException(message) from error


# -- chat-server tokens ---------------------------------------------------------------------

_store_option = click.option(
    "--store",
    envvar="CHAT_STORE",
    default=default_store_url,
    show_default="a SQLite file in the user data directory",
    help="The server's session store, where tokens are kept unless --tokens-file is given.",
)
_tokens_file_option = click.option(
    "--tokens-file",
    envvar="CHAT_TOKENS_FILE",
    type=click.Path(dir_okay=False),
    default=None,
    help="Keep token hashes in this file instead of the store.",
)


def _with_tokens(store: str, tokens_file: str | None, work: Callable[[TokenStore], Any]) -> Any:
    """Run ``work(tokens)`` on the token store of ``store`` / ``tokens_file``."""

    async def run() -> Any:
        tokens = open_token_store(store, tokens_file)
        try:
            return await work(tokens)
        finally:
            await tokens.aclose()

    try:
        return asyncio.run(run())
    except ChatError as error:
        raise click.ClickException(error.message) from error
    except ValueError as error:
        raise click.ClickException(str(error)) from error


@main.group()
def tokens() -> None:
    """Bearer tokens for --auth tokens (only their hashes are kept)."""


@tokens.command("add")
@click.argument("name")
@click.option("--admin", is_flag=True, help="May list every identity's sessions and full stats.")
@_store_option
@_tokens_file_option
def tokens_add(name: str, admin: bool, store: str, tokens_file: str | None) -> None:
    """Make a token for identity NAME; print it once, alone on the last line of stdout."""
    token = new_token()

    async def add(tokens: TokenStore) -> tuple[TokenRecord, str]:
        return await tokens.add(name, hash_token(token), admin=admin), tokens.location

    record, where = _with_tokens(store, tokens_file, add)
    role = "administrator" if record.admin else "user"
    click.echo(f"token for {record.name} ({role}), kept as a hash in {where}.")
    click.echo("It is shown only now; clients send it as 'authorization: Bearer TOKEN':")
    click.echo(token)


@tokens.command("list")
@_store_option
@_tokens_file_option
def tokens_list(store: str, tokens_file: str | None) -> None:
    """The names and roles of the tokens (never the tokens)."""
    records = _with_tokens(store, tokens_file, lambda t: t.list())
    for record in records:
        role = "admin" if record.admin else "user"
        click.echo(f"{record.name}\t{role}\t{record.created_at.isoformat()}")


@tokens.command("revoke")
@click.argument("name")
@_store_option
@_tokens_file_option
def tokens_revoke(name: str, store: str, tokens_file: str | None) -> None:
    """Revoke NAME's token: refused on the next RPC, and on open streams' next request."""
    if not _with_tokens(store, tokens_file, lambda t: t.revoke(name)):
        raise click.ClickException(f"no token named {name!r}")
    click.echo(f"revoked the token of {name}")
