"""``chat-client``: talk to a grpc-chat server, interactively or one command at a time.

Each command parses its options, builds one :class:`~chat.client.ClientConfig` and calls
:class:`~chat.client.ChatClient`; what is shown is made in :mod:`chat.cli._render`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from chat._defaults import default_of
from chat._version import __version__
from chat.cli._render import (
    make_console,
    reply_json,
    server_stats_json,
    server_stats_table,
    session_details,
    session_json,
    session_table,
)
from chat.cli._sigint import on_sigint
from chat.client import (
    DEFAULT_TARGET,
    ChatClient,
    ClientConfig,
    ReconnectPolicy,
    ReplyChunk,
    ReplyCompleted,
    ReplyFailed,
    ServingStatus,
)
from chat.errors import (
    ChatError,
    ConfigurationError,
    DeadlineExceeded,
    InvalidArgument,
    ServerUnreachable,
    SessionNotFound,
    Unavailable,
)
from chat.types import ContextPolicy, FinishReason, Session

__all__ = ["EXIT_CODES", "exit_code_for", "main"]

_T = TypeVar("_T")

#: Exit statuses scripts can rely on (also in ``chat-client --help`` and the README).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 4
EXIT_TIMEOUT = 5
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "any other error (the server failed the request, the reply failed, not serving)",
    EXIT_USAGE: "usage error or invalid argument (bad option, empty message, bad --target)",
    EXIT_UNREACHABLE: "server unreachable, connection lost, or server unavailable",
    EXIT_NOT_FOUND: "session not found",
    EXIT_TIMEOUT: "no answer within --timeout",
    EXIT_INTERRUPTED: "interrupted with Ctrl-C (the reply was cancelled)",
}

_EPILOG = "\b\nExit status:\n" + "\n".join(
    f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items()
)

_CONTEXT = {"auto_envvar_prefix": "CHAT", "help_option_names": ["-h", "--help"]}


def exit_code_for(error: ChatError) -> int:
    """The documented exit status for ``error``."""
    if isinstance(error, SessionNotFound):
        return EXIT_NOT_FOUND
    if isinstance(error, InvalidArgument | ConfigurationError):
        return EXIT_USAGE
    if isinstance(error, ServerUnreachable | Unavailable):
        return EXIT_UNREACHABLE
    if isinstance(error, DeadlineExceeded):
        return EXIT_TIMEOUT
    return EXIT_ERROR


def _fail(message: str, exit_code: int) -> NoReturn:
    """Say what went wrong on stderr and leave with ``exit_code``."""
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(exit_code)


def _run(config: ClientConfig, work: Coroutine[Any, Any, _T]) -> _T:
    """Run one command's coroutine; turn its errors into messages and exit statuses."""
    try:
        return asyncio.run(work)
    except ServerUnreachable as error:
        start = "chat-server" if config.port == 50051 else f"chat-server --port {config.port}"
        _fail(
            f"{error.message}\n  start one with `{start}`, or point to another with "
            "--target HOST:PORT (or CHAT_TARGET)",
            EXIT_UNREACHABLE,
        )
    except ChatError as error:
        _fail(error.message, exit_code_for(error))


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group(invoke_without_command=True, context_settings=_CONTEXT, epilog=_EPILOG)
@click.option(
    "--target",
    "-t",
    default=DEFAULT_TARGET,
    show_default=True,
    help="Server address, HOST:PORT (environment: CHAT_TARGET).",
)
@click.option(
    "--timeout",
    default=default_of(ClientConfig, "timeout"),
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds each call may take (not counting a streaming reply).",
)
@click.option(
    "--reconnect/--no-reconnect",
    default=True,
    show_default=True,
    help="Interactive: reconnect by itself, with backoff, after losing the server.",
)
@click.option(
    "--session",
    "-s",
    "session",
    default=None,
    help="Interactive: start in this session (id or unique prefix).",
)
@click.option(
    "--history-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Interactive: keep the prompt's history in this file (default: memory only).",
)
@click.option(
    "--log-level",
    default="error",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Library log messages shown on stderr.",
)
@click.version_option(__version__, prog_name="chat-client")
@click.pass_context
def main(
    ctx: click.Context,
    target: str,
    timeout: float,
    reconnect: bool,
    session: str | None,
    history_file: Path | None,
    log_level: str,
) -> None:
    """Talk to a grpc-chat server.

    Without a command, opens an interactive prompt: type a message to chat (the reply
    streams as it is written), /help for the commands, Ctrl-C to stop a reply, Ctrl-D or
    /quit to leave. The commands below do one thing each, for scripts; each takes --json.
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        config = ClientConfig(
            target=target,
            timeout=timeout,
            reconnect=ReconnectPolicy() if reconnect else None,
        )
    except ConfigurationError as error:
        raise click.BadParameter(error.message, param_hint="--target") from error
    ctx.obj = config
    if ctx.invoked_subcommand is None:
        # Imported here: prompt_toolkit takes a third of a second to import, which the
        # scripting commands do not need to pay.
        from chat.cli._repl import InteractiveOptions, run_interactive

        options = InteractiveOptions(session=session, history_file=history_file)
        ctx.exit(run_interactive(config, options))


# -- ask ----------------------------------------------------------------------------------------


@main.command()
@click.argument("message")
@click.option("--session", "-s", "session_id", help="Continue this session (id or unique prefix).")
@click.option("--new", "new", is_flag=True, help="Start a new session (the default).")
@click.option("--system", default=None, help="System prompt (sets it on --session).")
@click.option("--title", default=None, help="Title of the new session.")
@click.option("--model", default=None, help="Model (switches it on --session).")
@json_option
@click.pass_obj
def ask(
    config: ClientConfig,
    message: str,
    session_id: str | None,
    new: bool,
    system: str | None,
    title: str | None,
    model: str | None,
    as_json: bool,
) -> None:
    """Send MESSAGE ("-" reads it from stdin) and stream the reply to stdout.

    The reply is written as plain text as it arrives. A new session is created unless
    --session names one; its id is printed on stderr (and in the --json output).
    """
    if session_id and new:
        raise click.UsageError("--session and --new exclude each other")
    if session_id and title is not None:
        raise click.UsageError("--title is for a new session; use `sessions` to rename one")
    # Like $(...) in a shell: a trailing newline from the pipe is not part of the message.
    text = sys.stdin.read().rstrip("\r\n") if message == "-" else message
    if not text.strip():
        raise click.BadParameter("the message is empty", param_hint="MESSAGE")
    code = _run(config, _ask(config, text, session_id, system, title, model, as_json))
    if code:
        _fail("interrupted: the reply was cancelled", code)


async def _ask(
    config: ClientConfig,
    text: str,
    session_id: str | None,
    system: str | None,
    title: str | None,
    model: str | None,
    as_json: bool,
) -> int:
    async with ChatClient.from_config(config) as client:
        if session_id:
            session = await client.find_session(session_id)
            if system is not None or model is not None:
                session = await client.update_session(
                    session.session_id, system_prompt=system, model=model
                )
        else:
            session = await client.create_session(
                title=title if title is not None else text.strip().splitlines()[0][:60],
                system_prompt=system or "",
                model=model or "",
            )
            if not as_json:
                click.echo(f"session {session.session_id}", err=True)
        reply = client.send(session.session_id, text)
        interrupted = abandoned = False
        waiting = asyncio.current_task()

        def interrupt() -> None:
            nonlocal interrupted, abandoned
            if not interrupted:
                interrupted = True
                click.echo("\n(cancelling the reply; Ctrl-C again to stop waiting)", err=True)
                cancelling.add(asyncio.ensure_future(reply.cancel()))
            elif not abandoned and waiting is not None:
                # The server does not confirm the CANCEL (it may be frozen or cut off): do not
                # make the person wait for the keepalive to find out.
                abandoned = True
                for future in cancelling:
                    future.cancel()
                waiting.cancel()

        cancelling: set[asyncio.Future[None]] = set()
        with on_sigint(interrupt):
            try:
                async with reply:
                    async for event in reply:
                        if isinstance(event, ReplyChunk):
                            if not as_json:
                                click.echo(event.text, nl=False)
                                sys.stdout.flush()
                        elif isinstance(event, ReplyFailed):
                            if reply.text and not as_json:
                                click.echo()
                            raise event.error()
                        elif isinstance(event, ReplyCompleted):
                            if not as_json:
                                click.echo()
                            elif reply.result is not None:
                                _print_json(reply_json(reply.result))
                            if event.finish_reason is FinishReason.CANCELLED:
                                return EXIT_INTERRUPTED
            except asyncio.CancelledError:
                if not abandoned or waiting is None:
                    raise
                waiting.uncancel()
                return EXIT_INTERRUPTED
            finally:
                if cancelling:
                    await asyncio.wait(cancelling)
    return EXIT_OK


# -- sessions -----------------------------------------------------------------------------------


@main.group()
def sessions() -> None:
    """List, show, create and delete sessions."""


@sessions.command("list")
@click.option("--limit", "-n", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--all", "everything", is_flag=True, help="Every session, page after page.")
@click.option("--page-token", default="", help="Continue from a previous --json page.")
@json_option
@click.pass_obj
def sessions_list(
    config: ClientConfig, limit: int, everything: bool, page_token: str, as_json: bool
) -> None:
    """Sessions, newest first."""

    async def work() -> tuple[list[Session], str, int]:
        async with ChatClient.from_config(config) as client:
            if everything:
                found: list[Session] = []
                async with contextlib.aclosing(client.iter_sessions(page_size=limit)) as all_:
                    async for session in all_:
                        found.append(session)
                return found, "", len(found)
            page = await client.list_sessions(page_size=limit, page_token=page_token)
            return page.sessions, page.next_page_token, page.total

    found, token, total = _run(config, work())
    if as_json:
        _print_json(
            {
                "sessions": [session_json(s) for s in found],
                "next_page_token": token,
                "total": total,
            }
        )
    elif not found:
        click.echo("no sessions", err=True)
    else:
        make_console().print(session_table(found, total=total))


@sessions.command("show")
@click.argument("session_id")
@click.option("--messages/--no-messages", default=True, show_default=True)
@json_option
@click.pass_obj
def sessions_show(config: ClientConfig, session_id: str, messages: bool, as_json: bool) -> None:
    """A session (SESSION_ID may be a unique prefix) and its messages."""
    from chat.cli._render import history_renderables

    async def work() -> tuple[Session, list[Any] | None]:
        async with ChatClient.from_config(config) as client:
            session = await client.find_session(session_id)
            history = await client.history(session.session_id) if messages else None
            return session, history

    session, history = _run(config, work())
    if as_json:
        _print_json(session_json(session, history))
        return
    console = make_console()
    console.print(session_details(session))
    if history:
        console.print()
        for line in history_renderables(history):
            console.print(line)


@sessions.command("delete")
@click.argument("session_id")
@json_option
@click.pass_obj
def sessions_delete(config: ClientConfig, session_id: str, as_json: bool) -> None:
    """Delete a session (SESSION_ID may be a unique prefix) and its history."""

    async def work() -> tuple[str, int]:
        async with ChatClient.from_config(config) as client:
            session = await client.find_session(session_id)
            return session.session_id, await client.delete_session(session.session_id)

    deleted_id, count = _run(config, work())
    if as_json:
        _print_json({"session_id": deleted_id, "deleted_messages": count})
    else:
        click.echo(f"deleted session {deleted_id} ({count} messages)")


@sessions.command("create")
@click.option("--title", default="", help="Human-readable title.")
@click.option("--system", default="", help="System prompt.")
@click.option("--model", default="", help="Model (the server's default when empty).")
@click.option(
    "--context-policy",
    type=click.Choice(["truncate", "reject"]),
    default=None,
    help="What to do when the history outgrows the model's context (server default: truncate).",
)
@click.option(
    "--max-reply-tokens",
    type=click.IntRange(0, 2**31 - 1),
    default=0,
    help="Longest reply the model is asked for, in tokens (0: the server's default).",
)
@json_option
@click.pass_obj
def sessions_create(
    config: ClientConfig,
    title: str,
    system: str,
    model: str,
    context_policy: str | None,
    max_reply_tokens: int,
    as_json: bool,
) -> None:
    """Create a session and print its id."""
    policy = ContextPolicy[context_policy.upper()] if context_policy else ContextPolicy.UNSPECIFIED

    async def work() -> Session:
        async with ChatClient.from_config(config) as client:
            return await client.create_session(
                title=title,
                system_prompt=system,
                model=model,
                context_policy=policy,
                max_reply_tokens=max_reply_tokens,
            )

    session = _run(config, work())
    if as_json:
        _print_json(session_json(session))
    else:
        click.echo(session.session_id)


# -- server -------------------------------------------------------------------------------------


@main.command()
@json_option
@click.pass_obj
def stats(config: ClientConfig, as_json: bool) -> None:
    """The server's statistics."""

    async def work() -> Any:
        async with ChatClient.from_config(config) as client:
            return await client.server_stats()

    info = _run(config, work())
    if as_json:
        _print_json(server_stats_json(info))
    else:
        make_console().print(server_stats_table(info, target=config.target))


