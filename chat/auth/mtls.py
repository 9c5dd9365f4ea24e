"""Client certificates (``--auth mtls``): the identity is a name in the verified certificate.

The TLS layer has already verified the certificate against ``--tls-client-ca`` (the server
requires one). The identity is the certificate's first subjectAltName of type DNS or email
(``rfc822Name``), or, when it has neither, its subject commonName. Administrators are the
identities named with ``--admin-identity``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from chat.auth._identity import Credentials, Identity
from chat.errors import Unauthenticated

__all__ = ["MtlsAuth", "certificate_identity"]


def certificate_identity(certificate: Mapping[str, Any]) -> str | None:
    """The identity in a certificate as :meth:`ssl.SSLSocket.getpeercert` returns it.

    >>> certificate_identity({"subjectAltName": (("DNS", "bob.example"),)})
    'bob.example'
    >>> certificate_identity({"subject": ((("commonName", "carol"),),)})
    'carol'
    """
    for kind, value in certificate.get("subjectAltName", ()):
        if kind in ("DNS", "email") and value:
            return str(value)
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value)
    return None


class MtlsAuth:
    """``--auth mtls``."""

    mode = "mtls"

    def __init__(self, admins: Collection[str] = ()) -> None:
        self.admins = frozenset(admins)

    async def authenticate(
        self, metadata: Mapping[str, str], peer_certificate: dict[str, Any] | None
    ) -> Credentials:
        if not peer_certificate:
            raise Unauthenticated(
                "this server requires a client certificate signed by its client CA "
                "(chat-client --tls --cert FILE --key FILE)"
            )
        name = certificate_identity(peer_certificate)
        if name is None:
            raise Unauthenticated(
                "the client certificate names nobody: it needs a DNS or email "
                "subjectAltName, or a commonName"
            )
        return Credentials(Identity(name, name in self.admins))

    async def aclose(self) -> None:
        return None
