"""JSON Web Tokens (``--auth jwt``), verified with PyJWT.

HS256 with a shared secret (``--jwt-secret-file``) or RS256/ES256 with the public keys of a
JWKS file (``--jwt-jwks``; the token's ``kid`` picks the key, a set with one key needs none).
``exp`` is required; ``nbf`` is checked when present; ``aud`` and ``iss`` are required and
checked when ``--jwt-audience`` and ``--jwt-issuer`` are given. The identity is ``sub``;
the caller is an administrator when the claim ``admin`` is ``true``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from chat.auth._identity import Credentials, Identity, bearer_token
from chat.errors import ConfigurationError, Unauthenticated
from chat.secret import Secret

__all__ = ["ADMIN_CLAIM", "JwtAuth", "JwtSettings"]

#: The claim that makes the caller an administrator (``"admin": true``).
ADMIN_CLAIM = "admin"
#: Seconds of clock difference tolerated on ``exp`` and ``nbf``.
LEEWAY = 30.0


@dataclass(frozen=True, slots=True)
class JwtSettings:
    """How ``--auth jwt`` verifies tokens; exactly one of ``secret`` and ``jwks`` is set."""

    secret: Secret | None = field(default=None, repr=False)
    jwks: str | None = field(default=None, repr=False)
    audience: str | None = None
    issuer: str | None = None

    def __post_init__(self) -> None:
        if (self.secret is None) == (self.jwks is None):
            raise ConfigurationError(
                "--auth jwt needs exactly one of --jwt-secret-file (HS256) and "
                "--jwt-jwks (RS256/ES256)"
            )

    @classmethod
    def from_files(
        cls,
        *,
        secret_file: str | None = None,
        jwks_file: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> JwtSettings:
        def read(path: str, what: str) -> str:
            try:
                return Path(path).expanduser().read_text(encoding="utf-8").strip()
            except OSError as error:
                raise ConfigurationError(f"cannot read the {what} {path}: {error}") from error

        secret = Secret(read(secret_file, "JWT secret file")) if secret_file else None
        if secret is not None and len(secret.reveal()) < 32:
            raise ConfigurationError(
                "the JWT secret must be at least 32 characters (HS256 is only as strong as it)"
            )
        jwks = read(jwks_file, "JWKS file") if jwks_file else None
        return cls(secret=secret, jwks=jwks, audience=audience or None, issuer=issuer or None)


class JwtAuth:
    """``--auth jwt``: the identity is the verified token's ``sub``."""

    mode = "jwt"

    def __init__(self, settings: JwtSettings) -> None:
        self.settings = settings
        # kid -> (key, the one algorithm it verifies): a token never picks the algorithm.
        self._keys: dict[str | None, tuple[Any, str]] = {}
        if settings.secret is not None:
            self._keys[None] = (settings.secret.reveal(), "HS256")
        else:
            assert settings.jwks is not None
            try:
                keys = jwt.PyJWKSet.from_json(settings.jwks).keys
            except (jwt.PyJWTError, ValueError, json.JSONDecodeError) as error:
                raise ConfigurationError(f"the JWKS file is not usable: {error}") from error
            for key in keys:
                algorithm = key.algorithm_name
                if algorithm not in ("RS256", "ES256"):
                    raise ConfigurationError(
                        f"the JWKS key {key.key_id!r} is for {algorithm}; RS256 and ES256 "
                        "keys are accepted"
                    )
                self._keys[key.key_id] = (key.key, algorithm)
            if len(keys) == 1:
                self._keys[None] = self._keys[keys[0].key_id]

    def _verify(self, token: str) -> dict[str, Any]:
        settings = self.settings
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            entry = self._keys.get(kid) if kid in self._keys else self._keys.get(None)
            if entry is None:
                raise Unauthenticated("the JWT names a key (kid) the server does not know")
            key, algorithm = entry
            required = ["exp", "sub"]
            if settings.audience:
                required.append("aud")
            if settings.issuer:
                required.append("iss")
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=LEEWAY,
                options={"require": required, "verify_aud": settings.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the JWT has expired: get a new one") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the JWT is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                f"the JWT is not for this server (aud must be {settings.audience!r})"
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(
                f"the JWT is not from the expected issuer ({settings.issuer!r})"
            ) from None
        except jwt.MissingRequiredClaimError as error:
            raise Unauthenticated(f"the JWT lacks the {error.claim!r} claim") from None
        except (jwt.PyJWTError, TypeError, ValueError):
            # The library's text may quote parts of the token: say what, not how. (A key of
            # another type than the token's algorithm is a TypeError in PyJWT.)
            raise Unauthenticated(
                "the JWT is not valid (bad signature, algorithm or format)"
            ) from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("the JWT's sub claim must be a non-empty string")
        return claims

    async def authenticate(
        self, metadata: Mapping[str, str], peer_certificate: dict[str, Any] | None
    ) -> Credentials:
        claims = self._verify(bearer_token(metadata, "a JWT"))
        identity = Identity(claims["sub"], claims.get(ADMIN_CLAIM) is True)
        expires = float(claims["exp"])

        async def recheck() -> None:
            if time.time() > expires + LEEWAY:
                raise Unauthenticated("the JWT has expired: get a new one and reconnect")

        return Credentials(identity, recheck)

    async def aclose(self) -> None:
        return None
