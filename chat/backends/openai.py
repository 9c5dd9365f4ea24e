"""The OpenAI-compatible backend: OpenAI, vLLM, Ollama, llama.cpp's server, LM Studio...

Streams chat completions with the ``openai`` SDK (``pip install 'grpc-chat[openai]'``) from
``base_url`` (default ``https://api.openai.com/v1``)::

    backend = OpenAIBackend(RemoteSettings(base_url="http://localhost:11434/v1",
                                           default_model="llama3.2"))

Usage is asked for with ``stream_options={"include_usage": True}``; servers that ignore the
option simply report none. The SDK's own retries are turned off: :mod:`chat.backends.remote`
retries transient failures before the first token, the same way for every backend.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING

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

__all__ = ["DEFAULT_BASE_URL", "DEFAULT_MODEL", "OpenAIBackend"]

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
        page = await self._client.models.list()
        return _with_aliases(model.id for model in page.data)

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
        try:
            stream = await self._client.chat.completions.create(
                model=request.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
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
                raise self._error(error, request.model) from None
        yield Delta(finish_reason=finish, usage=usage)

    def _error(self, error: openai.APIError, model: str) -> BackendError:
        """The :class:`BackendError` for an SDK error; the upstream's text is redacted."""
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


def _upstream_message(error: openai.APIError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return error.message


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
