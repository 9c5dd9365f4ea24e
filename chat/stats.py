"""The server's statistics (``GetServerStats``): counters, and the snapshot clients read.

:class:`ServerStatsInfo` is the one list of statistics: the server's snapshot, the fields of
``ServerStatsResponse`` (a test checks they agree) and what :meth:`chat.ChatClient.server_stats`
returns are all this class, converted by name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from datetime import datetime

from chat.replay import ReplayStats
from chat.types import utcnow

__all__ = ["ServerStats", "ServerStatsInfo"]


@dataclass(frozen=True, slots=True)
class ServerStatsInfo:
    """The server's statistics at one moment (``GetServerStats``)."""

    #: Server software version.
    version: str
    #: Model backend name (echo, openai, gemini).
    backend: str
    #: The server's default model.
    model: str
    #: Session store kind (memory, sqlite, redis).
    store: str
    #: When the server started (``None`` if a server did not say).
    started_at: datetime | None
    uptime_seconds: float
    #: MESSAGE and RETRY requests received on Chat streams.
    total_requests: int
    #: Requests whose reply completed (finish reason stop or length).
    successful_requests: int
    #: Requests answered with an ERROR, or whose reply ended with finish reason error.
    failed_requests: int
    #: Replies that ended cancelled (CANCEL or the client going away).
    cancelled_requests: int
    #: Sessions currently stored.
    active_sessions: int
    #: Sessions created through this server process.
    total_sessions_created: int
    #: Mean processing time of completed replies, in seconds.
    avg_response_time: float
    #: Chat streams open now.
    active_streams: int
    #: Replies in flight now.
    active_replies: int
    #: CHUNK events sent.
    total_chunks_sent: int
    #: Sessions removed by retention: idle too long, over the cap, messages over the cap.
    expired_sessions: int
    evicted_sessions: int
    trimmed_messages: int
    #: The server cannot reach its session store now (``active_sessions`` is the last count).
    store_unreachable: bool = False
    #: Streams watching a session now (WATCH).
    active_watchers: int = 0
    #: Turns the replay log holds now (running, or ended within the replay window).
    replay_turns: int = 0
    #: Their size, as the replay log counts it (text plus a fixed overhead per event).
    replay_bytes: int = 0
    #: Events the replay log dropped to stay within its size.
    replay_evicted_events: int = 0
    #: Ended turns the replay log dropped at the end of the replay window.
    replay_expired_turns: int = 0
    #: RESUME requests served.
    resumed_turns: int = 0


#: What the snapshot takes from outside the counters (the core knows these).
_CONTEXT = (
    "version",
    "backend",
    "model",
    "store",
    "active_sessions",
    "store_unreachable",
    "replay_turns",
    "replay_bytes",
    "replay_evicted_events",
    "replay_expired_turns",
)
#: What the snapshot computes from the counters.
_COMPUTED = ("uptime_seconds", "avg_response_time")


@dataclass(slots=True)
class ServerStats:
    """Mutable counters owned by one :class:`~chat.core.ChatCore` (never module-global).

    Every field of :class:`ServerStatsInfo` that is neither context nor computed is a counter
    of the same name here.
    """

    started_at: datetime = field(default_factory=utcnow)
    started_monotonic: float = field(default_factory=time.monotonic)
    total_requests: int = 0
    successful_requests: int = 0
    failed_requests: int = 0
    cancelled_requests: int = 0
    total_sessions_created: int = 0
    response_time_total: float = 0.0
    active_streams: int = 0
    active_replies: int = 0
    total_chunks_sent: int = 0
    expired_sessions: int = 0
    evicted_sessions: int = 0
    trimmed_messages: int = 0
    active_watchers: int = 0
    resumed_turns: int = 0

    def record_success(self, processing_time: float) -> None:
        self.successful_requests += 1
        self.response_time_total += processing_time

    def snapshot(
        self,
        *,
        version: str,
        backend: str,
        model: str,
        store: str,
        active_sessions: int,
        store_unreachable: bool = False,
        replay: ReplayStats | None = None,
    ) -> ServerStatsInfo:
        done = self.successful_requests
        counters = {
            f.name: getattr(self, f.name)
            for f in fields(ServerStatsInfo)
            if f.name not in _CONTEXT and f.name not in _COMPUTED
        }
        return ServerStatsInfo(
            version=version,
            backend=backend,
            model=model,
            store=store,
            active_sessions=active_sessions,
            store_unreachable=store_unreachable,
            replay_turns=0 if replay is None else replay.turns,
            replay_bytes=0 if replay is None else replay.bytes,
            replay_evicted_events=0 if replay is None else replay.evicted_events,
            replay_expired_turns=0 if replay is None else replay.expired_turns,
            uptime_seconds=time.monotonic() - self.started_monotonic,
            avg_response_time=self.response_time_total / done if done else 0.0,
            **counters,
        )
