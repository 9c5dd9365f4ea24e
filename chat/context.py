"""Building the prompt for a turn from a session's history, within the model's context window.

Each model has a context window in tokens: configured (``--context-window``), known for
common models (:data:`KNOWN_CONTEXT_WINDOWS`), or a default. Part of it is reserved for the
reply; the prompt gets the rest. :class:`ContextBudget` keeps the system prompt and the
newest messages, and drops the oldest (policy ``TRUNCATE``), or refuses the turn with
:class:`~chat.errors.ContextTooLong` (policy ``REJECT``).

Tokens are counted with the model's own tokenizer where one is available offline: OpenAI's
``o200k_base``/``cl100k_base`` encodings for OpenAI models when the ``tokenizer`` extra
(``bpe-openai``, which ships the encodings inside the package) is installed. Everything else
is estimated (:func:`estimate_tokens`), erring on the high side. Where a model reports the
real size of its prompts, :class:`Calibration` corrects the count per model, so that a count
that runs under the model's own (a small vocabulary, a chat template's tokens) still keeps
prompts within the window.

The reply limit (a session's, else the reply reserve) is kept free of prompt and sent to the
model (``Context.max_output_tokens``), so a reply cannot overflow the room kept for it.
"""

from __future__ import annotations

import bisect
import importlib
import itertools
import logging
import math
import operator
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from chat.backends import PromptMessage
from chat.errors import ConfigurationError, ContextTooLong
from chat.types import ContextPolicy, Message, MessageStatus, Role, Session

__all__ = [
    "CALIBRATION_MARGIN",
    "CALIBRATION_SAMPLES",
    "KNOWN_CONTEXT_WINDOWS",
    "MESSAGE_OVERHEAD_TOKENS",
    "Calibration",
    "Context",
    "ContextBudget",
    "ContextSettings",
    "TokenCounter",
    "build_context",
    "estimate_tokens",
    "fit_messages",
]

log = logging.getLogger(__name__)

#: Tokens each message costs beyond its text (role markers and separators of chat formats).
MESSAGE_OVERHEAD_TOKENS = 4

#: Context windows (tokens) of common models, matched by the longest prefix of the model
#: name. Local servers often run a model with a smaller window than it supports (Ollama's
#: ``num_ctx``): set ``--context-window`` to what the server really uses.
KNOWN_CONTEXT_WINDOWS: tuple[tuple[str, int], ...] = (
    ("gpt-4.1", 1_047_576),
    ("gpt-4o", 128_000),
    ("gpt-4-turbo", 128_000),
    ("gpt-4-32k", 32_768),
    ("gpt-4", 8_192),
    ("gpt-3.5-turbo", 16_385),
    ("gpt-5", 400_000),
    ("o1-mini", 128_000),
    ("o1", 200_000),
    ("o3", 200_000),
    ("o4-mini", 200_000),
    ("gemini-1.5-pro", 2_097_152),
    ("gemini-1.5-flash", 1_048_576),
    ("gemini-2.0-flash", 1_048_576),
    ("gemini-2.5", 1_048_576),
    ("gemini-", 1_048_576),
    ("llama3.1", 131_072),
    ("llama3.2", 131_072),
    ("llama3.3", 131_072),
)


#: OpenAI model name prefixes and their tokenizer encodings (longest prefix wins).
_OPENAI_ENCODINGS: tuple[tuple[str, str], ...] = (
    ("gpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("o1", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5", "cl100k_base"),
)


def _openai_encoding(model: str) -> str | None:
    name = model.lower().rsplit("/", 1)[-1]
    best, found = "", None
    for prefix, encoding in _OPENAI_ENCODINGS:
        if name.startswith(prefix) and len(prefix) > len(best):
            best, found = prefix, encoding
    return found


