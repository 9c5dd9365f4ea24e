"""TLS contexts for the server and the client (HTTP/2 by ALPN, TLS 1.2 or newer).

The server's context is made once and reloaded in place (:func:`reload_server_context`):
OpenSSL uses the certificate a context holds when a handshake starts, so connections made
after a reload get the new certificate and open ones are not touched (``SIGHUP``).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from chat.errors import ConfigurationError

__all__ = ["client_context", "reload_server_context", "server_context"]


def _load_chain(context: ssl.SSLContext, cert: str, key: str, what: str) -> None:
    try:
        context.load_cert_chain(Path(cert).expanduser(), Path(key).expanduser())
    except FileNotFoundError as error:
        raise ConfigurationError(f"{what}: no such file {error.filename}") from error
    except (ssl.SSLError, OSError) as error:
        raise ConfigurationError(
            f"{what}: cannot use {cert} with key {key} ({error.strerror or error}); "
            "both must be PEM and the key must belong to the certificate"
        ) from error


def _load_ca(context: ssl.SSLContext, ca: str, what: str) -> None:
    try:
        context.load_verify_locations(cafile=Path(ca).expanduser())
    except FileNotFoundError as error:
        raise ConfigurationError(f"{what}: no such file {ca}") from error
    except (ssl.SSLError, OSError) as error:
        raise ConfigurationError(
            f"{what}: {ca} holds no usable PEM certificate ({error})"
        ) from error


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """The server's context; with ``client_ca`` it requires client certificates it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    _load_chain(context, cert, key, "--tls-cert/--tls-key")
    if client_ca is not None:
        _load_ca(context, client_ca, "--tls-client-ca")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def reload_server_context(
    context: ssl.SSLContext, cert: str, key: str, client_ca: str | None = None
) -> None:
    """Load the (renewed) files into ``context`` for the connections made from now on.

    Checked on a scratch context first, so a bad new file leaves the old ones in use.
    """
    server_context(cert, key, client_ca)
    _load_chain(context, cert, key, "--tls-cert/--tls-key")
    if client_ca is not None:
        _load_ca(context, client_ca, "--tls-client-ca")


def client_context(
    ca_file: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """The client's context: the server verified against ``ca_file`` (default: the system's
    trusted CAs); ``cert`` and ``key`` for a server that requires client certificates."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    if ca_file is not None:
        _load_ca(context, ca_file, "--ca-file")
    if (cert is None) != (key is None):
        raise ConfigurationError("a client certificate needs both --cert and --key")
    if cert is not None and key is not None:
        _load_chain(context, cert, key, "--cert/--key")
    return context
