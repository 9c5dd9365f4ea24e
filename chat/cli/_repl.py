"""The interactive ``chat-client``: read a line, run a command or send a message, show the reply.

Only input and rendering live here; everything that talks to the server is a
:class:`~chat.client.ChatClient` call. The prompt is prompt_toolkit's (history, arrow keys)
when stdin is a terminal, and plain line reading otherwise (``chat-client < script``).

Ctrl-C is a key at the prompt (prompt_toolkit reads the terminal raw): on an empty line it
quits, otherwise it clears the line. While a command runs the terminal is cooked, so Ctrl-C
is SIGINT: the first one cancels the streaming reply (the reply then ends as cancelled), the
next one abandons the command.

When stdin is not a terminal, lines are a script: stdout gets the replies and what the
commands were asked to show, stderr everything else (banner, confirmations, notices,
errors), and the exit status is that of the first error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import functools
import logging
import os
import stat
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeVar

from prompt_toolkit import PromptSession
from prompt_toolkit.application import run_in_terminal
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.styles import Style
from rich.console import Console
from rich.table import Table
from rich.text import Text

from chat.cli._exit import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, exit_code_for
from chat.cli._hints import unreachable_hint
from chat.cli._markdown import StreamingMarkdown
from chat.cli._render import (
    client_stats_table,
    history_renderables,
    reply_summary,
    server_stats_table,
    session_details,
    session_table,
    short_id,
    who_am_i_text,
)
from chat.cli._sigint import on_sigint
from chat.client import (
    ChatClient,
    ClientConfig,
    ConnectionState,
    ConnectionStateChanged,
    Notice,
    ReplyChunk,
    ReplyCompleted,
    ReplyFailed,
    ReplyStarted,
    ReplyStatus,
    ReplyStream,
    ServerNotice,
    ServingStatus,
    SessionUpdated,
    Watch,
    WatchEvent,
)
from chat.errors import (
    ChatError,
    ConfigurationError,
    ConnectionLost,
    ServerUnreachable,
    SessionNotFound,
    StatusCode,
)
from chat.types import FinishReason, MessageStatus, Role, Session, SessionUpdateKind

__all__ = ["InteractiveOptions", "run_interactive"]

#: Errors after which the server kept the user's message as failed, so /retry can help.
_RETRYABLE = frozenset(
    {
        StatusCode.UNAVAILABLE,
        StatusCode.DEADLINE_EXCEEDED,
        StatusCode.RESOURCE_EXHAUSTED,
        StatusCode.INTERNAL,
        StatusCode.UNAUTHENTICATED,
        StatusCode.UNKNOWN,
    }
)

#: Another client typing: not worth a line of its own.
_TYPING = frozenset({SessionUpdateKind.TYPING_STARTED, SessionUpdateKind.TYPING_STOPPED})
_STYLE = Style.from_dict(
    {"you": "bold ansigreen", "session": "ansicyan", "offline": "ansired", "other": "bold ansiblue"}
)
#: What marks a reply to another client's message, in a joined session.
_OTHER_LABEL = "Other client › "


log = logging.getLogger(__name__)

#: What ``--render`` accepts: ``None`` is Markdown on a terminal, plain text otherwise.
RENDERINGS = ("markdown", "plain")


@dataclass(frozen=True, slots=True)
class InteractiveOptions:
    """What only the interactive client needs, besides the :class:`ClientConfig`."""

    #: Session to start in (id or unique prefix).
    session: str | None = None
    #: Keep the prompt's history in this file (in memory only when ``None``).
    history_file: Path | None = None
    #: No summary line after each reply (``/verbose on`` brings it back).
    quiet: bool = False
    #: How replies are shown (:data:`RENDERINGS`); ``None``: Markdown on a terminal.
    render: str | None = None

    def __post_init__(self) -> None:
        if self.render is not None and self.render not in RENDERINGS:
            raise ConfigurationError(
                f"render must be one of {', '.join(RENDERINGS)}, not {self.render!r}"
            )


# -- reading lines ----------------------------------------------------------------------------


class _LineReader(Protocol):
    #: Whether a person is typing (prompts are shown, lines typed during a reply are read).
    interactive: bool

    async def read(self, prompt: Callable[[], FormattedText]) -> str | None:
        """The next line; ``None`` to leave (end of input, or Ctrl-C on an empty line).

        ``prompt`` is called at every redraw, so that it follows the connection's state.
        """
        ...

    def typeahead(self, on_line: Callable[[str], None]) -> contextlib.AbstractContextManager[None]:
        """While inside, pass each line typed to ``on_line`` (a reply is streaming)."""
        ...

    def refresh(self) -> None:
        """Draw the prompt again (what it shows changed)."""
        ...

    def close(self) -> None: ...


class _TerminalReader:
    """prompt_toolkit's prompt: line editing, history, arrow keys."""

    interactive = True

    def __init__(self, history_file: Path | None) -> None:
        history: History = InMemoryHistory()
        if history_file is not None:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(history_file))
        bindings = KeyBindings()

        @bindings.add("c-c")
        def _interrupt(event: KeyPressEvent) -> None:
            buffer = event.app.current_buffer
            if buffer.text:
                buffer.reset()
            else:
                event.app.exit(exception=KeyboardInterrupt())

        self._session: PromptSession[str] = PromptSession(
            history=history, key_bindings=bindings, style=_STYLE
        )

    async def read(self, prompt: Callable[[], FormattedText]) -> str | None:
        try:
            # Ctrl-C is a key binding (above); SIGINT stays with the REPL's handler.
            return await self._session.prompt_async(prompt, handle_sigint=False)
        except (EOFError, KeyboardInterrupt):
            # Caught here: a KeyboardInterrupt leaving a task would stop the event loop.
            return None

    def refresh(self) -> None:
        if self._session.app.is_running:
            self._session.app.invalidate()

    @contextlib.contextmanager
    def typeahead(self, on_line: Callable[[str], None]) -> Iterator[None]:
        # The terminal is cooked while a reply streams: the kernel hands over whole lines.
        # Its echo is turned off meanwhile, so that what is typed is not drawn inside the
        # reply; the line is shown after the reply, at the prompt, before it is run.
        loop = asyncio.get_running_loop()
        fd = sys.stdin.fileno()
        pending = bytearray()
        with _no_echo(fd), self._reading(loop, fd, pending, on_line):
            yield

    @contextlib.contextmanager
    def _reading(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        pending: bytearray,
        on_line: Callable[[str], None],
    ) -> Iterator[None]:

        def readable() -> None:
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                return
            pending.extend(data)
            while (end := pending.find(b"\n")) >= 0:
                line = bytes(pending[:end]).decode(errors="replace")
                del pending[: end + 1]
                on_line(line)

        loop.add_reader(fd, readable)
        try:
            yield
        finally:
            loop.remove_reader(fd)
            if pending:
                on_line(bytes(pending).decode(errors="replace"))

    def close(self) -> None:
        return None


