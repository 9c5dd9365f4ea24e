"""Identities and the :class:`Authenticator` protocol every ``--auth`` mode implements."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from chat.errors import Unauthenticated
from chat.types import ANONYMOUS

__all__ = [
    "AUTH_MODES",
    "LOCAL",
    "Authenticator",
    "Credentials",
    "Identity",
    "NoAuth",
    "bearer_token",
]

#: The values of ``--auth``.
AUTH_MODES = ("none", "tokens", "mtls", "jwt")


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller: sessions belong to ``name``; ``admin`` may see everyone's.

    >>> Identity("alice")
    Identity(name='alice', admin=False)
    """

    name: str
    admin: bool = False


#: The caller of a server with ``--auth none`` (and of code that calls the core directly).
LOCAL = Identity(ANONYMOUS, admin=True)


async def _always_valid() -> None:
    return None


@dataclass(frozen=True, slots=True)
class Credentials:
    """An identity and how to check that what proved it still holds.

    ``recheck()`` raises :class:`~chat.errors.Unauthenticated` once the credential is no
    longer accepted (a revoked token, an expired JWT): a ``Chat`` stream calls it before each
    request, so an open stream learns of a revocation on its next request.
    """

    identity: Identity
    recheck: Callable[[], Awaitable[None]] = field(default=_always_valid, compare=False)


class Authenticator(Protocol):
    """Establishes the caller of one RPC from its metadata and its TLS peer certificate."""

    @property
    def mode(self) -> str:
        """The ``--auth`` value (``none``, ``tokens``, ``mtls``, ``jwt``)."""
        ...

    async def authenticate(
        self, metadata: Mapping[str, str], peer_certificate: dict[str, Any] | None
    ) -> Credentials:
        """The caller's credentials; :class:`~chat.errors.Unauthenticated` saying what to
        supply when they are missing or not accepted."""
        ...

    async def aclose(self) -> None:
        """Release what the authenticator holds (a token store's connection)."""
        ...


class NoAuth:
    """``--auth none``: everyone is :data:`LOCAL`."""

    mode = "none"

    async def authenticate(
        self, metadata: Mapping[str, str], peer_certificate: dict[str, Any] | None
    ) -> Credentials:
        return Credentials(LOCAL)

    async def aclose(self) -> None:
        return None


def bearer_token(metadata: Mapping[str, str], what: str) -> str:
    """The token of ``authorization: Bearer TOKEN``; ``Unauthenticated`` naming ``what``."""
    header = metadata.get("authorization")
    if not header:
        raise Unauthenticated(
            f"this server requires {what}: send the metadata 'authorization: Bearer <token>' "
            "(chat-client: --token-file FILE or CHAT_TOKEN)"
        )
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated(
            f"the authorization metadata must be 'Bearer <token>' carrying {what}"
        )
    return token
