"""Turn orchestration: sessions, the per-stream conversation state, cancellation, chunking.

No gRPC here. :class:`ChatCore` owns the store, the backend and the counters of one server.
Each ``Chat`` stream is a :class:`Conversation`: the service feeds it :class:`Request`\\ s and
writes out what its :class:`~chat.events.Outbox` yields.

Sessions are private: each belongs to the identity that created it (``Session.owner``) and
every method that names a session takes the caller's :class:`~chat.auth.Identity`. For
another identity a session behaves exactly like one that does not exist (the same
:class:`~chat.errors.SessionNotFound`, after the same single store read). Administrators may
read, change and delete anyone's session and list everyone's; turns and typing on a
session are its owner's alone, so its updates reach only the owner's streams.

Within a conversation, each session has a *lane*: a FIFO of turns served by one task, so
turns on one session are answered in order and a message sent while a reply streams waits
its turn. Lanes of different sessions run concurrently. Across conversations (and, with a
shared store, across servers) :meth:`SessionStore.lock` keeps turns of one session apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import Coroutine, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Self

from chat._page_tokens import PageTokens
from chat._version import __version__
from chat.auth import LOCAL, Credentials, Identity
from chat.backends import Delta, GenerationRequest, ModelBackend, ModelCheck, ModelChecker
from chat.context import ContextBudget, estimate_tokens
from chat.errors import (
    Aborted,
    BackendError,
    ChatError,
    ContextTooLong,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    SessionNotFound,
    StoreUnavailable,
    TurnNotFound,
    TurnOutOfRange,
    Unavailable,
)
from chat.events import Event, EventKind, ReplyCounter, Request, RequestKind
from chat.health import StoreHealth
from chat.observe import NO_OBSERVER, NO_TURN, Observer, TurnObservation
from chat.outbox import FINAL_SINK, LOG_SINK, LogSink, Outbox
from chat.quota import QuotaKeeper, QuotaUsage
from chat.replay import MemoryReplayLog, ReplayLog
from chat.retention import Retention, RetentionKeeper
from chat.stats import ServerStats, ServerStatsInfo
from chat.store import OwnerLimitReached, SessionStore
from chat.types import (
    ConcurrencyPolicy,
    ContextPolicy,
    DisconnectPolicy,
    FinishReason,
    Message,
    MessageStatus,
    Role,
    Session,
    SessionPatch,
    SessionUpdateKind,
    StatusKind,
    Usage,
    utcnow,
)

__all__ = ["ChatCore", "Conversation", "Limits"]

log = logging.getLogger(__name__)

_TICK = timedelta(microseconds=1)
_INT32_MAX = 2**31 - 1
#: Owners whose last session count is remembered for stats during a store outage.
_KNOWN_COUNTS = 1024
#: Chunks of a reply kept as separate strings before they are joined into one block.
_PARTS_PER_BLOCK = 256
#: A reply's pump lets the other tasks run after this many chunks even when its model never
#: makes it wait (echo, or a burst a remote model sent at once): without it, one pass of the
#: event loop queues whole replies for every stream, and every other stream's PING or first
#: chunk waits for all of them.
_CHUNKS_PER_TURN_OF_THE_LOOP = 4
#: Chunks this far apart (seconds) mean the model made the pump wait, so the loop has
#: turned since: a model that streams at its own pace (a remote one, a paced echo) is never
#: made to wait a turn more. A chunk the pump does not wait for takes microseconds.
_WAITED = 0.0002
#: The string fields of a Chat request held to ``Limits.max_id_chars``.
_REQUEST_IDS = (
    "session_id",
    "request_id",
    "turn_id",
    "client_message_id",
    "timestamp",
    "traceparent",
)


def _replayed(event: Event, request_id: str = "") -> Event:
    """A logged ``event`` (a new object, from the replay log) for this stream: with
    ``request_id`` if given."""
    if request_id:
        event.request_id = request_id
    return event


def _too_long(name: str, value: str, limit: int) -> InvalidArgument:
    # The length, never the value: the value is what is too big to send back.
    return InvalidArgument(name, f"is {len(value)} characters; the limit is {limit}")


@dataclass(frozen=True, slots=True)
class Limits:
    """Sizes the server accepts and the knobs of its output path."""

    max_message_chars: int = 32_000
    max_system_prompt_chars: int = 32_000
    max_title_chars: int = 200
    max_model_chars: int = 200
    #: Ids (session, request, turn, client message), and the timestamp and trace context
    #: (traceparent) a client sends.
    max_id_chars: int = 128
    #: ``page_token`` of ListSessions (the server's own tokens are far shorter).
    max_page_token_chars: int = 512
    #: Largest request message accepted, in bytes (after decompression).
    max_receive_bytes: int = 4 * 1024 * 1024
    default_page_size: int = 50
    max_page_size: int = 1000
    #: A delta longer than this is sent as several chunks.
    max_chunk_chars: int = 8192
    #: Events a stream may have queued before its turns wait for the client to read.
    outbox_high_water: int = 64
    #: Merge chunks of one reply that are already waiting when the client reads.
    coalesce_chunks: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise ValueError(f"{f.name} must be >= 1, not {value}")
        if self.default_page_size > self.max_page_size:
            raise ValueError("default_page_size must not exceed max_page_size")


class ChatCore:
    """Sessions and turns for one server: the whole service without the wire.

    >>> from chat.store.memory import MemoryStore
    >>> from chat.backends.echo import EchoBackend
    >>> core = ChatCore(MemoryStore(), EchoBackend())
    """

    def __init__(
        self,
        store: SessionStore,
        backend: ModelBackend,
        *,
        limits: Limits | None = None,
        stats: ServerStats | None = None,
        context: ContextBudget | None = None,
        retention: Retention | None = None,
        quotas: QuotaKeeper | None = None,
        model_check: ModelCheck = ModelCheck.STRICT,
        observer: Observer | None = None,
        health: StoreHealth | None = None,
        replay: ReplayLog | None = None,
        on_disconnect: DisconnectPolicy = DisconnectPolicy.CONTINUE,
    ) -> None:
        if on_disconnect is DisconnectPolicy.UNSPECIFIED:
            raise ValueError("on_disconnect must be CANCEL or CONTINUE")
        self.store = store
        self.quotas = quotas or QuotaKeeper()
        self.backend = backend
        self.models = ModelChecker(backend, model_check)
        self.health = health or StoreHealth(store)
        self.limits = limits or Limits()
        self.context = context or ContextBudget()
        self.stats = stats or ServerStats()
        #: Told about every turn (metrics, traces, access logs; :mod:`chat.observe`).
        self.observer = observer or NO_OBSERVER
        #: The events of running and recent turns (RESUME, WATCH, resends); in this process
        #: unless one is given (the Redis one, where the Redis store is used).
        self.replay: ReplayLog = replay or MemoryReplayLog(on_evicted=self.observer.replay_evicted)
        # A log shared with other servers (Redis) tells of their INTERRUPTs and session
        # updates.
        self.replay.on_interrupt(self._cancel_session_turns)
        self.replay.on_update(self._remote_update)
        self.replay.on_cancel(self._remote_cancel)
        #: What a turn of a session without its own setting does when its stream goes away.
        self.on_disconnect = on_disconnect
        self.retention = RetentionKeeper(store, retention or Retention(), self.stats)
        self._page_tokens: PageTokens | None = None
        # The last session count read, per owner (None: everyone's), for stats during a
        # store outage.
        self._known_sessions: dict[str | None, int] = {}
        self._subscribers: dict[str, set[Conversation]] = {}
        self._conversations: set[Conversation] = set()
        self._streams_of: dict[str, int] = {}
        #: Closed streams whose turns run on (``DisconnectPolicy.CONTINUE``).
        self._detached: set[Conversation] = set()
        self._draining = False
        self._last_created = datetime.min.replace(tzinfo=UTC)
        self._idle = asyncio.Event()
        self._idle.set()

    # -- sessions -----------------------------------------------------------------------

    async def create_session(
        self,
        *,
        model: str = "",
        system_prompt: str = "",
        title: str = "",
        context_policy: ContextPolicy = ContextPolicy.UNSPECIFIED,
        concurrency_policy: ConcurrencyPolicy = ConcurrencyPolicy.UNSPECIFIED,
        on_disconnect: DisconnectPolicy = DisconnectPolicy.UNSPECIFIED,
        max_reply_tokens: int = 0,
        identity: Identity = LOCAL,
    ) -> Session:
        """Create and store a new session, owned by ``identity`` (``UNAVAILABLE`` while the
        server drains)."""
        if self._draining:
            raise Unavailable(
                "the server is shutting down and takes no new sessions; "
                "create it on another replica (or once this one is back)"
            )
        self._check_text("title", title, self.limits.max_title_chars)
        self._check_text("system_prompt", system_prompt, self.limits.max_system_prompt_chars)
        self._check_reply_tokens(max_reply_tokens)
        await self._check_model(model)
        # Strictly increasing creation times keep "newest first" equal to creation order,
        # even for sessions created within one clock tick.
        now = max(utcnow(), self._last_created + _TICK)
        self._last_created = now
        session = Session(
            session_id=str(uuid.uuid4()),
            created_at=now,
            last_activity=now,
            title=title,
            model=model or self.backend.default_model,
            system_prompt=system_prompt,
            context_policy=context_policy,
            concurrency_policy=concurrency_policy,
            on_disconnect=on_disconnect,
            max_reply_tokens=max_reply_tokens,
            owner=identity.name,
        )
        max_sessions = self.quotas.quotas.max_sessions
        try:
            await self.store.create(session, max_owned=max_sessions)
        except OwnerLimitReached as full:
            self.quotas.check_sessions(identity.name, full.owned)
            raise
        self.stats.total_sessions_created += 1
        log.info("created session %s (model %s)", session.session_id, session.model)
        await self.retention.session_created()
        return shown(session, identity)

    async def _owned(self, session_id: str, identity: Identity, *, admin: bool = True) -> Session:
        """The session if ``identity`` may use it (its owner, or with ``admin`` an
        administrator); else exactly what an unknown id gets: one store read, then
        :class:`~chat.errors.SessionNotFound` with the same message."""
        session = await self.store.get(self._check_id(session_id))
        if session.owner != identity.name and not (admin and identity.admin):
            raise SessionNotFound(session_id)
        return session

    async def get_session(self, session_id: str, identity: Identity = LOCAL) -> Session:
        session = await self._live(await self._owned(session_id, identity))
        return shown(session, identity)

    async def _live(self, session: Session) -> Session:
        """``session`` with its live state: whether a turn runs, how many watch it."""
        session_id = session.session_id
        running = await self.replay.running_turn(session_id) is not None
        watchers = await self.replay.watchers(session_id)
        if not running and not watchers:
            return session
        return dataclasses.replace(session, turn_running=running, watchers=watchers)

    async def get_history(self, session_id: str, identity: Identity = LOCAL) -> list[Message]:
        await self._owned(session_id, identity)
        return await self.store.messages(session_id)

    async def read_session(
        self, session_id: str, identity: Identity = LOCAL
    ) -> tuple[Session, list[Message]]:
        """The session and its history, read at one moment (they always agree)."""
        # Ownership first, with a read that costs the same for any session: reading another
        # identity's whole history before refusing would tell, by its time, that it exists.
        await self._owned(session_id, identity)
        session, history = await self.store.read(session_id)
        return shown(await self._live(session), identity), history

    async def update_session(
        self, session_id: str, patch: SessionPatch, identity: Identity = LOCAL
    ) -> Session:
        """Apply ``patch`` and tell the owner's other streams."""
        self._check_id(session_id)
        if patch.title is not None:
            self._check_text("title", patch.title, self.limits.max_title_chars)
        if patch.system_prompt is not None:
            self._check_text(
                "system_prompt", patch.system_prompt, self.limits.max_system_prompt_chars
            )
        if patch.max_reply_tokens is not None:
            self._check_reply_tokens(patch.max_reply_tokens)
        if patch.model is not None:
            if not patch.model:
                raise InvalidArgument("model", "must not be empty")
            await self._check_model(patch.model)
        await self._owned(session_id, identity)
        now = utcnow()
        session = await self.store.update(session_id, patch, now)
        # A store moves last_activity to now only when a field changed: a patch that
        # changes nothing tells nobody (and keeps nobody's session from expiring).
        if session.last_activity == now:
            changed = ", ".join(patch.changed())
            self._publish(session, SessionUpdateKind.SESSION_UPDATED, f"session updated: {changed}")
        return shown(session, identity)

    async def delete_session(self, session_id: str, identity: Identity = LOCAL) -> int:
        """Delete the session; return how many messages went with it."""
        session = await self._owned(session_id, identity)
        deleted = await self.store.delete(session_id)
        self._publish(
            dataclasses.replace(session, message_count=0),
            SessionUpdateKind.SESSION_DELETED,
            "session deleted",
        )
        self._subscribers.pop(session_id, None)
        log.info("deleted session %s (%d messages)", session_id, deleted)
        return deleted

    async def list_sessions(
        self,
        page_size: int = 0,
        page_token: str = "",
        identity: Identity = LOCAL,
        *,
        all_identities: bool = False,
    ) -> tuple[list[Session], str, int]:
        """One page of the caller's sessions, newest first: ``(sessions, next_page_token,
        total)``; with ``all_identities`` (administrators only) everyone's."""
        if all_identities and not identity.admin:
            raise PermissionDenied(
                "only administrators may list every identity's sessions (all_identities)"
            )
        owner = None if all_identities else identity.name
        limits = self.limits
        if not 0 <= page_size <= limits.max_page_size:
            raise InvalidArgument(
                "page_size", f"must be between 0 and {limits.max_page_size}, not {page_size}"
            )
        self._check_text("page_token", page_token, limits.max_page_token_chars)
        tokens = await self._tokens()
        cursor = tokens.open(page_token) if page_token else None
        page = await self.store.list_sessions(
            page_size or limits.default_page_size, cursor, owner=owner
        )
        next_token = tokens.seal(page.next_cursor) if page.next_cursor else ""
        sessions = [shown(s, identity) for s in page.sessions]
        return sessions, next_token, await self.store.count(owner=owner)

    async def _tokens(self) -> PageTokens:
        if self._page_tokens is None:
            self._page_tokens = PageTokens(await self.store.secret("page-tokens"))
        return self._page_tokens

    async def stats_snapshot(self, identity: Identity = LOCAL) -> ServerStatsInfo:
        """The server's statistics now.

        Administrators get every counter. Others get what describes the server (version,
        backend, model, store, start time) and their own share of what exists now (their
        sessions and open streams); the counters of everyone's traffic read 0, so nothing
        tells them about other users. During a store outage the store is not asked: the
        session count is the last one read, and ``store_unreachable`` is true.
        """
        owner = None if identity.admin else identity.name
        unreachable = not self.health.available
        if not unreachable:
            try:
                count = await self.store.count(owner=owner)
            except StoreUnavailable:
                unreachable = True
            else:
                if len(self._known_sessions) >= _KNOWN_COUNTS and owner not in self._known_sessions:
                    self._known_sessions.clear()
                self._known_sessions[owner] = count
        full = self.stats.snapshot(
            version=__version__,
            backend=self.backend.name,
            model=self.backend.default_model,
            store=self.store.kind,
            active_sessions=self._known_sessions.get(owner, 0),
            store_unreachable=unreachable,
            replay=self.replay.stats(),
        )
        if identity.admin:
            return full
        return ServerStatsInfo(
            version=full.version,
            backend=full.backend,
            model=full.model,
            store=full.store,
            started_at=full.started_at,
            uptime_seconds=full.uptime_seconds,
            total_requests=0,
            successful_requests=0,
            failed_requests=0,
            cancelled_requests=0,
            active_sessions=full.active_sessions,
            total_sessions_created=0,
            avg_response_time=0.0,
            active_streams=self._streams_of.get(identity.name, 0),
            active_replies=0,
            total_chunks_sent=0,
            expired_sessions=0,
            evicted_sessions=0,
            trimmed_messages=0,
            store_unreachable=full.store_unreachable,
        )

    async def who_am_i(self, identity: Identity = LOCAL) -> list[QuotaUsage]:
        """The limits that apply to ``identity`` and its use of them now."""
        owned = None
        if self.quotas.quotas.max_sessions is not None:
            owned = await self.store.count(owner=identity.name)
        return await self.quotas.usage(identity.name, owned)

    def _check_id(self, session_id: str) -> str:
        if not session_id:
            raise InvalidArgument("session_id", "is required")
        self._check_text("session_id", session_id, self.limits.max_id_chars)
        return session_id

    def check_request(self, request: Request) -> InvalidArgument | None:
        """The first string field of a Chat request over its limit, as the error to send."""
        limits = self.limits
        if len(request.message) > limits.max_message_chars:
            return _too_long("message", request.message, limits.max_message_chars)
        for name in _REQUEST_IDS:
            value = getattr(request, name)
            if len(value) > limits.max_id_chars:
                return _too_long(name, value, limits.max_id_chars)
        return None

    def echoable(self, request: Request) -> Request:
        """``request`` with the ids an answer may repeat: those over the limit left out."""
        limit = self.limits.max_id_chars
        return dataclasses.replace(
            request,
            session_id=request.session_id if len(request.session_id) <= limit else "",
            request_id=request.request_id if len(request.request_id) <= limit else "",
            message="",
        )

    @staticmethod
    def _check_reply_tokens(value: int) -> None:
        if not 0 <= value <= _INT32_MAX:
            raise InvalidArgument(
                "max_reply_tokens", f"must be between 0 (the server's default) and {_INT32_MAX}"
            )

    @staticmethod
    def _check_text(name: str, value: str, limit: int) -> None:
        if len(value) > limit:
            raise _too_long(name, value, limit)

    async def _check_model(self, model: str) -> None:
        if not model:
            return
        self._check_text("model", model, self.limits.max_model_chars)
        if (problem := await self.models.problem(model)) is not None:
            raise InvalidArgument("model", problem)

    # -- streams and lifecycle ------------------------------------------------------------

    def open_conversation(self, credentials: Credentials | None = None) -> Conversation:
        """The state of a new ``Chat`` stream of ``credentials``' identity (default
        :data:`~chat.auth.LOCAL`); use it with ``async with``."""
        return Conversation(self, credentials or Credentials(LOCAL))

    @property
    def draining(self) -> bool:
        return self._draining

    def start_draining(self) -> None:
        """Refuse new turns (``UNAVAILABLE``); see :meth:`Conversation.drain`."""
        self._draining = True
        for conversation in list(self._conversations):
            conversation.drain()

    def interrupt(self) -> None:
        """The grace period is over: end every stream's turns now, each with a final event
        (see :meth:`Conversation.interrupt`), then the streams themselves."""
        for conversation in [*self._conversations, *self._detached]:
            conversation.interrupt()

    async def wait_idle(self, within: float) -> bool:
        """Wait until every stream has closed; ``False`` if ``within`` seconds passed first."""
        try:
            async with asyncio.timeout(within):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def queued_turns(self) -> int:
        """Turns accepted on open streams and waiting for an earlier turn of their session."""
        return sum(c.queued_turns for c in self._conversations)

    def send_heartbeats(self, silent_for: float) -> int:
        """Send a heartbeat on every stream that has sent nothing for ``silent_for`` seconds.

        Proxies and load balancers that time out silent streams (and ignore HTTP/2 PINGs)
        then keep a stream open while a model thinks for minutes. The heartbeat is a
        ``STATUS`` event with ``status_kind`` HEARTBEAT, which clients ignore. Returns how
        many were sent.
        """
        now = time.monotonic()
        sent = 0
        for conversation in self._conversations:
            outbox = conversation.outbox
            # An outbox with events in it is not silent: its writer is sending, or waiting
            # for the client to read, and one more event would not help.
            if not len(outbox) and now - outbox.last_sent >= silent_for:
                outbox.put_nowait(
                    Event(
                        EventKind.STATUS,
                        status_message="heartbeat",
                        status_kind=StatusKind.HEARTBEAT,
                    )
                )
                sent += 1
        return sent

    def _stream_opened(self, conversation: Conversation) -> None:
        self._conversations.add(conversation)
        name = conversation.identity.name
        self._streams_of[name] = self._streams_of.get(name, 0) + 1
        self.stats.active_streams += 1
        self._idle.clear()
        if self._draining:
            # The server still listens during the grace period: a stream opened then is
            # told to go elsewhere too, rather than holding the shutdown for all of it.
            conversation.drain()

    def _stream_closed(self, conversation: Conversation) -> None:
        self._conversations.discard(conversation)
        name = conversation.identity.name
        if self._streams_of.get(name, 0) <= 1:
            self._streams_of.pop(name, None)
        else:
            self._streams_of[name] -= 1
        self.stats.active_streams -= 1
        if not self._conversations and not self._detached:
            self._idle.set()

    def _detached_done(self, conversation: Conversation) -> None:
        """The last turn a closed stream left running has ended."""
        self._detached.discard(conversation)
        if not self._conversations and not self._detached:
            self._idle.set()

    def _cancel_session_turns(self, session_id: str) -> None:
        """Cancel every turn of ``session_id`` running or queued in this process
        (``CONCURRENCY_POLICY_INTERRUPT``)."""
        for conversation in [*self._conversations, *self._detached]:
            conversation.cancel_session(session_id)

    # -- session updates pushed to other streams ------------------------------------------

    def _subscribe(self, session_id: str, conversation: Conversation) -> None:
        self._subscribers.setdefault(session_id, set()).add(conversation)

    def _unsubscribe(self, session_id: str, conversation: Conversation) -> None:
        subscribers = self._subscribers.get(session_id)
        if subscribers is not None:
            subscribers.discard(conversation)
            if not subscribers:
                del self._subscribers[session_id]

    def _publish(
        self,
        session: Session,
        kind: SessionUpdateKind,
        message: str,
        *,
        exclude: Conversation | None = None,
    ) -> None:
        self._deliver(session, kind, message, exclude=exclude)
        # Streams following the session on other servers (a fleet on Redis) get it too.
        self.replay.publish_update(session, kind, message)

    def _cancel_detached(self, identity: str, request: Request) -> bool:
        """Cancel what ``request`` (a CANCEL) names among the replies ``identity`` left
        running on streams that went away; whether there was any."""
        found = False
        for other in list(self._detached):
            if other.identity.name == identity:
                theirs = other._cancel_targets(request)
                if theirs:
                    other._cancel_turns(theirs)
                    found = True
        return found

    def _runs_here(self, turn_id: str) -> bool:
        """Whether a stream of this process (or one gone, its turn running on) runs it."""
        return any(
            lane.current is not None and lane.current.reply.turn_id == turn_id
            for conversation in (*self._conversations, *self._detached)
            for lane in conversation._lanes.values()
        )

    def _remote_cancel(self, identity: str, session_id: str, request_id: str) -> None:
        """Another server's CANCEL (through the replay log) that it found nothing for."""
        request = Request(RequestKind.CANCEL, session_id=session_id, request_id=request_id)
        self._cancel_detached(identity, request)

    def _remote_update(self, session: Session, kind: SessionUpdateKind, message: str) -> None:
        """Another server's session update (through the replay log), for this one's streams."""
        self._deliver(session, kind, message)
        if kind is SessionUpdateKind.SESSION_DELETED:
            self._subscribers.pop(session.session_id, None)

    def _deliver(
        self,
        session: Session,
        kind: SessionUpdateKind,
        message: str,
        *,
        exclude: Conversation | None = None,
    ) -> None:
        for conversation in self._subscribers.get(session.session_id, ()):
            if conversation is exclude:
                continue
            outbox = conversation.outbox
            if len(outbox) >= conversation._request_backlog:
                # Another client's events (typing, say) are not held back by this one's
                # reading: a stream that leaves this many unread misses updates rather than
                # queueing them without bound. The next one it gets is up to date.
                log.debug("session update %r dropped for a stream that is not reading", message)
                continue
            outbox.put_nowait(
                Event(
                    EventKind.SESSION_UPDATE,
                    session_id=session.session_id,
                    status_message=message,
                    message_count=session.message_count,
                    session=shown(session, conversation.identity),
                    update_kind=kind,
                )
            )