@contextlib.contextmanager
def _no_echo(fd: int) -> Iterator[None]:
    """Turn the terminal's echo off while inside (lines are still read whole; Ctrl-C works)."""
    try:
        import termios

        saved = termios.tcgetattr(fd)
    except (ImportError, OSError):
        yield  # not a terminal after all, or no termios on this platform
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ECHONL)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            termios.tcsetattr(fd, termios.TCSANOW, saved)


class _PlainReader:
    """Lines from a pipe, a file, a device or a test's stdin: no prompt, no editing."""

    interactive = False

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._reader: asyncio.StreamReader | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._checked = False

    async def _async_reader(self) -> asyncio.StreamReader | None:
        if not self._checked:
            self._checked = True
            try:
                mode = os.fstat(self._stream.fileno()).st_mode
            except (OSError, ValueError, AttributeError):
                return None  # no file descriptor (a test's stream): read it directly
            # Only pipes and sockets can be waited on by the event loop (and must be, or a
            # slow writer would block the client). Files and devices such as /dev/null
            # answer at once; the loop refuses them (connect_read_pipe: PermissionError).
            if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
                return None
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader()
            try:
                self._transport, _ = await loop.connect_read_pipe(
                    lambda: asyncio.StreamReaderProtocol(reader), self._stream
                )
            except (OSError, ValueError):
                return None
            self._reader = reader
        return self._reader

    async def read(self, prompt: Callable[[], FormattedText]) -> str | None:
        reader = await self._async_reader()
        if reader is None:
            line = self._stream.readline()
        else:
            line = (await reader.readline()).decode(errors="replace")
        if not line:
            return None
        return line.rstrip("\r\n")

    @contextlib.contextmanager
    def typeahead(self, on_line: Callable[[str], None]) -> Iterator[None]:
        # Lines of a script are read in order, after the reply.
        yield

    def refresh(self) -> None:
        return None  # no prompt

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


# -- the REPL -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Command:
    name: str
    usage: str
    help: str
    run: Callable[[str], Awaitable[bool | None]]


@dataclass(slots=True)
class _WatchedTurn:
    """A reply of another client in the joined session, as far as it was shown."""

    turn_id: str
    text: str = ""
    #: Characters of ``text`` printed so far; at the prompt, whole lines only (the line
    #: being written is shown in the prompt until it ends).
    printed: int = 0
    labelled: bool = False


@dataclass(slots=True)
class _LastTurn:
    """The last message this client sent, so that /retry can send it again."""

    session_id: str
    request_id: str
    #: The text, for a MESSAGE (a RETRY's text is the server's failed message).
    text: str
    #: The connection was lost before the reply ended.
    cut_short: bool = False


