"""Counters the server measures about itself (``GetServerStats``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

from chat.types import utcnow

__all__ = ["ServerStats", "StatsSnapshot"]


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """The counters at one moment, plus what only the caller knows (store, backend)."""

    uptime_seconds: float
    started_at: datetime
    total_requests: int
    successful_requests: int
    failed_requests: int
    cancelled_requests: int
    total_sessions_created: int
    avg_response_time: float
    active_streams: int
    active_replies: int
    total_chunks_sent: int
    expired_sessions: int
    evicted_sessions: int
    trimmed_messages: int


@dataclass(slots=True)
class ServerStats:
    """Mutable counters owned by one :class:`~chat.core.ChatCore` (never module-global)."""

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

    def record_success(self, processing_time: float) -> None:
        self.successful_requests += 1
        self.response_time_total += processing_time

    def snapshot(self) -> StatsSnapshot:
        done = self.successful_requests
        return StatsSnapshot(
            uptime_seconds=time.monotonic() - self.started_monotonic,
            started_at=self.started_at,
            total_requests=self.total_requests,
            successful_requests=done,
            failed_requests=self.failed_requests,
            cancelled_requests=self.cancelled_requests,
            total_sessions_created=self.total_sessions_created,
            avg_response_time=self.response_time_total / done if done else 0.0,
            active_streams=self.active_streams,
            active_replies=self.active_replies,
            total_chunks_sent=self.total_chunks_sent,
            expired_sessions=self.expired_sessions,
            evicted_sessions=self.evicted_sessions,
            trimmed_messages=self.trimmed_messages,
        )
