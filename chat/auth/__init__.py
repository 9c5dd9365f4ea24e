"""Who is calling: identities, and the authenticators that establish them (``--auth``).

Every RPC but the health check (and reflection when it is public) is authenticated before
its handler runs (:mod:`chat.auth.guard`, a grpclib ``RecvRequest`` listener). The result is
an :class:`Identity`: the name sessions are owned by and quotas counted for, and whether it
is an administrator. With ``--auth none`` every caller is :data:`LOCAL`: the one identity
``anonymous``, an administrator (anyone who reaches the port can do everything anyway).

=========  ===========================================  =================================
``--auth`` credential                                   identity
=========  ===========================================  =================================
none       nothing                                      ``anonymous`` (admin)
tokens     ``authorization: Bearer TOKEN`` metadata     the token's name (``tokens add``)
mtls       a client certificate the server verified     its first DNS or email SAN, else CN
jwt        ``authorization: Bearer JWT`` (HS/RS/ES256)  the ``sub`` claim; admin: ``admin``
=========  ===========================================  =================================
"""

from __future__ import annotations

from chat.auth._identity import (
    AUTH_MODES,
    LOCAL,
    Authenticator,
    Credentials,
    Identity,
    NoAuth,
    bearer_token,
)

__all__ = [
    "AUTH_MODES",
    "LOCAL",
    "Authenticator",
    "Credentials",
    "Identity",
    "NoAuth",
    "bearer_token",
]
