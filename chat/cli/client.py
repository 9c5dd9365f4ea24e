"""``chat-client``: talk to a grpc-chat server, interactively or one command at a time.

Each command parses its options, builds one :class:`~chat.client.ClientConfig` and calls
:class:`~chat.client.ChatClient`; what is shown is made in :mod:`chat.cli._render`.

The options of the whole client (``--target``, ``--timeout``, ``--log-level``,
``--render``) are also accepted after the command (``chat-client ask --target ...``). Every
option reads the environment variable ``CHAT_<OPTION>`` for the client's own options and
``CHAT_<COMMAND>_<OPTION>`` for a command's (``CHAT_ASK_SESSION``, ``CHAT_ASK_JSON``,
``CHAT_SESSIONS_LIST_LIMIT``), named after the option as written on the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from chat._defaults import default_of
from chat._version import __version__
from chat.cli._exit import (
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    exit_code_for,
)
from chat.cli._hints import unreachable_hint
from chat.cli._render import (
    error_json,
    make_console,
    reply_json,
    server_stats_json,
    server_stats_table,
    session_details,
    session_json,
    session_lines,
    session_table,
    watch_event_json,
    who_am_i_text,
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
    ReplyStarted,
    ServingStatus,
    SessionUpdated,
    WatchEvent,
    WhoAmI,
)
from chat.errors import ChatError, ConfigurationError, ServerUnreachable
from chat.secret import Secret
from chat.types import (
    ConcurrencyPolicy,
    ContextPolicy,
    DisconnectPolicy,
    FinishReason,
    Session,
    SessionUpdateKind,
)

__all__ = ["ENV_PREFIX", "EXIT_CODES", "exit_code_for", "main"]

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])
_E = TypeVar("_E", bound=enum.Enum)

#: Every environment variable of chat-client starts with this.
ENV_PREFIX = "CHAT"

#: What ``--render`` accepts (the default is Markdown on a terminal, plain text otherwise).
_RENDERINGS = ("markdown", "plain")

_EPILOG = "\b\nExit status:\n" + "\n".join(
    f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items()
)

_CONTEXT = {"help_option_names": ["-h", "--help"]}


# -- the options of the whole client --------------------------------------------------------


@dataclass(slots=True)
class _Settings:
    """The client's own options, from before the command and (overriding them) after it."""

    target: str = DEFAULT_TARGET
    timeout: float = default_of(ClientConfig, "timeout")
    log_level: str = "error"
    render: str | None = None
    reconnect: bool = True
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token_file: str | None = None

    def config(self) -> ClientConfig:
        """The client's configuration; a bad ``--target`` is a usage error (exit 2)."""
        logging.basicConfig(
            level=self.log_level.upper(),
            format="%(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
            force=True,
        )
        try:
            config = ClientConfig(
                target=self.target,
                timeout=self.timeout,
                # Connecting is a call like any other: --timeout bounds it too.
                connect_timeout=self.timeout,
                reconnect=ReconnectPolicy() if self.reconnect else None,
            )
        except ConfigurationError as error:
            raise click.BadParameter(error.message, param_hint="'--target'") from error
        try:
            return dataclasses.replace(
                config,
                tls=self.tls,
                ca_file=self.ca_file,
                cert_file=self.cert_file,
                key_file=self.key_file,
                # A token is never an option's value: it would show in the process list.
                token=_read_token(self.token_file),
            )
        except ConfigurationError as error:
            raise click.UsageError(error.message) from error

    def markdown(self) -> bool:
        """Whether replies are rendered as Markdown (by default: when stdout is a terminal)."""
        if self.render is not None:
            return self.render == "markdown"
        return sys.stdout.isatty()


def _read_token(token_file: str | None) -> Secret | None:
    """The bearer token from ``--token-file``, else from ``CHAT_TOKEN``; never shown."""
    if token_file is not None:
        try:
            value = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise ConfigurationError(f"cannot read the token file {token_file!r}") from None
        if not value:
            raise ConfigurationError(f"the token file {token_file!r} is empty")
        return Secret(value)
    value = os.environ.get("CHAT_TOKEN", "").strip()
    return Secret(value) if value else None


def _settings() -> _Settings:
    settings = click.get_current_context().find_object(_Settings)
    if settings is None:  # a command invoked on its own, as tests may do
        settings = _Settings()
    return settings