class TokenCounter(Protocol):
    """Counts the tokens of a text for one model."""

    def __call__(self, text: str) -> int: ...


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate that errs on the high side.

    BPE tokenizers of current models average about 4 characters per token on English text
    and about one token per character on CJK scripts. The estimate counts one token per 3
    ASCII characters and one per other character, so a history that fits by this count also
    fits by the real one in nearly every case, at the price of sending slightly less history.

    >>> estimate_tokens("Hello, world!")
    5
    >>> estimate_tokens("日本語")
    3
    """
    # Runs over the whole history at every turn: count in C, not character by character
    # (encoding to ASCII while ignoring the rest keeps exactly the ASCII characters).
    ascii_chars = len(text) if text.isascii() else len(text.encode("ascii", "ignore"))
    return math.ceil(ascii_chars / 3) + (len(text) - ascii_chars)


@dataclass(frozen=True, slots=True)
class ContextSettings:
    """The server's context budget settings.

    >>> ContextSettings().window_for("gpt-4o-mini")
    128000
    >>> ContextSettings(context_window=4096).prompt_budget("anything")
    3072
    """

    #: The context window of every model, overriding the table and the default.
    context_window: int | None = None
    #: The window of a model neither configured nor in :data:`KNOWN_CONTEXT_WINDOWS`.
    default_context_window: int = 8_192
    #: Tokens kept free for the reply (at most half the window), and the longest reply the
    #: model is asked for when the session sets no limit (0: none is sent).
    reply_reserve: int = 1_024
    #: The policy of sessions that choose none (``ContextPolicy.UNSPECIFIED``).
    default_policy: ContextPolicy = ContextPolicy.TRUNCATE
    #: Count tokens with the model's tokenizer when one is installed (else estimate).
    use_tokenizers: bool = True

    def __post_init__(self) -> None:
        if self.context_window is not None and self.context_window < 16:
            raise ConfigurationError(f"context window must be >= 16, not {self.context_window}")
        if self.default_context_window < 16:
            raise ConfigurationError(
                f"default context window must be >= 16, not {self.default_context_window}"
            )
        if self.reply_reserve < 0:
            raise ConfigurationError(f"reply reserve must be >= 0, not {self.reply_reserve}")
        if self.default_policy is ContextPolicy.UNSPECIFIED:
            raise ConfigurationError("the default context policy must be TRUNCATE or REJECT")

    def window_for(self, model: str) -> int:
        """The context window of ``model``, in tokens."""
        if self.context_window is not None:
            return self.context_window
        name = model.lower().rsplit("/", 1)[-1]
        best = ""
        window = self.default_context_window
        for prefix, tokens in KNOWN_CONTEXT_WINDOWS:
            if name.startswith(prefix) and len(prefix) > len(best):
                best, window = prefix, tokens
        return window

    def reply_limit(self, requested: int = 0) -> int:
        """The longest reply, in tokens: ``requested`` (a session's), else the reply reserve.

        0 means no limit is sent (the upstream's default applies).
        """
        return requested if requested > 0 else self.reply_reserve

    def prompt_budget(self, model: str, reply_limit: int | None = None) -> int:
        """Tokens the prompt may use: the window less the room kept for the reply.

        The room is the reply limit (:meth:`reply_limit`), at most half the window.
        """
        window = self.window_for(model)
        limit = self.reply_reserve if reply_limit is None else reply_limit
        return window - min(limit, window // 2)


@dataclass(frozen=True, slots=True)
class Context:
    """The messages sent to the model for one turn.

    ``messages`` starts with the system prompt (if the session has one) and ends with the
    user's new message. ``omitted`` counts history messages left out to fit the budget;
    ``tokens`` is the prompt's size in the model's tokens as far as the server can tell (its
    count, calibrated by what the model reported before), ``counted`` the raw count, and
    ``budget`` what the prompt was allowed. ``max_output_tokens`` is the longest reply to ask
    for (``None``: no limit is sent).
    """

    messages: list[PromptMessage]
    omitted: int = 0
    tokens: int = 0
    budget: int = 0
    counted: int = 0
    max_output_tokens: int | None = None

    @property
    def conversation_messages(self) -> int:
        """Messages sent, not counting the system prompt (``context_messages`` on the wire)."""
        # Only the first message can be the system prompt (history never holds one), so this
        # is O(1): it is read on every turn, and histories run to hundreds of messages.
        messages = self.messages
        return len(messages) - (1 if messages and messages[0].role is Role.SYSTEM else 0)


def _history(session: Session, history: Sequence[Message]) -> list[PromptMessage]:
    """The history the model sees: the session's *answered turns*, as user/assistant pairs.

    Chat templates of many models (Llama 2, Mistral, Gemma...) refuse a conversation whose
    roles do not alternate, so the prompt is built from whole turns only. A turn is sent
    when its reply has text and did not fail: a reply cut short by CANCEL or a shutdown is
    sent as far as it got. An *unanswered* turn is left out as a whole, the user message with
    it: a reply cancelled or interrupted before its first word, a model that said nothing,
    and a failed turn (which RETRY sends again as the new message, so it is not sent twice).
    The person still sees those messages in the history; the model does not.

    Whatever the stored history holds (a trimmed one may start with an answer), the result
    alternates user, assistant, starting with a user message.
    """
    turns: list[PromptMessage] = []
    for question, answer in itertools.pairwise(history):
        if _answered(question, answer):
            turns.append(PromptMessage(Role.USER, question.content))
            turns.append(PromptMessage(Role.ASSISTANT, answer.content))
    return turns


def _answered(question: Message, answer: Message) -> bool:
    """Whether two consecutive history messages are a turn the model sees (see _history)."""
    return (
        question.role is Role.USER
        and answer.role is Role.ASSISTANT
        and bool(question.content)
        and bool(answer.content)
        and MessageStatus.FAILED not in (question.status, answer.status)
    )


#: Sessions whose prepared history a :class:`ContextBudget` keeps (least recently used go).
PREPARED_SESSIONS = 256


@dataclass(slots=True)
class _Prepared:
    """A session's history as the model sees it (:func:`_history`), with running totals.

    Histories only grow between turns, so each turn converts and counts only the messages
    added since the last one: building a prompt was O(history) in Python objects on every
    turn (hundreds of microseconds at a few hundred messages, before the first chunk).
    """

    count: TokenCounter
    #: The history it was made from (checked message by message, by identity, for reuse).
    source: list[Message] = field(default_factory=list)
    #: What _history returns for ``source``: answered turns, user then assistant.
    prompts: list[PromptMessage] = field(default_factory=list)
    #: ``totals[i]``: tokens of ``prompts[:i]`` (each message as fit_messages counts it).
    totals: list[int] = field(default_factory=lambda: [0])

    def extends(self, history: Sequence[Message], count: TokenCounter) -> bool:
        source = self.source
        return (
            count is self.count
            and len(source) <= len(history)
            and all(map(operator.is_, source, history))
        )

    def add(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        count, prompts, totals = self.count, self.prompts, self.totals
        # Turns are pairs of consecutive messages: the first new message may answer the
        # last one seen before.
        for question, answer in itertools.pairwise([*self.source[-1:], *messages]):
            if _answered(question, answer):
                for role, content in (
                    (Role.USER, question.content),
                    (Role.ASSISTANT, answer.content),
                ):
                    prompts.append(PromptMessage(role, content))
                    totals.append(totals[-1] + count(content) + MESSAGE_OVERHEAD_TOKENS)
        self.source.extend(messages)

    def fit(
        self, system: PromptMessage | None, newest: PromptMessage, budget: int
    ) -> tuple[list[PromptMessage], int, int] | None:
        """What :func:`fit_messages` returns for these prompts, in O(log n + kept)."""
        count, prompts, totals = self.count, self.prompts, self.totals
        used = count(newest.content) + MESSAGE_OVERHEAD_TOKENS
        if system is not None:
            used += count(system.content) + MESSAGE_OVERHEAD_TOKENS
        if used > budget:
            return None
        # Every message costs at least MESSAGE_OVERHEAD_TOKENS, so the newest-first walk of
        # fit_messages stops exactly where the newest suffix stops fitting.
        total = totals[-1]
        start = bisect.bisect_left(totals, total - (budget - used))
        used += total - totals[start]
        while start < len(prompts) and prompts[start].role is Role.ASSISTANT:
            used -= totals[start + 1] - totals[start]
            start += 1
        messages = ([system] if system is not None else []) + prompts[start:] + [newest]
        return messages, start, used


def build_context(session: Session, history: Sequence[Message], text: str) -> Context:
    """The system prompt, then the whole history, then ``text`` as the new user message."""
    messages: list[PromptMessage] = []
    if session.system_prompt:
        messages.append(PromptMessage(Role.SYSTEM, session.system_prompt))
    messages.extend(_history(session, history))
    messages.append(PromptMessage(Role.USER, text))
    return Context(messages)


def fit_messages(
    system: PromptMessage | None,
    history: Sequence[PromptMessage],
    newest: PromptMessage,
    budget: int,
    count: Callable[[str], int],
) -> tuple[list[PromptMessage], int, int] | None:
    """Fit a prompt into ``budget`` tokens: ``(messages, omitted, tokens)``, or ``None``.

    The system prompt and ``newest`` are always kept; history is taken newest first while it
    fits, and the first message that does not fit ends it (the kept history is the most
    recent, contiguous part). A kept history never starts with an assistant message.
    ``None`` when the system prompt and ``newest`` alone exceed the
    budget.

    >>> m = [PromptMessage(Role.USER, "x" * 30), PromptMessage(Role.ASSISTANT, "y" * 30)]
    >>> kept, omitted, tokens = fit_messages(None, m, PromptMessage(Role.USER, "z"), 30, len)
    >>> [p.content[0] for p in kept], omitted, tokens
    (['z'], 2, 5)
    """

    def cost(message: PromptMessage) -> int:
        return count(message.content) + MESSAGE_OVERHEAD_TOKENS

    used = cost(newest) + (cost(system) if system is not None else 0)
    if used > budget:
        return None
    start = len(history)
    while start > 0:
        needed = cost(history[start - 1])
        if used + needed > budget:
            break
        used += needed
        start -= 1
    # The dropped question of a kept answer would leave the answer without its context (and
    # a prompt starting with an answer breaks templates that require alternating roles).
    while start < len(history) and history[start].role is Role.ASSISTANT:
        used -= cost(history[start])
        start += 1
    messages = ([system] if system is not None else []) + list(history[start:]) + [newest]
    return messages, start, used


@dataclass(slots=True)
class Calibration:
    """How a model's real prompt sizes relate to the server's count of them.

    The count (a tokenizer-free estimate, or even an exact tokenizer, which does not see the
    chat template's own tokens) can run under what the model reports in ``usage``: a small
    vocabulary needs more tokens per character than the estimate assumes, and templates add
    markers and preambles. From each reported prompt size the calibration keeps an upper
    bound ``real <= scale * counted + overhead`` that holds for every prompt it has seen
    (the last :data:`CALIBRATION_SAMPLES`), with a margin on the scale; the budget is then
    applied to that bound, so what fits by the count fits for real.

    It only ever makes the count larger (scale >= 1, overhead >= 0): a model whose real
    counts run lower keeps the plain count, which errs high already.

    >>> c = Calibration()
    >>> c.observe(counted=100, reported=120)
    >>> c.scale > 1.2, c.tokens(100) >= 120
    (True, True)
    """

    samples: list[tuple[int, int]] = field(default_factory=list)
    scale: float = 1.0
    overhead: int = 0

    def observe(self, *, counted: int, reported: int) -> None:
        if counted <= 0 or reported <= 0:
            return
        self.samples.append((counted, reported))
        del self.samples[:-CALIBRATION_SAMPLES]
        # The scale from prompts large enough that a template's fixed tokens matter little;
        # the overhead then covers whatever the scale leaves over on any prompt seen.
        ratios = [real / count for count, real in self.samples if count >= _MIN_SCALE_SAMPLE]
        ratio = max(ratios, default=1.0)
        self.scale = ratio * CALIBRATION_MARGIN if ratio > 1.0 else 1.0
        self.overhead = max(
            0, max(math.ceil(real - self.scale * count) for count, real in self.samples)
        )

    def tokens(self, counted: int) -> int:
        """The real size of a prompt the server counts ``counted`` tokens, at most."""
        return math.ceil(self.scale * counted) + self.overhead

    def budget(self, budget: int) -> int:
        """The most the server may count for a prompt whose real size must fit ``budget``."""
        allowed = math.floor((budget - self.overhead) / self.scale)
        # The division can round up to a whole number that tokens() then rounds past the
        # budget (123 / 3.41666... is 36.0, and 36 * 3.41666... is 123.00000000000001).
        while allowed > 0 and self.tokens(allowed) > budget:
            allowed -= 1
        return allowed


#: Reported prompt sizes a calibration remembers (the newest).
CALIBRATION_SAMPLES = 64
#: Headroom on the largest ratio seen, for prompts unlike the ones seen so far.
CALIBRATION_MARGIN = 1.05
#: Counted size from which a prompt's ratio sets the scale.
_MIN_SCALE_SAMPLE = 32


class ContextBudget:
    """Fits each turn's prompt into its model's context window.

    One per server: it caches the tokenizers it loads.

    >>> from chat.types import utcnow
    >>> now = utcnow()
    >>> session = Session("s", now, now, system_prompt="Be brief.")
    >>> budget = ContextBudget(ContextSettings(context_window=4096))
    >>> budget.build(session, [], "hello", model="echo").conversation_messages
    1
    """

    def __init__(self, settings: ContextSettings | None = None) -> None:
        self.settings = settings or ContextSettings()
        self._counters: dict[str, TokenCounter] = {}
        self._encodings: dict[str, TokenCounter | None] = {}
        self._calibrations: dict[str, Calibration] = {}
        self._prepared: OrderedDict[str, _Prepared] = OrderedDict()
        self._reuse = True

    def _prepare(
        self, session_id: str, history: Sequence[Message], count: TokenCounter
    ) -> _Prepared:
        """The session's history as the model sees it, reusing the last turn's work.

        Reused only while the history read now starts with the very messages (the same
        objects) read last time, as the memory store returns them; a trimmed history or
        another token counter starts afresh. A store that decodes its messages anew on every
        read (SQLite, Redis) hands out equal but new objects: then nothing is kept at all,
        rather than holding the histories of hundreds of sessions for nothing.
        """
        prepared = self._prepared.get(session_id)
        if prepared is not None:
            if prepared.extends(history, count):
                self._prepared.move_to_end(session_id)
                prepared.add(history[len(prepared.source) :])
                return prepared
            first = prepared.source[0] if prepared.source else None
            if first is not None and history and first is not history[0] and first == history[0]:
                self._reuse = False
                self._prepared.clear()
        prepared = _Prepared(count)
        prepared.add(history)
        if self._reuse:
            self._prepared[session_id] = prepared
            self._prepared.move_to_end(session_id)
            if len(self._prepared) > PREPARED_SESSIONS:
                self._prepared.popitem(last=False)
        return prepared

    def calibration(self, model: str) -> Calibration:
        """What the reports of ``model`` taught about its prompt sizes (see :meth:`observe`)."""
        calibration = self._calibrations.get(model)
        if calibration is None:
            calibration = self._calibrations[model] = Calibration()
        return calibration

    def observe(self, model: str, context: Context, prompt_tokens: int) -> None:
        """Learn from the prompt size ``model`` reported for a prompt built by :meth:`build`."""
        self.calibration(model).observe(counted=context.counted, reported=prompt_tokens)

    def policy_for(self, session: Session) -> ContextPolicy:
        if session.context_policy is ContextPolicy.UNSPECIFIED:
            return self.settings.default_policy
        return session.context_policy

    def counter_for(self, model: str) -> TokenCounter:
        """The model's tokenizer when available offline, else :func:`estimate_tokens`."""
        counter = self._counters.get(model)
        if counter is None:
            encoding = _openai_encoding(model) if self.settings.use_tokenizers else None
            counter = self._encoding_counter(encoding) if encoding else None
            counter = counter or estimate_tokens
            self._counters[model] = counter
        return counter

    def _encoding_counter(self, name: str) -> TokenCounter | None:
        if name in self._encodings:
            return self._encodings[name]
        counter: TokenCounter | None = None
        try:
            with warnings.catch_warnings():
                # bpe-openai reads its data (at import and at first use) with a deprecated
                # importlib.resources call.
                warnings.simplefilter("ignore", DeprecationWarning)
                bpe: Any = importlib.import_module("bpe_openai")
                encoding = bpe.get_encoding(name)
                # The tables load on first use: load them here, where the warning is off.
                encoding.encode_ordinary("warm up")
        except ImportError:
            pass
        # Any other failure (a broken install) means: estimate instead.
        except Exception:  # noqa: BLE001
            log.warning("could not load the %s tokenizer; estimating token counts", name)
        else:
            log.info("counting tokens with the %s encoding", name)

            def count(text: str) -> int:
                return len(encoding.encode_ordinary(text))

            counter = count
        self._encodings[name] = counter
        return counter

    def build(
        self,
        session: Session,
        history: Sequence[Message],
        text: str,
        *,
        model: str,
    ) -> Context:
        """The prompt for ``text`` on ``session``, fitted to ``model``'s budget.

        The session's ``max_reply_tokens`` (0: the server's reply reserve) is kept free of
        prompt, and is what the model is asked for at most (``Context.max_output_tokens``),
        no more than the window has left.

        Raises :class:`~chat.errors.ContextTooLong` when the new message (with the system
        prompt) does not fit at all, or when history must be left out and the session's
        policy is ``REJECT``.
        """
        settings = self.settings
        limit = settings.reply_limit(session.max_reply_tokens)
        budget = settings.prompt_budget(model, limit)
        count = self.counter_for(model)
        calibration = self.calibration(model)
        system = (
            PromptMessage(Role.SYSTEM, session.system_prompt) if session.system_prompt else None
        )
        newest = PromptMessage(Role.USER, text)
        prepared = self._prepare(session.session_id, history, count)
        fitted = prepared.fit(system, newest, calibration.budget(budget))
        window = settings.window_for(model)
        if fitted is None:
            what = "the message with the system prompt" if system is not None else "the message"
            raise ContextTooLong(
                "message",
                f"{what} needs more tokens than model {model!r} accepts per turn "
                f"({budget} of its {window}-token context window; the rest is kept for the "
                "reply): shorten it",
            )
        messages, omitted, counted = fitted
        if omitted and self.policy_for(session) is ContextPolicy.REJECT:
            raise ContextTooLong(
                "history",
                f"this session's history no longer fits model {model!r}'s context window "
                f"({window} tokens, {window - budget} kept for the reply) and its context "
                "policy is REJECT: set the policy to TRUNCATE to leave the oldest messages "
                "out, or start a new session; the message is kept and can be retried",
            )
        tokens = calibration.tokens(counted)
        # A limit larger than the room kept may use what the window has left, no more.
        reply = min(limit, window - tokens) if limit > 0 else None
        return Context(
            messages,
            omitted=omitted,
            tokens=tokens,
            budget=budget,
            counted=counted,
            max_output_tokens=max(1, reply) if reply is not None else None,
        )