@dataclass(slots=True, eq=False)
class _Turn:
    """One MESSAGE or RETRY on its way to a reply."""

    request: Request
    received: float = field(default_factory=time.monotonic)
    reply: ReplyCounter = field(default_factory=ReplyCounter)
    #: The reply's text so far: the latest chunks, and ``blocks`` of earlier ones joined.
    parts: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    #: Chunks of the reply queued so far.
    chunks: int = 0
    finish: FinishReason = FinishReason.STOP
    usage: Usage | None = None
    generation: asyncio.Task[None] | None = None
    cancelled: bool = False
    #: Cancelled because the server's grace period ran out (not by the client).
    interrupted: bool = False
    started: bool = False
    observed: TurnObservation = NO_TURN
    #: Tokens of the prompt as counted for the context (the token budget's estimate).
    prompt_tokens: int = 0
    #: Where the turn's events go: its stream's outbox, or once the stream is gone, the
    #: turn's replay log alone (:class:`~chat.outbox.LogSink`).
    sink: Outbox | LogSink = LOG_SINK
    #: Runs to its end if its stream goes away (the session's ``on_disconnect``).
    continues: bool = False
    #: Its final event (RESPONSE_COMPLETE or ERROR) was sent.
    ended: bool = False

    def compact(self) -> None:
        """Join the latest chunks into a block: a long reply is thousands of small strings,
        each with its object overhead; joined now and then, the turn holds about its
        text's size."""
        self.blocks.append("".join(self.parts))
        self.parts.clear()

    def text(self) -> str:
        return "".join(self.blocks) + "".join(self.parts)

    def release(self) -> None:
        """Drop the reply's text once it is stored (the turn may outlive its reply)."""
        self.parts.clear()
        self.blocks.clear()