def _set_after_command(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """A client option given after the command: it overrides the one given before."""
    if value is not None and param.name is not None:
        setattr(ctx.ensure_object(_Settings), param.name, value)


#: ``(declarations, keyword arguments)`` of the options every command accepts too.
_SHARED_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (
        ("--target", "-t"),
        {"help": "Server address, HOST:PORT (the port defaults to 50051).", "metavar": "HOST:PORT"},
    ),
    (
        ("--timeout",),
        {
            "type": click.FloatRange(min=0, min_open=True),
            "help": "Seconds each call may take, connecting included (not a streaming reply).",
        },
    ),
    (
        ("--log-level",),
        {
            "type": click.Choice(["debug", "info", "warning", "error"]),
            "help": "Library log messages shown on stderr.",
        },
    ),
    (
        ("--render",),
        {
            "type": click.Choice(_RENDERINGS),
            "help": "How replies are shown [default: markdown on a terminal, else plain].",
        },
    ),
]

_SHARED_DEFAULTS = {
    "target": DEFAULT_TARGET,
    "timeout": default_of(ClientConfig, "timeout"),
    "log_level": "error",
    "render": None,
}


def _shared_options_of_the_group(function: _F) -> _F:
    for declarations, options in reversed(_SHARED_OPTIONS):
        name = declarations[0].lstrip("-").replace("-", "_")
        default = _SHARED_DEFAULTS[name]
        function = click.option(
            *declarations, default=default, show_default=default is not None, **options
        )(function)
    return function


def _shared_options(function: _F) -> _F:
    """The client's options, accepted after the command too (``ask --target ...``)."""
    for declarations, options in reversed(_SHARED_OPTIONS):
        function = click.option(
            *declarations,
            default=None,
            expose_value=False,
            # Read from the environment once, by the group (CHAT_TARGET, not CHAT_ASK_TARGET).
            allow_from_autoenv=False,
            callback=_set_after_command,
            **options,
        )(function)
    return function


def _fail(message: str, exit_code: int) -> NoReturn:
    """Say what went wrong on stderr and leave with ``exit_code``."""
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(exit_code)


def _run(config: ClientConfig, work: Coroutine[Any, Any, _T], *, as_json: bool = False) -> _T:
    """Run one command's coroutine; turn its errors into messages and exit statuses.

    With ``--json`` the error is also printed as JSON on stdout, with its gRPC status: the
    protocol detail that the message for people leaves out.
    """
    try:
        return asyncio.run(work)
    except ChatError as error:
        if as_json:
            _print_json(error_json(error))
        message = error.message
        if isinstance(error, ServerUnreachable):
            hint = unreachable_hint(error, config)
            if hint is not None:
                message += f"\n  {hint}"
        _fail(message, exit_code_for(error))


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group(invoke_without_command=True, context_settings=_CONTEXT, epilog=_EPILOG)
@_shared_options_of_the_group
@click.option("--tls", is_flag=True, help="Connect over TLS.")
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --tls: PEM CA(s) to verify the server with [default: the system's].",
)
@click.option(
    "--cert",
    "cert_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --tls: client certificate (PEM), for a server that requires one.",
)
@click.option(
    "--key",
    "key_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --tls: the client certificate's private key (PEM).",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File holding the bearer token to send [default: the CHAT_TOKEN variable].",
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
    "--quiet",
    "-q",
    is_flag=True,
    help="Interactive: no summary line after each reply (/verbose on brings it back).",
)
@click.version_option(__version__, prog_name="chat-client")
@click.pass_context
def main(
    ctx: click.Context,
    target: str,
    timeout: float,
    log_level: str,
    render: str | None,
    tls: bool,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    token_file: Path | None,
    reconnect: bool,
    session: str | None,
    history_file: Path | None,
    quiet: bool,
) -> None:
    """Talk to a grpc-chat server.

    Without a command, opens an interactive prompt: type a message to chat (the reply
    streams as it is written), /help for the commands, Ctrl-C to stop a reply, Ctrl-D or
    /quit to leave. The commands below do one thing each, for scripts; each takes --json.
    Options go before or after the command; each can be set in the environment, as
    CHAT_<OPTION> (CHAT_TARGET) or CHAT_<COMMAND>_<OPTION> (CHAT_ASK_SESSION).
    """
    files = [None if f is None else str(f) for f in (ca_file, cert_file, key_file, token_file)]
    ctx.obj = _Settings(target, timeout, log_level, render, reconnect, tls, *files)
    if ctx.invoked_subcommand is None:
        config = ctx.obj.config()
        # Imported here: prompt_toolkit takes a third of a second to import, which the
        # scripting commands do not need to pay.
        from chat.cli._repl import InteractiveOptions, run_interactive

        options = InteractiveOptions(
            session=session, history_file=history_file, quiet=quiet, render=render
        )
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
@_shared_options
def ask(
    message: str,
    session_id: str | None,
    new: bool,
    system: str | None,
    title: str | None,
    model: str | None,
    as_json: bool,
) -> None:
    """Send MESSAGE ("-" reads it from stdin) and stream the reply to stdout.

    The reply is written as it arrives: as Markdown on a terminal, as plain text otherwise.
    A new session is created unless --session names one; its id is printed on stderr (and
    in the --json output). A message the server refuses leaves no new session behind.
    """
    settings = _settings()
    config = settings.config()
    if session_id and new:
        raise click.UsageError("--session and --new exclude each other")
    if session_id and title is not None:
        raise click.UsageError("--title is for a new session; use `sessions` to rename one")
    # Like $(...) in a shell: a trailing newline from the pipe is not part of the message.
    text = sys.stdin.read().rstrip("\r\n") if message == "-" else message
    if not text.strip():
        raise click.BadParameter("the message is empty", param_hint="MESSAGE")
    request = _AskRequest(text, session_id, system, title, model, as_json, settings.markdown())
    code = _run(config, _ask(config, request), as_json=as_json)
    if code:
        _fail("interrupted: the reply was cancelled", code)


