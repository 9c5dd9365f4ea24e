"""A wrapper that keeps credentials out of logs, reprs, tracebacks and error messages."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final, final

from chat.errors import ConfigurationError

__all__ = ["Secret", "keep_headers_out_of_logs", "read_api_key"]

_REDACTED: Final = "Secret('**********')"


@final
class Secret:
    """A string that does not show itself: ``repr``, ``str`` and formatting print a mask.

    Only :meth:`reveal` returns the value; call it at the last moment, where the value is
    handed to the SDK that sends it.

    >>> key = Secret("sk-123")
    >>> key, f"{key}"
    (Secret('**********'), "Secret('**********')")
    >>> key.reveal()
    'sk-123'
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("a Secret holds a str")
        self._value = value

    def reveal(self) -> str:
        """The value itself."""
        return self._value

    def __repr__(self) -> str:
        return _REDACTED

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return _REDACTED

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self) -> str | tuple[object, ...]:
        # Pickling would write the key wherever the pickle goes (a cache, a queue).
        raise TypeError("a Secret cannot be pickled")


def read_api_key(
    *,
    key_file: str | os.PathLike[str] | None,
    env_vars: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> Secret | None:
    """The API key from ``key_file`` if given, else from the first of ``env_vars`` that is set.

    Surrounding whitespace (the newline an editor leaves) is stripped. An empty or unreadable
    file is a :class:`~chat.errors.ConfigurationError` naming the file, never its content.

    >>> read_api_key(key_file=None, env_vars=["CHAT_API_KEY"], environ={"CHAT_API_KEY": "k "})
    Secret('**********')
    """
    if key_file is not None:
        path = Path(key_file)
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            reason = (
                (error.strerror or type(error).__name__)
                if isinstance(error, OSError)
                else "not UTF-8 text"
            )
            raise ConfigurationError(
                f"cannot read the API key file {str(path)!r}: {reason}"
            ) from None
        if not value:
            raise ConfigurationError(f"the API key file {str(path)!r} is empty")
        return Secret(value)
    env = os.environ if environ is None else environ
    for name in env_vars:
        value = env.get(name, "").strip()
        if value:
            return Secret(value)
    return None


#: Loggers of dependencies that write HTTP/2 header values (``authorization`` among them)
#: at DEBUG level.
_HEADER_LOGGERS = ("hpack.hpack", "hpack.table")


def _not_debug(record: logging.LogRecord) -> bool:
    return record.levelno > logging.DEBUG


def keep_headers_out_of_logs() -> None:
    """Drop the DEBUG records of the HTTP/2 header codec (hpack), which show header values
    and so the bearer tokens sent as ``authorization`` metadata. Idempotent.

    Called by servers that authenticate and by clients that send a token, so that even
    ``--log-level debug`` (or a root logger at DEBUG) never writes a token.
    """
    for name in _HEADER_LOGGERS:
        logger = logging.getLogger(name)
        if _not_debug not in logger.filters:
            logger.addFilter(_not_debug)
