"""The OpenAI-compatible backend: OpenAI, vLLM, Ollama, llama.cpp's server, LM Studio...

Streams chat completions with the ``openai`` SDK (``pip install 'grpc-chat[openai]'``) from
``base_url`` (default ``https://api.openai.com/v1``)::

    backend = OpenAIBackend(RemoteSettings(base_url="http://localhost:11434/v1",
                                           default_model="llama3.2"))

Usage is asked for with ``stream_options={"include_usage": True}``; servers that ignore the
option simply report none. The reply limit is sent as ``max_completion_tokens`` to OpenAI
and as ``max_tokens`` to other servers (:func:`reply_limit_field`). The SDK's own retries
are turned off: :mod:`chat.backends.remote` retries transient failures before the first
token, the same way for every backend.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from chat.backends import Delta, GenerationRequest
from chat.backends.remote import (
    ModelListCache,
    RemoteSettings,
    error_for_status,
    parse_retry_after,
    redact,
    retry_before_first_delta,
)
from chat.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConfigurationError,
    MissingExtra,
)
from chat.types import FinishReason, Role, Usage

try:
    import httpx2
    import openai
except ImportError as error:  # pragma: no cover - exercised by the MissingExtra test
    raise MissingExtra("the openai backend", "openai") from error

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

__all__ = ["DEFAULT_BASE_URL", "DEFAULT_MODEL", "OpenAIBackend", "reply_limit_field"]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini"

#: Sent as the key to servers that need none (Ollama, vLLM, llama.cpp): the SDK insists on
#: one, and a fixed word says plainly that no real key was configured.
_NO_KEY = "no-key-configured"

_ROLES: dict[Role, str] = {Role.SYSTEM: "system", Role.USER: "user", Role.ASSISTANT: "assistant"}

_FINISH: dict[str, FinishReason] = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}


class OpenAIBackend:
    """Streams replies from an OpenAI-compatible ``/chat/completions`` endpoint.

    Raises :class:`~chat.errors.ConfigurationError` when no API key is given for OpenAI's
    own endpoint (servers at another ``base_url`` are sent a placeholder key).
    """

    name = "openai"

    def __init__(
        self,
        settings: RemoteSettings,
        *,
        rng: random.Random | None = None,
        on_retry: Callable[[BackendError], None] | None = None,
    ) -> None:
        if not settings.base_url and not settings.api_key:
            raise ConfigurationError(
                "the openai backend needs an API key for api.openai.com: set OPENAI_API_KEY "
                "(or CHAT_API_KEY), or pass --api-key-file; for a local server (Ollama, vLLM, "
                "llama.cpp) pass its --base-url"
            )
        self._settings = dataclasses.replace(
            settings, base_url=settings.base_url or DEFAULT_BASE_URL
        )
        self._rng = rng or random.Random()
        self._on_retry = on_retry
        key = settings.api_key.reveal() if settings.api_key else _NO_KEY
        self._client = openai.AsyncOpenAI(
            api_key=key,
            base_url=self._settings.base_url,
            timeout=httpx2.Timeout(settings.read_timeout, connect=settings.connect_timeout),
            max_retries=0,
        )
        self._limit_field = reply_limit_field(self._settings.base_url)
        self._models = ModelListCache(
            self._fetch_models,
            what=f"the openai backend at {self._settings.host_for_messages}",
            ttl=settings.models_ttl,
            timeout=settings.models_timeout,
        )

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self._settings.host_for_messages!r})"

    @property
    def default_model(self) -> str:
        return self._settings.default_model or DEFAULT_MODEL

    async def list_models(self) -> Sequence[str] | None:
        return await self._models.get()

    async def _fetch_models(self) -> Iterable[str]:
        try:
            page = await self._client.models.list()
        except openai.NotFoundError:
            await self._check_base_url()
            raise
        return _with_aliases(model.id for model in page.data)

    async def _check_base_url(self) -> None:
        """After a 404 for ``/models``: raise if the base URL only lacks its ``/v1``.

        OpenAI-compatible servers answer under ``/v1``; a base URL without it gets 404 for
        every request. Only a server that does answer ``/v1/models`` is taken as proof (some
        serve chat completions without listing models at all).
        """
        base = self._settings.base_url.rstrip("/")
        if urlsplit(base).path.endswith("/v1"):
            return
        try:
            await self._client.with_options(base_url=base + "/v1").models.list()
        except openai.APIError:
            return
        path = urlsplit(base).path
        raise ConfigurationError(
            f"the openai backend's base URL {self._settings.host_for_messages}{path} answers "
            f"404 for /models, but {self._settings.host_for_messages}{path}/v1 lists models: "
            "add /v1 to --base-url"
        )

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        return retry_before_first_delta(
            lambda: self._stream(request),
            self._settings.retry,
            what=f"openai request {request.request_id!r}",
            rng=self._rng,
            on_retry=self._on_retry,
        )

    async def _stream(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        messages: list[ChatCompletionMessageParam] = [
            {"role": _ROLES[m.role], "content": m.content}  # type: ignore[misc]
            for m in request.messages
        ]
        limit = request.max_output_tokens
        # The field this upstream reads; the other one is left out of the request.
        max_tokens = limit if limit is not None and self._limit_field == "max_tokens" else None
        max_completion = limit if max_tokens is None else None
        try:
            stream = await self._client.chat.completions.create(
                model=request.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=openai.omit if max_tokens is None else max_tokens,
                max_completion_tokens=openai.omit if max_completion is None else max_completion,
            )
        except openai.APIError as error:
            raise self._error(error, request.model) from None
        finish: FinishReason | None = None
        usage: Usage | None = None
        # Leaving this block for any reason (the end, an error, aclose() or cancellation)
        # closes the HTTP response at once, which is what stops the upstream generating.
        async with stream:
            try:
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = Usage(
                            prompt_tokens=chunk.usage.prompt_tokens or 0,
                            completion_tokens=chunk.usage.completion_tokens or 0,
                        )
                    for choice in chunk.choices:
                        if choice.index != 0:
                            continue
                        delta = choice.delta
                        text = (delta.content or "") + (delta.refusal or "") if delta else ""
                        if text:
                            yield Delta(text)
                        if choice.finish_reason is not None:
                            finish = _finish_reason(choice.finish_reason)
            except openai.APIError as error:
                raise self._error(error, request.model, streaming=True) from None
        yield Delta(finish_reason=finish, usage=usage)

    def _error(
        self, error: openai.APIError, model: str, *, streaming: bool = False
    ) -> BackendError:
        """The :class:`BackendError` for an SDK error; the upstream's text is redacted.

        ``streaming``: the error came while reading the reply, so the upstream was reached.
        """
        settings = self._settings
        where = settings.host_for_messages
        if isinstance(error, openai.APITimeoutError):
            if isinstance(error.__cause__, httpx2.ConnectTimeout):
                return BackendUnavailable(
                    f"cannot connect to the openai backend at {where} "
                    f"(no answer within {settings.connect_timeout:g}s)"
                )
            return BackendTimeout(
                f"the openai backend at {where} sent nothing for "
                f"{settings.read_timeout:g}s (the read timeout)"
            )
        if isinstance(error, openai.APIConnectionError):
            cause = type(error.__cause__).__name__ if error.__cause__ else "connection error"
            if streaming:
                return BackendUnavailable(
                    f"lost the connection to the openai backend at {where} before the reply "
                    f"ended ({cause})"
                )
            if not isinstance(error.__cause__, httpx2.ConnectError):
                # Connected, then the upstream closed the connection without an answer.
                return BackendUnavailable(
                    f"the openai backend at {where} closed the connection without answering "
                    f"({cause})"
                )
            return BackendUnavailable(
                f"cannot reach the openai backend at {where} ({cause}); is it running?"
            )
        if isinstance(error, openai.APIStatusError):
            retry_after = parse_retry_after(error.response.headers.get("retry-after"))
            log.warning("openai backend at %s answered HTTP %d", where, error.status_code)
            return error_for_status(
                error.status_code,
                redact(_upstream_message(error), settings.api_key),
                provider="the openai backend",
                settings=settings,
                model=model,
                retry_after=retry_after,
                key_hint=" (--api-key-file, CHAT_API_KEY or OPENAI_API_KEY)",
            )
        # An error event inside the stream (HTTP 200, then {"error": ...}).
        return BackendError(
            f"the openai backend at {where} failed while streaming: "
            f"{redact(_upstream_message(error), settings.api_key)}"
        )

    async def aclose(self) -> None:
        await self._client.close()


def reply_limit_field(base_url: str) -> Literal["max_completion_tokens", "max_tokens"]:
    """The request field that limits the reply's length at ``base_url``.

    OpenAI (and Azure OpenAI) deprecated ``max_tokens`` for ``max_completion_tokens``, and
    their reasoning models refuse ``max_tokens``. Other OpenAI-compatible servers (vLLM,
    Ollama, llama.cpp, LM Studio, transformers serve...) all take ``max_tokens``, and some
    ignore ``max_completion_tokens``, which would leave the reply unlimited.

    >>> reply_limit_field("https://api.openai.com/v1")
    'max_completion_tokens'
    >>> reply_limit_field("http://localhost:11434/v1")
    'max_tokens'
    """
    host = (urlsplit(base_url).hostname or "").lower()
    if host == "api.openai.com" or host.endswith(".openai.azure.com"):
        return "max_completion_tokens"
    return "max_tokens"


def _upstream_message(error: openai.APIError) -> str:
    """The upstream's own words about the error, else the SDK's ("Error code: 400").

    The SDK finds OpenAI's ``{"error": {"message": ...}}`` only; OpenAI-compatible servers
    use other shapes too: FastAPI-based ones (``transformers serve``, many proxies) answer
    ``{"detail": "..."}``, or a list of validation problems under ``detail``; some stream
    ``{"error": "..."}`` or answer with plain text.
    """
    text = _message_in(error.body) or error.message
    # Nothing but the status, which the error names anyway.
    return "" if re.fullmatch(r"Error code: \d+", text) else text


def _message_in(body: object, depth: int = 0) -> str:
    if isinstance(body, str):
        text = body.strip()
        # An HTML error page (a proxy's) says nothing the status does not.
        return "" if text.startswith("<") else text
    if isinstance(body, list) and depth < 3:
        return "; ".join(filter(None, (_message_in(item, depth + 1) for item in body[:5])))
    if isinstance(body, dict) and depth < 3:
        if isinstance(body.get("msg"), str):
            # A FastAPI validation problem: {"loc": ["body", "model"], "msg": "...", ...}.
            where = ".".join(str(part) for part in body.get("loc") or () if part != "body")
            return f"{where}: {body['msg']}" if where else str(body["msg"])
        for key in ("message", "detail", "error"):
            if key in body and (text := _message_in(body[key], depth + 1)):
                return text
    return ""


def _finish_reason(value: str) -> FinishReason:
    reason = _FINISH.get(value)
    if reason is None:
        # content_filter, tool_calls...: the protocol has no name for them; the reply did
        # end, so it is reported as STOP and the upstream's reason is logged.
        log.info("openai backend finished a reply with reason %r (reported as STOP)", value)
        return FinishReason.STOP
    return reason


def _with_aliases(names: Iterable[str]) -> list[str]:
    """Model ids, plus ``NAME`` for each ``NAME:latest`` (Ollama lists tags in full)."""
    result: list[str] = []
    for name in names:
        result.append(name)
        if name.endswith(":latest"):
            result.append(name.removesuffix(":latest"))
    return result