@dataclass(frozen=True, slots=True)
class _AskRequest:
    text: str
    session_id: str | None
    system: str | None
    title: str | None
    model: str | None
    as_json: bool
    markdown: bool


async def _ask(config: ClientConfig, request: _AskRequest) -> int:
    async with ChatClient.from_config(config) as client:
        if request.session_id:
            session = await client.find_session(request.session_id)
            if request.system is not None or request.model is not None:
                session = await client.update_session(
                    session.session_id, system_prompt=request.system, model=request.model
                )
            return (await _stream_reply(client, session, request, announce=False)).code
        session = await client.create_session(
            title=request.title
            if request.title is not None
            else request.text.strip().splitlines()[0][:60],
            system_prompt=request.system or "",
            model=request.model or "",
        )
        outcome = _Outcome()
        try:
            await _stream_reply(client, session, request, announce=True, outcome=outcome)
        finally:
            if outcome.nothing_stored:
                # Refused (too long, say) or cancelled before the model saw it: the session
                # made for the message holds nothing, so it goes too. Best effort.
                with contextlib.suppress(ChatError, RuntimeError):
                    await client.delete_session(session.session_id)
        return outcome.code


@dataclass(slots=True)
class _Outcome:
    code: int = EXIT_OK
    #: The turn stored nothing: refused before it started, or cancelled before that.
    nothing_stored: bool = False


async def _stream_reply(
    client: ChatClient,
    session: Session,
    request: _AskRequest,
    *,
    announce: bool,
    outcome: _Outcome | None = None,
) -> _Outcome:
    """Stream the reply to stdout; raise the typed error of a failed reply."""
    outcome = outcome if outcome is not None else _Outcome()
    reply = client.send(session.session_id, request.text)
    interrupted = abandoned = False
    waiting = asyncio.current_task()
    cancelling: set[asyncio.Future[None]] = set()

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

    show = not request.as_json
    with on_sigint(interrupt), _reply_output(request.markdown and show) as write:
        try:
            async with reply:
                async for event in reply:
                    if isinstance(event, ReplyStarted):
                        if announce and show:
                            click.echo(f"session {session.session_id}", err=True)
                    elif isinstance(event, ReplyChunk):
                        if show:
                            write(event.text)
                    elif isinstance(event, ReplyFailed):
                        write.end()
                        outcome.nothing_stored = not event.started
                        raise event.error()
                    elif isinstance(event, ReplyCompleted):
                        write.end()
                        if request.as_json and reply.result is not None:
                            _print_json(reply_json(reply.result))
                        outcome.nothing_stored = not event.message_count
                        if event.finish_reason is FinishReason.CANCELLED:
                            outcome.code = EXIT_INTERRUPTED
        except asyncio.CancelledError:
            if not abandoned or waiting is None:
                raise
            waiting.uncancel()
            outcome.code = EXIT_INTERRUPTED
        finally:
            if cancelling:
                await asyncio.wait(cancelling)
    return outcome


