"""The interactive ``chat-client``: read a line, run a command or send a message, show the reply.

Only input and rendering live here; everything that talks to the server is a
:class:`~chat.client.ChatClient` call. The prompt is prompt_toolkit's (history, arrow keys)
when stdin is a terminal, and plain line reading otherwise (``chat-client < script``).

Ctrl-C is a key at the prompt (prompt_toolkit reads the terminal raw): on an empty line it
quits, otherwise it clears the line. While a command runs the terminal is cooked, so Ctrl-C
is SIGINT: the first one cancels the streaming reply (the reply then ends as cancelled), the
next one abandons the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import functools
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

from chat.cli._render import (
    client_stats_table,
    history_renderables,
    server_stats_table,
    session_details,
    session_table,
    short_id,
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
)
from chat.errors import (
    ChatError,
    ConfigurationError,
    ServerUnreachable,
    SessionNotFound,
    StatusCode,
)
from chat.types import FinishReason, Session, SessionUpdateKind

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
_STYLE = Style.from_dict({"you": "bold ansigreen", "session": "ansicyan", "offline": "ansired"})


@dataclass(frozen=True, slots=True)
class InteractiveOptions:
    """What only the interactive client needs, besides the :class:`ClientConfig`."""

    #: Session to start in (id or unique prefix).
    session: str | None = None
    #: Keep the prompt's history in this file (in memory only when ``None``).
    history_file: Path | None = None


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

    @contextlib.contextmanager
    def typeahead(self, on_line: Callable[[str], None]) -> Iterator[None]:
        # The terminal is cooked while a reply streams: the kernel hands over whole lines.
        loop = asyncio.get_running_loop()
        fd = sys.stdin.fileno()
        pending = bytearray()

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


class _PlainReader:
    """Lines from a pipe, a file or a test's stdin: no prompt, no editing."""

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
                fd = self._stream.fileno()
                regular = stat.S_ISREG(os.fstat(fd).st_mode)
            except (OSError, ValueError, AttributeError):
                # No file descriptor (a test's stream) or a regular file: reading never blocks.
                return None
            if not regular:
                loop = asyncio.get_running_loop()
                reader = asyncio.StreamReader()
                self._transport, _ = await loop.connect_read_pipe(
                    lambda: asyncio.StreamReaderProtocol(reader), self._stream
                )
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


