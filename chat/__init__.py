"""grpc-chat: multi-turn chat with language models over a bidirectional gRPC stream.

Run a server from Python::

    import asyncio
    from chat import ServerConfig, serve

    asyncio.run(serve(ServerConfig(port=50051)))

The OpenAI-compatible and Gemini backends are in ``chat.backends.openai`` and
``chat.backends.gemini`` (extras ``grpc-chat[openai]`` and ``grpc-chat[gemini]``).

The generated message types and stubs are in the ``chatpb`` package
(``from chatpb import ChatRequest, ChatServiceStub``).
"""

from chat._version import __version__
from chat.backends import Delta, GenerationRequest, ModelBackend, PromptMessage
from chat.backends.coalesce import CoalescingBackend
from chat.backends.echo import EchoBackend
from chat.backends.remote import RemoteSettings, RetryPolicy
from chat.config import ServerConfig
from chat.context import ContextBudget, ContextSettings
from chat.core import ChatCore, Conversation, Limits, Request, RequestKind
from chat.errors import (
    BackendAuthError,
    BackendBadRequest,
    BackendError,
    BackendRateLimited,
    BackendTimeout,
    BackendUnavailable,
    ChatError,
    ConfigurationError,
    ContextTooLong,
    FailedPrecondition,
    InvalidArgument,
    MissingExtra,
    SessionNotFound,
    StatusCode,
    StoreUnavailable,
    Unavailable,
)
from chat.events import Event, EventKind
from chat.retention import Retention
from chat.secret import Secret
from chat.server import ChatServer, create_backend, serve
from chat.store import SessionPage, SessionStore, default_store_url, open_store
from chat.store.memory import MemoryStore
from chat.store.sqlite import SqliteStore
from chat.types import (
    ContextPolicy,
    FinishReason,
    Message,
    MessageStatus,
    Role,
    Session,
    SessionPatch,
    Usage,
)

__all__ = [
    "BackendAuthError",
    "BackendBadRequest",
    "BackendError",
    "BackendRateLimited",
    "BackendTimeout",
    "BackendUnavailable",
    "ChatCore",
    "ChatError",
    "ChatServer",
    "CoalescingBackend",
    "ConfigurationError",
    "ContextBudget",
    "ContextPolicy",
    "ContextSettings",
    "ContextTooLong",
    "Conversation",
    "Delta",
    "EchoBackend",
    "Event",
    "EventKind",
    "FailedPrecondition",
    "FinishReason",
    "GenerationRequest",
    "InvalidArgument",
    "Limits",
    "MemoryStore",
    "Message",
    "MessageStatus",
    "MissingExtra",
    "ModelBackend",
    "PromptMessage",
    "RemoteSettings",
    "Request",
    "RequestKind",
    "Retention",
    "RetryPolicy",
    "Role",
    "Secret",
    "ServerConfig",
    "Session",
    "SessionNotFound",
    "SessionPage",
    "SessionPatch",
    "SessionStore",
    "SqliteStore",
    "StatusCode",
    "StoreUnavailable",
    "Unavailable",
    "Usage",
    "__version__",
    "create_backend",
    "default_store_url",
    "open_store",
    "serve",
]
