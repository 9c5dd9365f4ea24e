"""How ``chat-client`` shows things: rich tables for people, plain dicts for ``--json``.

Nothing here talks to the server; the functions turn what :class:`~chat.client.ChatClient`
returns into renderables or JSON-ready values.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from chat.client import ClientStats, Reply, ServerStatsInfo, WhoAmI
from chat.errors import BackendRateLimited, ChatError, InvalidArgument
from chat.types import (
    ContextPolicy,
    FinishReason,
    Message,
    MessageStatus,
    Role,
    Session,
    Usage,
    utcnow,
)

__all__ = [
    "client_stats_table",
    "error_json",
    "history_renderables",
    "make_console",
    "message_json",
    "reply_json",
    "reply_summary",
    "server_stats_json",
    "server_stats_table",
    "session_details",
    "session_json",
    "session_lines",
    "session_table",
    "short_id",
]

_STATUS_TAGS = {
    MessageStatus.CANCELLED: "cancelled",
    MessageStatus.FAILED: "failed",
    MessageStatus.INTERRUPTED: "interrupted",
}


def make_console(file: TextIO | None = None) -> Console:
    """A console that writes colour only to a terminal, and never when ``NO_COLOR`` is set."""
    stream = file if file is not None else sys.stdout
    is_terminal = stream.isatty() if hasattr(stream, "isatty") else False
    plain = not is_terminal or "NO_COLOR" in os.environ
    return Console(
        file=file,
        # What is printed comes from people and models: never read it as rich markup.
        markup=False,
        highlight=False,
        no_color=plain,
        # Without a terminal, rich would still emit bold/italic codes: plain text only.
        color_system=None if plain else "auto",
        emoji=False,
        soft_wrap=not is_terminal,
    )


def short_id(session_id: str) -> str:
    """The first 8 characters, as the prompt shows them (any unique prefix is accepted)."""
    return session_id[:8]


def _ago(moment: datetime) -> str:
    seconds = max(0.0, (utcnow() - moment).total_seconds())
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 86400:
        return f"{seconds / 3600:.0f}h ago"
    return moment.strftime("%Y-%m-%d")


def _policy(policy: ContextPolicy) -> str:
    return "server default" if policy is ContextPolicy.UNSPECIFIED else policy.name.lower()


def session_table(
    sessions: Sequence[Session], *, current: str | None = None, total: int | None = None
) -> Table:
    caption = None
    if total is not None and total > len(sessions):
        caption = f"{len(sessions)} of {total} sessions, newest first"
    table = Table(title=None, caption=caption, show_edge=False, pad_edge=False)
    table.add_column("", width=1, no_wrap=True)
    table.add_column("id", no_wrap=True, style="cyan")
    table.add_column("title", overflow="ellipsis", max_width=40)
    table.add_column("messages", justify="right")
    table.add_column("model", no_wrap=True)
    table.add_column("last activity", no_wrap=True)
    for session in sessions:
        table.add_row(
            "›" if session.session_id == current else "",
            short_id(session.session_id),
            session.title or Text("(untitled)", style="dim"),
            str(session.message_count),
            session.model,
            _ago(session.last_activity),
        )
    return table


def session_lines(sessions: Sequence[Session]) -> list[str]:
    """Sessions as plain columns, for a pipe: no box drawing, no truncation, full ids.

    Tab-separated, with a header line: ``cut -f1``, ``awk -F'\t'`` and spreadsheets read it.
    """
    lines = ["id\ttitle\tmessages\tmodel\tlast activity"]
    for session in sessions:
        title = " ".join(session.title.split())  # a title must not break the columns
        lines.append(
            f"{session.session_id}\t{title}\t{session.message_count}\t{session.model}\t"
            f"{_time(session.last_activity)}"
        )
    return lines


def _grid(rows: Iterable[tuple[str, str | Text]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for name, value in rows:
        grid.add_row(name, value)
    return grid


def session_details(session: Session) -> Table:
    return _grid(
        [
            ("session", session.session_id),
            ("title", session.title or Text("(untitled)", style="dim")),
            ("model", session.model),
            ("messages", str(session.message_count)),
            ("system prompt", session.system_prompt or Text("(none)", style="dim")),
            ("context policy", _policy(session.context_policy)),
            (
                "reply limit",
                f"{session.max_reply_tokens} tokens"
                if session.max_reply_tokens
                else Text("(server default)", style="dim"),
            ),
            ("created", f"{session.created_at:%Y-%m-%d %H:%M:%S} UTC"),
            ("last activity", f"{session.last_activity:%Y-%m-%d %H:%M:%S} UTC"),
        ]
    )


def history_renderables(messages: Sequence[Message]) -> list[Text]:
    """One paragraph per message: who, what, and a tag when it is not complete."""
    lines: list[Text] = []
    for message in messages:
        if message.role is Role.USER:
            line = Text("You › ", style="bold green")
        elif message.role is Role.ASSISTANT:
            line = Text("Assistant › ", style="bold magenta")
        else:
            line = Text("System › ", style="bold yellow")
        line.append(message.content or "")
        tag = _STATUS_TAGS.get(message.status)
        if tag is not None:
            line.append(f"  [{tag}]", style="bold red" if tag == "failed" else "yellow")
        lines.append(line)
    return lines


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _duration(seconds: float) -> str:
    minutes, second = divmod(int(seconds), 60)
    hours, minute = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minute:02d}m {second:02d}s"
    return f"{minute}m {second:02d}s" if minute else f"{second}s"


def client_stats_table(stats: ClientStats, *, target: str, connected: bool) -> Table:
    return _grid(
        [
            ("server", f"{target} ({'connected' if connected else 'not connected'})"),
            ("session duration", _duration(stats.duration)),
            ("messages sent", str(stats.messages_sent)),
            ("replies completed", str(stats.replies_succeeded)),
            ("replies failed", str(stats.replies_failed)),
            ("replies cancelled", str(stats.replies_cancelled)),
            ("chunks received", str(stats.chunks_received)),
            ("average chunks per reply", f"{stats.average_chunks_per_reply:.1f}"),
            ("average response time", _seconds(stats.average_response_time)),
            ("average time to first chunk", _seconds(stats.average_first_chunk_time)),
            ("connection attempts", str(stats.connection_attempts)),
            ("reconnections", str(stats.reconnections)),
            ("sessions created", str(stats.sessions_created)),
        ]
    )


def server_stats_table(info: ServerStatsInfo, *, target: str) -> Table:
    started = "" if info.started_at is None else f", since {info.started_at:%Y-%m-%d %H:%M} UTC"
    return _grid(
        [
            ("server", f"{target}: chat-server {info.version}"),
            ("backend", f"{info.backend} (default model {info.model})"),
            ("store", info.store),
            ("uptime", f"{info.uptime_seconds:.0f} s{started}"),
            ("sessions", f"{info.active_sessions} stored, {info.total_sessions_created} created"),
            ("requests", str(info.total_requests)),
            ("completed", str(info.successful_requests)),
            ("failed", str(info.failed_requests)),
            ("cancelled", str(info.cancelled_requests)),
            ("average response time", _seconds(info.avg_response_time)),
            ("chunks sent", str(info.total_chunks_sent)),
            ("open streams", str(info.active_streams)),
            ("replies in flight", str(info.active_replies)),
            ("watching streams", str(info.active_watchers)),
            (
                "replay log",
                f"{info.replay_turns} turns, {info.replay_bytes} bytes; "
                f"{info.replay_evicted_events} events evicted, "
                f"{info.replay_expired_turns} turns expired; {info.resumed_turns} resumed",
            ),
        ]
    )


# -- JSON ---------------------------------------------------------------------------------


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _usage(usage: Usage | None) -> dict[str, int] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def message_json(message: Message) -> dict[str, Any]:
    return {
        "role": message.role.name.lower(),
        "content": message.content,
        "status": message.status.name.lower(),
        "timestamp": _time(message.created_at),
        "request_id": message.request_id,
        "model": message.model,
        "usage": _usage(message.usage),
    }


def session_json(session: Session, messages: Sequence[Message] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "session_id": session.session_id,
        "title": session.title,
        "model": session.model,
        "message_count": session.message_count,
        "system_prompt": session.system_prompt,
        "context_policy": session.context_policy.name.lower(),
        "max_reply_tokens": session.max_reply_tokens,
        "created_at": _time(session.created_at),
        "last_activity": _time(session.last_activity),
    }
    if messages is not None:
        data["messages"] = [message_json(m) for m in messages]
    return data


def reply_json(reply: Reply) -> dict[str, Any]:
    """The figures of :func:`reply_summary`, and the text, for ``ask --json``."""
    return {
        "session_id": reply.session_id,
        "request_id": reply.request_id,
        "text": reply.text,
        "finish_reason": reply.finish_reason.name.lower(),
        "model": reply.model,
        "usage": _usage(reply.usage),
        "message_count": reply.message_count,
        "context_messages": reply.context_messages,
        "omitted_messages": reply.omitted_messages,
        "chunks": reply.total_chunks,
        "processing_time": reply.processing_time,
        "response_time": reply.response_time,
        "first_chunk_time": reply.first_chunk_time,
    }


def reply_summary(reply: Reply) -> str:
    """One line of figures after a reply, from its RESPONSE_START and RESPONSE_COMPLETE::

        12 chunks · 1.20 s · first chunk 85 ms · 3 messages in context, 2 left out
        · 40 tokens in, 12 out · stop

    (on one line). Token counts only when the model reported them.
    """
    chunks = "1 chunk" if reply.total_chunks == 1 else f"{reply.total_chunks} chunks"
    parts = [chunks, _seconds(reply.response_time)]
    if reply.first_chunk_time is not None:
        parts.append(f"first chunk {_seconds(reply.first_chunk_time)}")
    plural = "" if reply.context_messages == 1 else "s"
    context = f"{reply.context_messages} message{plural} in context"
    if reply.omitted_messages:
        context += f", {reply.omitted_messages} left out"
    parts.append(context)
    if reply.usage is not None:
        parts.append(f"{reply.usage.prompt_tokens} tokens in, {reply.usage.completion_tokens} out")
    parts.append(_FINISH_WORDS.get(reply.finish_reason, reply.finish_reason.name.lower()))
    return " · ".join(parts)


_FINISH_WORDS = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length limit",
    FinishReason.CANCELLED: "cancelled",
}


def error_json(error: ChatError) -> dict[str, Any]:
    """An error for ``--json`` output: the protocol detail the message for people leaves out."""
    data: dict[str, Any] = {"code": error.status.name, "message": error.message}
    if isinstance(error, InvalidArgument):
        data["field"] = error.field
    if isinstance(error, BackendRateLimited) and error.retry_after is not None:
        data["retry_after"] = error.retry_after
    return {"error": data}


def server_stats_json(info: ServerStatsInfo) -> dict[str, Any]:
    data = {name: getattr(info, name) for name in info.__dataclass_fields__}
    data["started_at"] = _time(info.started_at)
    return data


def who_am_i_text(info: WhoAmI) -> str:
    """``chat-client whoami`` and ``/whoami``: the identity, its role and its limits.

    >>> print(who_am_i_text(WhoAmI("alice", False, "tokens")))
    alice (user; the server authenticates with tokens; no limits)
    """
    role = "administrator" if info.admin else "user"
    lines = [f"{info.identity} ({role}; the server authenticates with {info.auth}"]
    if not info.quotas:
        lines[0] += "; no limits)"
        return lines[0]
    lines[0] += ")"
    for quota in info.quotas:
        line = f"  {quota.name}: {quota.used} of {quota.limit}"
        if quota.period_seconds:
            line += (
                f" per {quota.period_seconds:g}s (the period ends in "
                f"{quota.resets_in_seconds:.0f}s)"
            )
        lines.append(line)
    return "\n".join(lines)
