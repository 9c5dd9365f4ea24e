"""Opaque page cursors for keyset pagination over (created_at, session_id)."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime

from chat.errors import InvalidArgument
from chat.types import format_timestamp, parse_timestamp

__all__ = ["decode_cursor", "encode_cursor"]


def encode_cursor(created_at: datetime, session_id: str) -> str:
    """A URL-safe token naming the last session of a page."""
    raw = f"{format_timestamp(created_at)}|{session_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Invert :func:`encode_cursor`; ``InvalidArgument('page_token', ...)`` if not one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, sep, session_id = raw.partition("|")
        if not sep or not session_id:
            raise ValueError(cursor)
        return parse_timestamp(stamp), session_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(
            "page_token", "is not a token returned by ListSessions; start again without one"
        ) from None