class _ReplyWriter:
    """Writes a reply's chunks to stdout: as they come, or as Markdown (on a terminal)."""

    def __init__(self, markdown: bool) -> None:
        self._stream: Any = None
        self._wrote = False
        self._ended = False
        if markdown:
            from chat.cli._markdown import StreamingMarkdown

            self._stream = StreamingMarkdown(make_console())

    def __call__(self, text: str) -> None:
        self._wrote = True
        if self._stream is not None:
            self._stream.feed(text)
        else:
            click.echo(text, nl=False)
            sys.stdout.flush()

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._stream is not None:
            self._stream.close()
        elif self._wrote:
            click.echo()


@contextlib.contextmanager
def _reply_output(markdown: bool) -> Iterator[_ReplyWriter]:
    writer = _ReplyWriter(markdown)
    try:
        yield writer
    finally:
        writer.end()


# -- sessions -----------------------------------------------------------------------------------


@main.group()
@_shared_options
def sessions() -> None:
    """List, show, create and delete sessions."""


@sessions.command("list")
@click.option("--limit", "-n", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--all", "everything", is_flag=True, help="Every session, page after page.")
@click.option("--page-token", default="", help="Continue from a previous --json page.")
@json_option
@_shared_options
def sessions_list(limit: int, everything: bool, page_token: str, as_json: bool) -> None:
    """Sessions, newest first: a table on a terminal, tab-separated columns otherwise."""
    config = _settings().config()

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

    found, token, total = _run(config, work(), as_json=as_json)
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
    elif not sys.stdout.isatty():
        for line in session_lines(found):
            click.echo(line)
    else:
        make_console().print(session_table(found, total=total))


@sessions.command("show")
@click.argument("session_id")
@click.option("--messages/--no-messages", default=True, show_default=True)
@json_option
@_shared_options
def sessions_show(session_id: str, messages: bool, as_json: bool) -> None:
    """A session (SESSION_ID may be a unique prefix) and its messages."""
    from chat.cli._render import history_renderables

    config = _settings().config()

    async def work() -> tuple[Session, list[Any] | None]:
        async with ChatClient.from_config(config) as client:
            session = await client.find_session(session_id)
            history = await client.history(session.session_id) if messages else None
            return session, history

    session, history = _run(config, work(), as_json=as_json)
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
@_shared_options
def sessions_delete(session_id: str, as_json: bool) -> None:
    """Delete a session (SESSION_ID may be a unique prefix) and its history."""
    config = _settings().config()

    async def work() -> tuple[str, int]:
        async with ChatClient.from_config(config) as client:
            session = await client.find_session(session_id)
            return session.session_id, await client.delete_session(session.session_id)

    deleted_id, count = _run(config, work(), as_json=as_json)
    if as_json:
        _print_json({"session_id": deleted_id, "deleted_messages": count})
    else:
        click.echo(f"deleted session {deleted_id} ({count} messages)")


_context_policy_option = click.option(
    "--context-policy",
    type=click.Choice(["truncate", "reject"]),
    default=None,
    help="What to do when the history outgrows the model's context (server default: truncate).",
)
_concurrency_option = click.option(
    "--concurrency",
    type=click.Choice(["queue", "reject", "interrupt"]),
    default=None,
    help="A message sent while a reply runs: waits its turn, is refused, or interrupts it "
    "(server default: queue).",
)
_on_disconnect_option = click.option(
    "--on-disconnect",
    type=click.Choice(["cancel", "continue"]),
    default=None,
    help="A reply whose client goes away: stops at once, or runs to its end and is kept for "
    "the client to resume (server default: its --on-disconnect).",
)


def _choice(kind: type[_E], value: str | None) -> _E | None:
    return None if value is None else kind[value.upper()]


@sessions.command("create")
@click.option("--title", default="", help="Human-readable title.")
@click.option("--system", default="", help="System prompt.")
@click.option("--model", default="", help="Model (the server's default when empty).")
@_context_policy_option
@_concurrency_option
@_on_disconnect_option
@click.option(
    "--max-reply-tokens",
    type=click.IntRange(0, 2**31 - 1),
    default=0,
    help="Longest reply the model is asked for, in tokens (0: the server's default).",
)
@json_option
@_shared_options
def sessions_create(
    title: str,
    system: str,
    model: str,
    context_policy: str | None,
    concurrency: str | None,
    on_disconnect: str | None,
    max_reply_tokens: int,
    as_json: bool,
) -> None:
    """Create a session and print its id."""
    config = _settings().config()

    async def work() -> Session:
        async with ChatClient.from_config(config) as client:
            return await client.create_session(
                title=title,
                system_prompt=system,
                model=model,
                context_policy=_choice(ContextPolicy, context_policy) or ContextPolicy.UNSPECIFIED,
                concurrency_policy=_choice(ConcurrencyPolicy, concurrency)
                or ConcurrencyPolicy.UNSPECIFIED,
                on_disconnect=_choice(DisconnectPolicy, on_disconnect)
                or DisconnectPolicy.UNSPECIFIED,
                max_reply_tokens=max_reply_tokens,
            )

    session = _run(config, work(), as_json=as_json)
    if as_json:
        _print_json(session_json(session))
    else:
        click.echo(session.session_id)


@sessions.command("update")
@click.argument("session_id")
@click.option("--title", default=None, help="New title.")
@click.option("--system", default=None, help='New system prompt ("" removes it).')
@click.option("--model", default=None, help="Model of the following replies.")
@_context_policy_option
@_concurrency_option
@_on_disconnect_option
@click.option(
    "--max-reply-tokens",
    type=click.IntRange(0, 2**31 - 1),
    default=None,
    help="Longest reply the model is asked for, in tokens (0: the server's default).",
)
@json_option
@_shared_options
def sessions_update(
    session_id: str,
    title: str | None,
    system: str | None,
    model: str | None,
    context_policy: str | None,
    concurrency: str | None,
    on_disconnect: str | None,
    max_reply_tokens: int | None,
    as_json: bool,
) -> None:
    """Change the settings given of a session (SESSION_ID may be a unique prefix); show it."""
    config = _settings().config()

    async def work() -> Session:
        async with ChatClient.from_config(config) as client:
            session = await client.find_session(session_id)
            return await client.update_session(
                session.session_id,
                title=title,
                system_prompt=system,
                model=model,
                context_policy=_choice(ContextPolicy, context_policy),
                concurrency_policy=_choice(ConcurrencyPolicy, concurrency),
                on_disconnect=_choice(DisconnectPolicy, on_disconnect),
                max_reply_tokens=max_reply_tokens,
            )

    session = _run(config, work(), as_json=as_json)
    if as_json:
        _print_json(session_json(session))
    else:
        make_console().print(session_details(session))


# -- watch --------------------------------------------------------------------------------------


@main.command()
@click.argument("session_id")
@json_option
@_shared_options
def watch(session_id: str, as_json: bool) -> None:
    """Print a session's activity as it happens, until Ctrl-C (SESSION_ID may be a prefix).

    Every reply of the session streams as it is written, whichever client sent the message
    (a reply already running is shown from its start), with typing and changes to the
    session. With --json: one JSON object per line, per event. Ctrl-C ends it (exit 0);
    so does the session's deletion.
    """
    config = _settings().config()
    _run(config, _watch(config, session_id, as_json), as_json=as_json)


async def _watch(config: ClientConfig, wanted: str, as_json: bool) -> None:
    stopping = asyncio.Event()
    with on_sigint(stopping.set):
        async with ChatClient.from_config(config) as client:
            session = await client.find_session(wanted)
            async with client.watch(session.session_id) as events:
                click.echo(f"watching session {session.session_id} (Ctrl-C to stop)", err=True)
                show = _WatchPrinter(as_json)
                stop = asyncio.ensure_future(stopping.wait())
                try:
                    while True:
                        following = asyncio.ensure_future(anext(events))
                        await asyncio.wait((following, stop), return_when=asyncio.FIRST_COMPLETED)
                        if not following.done():
                            following.cancel()
                            await asyncio.wait((following,))
                            break
                        if not show(following.result()):
                            break
                finally:
                    stop.cancel()
                    show.end()


class _WatchPrinter:
    """Shows a watched session's events: replies as they stream, or JSON lines."""

    def __init__(self, as_json: bool) -> None:
        self._json = as_json
        self._mid_line = False

    def __call__(self, item: WatchEvent) -> bool:
        """Show ``item``; ``False`` once the session is gone."""
        event = item.event
        if self._json:
            click.echo(json.dumps(watch_event_json(item), ensure_ascii=False))
            sys.stdout.flush()
        elif isinstance(event, SessionUpdated):
            if event.kind not in (SessionUpdateKind.TURN_COMPLETED, SessionUpdateKind.UNSPECIFIED):
                self.end()
                click.echo(f"· {event.message}")
        elif isinstance(event, ReplyStarted):
            self.end()
            who = "you" if item.is_mine else "another client"
            click.echo(f"[turn {item.turn_id[:8]}, {who}] Assistant › ", nl=False)
            self._mid_line = True
        elif isinstance(event, ReplyChunk):
            click.echo(event.text, nl=False)
            sys.stdout.flush()
            self._mid_line = True
        elif isinstance(event, ReplyCompleted):
            self.end()
            if event.finish_reason is not FinishReason.STOP:
                click.echo(f"  [{event.finish_reason.name.lower()}]")
        elif isinstance(event, ReplyFailed):
            self.end()
            click.echo(f"  [failed: {event.message}]")
        return not (
            isinstance(event, SessionUpdated) and event.kind is SessionUpdateKind.SESSION_DELETED
        )

    def end(self) -> None:
        """End the reply's line, if one is open."""
        if self._mid_line:
            click.echo()
            sys.stdout.flush()
            self._mid_line = False


# -- server -------------------------------------------------------------------------------------


@main.command()
@json_option
@_shared_options
def whoami(as_json: bool) -> None:
    """Who the server takes you for: identity, role, and your limits and their use."""
    config = _settings().config()

    async def work() -> WhoAmI:
        async with ChatClient.from_config(config) as client:
            return await client.who_am_i()

    info = _run(config, work(), as_json=as_json)
    if as_json:
        _print_json(dataclasses.asdict(info))
    else:
        click.echo(who_am_i_text(info))


@main.command()
@json_option
@_shared_options
def stats(as_json: bool) -> None:
    """The server's statistics."""
    config = _settings().config()

    async def work() -> Any:
        async with ChatClient.from_config(config) as client:
            return await client.server_stats()

    info = _run(config, work(), as_json=as_json)
    if as_json:
        _print_json(server_stats_json(info))
    else:
        make_console().print(server_stats_table(info, target=config.target))


@main.command()
@click.option(
    "--service", default="", help="Service to check (e.g. ChatService); the whole server if empty."
)
@json_option
@_shared_options
def health(service: str, as_json: bool) -> None:
    """The standard gRPC health check; exit status 0 only when SERVING.

    It works while the server drains on shutdown (it then reports NOT_SERVING).
    """
    config = _settings().config()

    async def work() -> ServingStatus:
        # Not `async with`: that opens the Chat stream, which a draining server turns away.
        client = ChatClient.from_config(config)
        try:
            return await client.health(service)
        finally:
            await client.aclose()

    status = _run(config, work(), as_json=as_json)
    if as_json:
        _print_json({"target": config.target, "service": service, "status": status.name})
    else:
        click.echo(status.name)
    if status is not ServingStatus.SERVING:
        sys.exit(EXIT_ERROR)


@main.command()
@click.option("--count", "-c", default=1, show_default=True, type=click.IntRange(1, 1000))
@json_option
@_shared_options
def ping(count: int, as_json: bool) -> None:
    """Round-trip time of pings on the conversation stream."""
    config = _settings().config()

    async def work() -> list[float]:
        async with ChatClient.from_config(config) as client:
            return [await client.ping() for _ in range(count)]

    times = _run(config, work(), as_json=as_json)
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


# -- environment variables ----------------------------------------------------------------------


def environment_variable(path: tuple[str, ...], option: click.Option) -> str:
    """The documented variable of ``option`` of the command at ``path`` (``()``: the client).

    ``CHAT_`` + the command path + the option's long name, upper-cased, dashes as
    underscores: ``ask --session`` reads ``CHAT_ASK_SESSION``, whatever the parameter is
    called in Python (click's own naming would read ``CHAT_ASK_SESSION_ID``).
    """
    long_names = [name for name in option.opts if name.startswith("--")]
    name = long_names[0] if long_names else option.opts[0]
    words = [ENV_PREFIX, *path, name.lstrip("-")]
    return "_".join(words).upper().replace("-", "_")


def _commands(
    command: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))


def _name_environment_variables(root: click.Command) -> None:
    for path, command in _commands(root):
        for param in command.params:
            if isinstance(param, click.Option) and param.allow_from_autoenv and param.expose_value:
                param.envvar = environment_variable(path, param)
                param.show_envvar = True


_name_environment_variables(main)