class _Repl:
    def __init__(
        self,
        config: ClientConfig,
        options: InteractiveOptions,
        console: Console,
        reader: _LineReader,
    ) -> None:
        self.config = config
        self.options = options
        self.out = console
        self.reader = reader
        self.client = ChatClient.from_config(config)
        self.session: Session | None = None
        # The user typed /disconnect: do not connect again until /connect.
        self.offline_by_choice = False
        self._was_connected = False
        self._reply: ReplyStream | None = None
        self._cancel_sent = False
        self._current: asyncio.Future[Any] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._typeahead: deque[str] = deque()
        self._watcher: asyncio.Task[None] | None = None
        self._prompting = False
        commands = [
            _Command("help", "", "this list", self.cmd_help),
            _Command("new", "[title]", "start a new session and switch to it", self.cmd_new),
            _Command("join", "<id>", "switch to a session (id or unique prefix)", self.cmd_join),
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
            _Command("retry", "", "run your last message again after it failed", self.cmd_retry),
            _Command(
                "cancel", "", "stop the reply (also: Ctrl-C while it streams)", self.cmd_cancel
            ),
            _Command("ping", "", "measure the round trip to the server", self.cmd_ping),
            _Command("stats", "", "this client's statistics", self.cmd_stats),
            _Command("server", "", "the server's statistics", self.cmd_server),
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
        self.out.print(Text(text, style="dim"))

    def error(self, text: str) -> None:
        self.out.print(Text(f"error: {text}", style="bold red"))

    def prompt(self) -> FormattedText:
        """``You [0720e2e4] ›``: the current session, and whether the client is offline."""
        fragments = [("class:you", "You")]
        if self.session is not None:
            fragments += [("", " "), ("class:session", f"[{short_id(self.session.session_id)}]")]
        if not self.client.connected:
            fragments.append(("class:offline", " (offline)"))
        fragments.append(("", " › "))
        return FormattedText(fragments)

    def unreachable(self, error: ServerUnreachable) -> None:
        self.error(error.message)
        port = self.config.port
        start = "chat-server" if port == 50051 else f"chat-server --port {port}"
        self.note(
            f"Start a server in another terminal with `{start}`, then type /connect "
            "(or point chat-client at one with --target HOST:PORT or CHAT_TARGET)."
        )

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> int:
        with on_sigint(self._interrupt):
            try:
                self._start_watching()
                if await self.connect() and self.options.session:
                    await self.cmd_join(self.options.session)
                while await self._step():
                    pass
            finally:
                for task in list(self._background):
                    task.cancel()
                if self._background:
                    await asyncio.wait(self._background)
                await self.client.aclose()
                await self._stop_watching()
                self.reader.close()
        return 0

    async def _step(self) -> bool:
        """Read one line and act on it; ``False`` to leave."""
        if self._typeahead:
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
            self.error(f"could not cancel: {error.message}")

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
                text = self._on_notice(notice)
                if text is None:
                    continue
                if self._prompting:
                    # Above the prompt, which prompt_toolkit then draws again.
                    await run_in_terminal(functools.partial(self.note, text))
                else:
                    self.note(text)

    def _on_notice(self, notice: Notice) -> str | None:
        """Follow what the notice says; return what to show, if anything."""
        if isinstance(notice, ConnectionStateChanged):
            if notice.state is ConnectionState.LOST:
                return f"· {notice.reason}"
            if notice.state is ConnectionState.RECONNECTING:
                wait = f" in {notice.delay:.1f}s" if notice.delay else ""
                policy = self.config.reconnect
                attempts = f"{notice.attempt}/{policy.max_attempts if policy else 1}"
                return f"· reconnecting to {notice.target}{wait} (attempt {attempts})"
            if notice.state is ConnectionState.RECONNECTED:
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

    # -- connecting ---------------------------------------------------------------------------

    async def connect(self) -> bool:
        try:
            await self.client.connect()
        except ServerUnreachable as error:
            self.unreachable(error)
            return False
        self._was_connected = True
        self.offline_by_choice = False
        try:
            info = await self.client.server_stats()
        except ChatError:
            self.out.print(f"Connected to {self.config.target}.")
        else:
            self.out.print(
                f"Connected to {self.config.target}: chat-server {info.version}, "
                f"{info.backend} backend, model {info.model}, {info.store} store."
            )
        self.note("Type a message to chat, /help for the commands, Ctrl-D or /quit to leave.")
        return True

    async def ready(self) -> bool:
        """Whether the client can talk to the server now (connecting once if it never did)."""
        if self.client.connected:
            return True
        if self.offline_by_choice:
            self.error("not connected; type /connect")
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
            self.error(error.message)
            self._session_gone(error.session_id)
        except ChatError as error:
            self.error(error.message)
        return True

    def unknown(self, name: str) -> None:
        names = [*self.commands, *self.aliases]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean /{self.aliases.get(close[0], close[0])}?" if close else ""
        self.error(f"unknown command /{name}.{hint} Type /help for the list.")
        self.note("To send a message that starts with /, begin it with //.")

    def need_session(self) -> Session | None:
        if self.session is None:
            self.error("no session yet: send a message, or use /new or /join <id>")
        return self.session

    # -- conversation -------------------------------------------------------------------------

    async def send(self, text: str) -> None:
        if not await self.ready():
            return
        if self.session is None:
            self.session = await self.client.create_session(title=_title_for(text))
            self.note(f"New session {short_id(self.session.session_id)}.")
        await self.stream(self.client.send(self.session.session_id, text))

    async def stream(self, reply: ReplyStream) -> None:
        """Show a reply as it streams; Ctrl-C or /cancel (typed meanwhile) stops it."""
        self._reply, self._cancel_sent = reply, False
        started = False
        try:
            with self.reader.typeahead(self._typed_while_streaming):
                async with reply:
                    async for event in reply:
                        if isinstance(event, ReplyStatus):
                            self.note(f"({event.message})")
                        elif isinstance(event, ReplyStarted):
                            started = True
                            self.out.print(Text("Assistant › ", style="bold magenta"), end="")
                        elif isinstance(event, ReplyChunk):
                            # As it arrives: no markup, no wrapping by rich.
                            self.out.out(event.text, end="", highlight=False)
                        elif isinstance(event, ReplyCompleted):
                            self.out.print()
                            self._footer(event)
                        elif isinstance(event, ReplyFailed):
                            if started:
                                self.out.print()
                            self._failed(event)
        except ServerUnreachable as error:
            if started:
                self.out.print()
            self.error(f"{error.message}; the reply was cut short")
        finally:
            self._reply = None

    def _footer(self, event: ReplyCompleted) -> None:
        if event.finish_reason is FinishReason.CANCELLED:
            self.out.print(Text("[cancelled: the partial reply is kept]", style="yellow"))
        elif event.finish_reason is FinishReason.LENGTH:
            self.out.print(Text("[cut at the model's length limit]", style="yellow"))

    def _failed(self, event: ReplyFailed) -> None:
        self.error(f"{event.message} ({event.code.name})")
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
        self.out.print(f"New session {short_id(self.session.session_id)}.")

    async def cmd_join(self, wanted: str) -> None:
        if not wanted:
            self.error("usage: /join <session id or unique prefix>")
            return
        if not await self.ready():
            return
        session = await self.client.find_session(wanted)
        self.session = session
        title = f" “{session.title}”" if session.title else ""
        self.out.print(
            f"Joined session {short_id(session.session_id)}{title} "
            f"({session.message_count} messages)."
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
            self.out.print(f"Title set: {self.session.title}")

    async def cmd_system(self, prompt: str) -> None:
        if (session := self.need_session()) is None:
            return
        if not prompt:
            self.out.print(f"System prompt: {session.system_prompt or '(none)'}")
            return
        if await self.ready():
            value = "" if prompt == "-" else prompt
            self.session = await self.client.update_session(session.session_id, system_prompt=value)
            self.out.print("System prompt removed." if not value else "System prompt set.")

    async def cmd_model(self, model: str) -> None:
        if (session := self.need_session()) is None:
            return
        if not model:
            self.out.print(f"Model: {session.model}")
            return
        if await self.ready():
            self.session = await self.client.update_session(session.session_id, model=model)
            self.out.print(f"Model set: {self.session.model}")

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
        self.out.print(f"Deleted session {short_id(target.session_id)} ({deleted} messages).")
        if self.session is not None and self.session.session_id == target.session_id:
            self.session = None

    async def cmd_retry(self, _: str) -> None:
        if (session := self.need_session()) is None or not await self.ready():
            return
        await self.stream(self.client.retry(session.session_id))

    async def cmd_cancel(self, _: str) -> None:
        self.note("Nothing is streaming. While a reply streams, press Ctrl-C or type /cancel.")

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

    async def cmd_health(self, _: str) -> None:
        if not await self.ready():
            return
        overall = await self.client.health()
        service = await self.client.health("ChatService")
        self.out.print(f"server: {overall.name}; ChatService: {service.name}")
        if service is not ServingStatus.SERVING:
            self.note("NOT_SERVING: the server is shutting down and takes no new messages.")

    async def cmd_connect(self, target: str) -> None:
        if target and target != self.config.target:
            try:
                config = dataclasses.replace(self.config, target=target)
            except ConfigurationError as error:
                self.error(error.message)
                return
            await self._stop_watching()
            await self.client.aclose()
            self.config, self.client = config, ChatClient.from_config(config)
            self._was_connected = False
            self._start_watching()
            if await self.connect() and self.session is not None:
                await self._keep_session()
            return
        if self.client.connected:
            self.out.print(f"Already connected to {self.config.target}.")
            return
        if await self.connect() and self.session is not None:
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
        await self.client.disconnect()
        self.offline_by_choice = True
        self.out.print(f"Disconnected from {self.config.target}; /connect reconnects.")

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
) -> int:
    """Run the interactive client until the person leaves; return the exit status."""
    from chat.cli._render import make_console

    stream = stdin if stdin is not None else sys.stdin
    out = console if console is not None else make_console()
    reader: _LineReader = (
        _TerminalReader(options.history_file) if stream.isatty() else _PlainReader(stream)
    )
    return asyncio.run(_Repl(config, options, out, reader).run())
