"""The default of a config field, read from the dataclass: one source for every layer.

The CLIs and :class:`~chat.client.ChatClient`'s keyword arguments show and use these rather
than repeating the literals.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["default_of"]


def default_of(config: type[Any], name: str) -> Any:
    """The default value of field ``name`` of dataclass ``config`` (its factory called).

    >>> from chat.config import ServerConfig
    >>> default_of(ServerConfig, "port")
    50051
    """
    for field in dataclasses.fields(config):
        if field.name == name:
            if field.default is not dataclasses.MISSING:
                return field.default
            if field.default_factory is not dataclasses.MISSING:
                return field.default_factory()
            raise ValueError(f"{config.__name__}.{name} has no default")
    raise AttributeError(f"{config.__name__} has no field {name!r}")
