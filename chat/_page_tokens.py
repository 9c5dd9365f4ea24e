"""Page tokens: a store's cursor, signed, so that ListSessions only takes back what it gave.

A token is ``base64url(version | cursor | tag)``, where ``tag`` is the first 16 bytes of an
HMAC-SHA256 of the rest under a key the store keeps (:meth:`SessionStore.secret`): every
server sharing the store accepts the tokens of the others, also after a restart, and a token
changed by one bit, or made by hand, is refused. Clients must treat tokens as opaque.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from chat.errors import InvalidArgument

__all__ = ["PageTokens"]

_VERSION = b"\x01"
_TAG_BYTES = 16


class PageTokens:
    """Seals store cursors into page tokens and opens them again.

    >>> tokens = PageTokens(bytes(32))
    >>> tokens.open(tokens.seal("cursor"))
    'cursor'
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a page token key needs at least 16 bytes")
        self._key = key

    def _tag(self, payload: bytes) -> bytes:
        return hmac.digest(self._key, payload, hashlib.sha256)[:_TAG_BYTES]

    def seal(self, cursor: str) -> str:
        payload = _VERSION + cursor.encode()
        return base64.urlsafe_b64encode(payload + self._tag(payload)).decode().rstrip("=")

    def open(self, token: str) -> str:
        """The cursor in ``token``; ``InvalidArgument('page_token', ...)`` if we did not make it."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raw = b""
        payload, tag = raw[:-_TAG_BYTES], raw[-_TAG_BYTES:]
        if (
            len(raw) <= len(_VERSION) + _TAG_BYTES
            or not payload.startswith(_VERSION)
            or not hmac.compare_digest(tag, self._tag(payload))
        ):
            raise InvalidArgument(
                "page_token", "is not a token returned by ListSessions; start again without one"
            )
        return payload[len(_VERSION) :].decode()
