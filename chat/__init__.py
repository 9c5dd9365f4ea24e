"""grpc-chat: multi-turn chat with language models over a bidirectional gRPC stream.

Run a server from Python::

    import asyncio
    from chat import ServerConfig, serve

    asyncio.run(serve(ServerConfig(port=50051)))

The OpenAI-compatible and Gemini backends are in ``chat.backends.openai`` and
``chat.backends.gemini`` (extras ``grpc-chat[openai]`` and ``grpc-chat[gemini]``).

Talk to one with the typed client::

    from chat import ChatClient, ReplyChunk

    async with ChatClient("localhost:50051") as client:
        session = await client.create_session(title="demo")
        async for event in client.send(session.session_id, "Hello!"):
            if isinstance(event, ReplyChunk):
                print(event.text, end="", flush=True)

The generated message types and stubs are in the ``chatpb`` package
(``from chatpb import ChatRequest, ChatServiceStub``).
"""

from chat._version import __version__
from chat.backends import (
    Delta,
    GenerationRequest,
    ModelBackend,
    ModelCheck,
    ModelChecker,
    PromptMessage,
)
from chat.backends.coalesce import CoalescingBackend
from chat.backends.echo import EchoBackend
from chat.backends.remote import RemoteSettings, RetryPolicy
from chat.client import (
    ChatClient,
    ClientConfig,
    ClientStats,
    ConnectionState,
    ConnectionStateChanged,
    Notice,
    Notices,
    ReconnectPolicy,
    Reply,
    ReplyChunk,
    ReplyCompleted,
    ReplyEvent,
    ReplyFailed,
    ReplyStarted,
    ReplyStatus,
    ReplyStream,
    ServerNotice,
    ServerStatsInfo,
    ServingStatus,
    SessionList,
    SessionUpdated,
    WhoAmI,
)
from chat.config import ServerConfig
from chat.context import ContextBudget, ContextSettings
from chat.core import ChatCore, Conversation, Limits
from chat.errors import (
    Aborted,
    BackendAuthError,
    BackendBadRequest,
    BackendError,
    BackendRateLimited,
    BackendTimeout,
    BackendUnavailable,
    ChatError,
    ConfigurationError,
    ConnectionLost,
    ConnectTimeout,
    ContextTooLong,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MissingExtra,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    ServerUnreachable,
    SessionNotFound,
    StatusCode,
    StoreUnavailable,
    TurnNotFound,
    TurnOutOfRange,
    Unauthenticated,
    Unavailable,
)
from chat.events import Event, EventKind, Request, RequestKind
from chat.replay import MemoryReplayLog, ReplayLog, ReplaySettings, ReplayStats
from chat.retention import Retention
from chat.secret import Secret
from chat.server import ChatServer, create_backend, serve
from chat.store import SessionPage, SessionStore, default_store_url, open_store
from chat.store.memory import MemoryStore
from chat.store.sqlite import SqliteStore
from chat.types import (
    ConcurrencyPolicy,
    ContextPolicy,
    DisconnectPolicy,
    FinishReason,
    Message,
    MessageStatus,
    Role,
    Session,
    SessionPatch,
    SessionUpdateKind,
    StatusKind,
    Usage,
)

__all__ = [
    "Aborted",
    "BackendAuthError",
    "BackendBadRequest",
    "BackendError",
    "BackendRateLimited",
    "BackendTimeout",
    "BackendUnavailable",
    "ChatClient",
    "ChatCore",
    "ChatError",
    "ChatServer",
    "ClientConfig",
    "ClientStats",
    "CoalescingBackend",
    "ConcurrencyPolicy",
    "ConfigurationError",
    "ConnectTimeout",
    "ConnectionLost",
    "ConnectionState",
    "ConnectionStateChanged",
    "ContextBudget",
    "ContextPolicy",
    "ContextSettings",
    "ContextTooLong",
    "Conversation",
    "DeadlineExceeded",
    "Delta",
    "DisconnectPolicy",
    "EchoBackend",
    "Event",
    "EventKind",
    "FailedPrecondition",
    "FinishReason",
    "GenerationRequest",
    "InvalidArgument",
    "Limits",
    "MemoryReplayLog",
    "MemoryStore",
    "Message",
    "MessageStatus",
    "MissingExtra",
    "ModelBackend",
    "ModelCheck",
    "ModelChecker",
    "Notice",
    "Notices",
    "PermissionDenied",
    "PromptMessage",
    "QuotaExceeded",
    "RateLimited",
    "ReconnectPolicy",
    "RemoteSettings",
    "ReplayLog",
    "ReplaySettings",
    "ReplayStats",
    "Reply",
    "ReplyChunk",
    "ReplyCompleted",
    "ReplyEvent",
    "ReplyFailed",
    "ReplyStarted",
    "ReplyStatus",
    "ReplyStream",
    "Request",
    "RequestKind",
    "Retention",
    "RetryPolicy",
    "Role",
    "Secret",
    "ServerConfig",
    "ServerNotice",
    "ServerStatsInfo",
    "ServerUnreachable",
    "ServingStatus",
    "Session",
    "SessionList",
    "SessionNotFound",
    "SessionPage",
    "SessionPatch",
    "SessionStore",
    "SessionUpdateKind",
    "SessionUpdated",
    "SqliteStore",
    "StatusCode",
    "StatusKind",
    "StoreUnavailable",
    "TurnNotFound",
    "TurnOutOfRange",
    "Unauthenticated",
    "Unavailable",
    "Usage",
    "WhoAmI",
    "__version__",
    "create_backend",
    "default_store_url",
    "open_store",
    "serve",
]