@main.command()
@click.option(
    "--service", default="", help="Service to check (e.g. ChatService); the whole server if empty."
)
@json_option
@click.pass_obj
def health(config: ClientConfig, service: str, as_json: bool) -> None:
    """The standard gRPC health check; exit status 0 only when SERVING."""

    async def work() -> ServingStatus:
        async with ChatClient.from_config(config) as client:
            return await client.health(service)

    status = _run(config, work())
    if as_json:
        _print_json({"target": config.target, "service": service, "status": status.name})
    else:
        click.echo(status.name)
    if status is not ServingStatus.SERVING:
        sys.exit(EXIT_ERROR)


@main.command()
@click.option("--count", "-c", default=1, show_default=True, type=click.IntRange(1, 1000))
@json_option
@click.pass_obj
def ping(config: ClientConfig, count: int, as_json: bool) -> None:
    """Round-trip time of PINGs on the Chat stream."""

    async def work() -> list[float]:
        async with ChatClient.from_config(config) as client:
            return [await client.ping() for _ in range(count)]

    times = _run(config, work())
    if as_json:
        _print_json(
            {
                "target": config.target,
                "round_trip_ms": [t * 1000 for t in times],
                "average_ms": sum(times) / len(times) * 1000,
            }
        )
    else:
        for rtt in times:
            click.echo(f"pong from {config.target} in {rtt * 1000:.2f} ms")