class _Repl:
    def __init__(
        self,
        config: ClientConfig,
        options: InteractiveOptions,
        console: Console,
        reader: _LineReader,
        diagnostics: Console | None = None,
    ) -> None:
        self.config = config
        self.options = options
        #: Replies and what commands were asked to show.
        self.out = console
        #: Everything else: stderr in a script, the same terminal otherwise.
        self.diag = diagnostics if diagnostics is not None else console
        self.reader = reader
        self.client = ChatClient.from_config(config)
        self.session: Session | None = None
        self.verbose = not options.quiet
        self.markdown = options.render == "markdown" or (
            options.render is None and console.is_terminal
        )
        #: The exit status of a script: that of its first error.
        self.exit_code = EXIT_OK
        # The user typed /disconnect: do not connect again until /connect.
        self.offline_by_choice = False
        self._was_connected = False
        self._banner_shown = False
        # The connection loss last reported, so that the reply cut short by it and the
        # notice about it do not both say it.
        self._loss_shown: str | None = None
        self._last_turn: _LastTurn | None = None
        self._reply: ReplyStream | None = None
        self._cancel_sent = False
        self._current: asyncio.Future[Any] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._typeahead: deque[str] = deque()
        self._watcher: asyncio.Task[None] | None = None
        self._prompting = False
        # The joined session whose other clients' replies are shown live (/join).
        self._following: tuple[str, asyncio.Task[None]] | None = None
        self._watched: _WatchedTurn | None = None
        commands = [
            _Command("help", "", "this list", self.cmd_help),
            _Command("new", "[title]", "start a new session and switch to it", self.cmd_new),
            _Command(
                "join",
                "<id>",
                "switch to a session (id or unique prefix); others' replies show live",
                self.cmd_join,
            ),
            _Command("sessions", "[n]", "list the newest sessions", self.cmd_sessions),
            _Command("info", "", "describe the current session", self.cmd_info),
            _Command("history", "", "show the current session's messages", self.cmd_history),
            _Command("title", "[text]", "show or set the session's title", self.cmd_title),
            _Command(
                "system", "[prompt|-]", "show, set or (-) remove the system prompt", self.cmd_system
            ),
            _Command("model", "[name]", "show or set the session's model", self.cmd_model),
            _Command(
                "delete", "[id]", "delete a session (default: the current one)", self.cmd_delete
            ),
            _Command(
                "retry", "", "send your last message again after its reply failed", self.cmd_retry
            ),
            _Command(
                "cancel", "", "stop the reply (also: Ctrl-C while it streams)", self.cmd_cancel
            ),
            _Command("verbose", "[on|off]", "the summary line after each reply", self.cmd_verbose),
            _Command("ping", "", "measure the round trip to the server", self.cmd_ping),
            _Command("stats", "", "this client's statistics", self.cmd_stats),
            _Command("server", "", "the server's statistics", self.cmd_server),
            _Command(
                "whoami", "", "who the server takes you for, and your limits", self.cmd_whoami
            ),
            _Command("health", "", "the server's health status", self.cmd_health),
            _Command(
                "connect", "[host:port]", "connect (again, or to another server)", self.cmd_connect
            ),
            _Command("disconnect", "", "close the connection", self.cmd_disconnect),
            _Command("clear", "", "clear the screen", self.cmd_clear),
            _Command("quit", "", "leave (also: Ctrl-D, or Ctrl-C on an empty line)", self.cmd_quit),
        ]
        self.commands = {c.name: c for c in commands}
        self.aliases = {"exit": "quit", "q": "quit", "?": "help"}

    # -- output helpers -----------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.diag.print(Text(text, style="dim"))

    def say(self, text: str) -> None:
        """A confirmation ("Title set"): for the person, not a result of the script."""
        self.diag.print(text)

    def error(self, text: str, code: int) -> None:
        """Report an error; the first one gives a script its exit status."""
        if self.exit_code == EXIT_OK:
            self.exit_code = code
        self.diag.print(Text(f"error: {text}", style="bold red"))

    def prompt(self) -> FormattedText:
        """``You [0720e2e4] ›``: the current session, and whether the client is offline."""
        fragments: list[tuple[str, str]] = []
        turn = self._watched
        if turn is not None and self.reader.interactive:
            # Another client's reply, the line being written: it goes above once it ends.
            rest = turn.text[turn.printed :]
            if rest or not turn.labelled:
                label = "" if turn.labelled else _OTHER_LABEL
                fragments += [("class:other", label), ("", rest), ("", "\n")]
        fragments.append(("class:you", "You"))
        if self.session is not None:
            fragments += [("", " "), ("class:session", f"[{short_id(self.session.session_id)}]")]
        if not self.client.connected:
            fragments.append(("class:offline", " (offline)"))
        fragments.append(("", " › "))
        return FormattedText(fragments)

    def unreachable(self, error: ServerUnreachable, config: ClientConfig | None = None) -> None:
        self.error(error.message, exit_code_for(error))
        hint = unreachable_hint(error, config or self.config)
        if hint is not None:
            then = ", then type /connect." if self.reader.interactive else "."
            self.note(hint[:1].upper() + hint[1:] + then)

    def _report_loss(self, message: str, *, as_error: bool) -> None:
        """Say once that the connection was lost (a reply cut short and a notice both tell)."""
        if message == self._loss_shown:
            return
        self._loss_shown = message
        if as_error:
            self.error(message, EXIT_UNREACHABLE)
        else:
            self.note(f"· {message}")

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> int:
        """Read and act until the end; the exit status (a script's: that of its first error)."""
        with on_sigint(self._interrupt):
            try:
                self._start_watching()
                # A script connects when a line needs the server: an empty one (cron,
                # `ssh host cmd </dev/null`) has nothing to do and succeeds.
                connected = await self.connect() if self.reader.interactive else True
                if connected and self.options.session:
                    await self.handle(f"/join {self.options.session}")
                while await self._step():
                    pass
            finally:
                for task in list(self._background):
                    task.cancel()
                if self._background:
                    await asyncio.wait(self._background)
                await self._stop_following()
                await self.client.aclose()
                await self._stop_watching()
                self.reader.close()
        return EXIT_OK if self.reader.interactive else self.exit_code

    async def _step(self) -> bool:
        """Read one line and act on it; ``False`` to leave."""
        if self._typeahead:
            # Typed while a reply streamed (not echoed then): shown now, at the prompt.
            line: str | None = self._typeahead.popleft()
            self.out.print("".join(fragment[1] for fragment in self.prompt()) + (line or ""))
        else:
            try:
                self._prompting = True
                line = await self._run_cancellable(self.reader.read(self.prompt))
            except asyncio.CancelledError:
                if _current_task_cancelling():
                    raise
                return False  # SIGINT while waiting for a line that is not typed (a script)
            finally:
                self._prompting = False
        if line is None:
            return False
        line = line.strip()
        if not line:
            return True
        try:
            return await self._run_cancellable(self.handle(line))
        except asyncio.CancelledError:
            if _current_task_cancelling():
                raise
            self.note("(interrupted)")
            return True
        finally:
            await self._follow_current()

    async def _run_cancellable(self, work: Awaitable[_T]) -> _T:
        """Run ``work`` as a task that Ctrl-C (SIGINT) may cancel."""
        task: asyncio.Future[_T] = asyncio.ensure_future(work)
        self._current = task
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.wait((task,))
            raise
        finally:
            self._current = None
        return task.result()

    def _interrupt(self) -> None:
        if self._reply is not None and not self._cancel_sent:
            self._cancel_sent = True
            self._spawn(self._cancel_reply(self._reply))
        elif self._current is not None and not self._current.done():
            self._current.cancel()

    async def _cancel_reply(self, reply: ReplyStream) -> None:
        try:
            await reply.cancel()
        except ChatError as error:
            self.error(f"could not cancel: {error.message}", exit_code_for(error))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- notices pushed by the server or the client -------------------------------------------

    def _start_watching(self) -> None:
        self._watcher = asyncio.create_task(self._watch(self.client))

    async def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait((self._watcher,))
            self._watcher = None

    async def _watch(self, client: ChatClient) -> None:
        async with client.notices() as notices:
            async for notice in notices:
                if self._prompting:
                    # Above the prompt, which prompt_toolkit then draws again.
                    await run_in_terminal(functools.partial(self._on_notice, notice))
                else:
                    self._on_notice(notice)

    def _on_notice(self, notice: Notice) -> None:
        """Follow what the notice says, and show what is worth showing."""
        text = self._notice_text(notice)
        if text is not None:
            self.note(text)

    def _notice_text(self, notice: Notice) -> str | None:
        if isinstance(notice, ConnectionStateChanged):
            if notice.state is ConnectionState.LOST:
                self._report_loss(notice.reason, as_error=False)
                return None
            if notice.state is ConnectionState.RECONNECTING:
                wait = f" in {notice.delay:.1f}s" if notice.delay else ""
                policy = self.config.reconnect
                attempts = f"{notice.attempt}/{policy.max_attempts if policy else 1}"
                return f"· reconnecting to {notice.target}{wait} (attempt {attempts})"
            if notice.state is ConnectionState.RECONNECTED:
                self._loss_shown = None
                kept = (
                    f"; still in session {short_id(self.session.session_id)}"
                    if self.session is not None
                    else ""
                )
                return f"· reconnected to {notice.target}{kept}"
            return None
        if isinstance(notice, SessionUpdated):
            if self.session is None or notice.session_id != self.session.session_id:
                return None
            sid = short_id(notice.session_id)
            if notice.kind is SessionUpdateKind.SESSION_DELETED:
                self.session = None
                return f"· session {sid} was deleted; your next message starts a new one"
            if notice.session is not None:
                self.session = notice.session
            if notice.kind in _TYPING:
                return None
            return f"· session {sid}: {notice.message} ({notice.message_count} messages)"
        if isinstance(notice, ServerNotice):
            return f"· server: {notice.message}"
        return None

    # -- following a joined session ------------------------------------------------------------

    async def _start_following(self, session_id: str) -> None:
        """Watch ``session_id``: other clients' replies show as they stream."""
        await self._stop_following()
        watch = self.client.watch(session_id)
        await watch.__aenter__()  # a refusal is this command's error
        self._following = (session_id, asyncio.create_task(self._follow(watch)))

    async def _stop_following(self) -> None:
        following, self._following = self._following, None
        if following is not None:
            following[1].cancel()
            await asyncio.wait((following[1],))
        if self._watched is not None:
            self._watched = None
            self.reader.refresh()

    async def _follow_current(self) -> None:
        """Stop following a session that is no longer the current one."""
        if self._following is None:
            return
        current = None if self.session is None else self.session.session_id
        if self._following[0] != current or self._following[1].done():
            await self._stop_following()

    async def _follow(self, watch: Watch) -> None:
        try:
            async for item in watch:
                if not item.is_mine and not isinstance(item.event, SessionUpdated):
                    # Session updates are notices already (typing, changes, deletion).
                    await self._show_watched(item)
        except ChatError as error:
            self.note(f"· stopped following session {short_id(watch.session_id)}: {error.message}")
        finally:
            with contextlib.suppress(ChatError):
                await watch.__aexit__(None, None, None)

    async def _show_watched(self, item: WatchEvent) -> None:
        event = item.event
        turn = self._watched
        if turn is None or turn.turn_id != item.turn_id:
            turn = self._watched = _WatchedTurn(item.turn_id)
        end = event if isinstance(event, ReplyCompleted | ReplyFailed) else None
        final = end is not None
        if isinstance(event, ReplyChunk):
            turn.text += event.text
        at_prompt = self._prompting and self.reader.interactive
        # At the prompt only whole lines go above it; elsewhere everything, as it comes.
        cut = turn.text.rfind("\n") + 1 if at_prompt and not final else len(turn.text)
        piece = turn.text[turn.printed : cut]
        turn.printed = max(turn.printed, cut)
        show = functools.partial(self._print_watched, turn, piece, end)
        if piece or final:
            if at_prompt:
                await run_in_terminal(show)
            else:
                show()
        if final:
            self._watched = None
        self.reader.refresh()

    def _print_watched(
        self, turn: _WatchedTurn, piece: str, end: ReplyCompleted | ReplyFailed | None
    ) -> None:
        if not turn.labelled:
            turn.labelled = True
            self.out.print(Text(_OTHER_LABEL, style="bold blue"), end="")
        if piece:
            self.out.out(piece, end="", highlight=False)
        if end is None:
            return
        if not turn.text.endswith("\n"):
            self.out.print()
        if isinstance(end, ReplyFailed):
            self.note(f"[another client's reply failed: {end.message}]")
        elif end.finish_reason is FinishReason.CANCELLED:
            self.note("[another client's reply was cancelled]")

    # -- connecting ---------------------------------------------------------------------------

    async def connect(self) -> bool:
        try:
            await self.client.connect()
        except ServerUnreachable as error:
            self.unreachable(error)
            return False
        self._connected()
        await self._describe_server()
        return True

    def _connected(self) -> None:
        self._was_connected = True
        self.offline_by_choice = False
        self._loss_shown = None

    async def _describe_server(self) -> None:
        try:
            info = await self.client.server_stats()
        except ChatError:
            self.say(f"Connected to {self.config.target}.")
        else:
            self.say(
                f"Connected to {self.config.target}: chat-server {info.version}, "
                f"{info.backend} backend, model {info.model}, {info.store} store."
            )
        if not self._banner_shown and self.reader.interactive:
            self.note("Type a message to chat, /help for the commands, Ctrl-D or /quit to leave.")
        self._banner_shown = True

    async def ready(self) -> bool:
        """Whether the client can talk to the server now (connecting once if it never did)."""
        if self.client.connected:
            return True
        if self.offline_by_choice:
            self.error("not connected; type /connect", EXIT_USAGE)
            return False
        if self._was_connected and self.config.reconnect is not None:
            return True  # the client reconnects by itself on its next call
        return await self.connect()

    # -- dispatch -----------------------------------------------------------------------------

    async def handle(self, line: str) -> bool:
        """Act on one line; ``False`` to leave."""
        try:
            if line.startswith("//"):
                await self.send(line[1:])
            elif line.startswith("/"):
                name, _, argument = line[1:].partition(" ")
                name = self.aliases.get(name.lower(), name.lower())
                command = self.commands.get(name)
                if command is None:
                    self.unknown(name)
                elif await command.run(argument.strip()) is False:
                    return False
            else:
                await self.send(line)
        except ServerUnreachable as error:
            self.unreachable(error)
        except SessionNotFound as error:
            self.error(error.message, exit_code_for(error))
            self._session_gone(error.session_id)
        except ChatError as error:
            self.error(error.message, exit_code_for(error))
        return True

    def unknown(self, name: str) -> None:
        names = [*self.commands, *self.aliases]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean /{self.aliases.get(close[0], close[0])}?" if close else ""
        self.error(f"unknown command /{name}.{hint} Type /help for the list.", EXIT_USAGE)
        self.note("To send a message that starts with /, begin it with //.")

    def need_session(self) -> Session | None:
        if self.session is None:
            self.error("no session yet: send a message, or use /new or /join <id>", EXIT_USAGE)
        return self.session

    # -- conversation -------------------------------------------------------------------------

    async def send(self, text: str) -> None:
        if not await self.ready():
            return
        new = self.session is None
        if self.session is None:
            self.session = await self.client.create_session(title=_title_for(text))
        await self.stream(self.client.send(self.session.session_id, text), text, new_session=new)

    async def stream(self, reply: ReplyStream, text: str, *, new_session: bool = False) -> None:
        """Show a reply as it streams; Ctrl-C or /cancel (typed meanwhile) stops it.

        ``new_session``: the session was made for this message; if the message is refused
        (nothing stored), the session goes too, rather than staying behind empty.
        """
        self._reply, self._cancel_sent = reply, False
        self._last_turn = _LastTurn(reply.session_id, reply.request_id, text)
        started = False
        markdown: StreamingMarkdown | None = None
        try:
            with self.reader.typeahead(self._typed_while_streaming):
                async with reply:
                    async for event in reply:
                        if isinstance(event, ReplyStatus):
                            self.note(f"({event.message})")
                        elif isinstance(event, ReplyStarted):
                            started = True
                            if new_session:
                                self.say(f"New session {short_id(event.session_id)}.")
                            markdown = self._start_reply()
                        elif isinstance(event, ReplyChunk):
                            if markdown is not None:
                                markdown.feed(event.text)
                            else:
                                # As it arrives: no markup, no wrapping by rich.
                                self.out.out(event.text, end="", highlight=False)
                        elif isinstance(event, ReplyCompleted):
                            self._end_reply(markdown)
                            markdown = None
                            self._footer(event, reply)
                            if new_session and not event.message_count:
                                await self._forget_new_session(reply.session_id)
                        elif isinstance(event, ReplyFailed):
                            if started:
                                self._end_reply(markdown)
                                markdown = None
                            self._failed(event)
                            if new_session and not event.started:
                                await self._forget_new_session(reply.session_id)
        except ServerUnreachable as error:
            if started:
                self._end_reply(markdown)
                markdown = None
            if self._loss_shown is not None and isinstance(error, ConnectionLost):
                # The loss was said (the client then tried to resume the reply): say why
                # the reply did not go on, not the loss again.
                self.error(f"the reply could not go on: {error.reason}", EXIT_UNREACHABLE)
            else:
                self._report_loss(error.message, as_error=True)
            self._last_turn.cut_short = True
            self.note("The reply was cut short; /retry sends your message again.")
        finally:
            if markdown is not None:
                markdown.close()
            self._reply = None

    def _start_reply(self) -> StreamingMarkdown | None:
        if not self.reader.interactive:
            return None  # a script's stdout is the replies' text, nothing around it
        if self.markdown:
            self.out.print(Text("Assistant ›", style="bold magenta"))
            return StreamingMarkdown(self.out)
        self.out.print(Text("Assistant › ", style="bold magenta"), end="")
        return None

    def _end_reply(self, markdown: StreamingMarkdown | None) -> None:
        if markdown is not None:
            markdown.close()
        else:
            self.out.print()

    async def _forget_new_session(self, session_id: str) -> None:
        # Best effort: the message was refused, and the session made for it holds nothing.
        with contextlib.suppress(ChatError):
            await self.client.delete_session(session_id)
        if self.session is not None and self.session.session_id == session_id:
            self.session = None

    def _footer(self, event: ReplyCompleted, reply: ReplyStream) -> None:
        if event.finish_reason is FinishReason.CANCELLED:
            self.note("[cancelled: the partial reply is kept]")
        elif event.finish_reason is FinishReason.LENGTH:
            self.note("[cut at the model's length limit]")
        if self.verbose and reply.result is not None:
            self.note(reply_summary(reply.result))

    def _failed(self, event: ReplyFailed) -> None:
        # The status is for logs: the person reads what happened and what to do.
        log.info("reply %s failed with %s", event.request_id, event.code.name)
        error = event.error()
        self.error(event.message, exit_code_for(error))
        if event.code is StatusCode.NOT_FOUND:
            self._session_gone(event.session_id)
        elif event.code in _RETRYABLE or event.started:
            self.note("Your message is kept; /retry sends it again.")

    def _session_gone(self, session_id: str) -> None:
        if self.session is not None and self.session.session_id == session_id:
            self.session = None
            self.note("The current session is gone; your next message starts a new one.")

    def _typed_while_streaming(self, line: str) -> None:
        if line.strip().lower() == "/cancel":
            self._interrupt()
        elif line.strip():
            self._typeahead.append(line)

    # -- commands -----------------------------------------------------------------------------

    async def cmd_help(self, _: str) -> None:
        table = Table(show_header=False, show_edge=False, pad_edge=False, box=None)
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for command in self.commands.values():
            table.add_row(f"/{command.name} {command.usage}".rstrip(), command.help)
        self.out.print(table)
        self.note(
            "Anything else is sent to the model (start with // to send a leading /). "
            "Ctrl-C stops a streaming reply."
        )

    async def cmd_new(self, title: str) -> None:
        if not await self.ready():
            return
        self.session = await self.client.create_session(title=title)
        self.say(f"New session {short_id(self.session.session_id)}.")

    async def cmd_join(self, wanted: str) -> None:
        if not wanted:
            self.error("usage: /join <session id or unique prefix>", EXIT_USAGE)
            return
        if not await self.ready():
            return
        session = await self.client.find_session(wanted)
        self.session = session
        await self._start_following(session.session_id)
        title = f" “{session.title}”" if session.title else ""
        live = ", a reply running" if session.turn_running else ""
        watchers = f", {session.watchers} watching" if session.watchers else ""
        self.say(
            f"Joined session {short_id(session.session_id)}{title} "
            f"({session.message_count} messages{live}{watchers}); "
            "other clients' replies show here as they stream."
        )

    async def cmd_sessions(self, argument: str) -> None:
        if not await self.ready():
            return
        count = int(argument) if argument.isdigit() and int(argument) > 0 else 20
        page = await self.client.list_sessions(page_size=min(count, 1000))
        if not page.sessions:
            self.note("No sessions yet: send a message to start one.")
            return
        current = None if self.session is None else self.session.session_id
        self.out.print(session_table(page.sessions, current=current, total=page.total))

    async def cmd_info(self, _: str) -> None:
        if (session := self.need_session()) is None or not await self.ready():
            return
        self.session = await self.client.get_session(session.session_id)
        self.out.print(session_details(self.session))

    async def cmd_history(self, _: str) -> None:
        if (session := self.need_session()) is None or not await self.ready():
            return
        messages = await self.client.history(session.session_id)
        if not messages:
            self.note("No messages yet.")
        for line in history_renderables(messages):
            self.out.print(line)

    async def cmd_title(self, title: str) -> None:
        if (session := self.need_session()) is None:
            return
        if not title:
            self.out.print(f"Title: {session.title or '(untitled)'}")
            return
        if await self.ready():
            self.session = await self.client.update_session(session.session_id, title=title)
            self.say(f"Title set: {self.session.title}")

    async def cmd_system(self, prompt: str) -> None:
        if (session := self.need_session()) is None:
            return
        if not prompt:
            self.out.print(f"System prompt: {session.system_prompt or '(none)'}")
            return
        if await self.ready():
            value = "" if prompt == "-" else prompt
            self.session = await self.client.update_session(session.session_id, system_prompt=value)
            self.say("System prompt removed." if not value else "System prompt set.")

    async def cmd_model(self, model: str) -> None:
        if (session := self.need_session()) is None:
            return
        if not model:
            self.out.print(f"Model: {session.model}")
            return
        if await self.ready():
            self.session = await self.client.update_session(session.session_id, model=model)
            self.say(f"Model set: {self.session.model}")

    async def cmd_delete(self, wanted: str) -> None:
        if not await self.ready():
            return
        if wanted:
            target = await self.client.find_session(wanted)
        elif (current := self.need_session()) is not None:
            target = current
        else:
            return
        deleted = await self.client.delete_session(target.session_id)
        self.say(f"Deleted session {short_id(target.session_id)} ({deleted} messages).")
        if self.session is not None and self.session.session_id == target.session_id:
            self.session = None

    async def cmd_retry(self, _: str) -> None:
        if (session := self.need_session()) is None or not await self.ready():
            return
        last = self._last_turn
        if last is not None and last.cut_short and last.session_id == session.session_id:
            text = await self._text_to_resend(last)
            if text is None:
                return
            if text:
                # A reply cut short by a lost connection is stored as cancelled (or not at
                # all), which RETRY does not take: the message is sent again instead.
                self.note("Sending your message again.")
                await self.stream(self.client.send(session.session_id, text), text)
                return
        await self.stream(self.client.retry(session.session_id), "")

    async def _text_to_resend(self, last: _LastTurn) -> str | None:
        """What /retry sends after a loss: the text, ``""`` for a RETRY, ``None``: nothing."""
        history = await self.client.history(last.session_id)
        turn = [m for m in history if m.request_id == last.request_id]
        if any(m.role is Role.ASSISTANT and m.status is MessageStatus.COMPLETE for m in turn):
            self._last_turn = None
            self.note("That reply was completed after all: /history shows it.")
            return None
        user = next((m for m in turn if m.role is Role.USER), None)
        if user is not None:
            return "" if user.status is MessageStatus.FAILED else user.content
        # Not stored at all (the server stopped mid-turn): the text the client has, if any.
        return last.text

    async def cmd_cancel(self, _: str) -> None:
        self.note("Nothing is streaming. While a reply streams, press Ctrl-C or type /cancel.")

    async def cmd_verbose(self, argument: str) -> None:
        value = argument.lower()
        if value in ("on", "off"):
            self.verbose = value == "on"
        elif value:
            self.error("usage: /verbose [on|off]", EXIT_USAGE)
            return
        state = "on" if self.verbose else "off"
        self.say(f"Summary line after each reply: {state}.")

    async def cmd_ping(self, _: str) -> None:
        if not await self.ready():
            return
        rtt = await self.client.ping()
        self.out.print(f"pong from {self.config.target} in {rtt * 1000:.1f} ms")

    async def cmd_stats(self, _: str) -> None:
        self.out.print(
            client_stats_table(
                self.client.stats, target=self.config.target, connected=self.client.connected
            )
        )

    async def cmd_server(self, _: str) -> None:
        if not await self.ready():
            return
        info = await self.client.server_stats()
        self.out.print(server_stats_table(info, target=self.config.target))

    async def cmd_whoami(self, _: str) -> None:
        if not await self.ready():
            return
        self.out.print(Text(who_am_i_text(await self.client.who_am_i())))

    async def cmd_health(self, _: str) -> None:
        # No ready(): the health check needs no Chat stream, which a draining server refuses.
        overall = await self.client.health()
        service = await self.client.health("ChatService")
        self.out.print(f"server: {overall.name}; ChatService: {service.name}")
        if service is not ServingStatus.SERVING:
            self.note("NOT_SERVING: the server is shutting down and takes no new messages.")

    async def cmd_connect(self, target: str) -> None:
        if target:
            try:
                config = dataclasses.replace(self.config, target=target)
            except ConfigurationError as error:
                self.error(error.message, EXIT_USAGE)
                return
            if config.target != self.config.target:
                await self._switch_to(config)
                return
        if self.client.connected:
            self.say(f"Already connected to {self.config.target}.")
            return
        if await self.connect() and self.session is not None:
            await self._keep_session()

    async def _switch_to(self, config: ClientConfig) -> None:
        """Connect to another server; on failure, stay with this one."""
        client = ChatClient.from_config(config)
        try:
            await client.connect()
        except ServerUnreachable as error:
            await client.aclose()
            self.unreachable(error, config)
            self.note(f"Still using {self.config.target}.")
            return
        await self._stop_following()
        await self._stop_watching()
        await self.client.aclose()
        self.config, self.client = config, client
        self._start_watching()
        self._connected()
        await self._describe_server()
        if self.session is not None:
            await self._keep_session()

    async def _keep_session(self) -> None:
        assert self.session is not None
        try:
            self.session = await self.client.get_session(self.session.session_id)
        except SessionNotFound:
            self.note(
                f"Session {short_id(self.session.session_id)} is not on this server; "
                "your next message starts a new one."
            )
            self.session = None

    async def cmd_disconnect(self, _: str) -> None:
        was_connected = self.client.connected
        await self.client.disconnect()
        self.offline_by_choice = True
        if was_connected:
            self.say(f"Disconnected from {self.config.target}; /connect reconnects.")
        else:
            self.note("Not connected; /connect connects.")

    async def cmd_clear(self, _: str) -> None:
        self.out.clear()

    async def cmd_quit(self, _: str) -> bool:
        return False


_T = TypeVar("_T")


def _title_for(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= 60 else first[:59] + "…"


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def run_interactive(
    config: ClientConfig,
    options: InteractiveOptions,
    *,
    stdin: TextIO | None = None,
    console: Console | None = None,
    diagnostics: Console | None = None,
) -> int:
    """Run the interactive client until the person leaves; return the exit status.

    A person at a terminal leaves with 0; a script (stdin not a terminal) gets the status of
    its first error, and its diagnostics go to stderr.
    """
    from chat.cli._render import make_console

    stream = stdin if stdin is not None else sys.stdin
    out = console if console is not None else make_console()
    reader: _LineReader
    if stream.isatty():
        reader = _TerminalReader(options.history_file)
    else:
        reader = _PlainReader(stream)
        if diagnostics is None:
            diagnostics = make_console(sys.stderr)
    return asyncio.run(_Repl(config, options, out, reader, diagnostics).run())
