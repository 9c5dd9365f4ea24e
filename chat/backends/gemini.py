"""The Gemini backend: Google's Gemini Developer API through the ``google-genai`` SDK.

``pip install 'grpc-chat[gemini]'``; the key comes from ``GEMINI_API_KEY`` (or
``GOOGLE_API_KEY``, ``CHAT_API_KEY``, ``--api-key-file``)::

    backend = GeminiBackend(RemoteSettings(api_key=Secret(key)))

The system prompt is sent as Gemini's system instruction; assistant messages have the role
``model``. ``base_url`` (default: the SDK's endpoint) points the SDK elsewhere, for a proxy
or a test server.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from chat.backends import Delta, GenerationRequest, PromptMessage
from chat.backends.remote import (
    ModelListCache,
    RemoteSettings,
    error_for_status,
    parse_retry_after,
    redact,
    retry_before_first_delta,
)
from chat.errors import (
    BackendBadRequest,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConfigurationError,
    MissingExtra,
)
from chat.types import FinishReason, Role, Usage

try:
    import httpx2
    from google import genai
    from google.genai import errors as genai_errors
    from google.genai import types as genai_types
except ImportError as error:  # pragma: no cover - exercised by the MissingExtra test
    raise MissingExtra("the gemini backend", "gemini") from error

__all__ = ["DEFAULT_BASE_URL", "DEFAULT_MODEL", "GeminiBackend"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemini-2.0-flash"
#: For messages only; the SDK knows its endpoint.
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"

_KEY_HINT = " (--api-key-file, CHAT_API_KEY, GEMINI_API_KEY or GOOGLE_API_KEY)"

#: The HTTP responses opened while a generation starts, so that closing the generation
#: closes them at once. The SDK nests several async generators without ``finally`` around
#: the response; closing the outer one leaves the connection to the garbage collector.
_OPENED: contextvars.ContextVar[list[httpx2.Response] | None] = contextvars.ContextVar(
    "chat_gemini_opened_responses", default=None
)


class GeminiBackend:
    """Streams replies with ``client.aio.models.generate_content_stream``.

    Raises :class:`~chat.errors.ConfigurationError` without an API key.
    """

    name = "gemini"

    def __init__(
        self,
        settings: RemoteSettings,
        *,
        rng: random.Random | None = None,
        on_retry: Callable[[BackendError], None] | None = None,
    ) -> None:
        if not settings.api_key:
            raise ConfigurationError(
                "the gemini backend needs an API key: set GEMINI_API_KEY (or GOOGLE_API_KEY, "
                "CHAT_API_KEY), or pass --api-key-file"
            )
        self._settings = dataclasses.replace(
            settings, base_url=settings.base_url or DEFAULT_BASE_URL
        )
        self._rng = rng or random.Random()
        self._on_retry = on_retry
        self._connect_timeout = settings.connect_timeout
        # Our own HTTP client: the SDK has a single timeout; the connect timeout is set per
        # request by the hook, and responses are recorded so that cancelling closes them.
        self._http = httpx2.AsyncClient(
            timeout=httpx2.Timeout(settings.read_timeout, connect=settings.connect_timeout),
            event_hooks={"request": [self._on_request], "response": [self._on_response]},
        )
        options = genai_types.HttpOptions(
            base_url=settings.base_url or None,
            # Milliseconds; the SDK passes it to every request, overriding the client's.
            timeout=max(1, round(settings.read_timeout * 1000)),
            httpx_async_client=self._http,
            # One attempt: retries are ours (before the first token only).
            retry_options=genai_types.HttpRetryOptions(attempts=1),
        )
        self._client = genai.Client(
            vertexai=False, api_key=settings.api_key.reveal(), http_options=options
        )
        self._models = ModelListCache(
            self._fetch_models,
            what=f"the gemini backend at {self._settings.host_for_messages}",
            ttl=settings.models_ttl,
            timeout=settings.models_timeout,
        )

    def __repr__(self) -> str:
        return f"GeminiBackend(base_url={self._settings.host_for_messages!r})"

    @property
    def default_model(self) -> str:
        return self._settings.default_model or DEFAULT_MODEL

    async def _on_request(self, request: httpx2.Request) -> None:
        timeouts = dict(request.extensions.get("timeout", {}))
        timeouts["connect"] = self._connect_timeout
        request.extensions["timeout"] = timeouts

    async def _on_response(self, response: httpx2.Response) -> None:
        opened = _OPENED.get()
        if opened is not None:
            opened.append(response)

    async def list_models(self) -> Sequence[str] | None:
        return await self._models.get()

    async def _fetch_models(self) -> Iterable[str]:
        names: list[str] = []
        pager = await self._client.aio.models.list(config={"page_size": 1000})
        async for model in pager:
            if model.name:
                names.append(model.name)
                names.append(model.name.removeprefix("models/"))
            if len(names) > 10_000:  # a broken server paging forever
                break
        return names

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        return retry_before_first_delta(
            lambda: self._stream(request),
            self._settings.retry,
            what=f"gemini request {request.request_id!r}",
            rng=self._rng,
            on_retry=self._on_retry,
        )

    async def _stream(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        system, contents = _to_gemini(request.messages)
        config = genai_types.GenerateContentConfig(
            system_instruction=system or None, max_output_tokens=request.max_output_tokens
        )
        opened: list[httpx2.Response] = []
        stream: AsyncIterator[genai_types.GenerateContentResponse] | None = None
        finish: FinishReason | None = None
        usage: Usage | None = None
        try:
            try:
                # The SDK sends the request on the first step of its stream; the hook
                # records the response in this context (set and reset within one step).
                token = _OPENED.set(opened)
                try:
                    stream = await self._client.aio.models.generate_content_stream(
                        model=request.model, contents=contents, config=config
                    )
                    chunk = await anext(stream, None)
                finally:
                    _OPENED.reset(token)
                while chunk is not None:
                    text, reason, chunk_usage = self._read_chunk(chunk, request.model)
                    if chunk_usage is not None:
                        usage = chunk_usage
                    if reason is not None:
                        finish = reason
                    if text:
                        yield Delta(text)
                    chunk = await anext(stream, None)
            except genai_errors.APIError as error:
                raise self._status_error(error, request.model) from None
            except httpx2.TransportError as error:
                raise self._transport_error(error) from None
        finally:
            # Runs on completion, error, aclose() and cancellation alike.
            if stream is not None and hasattr(stream, "aclose"):
                await stream.aclose()
            for response in opened:
                await response.aclose()
        yield Delta(finish_reason=finish, usage=usage)

    def _read_chunk(
        self, chunk: genai_types.GenerateContentResponse, model: str
    ) -> tuple[str, FinishReason | None, Usage | None]:
        feedback = chunk.prompt_feedback
        if feedback is not None and feedback.block_reason is not None and not chunk.candidates:
            raise BackendBadRequest(
                f"the gemini backend refused the prompt for model {model!r} "
                f"(blocked: {_enum_name(feedback.block_reason)})"
            )
        text = ""
        reason: FinishReason | None = None
        if chunk.candidates:
            candidate = chunk.candidates[0]
            if candidate.content is not None and candidate.content.parts:
                text = "".join(
                    part.text for part in candidate.content.parts if part.text and not part.thought
                )
            if candidate.finish_reason is not None:
                reason = _finish_reason(_enum_name(candidate.finish_reason))
        usage: Usage | None = None
        metadata = chunk.usage_metadata
        if metadata is not None and (
            metadata.prompt_token_count is not None or metadata.candidates_token_count is not None
        ):
            usage = Usage(
                prompt_tokens=metadata.prompt_token_count or 0,
                # Thinking models are billed for their thoughts as output tokens.
                completion_tokens=(metadata.candidates_token_count or 0)
                + (metadata.thoughts_token_count or 0),
            )
        return text, reason, usage

    def _status_error(self, error: genai_errors.APIError, model: str) -> BackendError:
        settings = self._settings
        status = int(error.code or 0)
        log.warning(
            "gemini backend at %s answered HTTP %d %s",
            settings.host_for_messages,
            status,
            error.status or "",
        )
        details = _error_details(error.details)
        # Gemini answers a bad key with 400 INVALID_ARGUMENT, reason API_KEY_INVALID.
        if any(d.get("reason") in ("API_KEY_INVALID", "API_KEY_EXPIRED") for d in details):
            status = 401
        retry_after = _retry_delay(details)
        response = getattr(error, "response", None)
        headers = getattr(response, "headers", None)
        if retry_after is None and headers is not None:
            retry_after = parse_retry_after(headers.get("retry-after"))
        if status == 0:
            return BackendError(
                f"the gemini backend failed while streaming: "
                f"{redact(str(error.message or ''), settings.api_key)}"
            )
        return error_for_status(
            status,
            redact(str(error.message or ""), settings.api_key),
            provider="the gemini backend",
            settings=settings,
            model=model,
            retry_after=retry_after,
            key_hint=_KEY_HINT,
        )

    def _transport_error(self, error: httpx2.TransportError) -> BackendError:
        settings = self._settings
        where = settings.host_for_messages
        if isinstance(error, httpx2.ConnectTimeout):
            return BackendUnavailable(
                f"cannot connect to the gemini backend at {where} "
                f"(no answer within {settings.connect_timeout:g}s)"
            )
        if isinstance(error, httpx2.TimeoutException):
            return BackendTimeout(
                f"the gemini backend at {where} sent nothing for "
                f"{settings.read_timeout:g}s (the read timeout)"
            )
        if not isinstance(error, httpx2.ConnectError):
            # Connected, then the connection broke (before the answer, or in the middle).
            return BackendUnavailable(
                f"lost the connection to the gemini backend at {where} before the reply "
                f"ended ({type(error).__name__})"
            )
        return BackendUnavailable(
            f"cannot reach the gemini backend at {where} ({type(error).__name__}); "
            "check the network and --base-url"
        )

    async def aclose(self) -> None:
        await self._client.aio.aclose()
        await self._http.aclose()


def _to_gemini(messages: Sequence[PromptMessage]) -> tuple[str, list[genai_types.Content]]:
    """The system instruction, and the turns with consecutive same-role messages merged."""
    system: list[str] = []
    contents: list[genai_types.Content] = []
    for message in messages:
        if message.role is Role.SYSTEM:
            system.append(message.content)
            continue
        role = "model" if message.role is Role.ASSISTANT else "user"
        part = genai_types.Part(text=message.content)
        if contents and contents[-1].role == role and contents[-1].parts is not None:
            contents[-1].parts.append(part)
        else:
            contents.append(genai_types.Content(role=role, parts=[part]))
    return "\n\n".join(system), contents


def _enum_name(value: Any) -> str:
    return str(getattr(value, "value", value))


def _finish_reason(name: str) -> FinishReason | None:
    if name == "STOP":
        return FinishReason.STOP
    if name == "MAX_TOKENS":
        return FinishReason.LENGTH
    if name in ("", "FINISH_REASON_UNSPECIFIED"):
        return None
    # SAFETY, RECITATION, ...: the reply ended; the protocol has no name for why.
    log.info("gemini backend finished a reply with reason %r (reported as STOP)", name)
    return FinishReason.STOP


def _error_details(body: Any) -> list[dict[str, Any]]:
    """The ``error.details`` entries of a Google API error body."""
    if isinstance(body, list) and body:
        body = body[0]
    if not isinstance(body, dict):
        return []
    inner = body.get("error", body)
    details = inner.get("details") if isinstance(inner, dict) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    """Seconds from a ``google.rpc.RetryInfo`` detail (``"retryDelay": "30s"``)."""
    for detail in details:
        if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            delay = detail.get("retryDelay")
            if isinstance(delay, str) and delay.endswith("s"):
                try:
                    return max(0.0, float(delay[:-1]))
                except ValueError:
                    return None
    return None