@dataclass(slots=True, eq=False)
class _Lane:
    """The turns of one session on one stream, answered one after the other."""

    pending: deque[_Turn] = field(default_factory=deque)
    current: _Turn | None = None
    worker: asyncio.Task[None] | None = None


class Conversation:
    """The server side of one ``Chat`` stream.

    Feed it requests with :meth:`handle` (from the task that reads the stream) and send what
    :attr:`outbox` yields (from the task that writes it). :meth:`finish_input` says the client
    has stopped sending; the outbox closes once every queued turn is answered. Leaving the
    ``async with`` block cancels the turns still running and keeps their partial replies.
    """

    def __init__(self, core: ChatCore, credentials: Credentials | None = None) -> None:
        self._core = core
        self.credentials = credentials or Credentials(LOCAL)
        self.identity = self.credentials.identity
        limits = core.limits
        self.outbox = Outbox(
            high_water=limits.outbox_high_water,
            coalesce=limits.coalesce_chunks,
            max_chunk_chars=limits.max_chunk_chars,
            stats=core.stats,
        )
        self._request_backlog = 4 * limits.outbox_high_water
        self._lanes: dict[str, _Lane] = {}
        self._sessions: set[str] = set()
        #: RESUMEs and resends replaying a turn into this stream.
        self._replays: set[asyncio.Task[None]] = set()
        #: WATCHes of this stream, by session.
        self._watches: dict[str, asyncio.Task[None]] = {}
        #: Sessions this stream follows for their updates because it watches them.
        self._watch_follows: set[str] = set()
        #: Turns started on this stream: a watch of their session does not repeat them.
        self._own_turns: set[str] = set()
        self._input_done = False
        self._draining = False
        self._closing = False

    async def __aenter__(self) -> Self:
        self._core._stream_opened(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- input ------------------------------------------------------------------------------

    async def handle(self, request: Request) -> None:
        """Act on one request; answers go to :attr:`outbox`. Never raises for bad input.

        Waits while the client leaves many events unread, so that a client that sends
        without reading (PINGs, say) cannot make the server queue without bound.
        """
        await self.outbox.wait_below(self._request_backlog)
        kind = request.kind
        refused = self._core.check_request(request)
        if refused is not None:
            if kind == RequestKind.MESSAGE or kind == RequestKind.RETRY:
                self._core.stats.total_requests += 1
                self._core.stats.failed_requests += 1
            self._error(self._core.echoable(request), refused)
            return
        if kind == RequestKind.PING:
            self.outbox.put_urgent(
                Event(EventKind.PONG, session_id=request.session_id, request_id=request.request_id)
            )
        elif kind == RequestKind.MESSAGE or kind == RequestKind.RETRY:
            if self._validate_turn(request) is None and not await self._admit(request):
                return
            await self._start_turn(request)
        elif kind == RequestKind.CANCEL:
            await self._cancel(request)
        elif kind == RequestKind.TYPING_START or kind == RequestKind.TYPING_STOP:
            await self._typing(request)
        elif kind == RequestKind.RESUME:
            await self._resume(request)
        elif kind == RequestKind.WATCH:
            await self._watch(request)
        elif kind == RequestKind.UNWATCH:
            self._unwatch(request)
        else:
            self._error(request, InvalidArgument("type", f"unknown request type {kind}"))

    async def refuse(self, error: ChatError) -> None:
        """Answer a request that could not be read (it does not decode) with an ERROR."""
        await self.outbox.wait_below(self._request_backlog)
        self._error(Request(), error)

    def finish_input(self) -> None:
        """The client half-closed the stream: answer what is queued, then close the outbox."""
        self._input_done = True
        self._maybe_finish()

    def drain(self) -> None:
        """The server is shutting down: once the queued turns are answered, tell the client.

        The client is sent a STATUS event with ``error_code`` UNAVAILABLE, asking it to end
        its side of the stream and reconnect; the stream then ends with status OK. (Ending it
        from the server side while the client still sends makes grpclib reset the stream,
        and a grpclib client then drops the events it has not read yet.) A client that does
        not end its side is cancelled when the grace period is over.
        """
        self._draining = True
        self._maybe_finish()

    def interrupt(self) -> None:
        """The grace period is over: stop every turn of this stream now, then end it.

        A queued turn gets an ERROR (UNAVAILABLE) and stores nothing; a reply streaming
        stops, keeps as INTERRUPTED exactly the text its client was sent, and ends with an
        ERROR (UNAVAILABLE, with its chunk count). Then comes the STATUS asking the client
        to end the stream and reconnect; when it does, the stream ends with OK. (Ending it
        from this side first would make a grpclib client fail the call.) The server closes
        the connections of clients that do not, shortly after.
        """
        for lane in self._lanes.values():
            while lane.pending:
                turn = lane.pending.popleft()
                turn.cancelled = turn.interrupted = True
                self._complete_cancelled(turn)
            current = lane.current
            if current is not None and not current.cancelled:
                current.cancelled = current.interrupted = True
                if current.generation is not None:
                    current.generation.cancel()
        self._maybe_finish()

    @property
    def queued_turns(self) -> int:
        """Turns accepted on this stream and waiting for an earlier one of their session."""
        return sum(len(lane.pending) for lane in self._lanes.values())

    def _maybe_finish(self) -> None:
        if self._lanes or self._replays:
            return
        if self._draining and not self._input_done:
            self._draining = False  # say it once
            self.outbox.put_nowait(
                Event(
                    EventKind.STATUS,
                    # For people; clients act on status_kind (the README says what to do).
                    status_message="the server is shutting down",
                    error_code=int(Unavailable.status),
                    status_kind=StatusKind.SHUTDOWN,
                )
            )
        if self._input_done:
            # Watches last as long as the client sends; its half-close ends them.
            for task in self._watches.values():
                task.cancel()
            self.outbox.close()

    def _error(self, request: Request, error: ChatError) -> None:
        """Send an ERROR for a request that is not (or not yet) a turn."""
        self.outbox.put_nowait(_error_event(request, error))

    def _turn_error(self, turn: _Turn, error: ChatError) -> None:
        """End ``turn`` with an ERROR (after its reply started, it ends the reply)."""
        event = _error_event(turn.request, error, turn.reply)
        if not turn.started:
            event.finish_reason = FinishReason.UNSPECIFIED
        self._final(turn, event)

    def _final(self, turn: _Turn, event: Event) -> None:
        """Send the final event of ``turn`` (it ends the turn's replay log)."""
        turn.ended = True
        turn.sink.put_nowait(event)

    async def _admit(self, request: Request) -> bool:
        """Count the turn against the identity's quotas; an ERROR (nothing stored) if over."""
        quotas = self._core.quotas
        if quotas.quotas.messages is None and quotas.quotas.tokens is None:
            return True
        try:
            await quotas.admit_message(self.identity.name)
        except (QuotaExceeded, Unavailable) as error:
            self._core.stats.total_requests += 1
            self._core.stats.failed_requests += 1
            if isinstance(error, QuotaExceeded):
                self._core.observer.rate_limited(error.limit)
            self._error(request, error)
            return False
        return True

    async def _start_turn(self, request: Request) -> None:
        """A MESSAGE or RETRY: a resend attaches to its turn; a session whose turn runs
        applies its concurrency policy; else the turn is queued in its lane."""
        core = self._core
        if self._validate_turn(request) is not None:
            self._submit_turn(request)
            return
        session_id = request.session_id
        turn_id = _new_turn_id()
        session: Session | None = None
        resend = request.client_message_id if request.kind == RequestKind.MESSAGE else ""
        try:
            if resend:
                # The owner's first: another identity must not take a message id (nor
                # learn, by an answer, that the session exists).
                session = await core._owned(session_id, self.identity, admin=False)
                claimed = await core.replay.claim(session_id, resend, turn_id)
                if claimed is not None:
                    core.stats.total_requests += 1
                    self._replay(request, claimed, 0)
                    return
            running = await core.replay.running_turn(session_id)
            if running is not None:
                if session is None:
                    session = await core._owned(session_id, self.identity, admin=False)
                policy = session.concurrency_policy
                if policy is ConcurrencyPolicy.REJECT:
                    # A turn of its own (and logged), so that a resend of this message
                    # gets the same answer.
                    core.stats.total_requests += 1
                    core.stats.failed_requests += 1
                    turn = self._new_turn(request, turn_id)
                    rejected = _rejected()
                    self._observe_refused(request, turn.received, rejected, turn_id)
                    self._turn_error(turn, rejected)
                    self._turn_done(turn)
                    return
                if policy is ConcurrencyPolicy.INTERRUPT:
                    core._cancel_session_turns(session_id)
                    # The running turn may be another server's.
                    await core.replay.interrupt(session_id)
        except ChatError as error:
            core.stats.total_requests += 1
            core.stats.failed_requests += 1
            # Counted as a turn that failed, as one refused in its lane is (metrics, the
            # access log): whether the client sent a client_message_id does not matter.
            self._observe_refused(request, time.monotonic(), error, turn_id)
            self._error(request, error)
            return
        self._submit_turn(request, turn_id)

    def _observe_refused(
        self, request: Request, received: float, error: ChatError, turn_id: str
    ) -> None:
        """Report a turn refused before it reached a lane: it failed with ``error``."""
        observed = self._core.observer.turn(request, received=received, turn_id=turn_id)
        observed.finished(FinishReason.ERROR, None, chunks=0, error=error)

    def _new_turn(self, request: Request, turn_id: str) -> _Turn:
        turn = _Turn(request, sink=self.outbox)
        reply = turn.reply
        reply.turn_id = turn_id
        reply.log = self._core.replay.begin(request.session_id, turn_id, request.request_id)
        self._own_turns.add(turn_id)
        return turn

    def _turn_done(self, turn: _Turn) -> None:
        if turn.request.session_id not in self._watches:
            self._own_turns.discard(turn.reply.turn_id)

    def _submit_turn(self, request: Request, turn_id: str = "") -> None:
        core = self._core
        core.stats.total_requests += 1
        error = self._validate_turn(request)
        if error is not None:
            core.stats.failed_requests += 1
            self._error(request, error)
            return
        lane = self._lanes.get(request.session_id)
        if lane is None:
            lane = self._lanes[request.session_id] = _Lane()
        turn = self._new_turn(request, turn_id or _new_turn_id())
        turn.observed = core.observer.turn(
            request, received=turn.received, turn_id=turn.reply.turn_id
        )
        lane.pending.append(turn)
        if lane.worker is None:
            lane.worker = asyncio.create_task(self._serve_lane(request.session_id, lane))

    def _validate_turn(self, request: Request) -> ChatError | None:
        if self._core.draining or self._closing:
            return Unavailable(
                "the server is shutting down and takes no new messages; "
                "send it again once connected to a server"
            )
        if not request.session_id:
            return InvalidArgument("session_id", "is required; create a session first")
        if request.kind == RequestKind.MESSAGE and not request.message.strip():
            return InvalidArgument("message", "must not be empty")
        return None

    async def _cancel(self, request: Request) -> None:
        if not request.request_id and not request.session_id:
            self._error(
                request,
                InvalidArgument("request_id", "CANCEL needs the request_id or session_id to stop"),
            )
            return
        targets = self._cancel_targets(request)
        if targets:
            self._cancel_turns(targets)
            return
        # A reply this identity left running on a stream that went away (and resumed here,
        # say) is stopped as if it were this stream's.
        core = self._core
        if core._cancel_detached(self.identity.name, request):
            return
        # ...or on another server sharing the replay log (the stream that went away was
        # there): passed on; whether a turn of the session runs says if it can find one.
        try:
            await core.replay.cancel(self.identity.name, request.session_id, request.request_id)
            running = request.session_id and await core.replay.running_turn(request.session_id)
            if running and not core._runs_here(running):
                return
        except ChatError as error:
            self._error(request, error)
            return
        what = request.request_id or f"session {request.session_id}"
        self.outbox.put_nowait(
            Event(
                EventKind.STATUS,
                session_id=request.session_id,
                request_id=request.request_id,
                status_message=f"nothing to cancel: no reply in flight or queued for {what}",
                status_kind=StatusKind.NOTHING_TO_CANCEL,
            )
        )

    def _cancel_targets(self, request: Request) -> list[tuple[str, _Turn]]:
        """This stream's turns a CANCEL names: by ``request_id``, else all of ``session_id``."""
        if request.request_id:
            return [
                (sid, turn)
                for sid, lane in self._lanes.items()
                for turn in (lane.current, *lane.pending)
                if turn is not None and turn.request.request_id == request.request_id
            ]
        lane = self._lanes.get(request.session_id)
        if lane is None:
            return []
        return [(request.session_id, t) for t in (lane.current, *lane.pending) if t is not None]

    def _cancel_turns(self, targets: Sequence[tuple[str, _Turn]]) -> None:
        for session_id, turn in targets:
            turn.cancelled = True
            lane = self._lanes[session_id]
            if turn is lane.current:
                if turn.generation is not None:
                    turn.generation.cancel()
            else:
                # Never started: answer at once; nothing is stored.
                lane.pending.remove(turn)
                self._complete_cancelled(turn)

    def cancel_session(self, session_id: str) -> None:
        """Cancel every turn of ``session_id`` on this stream (running or queued)."""
        lane = self._lanes.get(session_id)
        if lane is not None:
            self._cancel_turns(
                [(session_id, t) for t in (lane.current, *lane.pending) if t is not None]
            )

    async def _typing(self, request: Request) -> None:
        try:
            session = await self._core._owned(request.session_id, self.identity, admin=False)
        except ChatError as error:
            self._error(request, error)
            return
        self._follow(session.session_id)
        if request.kind == RequestKind.TYPING_START:
            kind, text = SessionUpdateKind.TYPING_STARTED, "typing started"
        else:
            kind, text = SessionUpdateKind.TYPING_STOPPED, "typing stopped"
        self._core._publish(session, kind, text, exclude=self)

    def _follow(self, session_id: str) -> None:
        if session_id not in self._sessions:
            self._sessions.add(session_id)
            self._core._subscribe(session_id, self)

    # -- replay: RESUME, resends, WATCH ---------------------------------------------------------

    async def _resume(self, request: Request) -> None:
        core = self._core
        try:
            await core._owned(request.session_id, self.identity, admin=False)
            if not request.turn_id:
                raise InvalidArgument("turn_id", "is required: the turn to resume")
            if request.after_seq < 0:
                raise InvalidArgument("after_seq", "must not be negative")
        except ChatError as error:
            self._error(request, error)
            return
        core.stats.resumed_turns += 1
        self._replay(request, request.turn_id, request.after_seq)

    def _replay(self, request: Request, turn_id: str, after_seq: int) -> None:
        """Send the events of ``turn_id`` after ``after_seq`` into this stream, then its
        live ones to its end, with the request's ``request_id`` (if it has one)."""
        task = asyncio.create_task(self._send_replay(request, turn_id, after_seq))
        self._replays.add(task)
        task.add_done_callback(self._replay_done)

    def _replay_done(self, task: asyncio.Task[None]) -> None:
        self._replays.discard(task)
        if not self._closing:
            self._maybe_finish()

    async def _send_replay(self, request: Request, turn_id: str, after_seq: int) -> None:
        core = self._core
        request_id = request.request_id
        outbox = self.outbox
        try:
            follow = core.replay.follow(request.session_id, turn_id, after_seq)
            async with aclosing(follow) as events:
                async for event in events:
                    if not await outbox.put(_replayed(event, request_id)):
                        return
        except TurnNotFound as error:
            self._error(request, await self._forgotten(request.session_id, turn_id, error))
        except ChatError as error:
            self._error(request, error)

    async def _forgotten(self, session_id: str, turn_id: str, error: ChatError) -> ChatError:
        """OUT_OF_RANGE rather than NOT_FOUND for a turn the log no longer has but the
        history does (this process's log may never have had it: another replica's, or
        from before a restart)."""
        try:
            history = await self._core.store.messages(session_id)
        except ChatError:
            return error
        if any(message.turn_id == turn_id for message in history):
            return TurnOutOfRange(turn_id)
        return error

    async def _watch(self, request: Request) -> None:
        session_id = request.session_id
        try:
            await self._core._owned(session_id, self.identity, admin=False)
        except ChatError as error:
            self._error(request, error)
            return
        if session_id not in self._watches:
            if session_id not in self._sessions:
                self._watch_follows.add(session_id)
                self._follow(session_id)
            self._watches[session_id] = asyncio.create_task(self._send_watch(session_id))
        self.outbox.put_nowait(
            Event(
                EventKind.STATUS,
                session_id=session_id,
                request_id=request.request_id,
                status_message="watching the session",
                status_kind=StatusKind.WATCHING,
            )
        )

    def _unwatch(self, request: Request) -> None:
        session_id = request.session_id
        task = self._watches.pop(session_id, None)
        if task is not None:
            task.cancel()
        if session_id in self._watch_follows:
            self._watch_follows.discard(session_id)
            self._sessions.discard(session_id)
            self._core._unsubscribe(session_id, self)
        self.outbox.put_nowait(
            Event(
                EventKind.STATUS,
                session_id=session_id,
                request_id=request.request_id,
                status_message="not watching the session",
                status_kind=StatusKind.NOT_WATCHING,
            )
        )

    async def _send_watch(self, session_id: str) -> None:
        """The events of the session's turns, as their senders got them; those of this
        stream's own turns it has already."""
        core = self._core
        own = self._own_turns
        outbox = self.outbox
        core.stats.active_watchers += 1
        core.observer.watchers_changed(1)
        try:
            async with aclosing(core.replay.watch(session_id)) as events:
                async for event in events:
                    if event.turn_id in own:
                        if event.kind is EventKind.RESPONSE_COMPLETE or event.kind is (
                            EventKind.ERROR
                        ):
                            own.discard(event.turn_id)
                        continue
                    if not await outbox.put(_replayed(event)):
                        return
        finally:
            core.stats.active_watchers -= 1
            core.observer.watchers_changed(-1)
            if self._watches.get(session_id) is asyncio.current_task():
                del self._watches[session_id]

    # -- turns ------------------------------------------------------------------------------

    async def _serve_lane(self, session_id: str, lane: _Lane) -> None:
        try:
            while lane.pending:
                turn = lane.current = lane.pending.popleft()
                with turn.observed.running():
                    await self._run_turn(turn)
                lane.current = None
        finally:
            lane.current = None
            # This frame (kept by the traceback of a CancelledError, which the task keeps)
            # refers to the lane: without this, task and lane would form a cycle holding
            # every buffer of the turn until the cyclic collector runs.
            lane.worker = None
            if self._lanes.get(session_id) is lane:
                del self._lanes[session_id]
            if self._closing:
                if not self._lanes:
                    self._core._detached_done(self)
            else:
                self._maybe_finish()

    async def _run_turn(self, turn: _Turn) -> None:
        core = self._core
        request = turn.request
        session_id = request.session_id
        try:
            # Before the lock: waiting for another identity's turn to end would tell that
            # the session exists.
            await core._owned(session_id, self.identity, admin=False)
            async with core.store.lock(session_id):
                session = await core.retention.turn_starting(session_id)
                policy = session.on_disconnect or core.on_disconnect
                turn.continues = policy is DisconnectPolicy.CONTINUE
                self._follow(session_id)
                history = await core.store.messages(session_id)
                text = request.message
                if request.kind == RequestKind.RETRY:
                    text = _failed_user_message(history)
                if turn.cancelled:
                    self._complete_cancelled(turn)
                    return
                model = session.model or core.backend.default_model
                try:
                    context = core.context.build(session, history, text, model=model)
                    # The context holds what the model needs; the history read for it (a
                    # copy of every message, from SQLite or Redis) can go now, not after
                    # the reply.
                    del history
                except ContextTooLong:
                    # Kept, marked FAILED, so that RETRY can send it once the policy, the
                    # model or the history allows.
                    await self._store_turn(turn, session, text, model, MessageStatus.FAILED)
                    raise
                if context.omitted:
                    plural = "" if context.omitted == 1 else "s"
                    await turn.sink.put(
                        Event(
                            EventKind.STATUS,
                            session_id=session_id,
                            request_id=request.request_id,
                            status_message=(
                                f"{context.omitted} older message{plural} left out to fit "
                                f"the context window of {model} ({context.budget} tokens "
                                "for the prompt)"
                            ),
                            omitted_messages=context.omitted,
                            status_kind=StatusKind.CONTEXT_TRUNCATED,
                            reply=turn.reply,
                        )
                    )
                start = Event(
                    EventKind.RESPONSE_START,
                    session_id=session_id,
                    request_id=request.request_id,
                    context_messages=context.conversation_messages,
                    omitted_messages=context.omitted,
                    model=model,
                    reply=turn.reply,
                )
                turn.prompt_tokens = context.tokens
                turn.observed.started(model, context.omitted)
                generation = GenerationRequest(
                    model,
                    context.messages,
                    request.request_id,
                    max_output_tokens=context.max_output_tokens,
                )
                await self._generate(turn, session, text, generation, start)
                if turn.usage is not None:
                    # What the model counted corrects the server's count for later turns.
                    core.context.observe(model, context, turn.usage.prompt_tokens)
        except ChatError as error:
            core.stats.failed_requests += 1
            turn.observed.finished(FinishReason.ERROR, turn.usage, chunks=turn.chunks, error=error)
            self._turn_error(turn, error)
        except asyncio.CancelledError:
            if not turn.ended:
                # Followers and watchers of the turn (its log) see it end.
                self._final(turn, _cancelled_event(turn))
            raise
        except Exception:
            log.exception("turn %r on session %s failed", request.request_id, session_id)
            core.stats.failed_requests += 1
            internal = ChatError("internal server error; the turn was not stored")
            turn.observed.finished(
                FinishReason.ERROR, turn.usage, chunks=turn.chunks, error=internal
            )
            self._turn_error(turn, internal)
        finally:
            turn.release()
            self._turn_done(turn)

    def _complete_cancelled(self, turn: _Turn) -> None:
        """Answer a turn cancelled before it reached the model: nothing is stored."""
        self._core.stats.cancelled_requests += 1
        turn.observed.finished(FinishReason.CANCELLED, None, chunks=0)
        if turn.interrupted:
            self._turn_error(turn, _shutdown_error())
        else:
            self._final(turn, _cancelled_event(turn))
        self._turn_done(turn)

    async def _generate(
        self,
        turn: _Turn,
        session: Session,
        text: str,
        generation: GenerationRequest,
        start: Event,
    ) -> None:
        """Send ``start`` (RESPONSE_START), stream the model's reply, store the turn, and end
        it with COMPLETE or ERROR."""
        core = self._core
        await turn.sink.wait_below(core.limits.outbox_high_water)
        core.stats.active_replies += 1
        task = turn.generation = asyncio.create_task(self._pump(turn, generation))
        # RESPONSE_START is queued once the pump task exists (nothing runs in between, so it
        # still leaves first): the pump then takes its first step before the writer wakes.
        # A model that answers at once (echo) has its first chunks queued by then, and they
        # leave with RESPONSE_START in one write; a remote model suspends on its request, and
        # the writer sends RESPONSE_START in the same pass of the loop as before.
        turn.sink.put_nowait(start)
        turn.started = True
        if turn.cancelled:
            task.cancel()
        try:
            try:
                await asyncio.wait((task,))
            except asyncio.CancelledError:
                # The stream is closing (client gone, or shutdown past its grace period):
                # stop the model, keep what it said, and let the cancellation go on.
                task.cancel()
                await asyncio.wait((task,))
                status = MessageStatus.INTERRUPTED if core.draining else MessageStatus.CANCELLED
                core.stats.cancelled_requests += 1
                # A store error is logged by _write_turn; the stream is gone, so there is
                # nobody to tell. What was queued but never written is not kept.
                with contextlib.suppress(ChatError):
                    await self._store_turn(
                        turn, session, text, generation.model, status, sent_only=True
                    )
                    await asyncio.shield(self._spend(turn))
                turn.observed.finished(FinishReason.CANCELLED, turn.usage, chunks=turn.chunks)
                self._final(turn, _cancelled_event(turn))
                raise
        finally:
            turn.generation = None
            core.stats.active_replies -= 1

        if task.cancelled():
            turn.finish = FinishReason.CANCELLED
            core.stats.cancelled_requests += 1
            if turn.interrupted:
                await self._end_interrupted(turn, session, text, generation.model)
                return
            status = MessageStatus.CANCELLED
        elif (error := task.exception()) is not None:
            if not isinstance(error, BackendError):
                log.error("backend %s failed", core.backend.name, exc_info=error)
                error = BackendError(f"the model backend failed: {error}")
            assert isinstance(error, ChatError)
            await self._store_turn(turn, session, text, generation.model, MessageStatus.FAILED)
            await self._spend(turn)
            core.stats.failed_requests += 1
            turn.observed.finished(FinishReason.ERROR, turn.usage, chunks=turn.chunks, error=error)
            self._turn_error(turn, error)
            return
        else:
            status = MessageStatus.COMPLETE
        stored = await self._store_turn(turn, session, text, generation.model, status)
        await self._spend(turn)
        processing_time = time.monotonic() - turn.received
        if status is MessageStatus.COMPLETE:
            core.stats.record_success(processing_time)
        turn.observed.finished(turn.finish, turn.usage, chunks=turn.chunks)
        self._final(
            turn,
            Event(
                EventKind.RESPONSE_COMPLETE,
                session_id=session.session_id,
                request_id=turn.request.request_id,
                processing_time=processing_time,
                message_count=stored.message_count,
                finish_reason=turn.finish,
                usage=turn.usage,
                model=generation.model,
                reply=turn.reply,
            ),
        )
        core._publish(stored, SessionUpdateKind.TURN_COMPLETED, "reply completed", exclude=self)

    async def _end_interrupted(self, turn: _Turn, session: Session, text: str, model: str) -> None:
        """Keep a reply the end of the grace period stopped, then send its final event.

        The writer is given the chunks already queued first (bounded: the server cancels
        the stream soon after), so that the stored text is what the client was sent.
        """
        queued = len(turn.text())
        status = MessageStatus.INTERRUPTED
        error = _shutdown_error()
        try:
            await turn.reply.wait_sent(queued)
        except asyncio.CancelledError:
            with contextlib.suppress(ChatError):
                await self._store_turn(turn, session, text, model, status, sent_only=True)
                await asyncio.shield(self._spend(turn))
            turn.observed.finished(FinishReason.ERROR, turn.usage, chunks=turn.chunks, error=error)
            raise
        await self._store_turn(turn, session, text, model, status, sent_only=True)
        await self._spend(turn)
        turn.observed.finished(FinishReason.ERROR, turn.usage, chunks=turn.chunks, error=error)
        self._turn_error(turn, error)

    async def _pump(self, turn: _Turn, generation: GenerationRequest) -> None:
        limit = self._core.limits.max_chunk_chars
        session_id = turn.request.session_id
        request_id = turn.request.request_id
        parts = turn.parts
        delta: Delta
        # Chunks queued since the loop last turned, as far as the pump can tell.
        burst = 0
        last = time.perf_counter()
        async with aclosing(self._core.backend.generate(generation)) as deltas:
            async for delta in deltas:
                text = delta.text
                while text:
                    piece, text = text[:limit], text[limit:]
                    chunk = Event(
                        EventKind.CHUNK,
                        session_id=session_id,
                        request_id=request_id,
                        chunk_text=piece,
                        reply=turn.reply,
                    )
                    sink = turn.sink
                    if not await sink.put(chunk) and turn.sink is not sink:
                        # The stream went away while this waited; the turn runs on.
                        turn.sink.put_nowait(chunk)
                    if not parts:
                        turn.observed.first_token()
                    # Only after the chunk is queued: the stored reply is exactly what the
                    # client is sent, even when a cancel lands while waiting for the client.
                    parts.append(piece)
                    turn.chunks += 1
                    if len(parts) >= _PARTS_PER_BLOCK:
                        turn.compact()
                    now = time.perf_counter()
                    if now - last > _WAITED:
                        burst = 0
                    last = now
                    burst += 1
                    if burst >= _CHUNKS_PER_TURN_OF_THE_LOOP:
                        await asyncio.sleep(0)
                        burst = 0
                if delta.finish_reason is not None:
                    turn.finish = delta.finish_reason
                if delta.usage is not None:
                    turn.usage = self._checked_usage(delta.usage)

    def _spend(self, turn: _Turn) -> Coroutine[None, None, None]:
        """Count the turn's tokens against the identity's budget (if there is one): what
        the backend reported, else the prompt as counted plus an estimate of the reply.

        The count is taken now (the turn's text is dropped when the turn ends, possibly
        before a shielded spend runs); the returned awaitable records it.
        """
        if self._core.quotas.quotas.tokens is None:
            return self._spend_tokens(None)
        usage = turn.usage
        if usage is not None and usage.total_tokens > 0:
            tokens = usage.total_tokens
        else:
            tokens = turn.prompt_tokens + estimate_tokens(turn.text())
        return self._spend_tokens(tokens)

    async def _spend_tokens(self, tokens: int | None) -> None:
        if tokens is None:
            return
        try:
            await self._core.quotas.spend_tokens(self.identity.name, tokens)
        except Unavailable as error:
            log.warning("could not count %d tokens of %s: %s", tokens, self.identity.name, error)

    def _checked_usage(self, usage: Usage) -> Usage | None:
        """``usage`` if its counts fit the wire (int32, not negative), else ``None``.

        A count that does not fit would make the encoder refuse the event, which ends the
        whole stream; an upstream that reports such numbers is wrong anyway.
        """
        counts = (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
        if all(0 <= count <= _INT32_MAX for count in counts):
            return usage
        log.warning(
            "ignoring the token usage the %s backend reported (%d prompt, %d completion): "
            "not a count the protocol can carry",
            self._core.backend.name,
            usage.prompt_tokens,
            usage.completion_tokens,
        )
        return None

    async def _store_turn(
        self,
        turn: _Turn,
        session: Session,
        text: str,
        model: str,
        status: MessageStatus,
        *,
        sent_only: bool = False,
    ) -> Session:
        """Write the user message and the (possibly partial) reply in one append.

        The write goes on when the stream closes meanwhile: a client that leaves just as its
        reply ends must not lose the turn (cancelled in the middle, a Redis append may be
        sent or not). A second cancellation (a shutdown past its grace period) gives up.
        """
        write = asyncio.create_task(
            self._write_turn(turn, session, text, model, status, sent_only=sent_only)
        )
        try:
            return await asyncio.shield(write)
        except asyncio.CancelledError:
            try:
                await asyncio.wait((write,))
            finally:
                if not write.done():
                    write.cancel()
                elif not write.cancelled():
                    # Nobody is left to tell; a ChatError is logged by _write_turn.
                    error = write.exception()
                    if error is not None and not isinstance(error, ChatError):
                        log.error(
                            "could not store a turn of session %s",
                            session.session_id,
                            exc_info=error,
                        )
            raise

    async def _write_turn(
        self,
        turn: _Turn,
        session: Session,
        text: str,
        model: str,
        status: MessageStatus,
        *,
        sent_only: bool = False,
    ) -> Session:
        request_id = turn.request.request_id
        now = utcnow()
        user_status = (
            MessageStatus.FAILED if status is MessageStatus.FAILED else (MessageStatus.COMPLETE)
        )
        turn_id = turn.reply.turn_id
        messages = [Message(Role.USER, text, now, user_status, request_id, turn_id=turn_id)]
        reply = turn.text()
        if sent_only:
            # A reply cut short keeps what reached the stream, not what was still queued.
            reply = reply[: turn.reply.sent_chars]
        # A failed turn keeps its reply only if the model said something; any other turn
        # that reached the model keeps its (possibly empty, possibly partial) reply.
        if reply or status is not MessageStatus.FAILED:
            messages.append(
                Message(Role.ASSISTANT, reply, now, status, request_id, model, turn.usage, turn_id)
            )
        try:
            stored = await self._core.store.append(session.session_id, messages)
        except ChatError as error:
            log.warning(
                "could not store turn %r of session %s: %s",
                request_id,
                session.session_id,
                error.detail,
            )
            raise
        return await self._core.retention.turn_stored(stored)

    # -- shutdown ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """The stream is gone: a reply whose session says ``continue`` runs on into its
        replay log; every other turn is cancelled (keeping its partial reply). Then
        unsubscribe and close the outbox."""
        if self._closing:
            return
        self._closing = True
        core = self._core
        # What the turns say from now on goes to their logs alone: all of it for a reply
        # that runs on, else only what ends it (its chunks would never reach the client,
        # and are not stored either).
        sinks: dict[int, LogSink] = {}
        detached: list[_Lane] = []
        workers = []
        for lane in self._lanes.values():
            current = lane.current
            # Not while the server drains: it cannot keep a reply beyond its grace period.
            if (
                current is not None
                and current.continues
                and not current.cancelled
                and not core.draining
            ):
                current.sink = LOG_SINK
                detached.append(lane)
            elif current is not None:
                current.sink = FINAL_SINK
                sinks[id(current.reply)] = FINAL_SINK
            while lane.pending:
                turn = lane.pending.popleft()
                turn.sink = FINAL_SINK
                sinks[id(turn.reply)] = FINAL_SINK
                turn.cancelled = True
                self._final(turn, _cancelled_event(turn))
                self._turn_done(turn)
            if lane not in detached and lane.worker is not None:
                workers.append(lane.worker)
        for event in self.outbox.take_pending():
            if event.reply is not None:
                sinks.get(id(event.reply), LOG_SINK).put_nowait(event)
        self.outbox.close()
        tasks = [*workers, *self._replays, *self._watches.values()]
        for task in tasks:
            task.cancel()
        try:
            if tasks:
                await asyncio.wait(tasks)
        finally:
            for session_id in self._sessions:
                core._unsubscribe(session_id, self)
            self._sessions.clear()
            self._lanes = {sid: lane for sid, lane in self._lanes.items() if lane in detached}
            if self._lanes:
                core._detached.add(self)
            core._stream_closed(self)


def shown(session: Session, identity: Identity) -> Session:
    """``session`` as ``identity`` may see it: the owner is shown to administrators only."""
    if identity.admin or not session.owner:
        return session
    return dataclasses.replace(session, owner="")


def _new_turn_id() -> str:
    # 64 random bits in 11 characters: it goes out with every event of the turn.
    return secrets.token_urlsafe(8)


def _error_event(request: Request, error: ChatError, reply: ReplyCounter | None = None) -> Event:
    event = Event(
        EventKind.ERROR,
        session_id=request.session_id,
        request_id=request.request_id,
        error_message=error.message,
        error_code=int(error.status),
        error_field=error.field if isinstance(error, InvalidArgument) else "",
        reply=reply,
        finish_reason=FinishReason.UNSPECIFIED if reply is None else FinishReason.ERROR,
    )
    if isinstance(error, RateLimited) and error.retry_after is not None:
        event.retry_after = error.retry_after
    return event


def _cancelled_event(turn: _Turn) -> Event:
    return Event(
        EventKind.RESPONSE_COMPLETE,
        session_id=turn.request.session_id,
        request_id=turn.request.request_id,
        finish_reason=FinishReason.CANCELLED,
        processing_time=time.monotonic() - turn.received,
        reply=turn.reply,
    )


def _rejected() -> Aborted:
    return Aborted(
        "a reply of this session is running and the session's concurrency policy is "
        "reject: send the message again once it ends"
    )


def _shutdown_error() -> Unavailable:
    return Unavailable(
        "the server is shutting down: this reply was cut short (what was sent of it is kept, "
        "marked interrupted); reconnect, to another replica if there is one, to go on"
    )


def _failed_user_message(history: Sequence[Message]) -> str:
    """The text of the last user message if its turn failed; the thing RETRY resends."""
    for message in reversed(history):
        if message.role is Role.USER:
            if message.status is MessageStatus.FAILED:
                return message.content
            break
    raise FailedPrecondition("nothing to retry: the last message of this session did not fail")
