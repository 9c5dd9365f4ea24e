"""The context budget: what is kept, what is dropped, and how the client is told."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chat.backends import PromptMessage
from chat.context import (
    MESSAGE_OVERHEAD_TOKENS,
    ContextBudget,
    ContextSettings,
    estimate_tokens,
    fit_messages,
)
from chat.errors import ConfigurationError, ContextTooLong
from chat.types import ContextPolicy, Message, MessageStatus, Role, Session, utcnow
from tests.strategies import histories, prompt_text

counters: st.SearchStrategy[Callable[[str], int]] = st.sampled_from([estimate_tokens, len])


def cost(message: PromptMessage, count: Callable[[str], int]) -> int:
    return count(message.content) + MESSAGE_OVERHEAD_TOKENS


@given(
    system=st.none() | prompt_text,
    history=histories,
    newest=prompt_text,
    budget=st.integers(0, 3000),
    count=counters,
)
def test_fitting_keeps_system_and_newest_keeps_order_and_fits(
    system: str | None,
    history: list[PromptMessage],
    newest: str,
    budget: int,
    count: Callable[[str], int],
) -> None:
    system_message = PromptMessage(Role.SYSTEM, system) if system is not None else None
    newest_message = PromptMessage(Role.USER, newest)
    required = cost(newest_message, count) + (cost(system_message, count) if system_message else 0)
    fitted = fit_messages(system_message, history, newest_message, budget, count)
    if required > budget:
        assert fitted is None
        return
    assert fitted is not None
    messages, omitted, tokens = fitted
    # The system prompt first, the newest message last.
    if system_message is not None:
        assert messages[0] == system_message
    assert messages[-1] == newest_message
    # The kept history is the newest part of the history, in its order.
    kept = messages[(1 if system_message else 0) : -1]
    assert kept == history[len(history) - len(kept) :]
    assert omitted == len(history) - len(kept)
    # It fits, and the count is exact.
    assert tokens == sum(cost(m, count) for m in messages) <= budget
    if omitted:
        # Only the oldest were dropped, and only because the next one did not fit (or was
        # an answer whose question did not fit).
        assert not kept or kept[0].role is Role.USER
        next_older = history[omitted - 1]
        assert tokens + cost(next_older, count) > budget or next_older.role is Role.ASSISTANT


def session(
    *, system_prompt: str = "", policy: ContextPolicy = ContextPolicy.UNSPECIFIED
) -> Session:
    now = utcnow()
    return Session("s", now, now, system_prompt=system_prompt, context_policy=policy)


def history_of(count: int, size: int = 40) -> list[Message]:
    now = utcnow()
    return [
        Message(Role.USER if i % 2 == 0 else Role.ASSISTANT, f"m{i} " + "x" * size, now)
        for i in range(count)
    ]


def test_a_short_history_is_sent_whole() -> None:
    context = ContextBudget().build(session(system_prompt="sys"), history_of(4), "hi", model="m")
    assert context.omitted == 0
    assert next(m.role for m in context.messages) is Role.SYSTEM
    assert context.conversation_messages == 5


def test_truncation_drops_the_oldest_and_says_how_many() -> None:
    budget = ContextBudget(ContextSettings(context_window=200, reply_reserve=50))
    context = budget.build(session(), history_of(20), "newest", model="m")
    assert context.omitted > 0
    assert context.messages[-1].content == "newest"
    assert context.messages[0].content.startswith(f"m{context.omitted} ")
    assert context.tokens <= context.budget == 150


def test_failed_messages_are_not_history_for_the_model() -> None:
    now = utcnow()
    history = [
        Message(Role.USER, "asked", now, MessageStatus.FAILED),
        Message(Role.USER, "asked again", now),
        Message(Role.ASSISTANT, "answer", now),
        Message(Role.ASSISTANT, "", now, MessageStatus.CANCELLED),
    ]
    context = ContextBudget().build(session(), history, "next", model="m")
    assert [m.content for m in context.messages] == ["asked again", "answer", "next"]


def test_reject_policy_refuses_a_turn_that_needs_truncation() -> None:
    budget = ContextBudget(ContextSettings(context_window=200, reply_reserve=50))
    with pytest.raises(ContextTooLong, match="REJECT") as raised:
        budget.build(session(policy=ContextPolicy.REJECT), history_of(20), "hi", model="m")
    assert raised.value.field == "history"
    # The same history under the server default (TRUNCATE) is fitted.
    assert budget.build(session(), history_of(20), "hi", model="m").omitted > 0


def test_the_server_default_policy_applies_to_sessions_without_one() -> None:
    budget = ContextBudget(
        ContextSettings(context_window=200, reply_reserve=50, default_policy=ContextPolicy.REJECT)
    )
    with pytest.raises(ContextTooLong):
        budget.build(session(), history_of(20), "hi", model="m")
    truncating = session(policy=ContextPolicy.TRUNCATE)
    assert budget.build(truncating, history_of(20), "hi", model="m").omitted > 0


@pytest.mark.parametrize("policy", [ContextPolicy.TRUNCATE, ContextPolicy.REJECT])
def test_a_message_that_cannot_fit_is_refused_under_any_policy(policy: ContextPolicy) -> None:
    budget = ContextBudget(ContextSettings(context_window=100, reply_reserve=20))
    with pytest.raises(ContextTooLong, match="shorten it") as raised:
        budget.build(session(policy=policy), [], "word " * 200, model="m")
    assert raised.value.field == "message"


def test_reply_reserve_is_at_most_half_the_window() -> None:
    settings = ContextSettings(context_window=1000, reply_reserve=5000)
    assert settings.prompt_budget("m") == 500


@pytest.mark.parametrize(
    ("model", "window"),
    [
        ("gpt-4o-mini", 128_000),
        ("gpt-4", 8_192),
        ("gpt-4-turbo-2024-04-09", 128_000),
        ("gpt-4.1-nano", 1_047_576),
        ("gemini-2.0-flash", 1_048_576),
        ("models/gemini-1.5-pro-002", 2_097_152),
        ("llama3.2:latest", 131_072),
        ("some-local-model", 8_192),
    ],
)
def test_known_models_have_their_windows_and_others_the_default(model: str, window: int) -> None:
    assert ContextSettings().window_for(model) == window
    assert ContextSettings(context_window=4096).window_for(model) == 4096


@pytest.mark.parametrize(
    "settings",
    [
        {"context_window": 8},
        {"default_context_window": 0},
        {"reply_reserve": -1},
        {"default_policy": ContextPolicy.UNSPECIFIED},
    ],
)
def test_bad_settings_are_refused(settings: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        ContextSettings(**settings)  # type: ignore[arg-type]


ENGLISH = (
    "The quick brown fox jumps over the lazy dog. Streaming replies token by token makes "
    "a chat feel responsive, and a context budget keeps long conversations within the "
    "model's window without silently dropping what the person said."
)


def test_openai_models_are_counted_with_their_own_tokenizer() -> None:
    budget = ContextBudget()
    # o200k_base encodes "Hello, world!" as Hello | , | ␣world | !
    assert budget.counter_for("gpt-4o")("Hello, world!") == 4
    assert budget.counter_for("gpt-4")("Hello, world!") == 4
    assert budget.counter_for("llama3.2") is estimate_tokens
    assert ContextBudget(ContextSettings(use_tokenizers=False)).counter_for("gpt-4o") is (
        estimate_tokens
    )


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_the_estimate_errs_on_the_high_side_for_english(model: str) -> None:
    exact = ContextBudget().counter_for(model)
    assert exact is not estimate_tokens
    assert estimate_tokens(ENGLISH) >= exact(ENGLISH)


# -- reuse across turns: the same prompts as fitting the whole history afresh ---------------

stored_messages = st.builds(
    Message,
    st.sampled_from([Role.USER, Role.ASSISTANT]),
    st.text("ab ", max_size=40),
    st.just(utcnow()),
    st.sampled_from(list(MessageStatus)),
)
#: What happens to a session's history between two turns.
changes = st.one_of(
    st.tuples(st.just("append"), st.lists(stored_messages, max_size=4)),
    st.tuples(st.just("trim"), st.integers(1, 5)),
    # A store that decodes its messages anew on each read (equal messages, new objects).
    st.tuples(st.just("decode"), st.none()),
)


def fitted_afresh(
    session: Session, history: list[Message], text: str, budget: ContextBudget
) -> tuple[list[PromptMessage], int, int] | None:
    """The specification: fit_messages over the history the model sees."""
    seen = [
        PromptMessage(m.role, m.content)
        for m in history
        if m.content and m.status is not MessageStatus.FAILED and m.role is not Role.SYSTEM
    ]
    system = PromptMessage(Role.SYSTEM, session.system_prompt) if session.system_prompt else None
    count = budget.counter_for("m")
    limit = budget.settings.prompt_budget("m")
    return fit_messages(system, seen, PromptMessage(Role.USER, text), limit, count)


@given(
    turns=st.lists(st.tuples(changes, prompt_text), min_size=1, max_size=12),
    window=st.integers(16, 400),
    system_prompt=st.sampled_from(["", "be brief"]),
)
def test_a_prompt_built_from_the_last_turns_work_is_the_one_built_afresh(
    turns: list[tuple[tuple[str, object], str]], window: int, system_prompt: str
) -> None:
    budget = ContextBudget(ContextSettings(context_window=window, reply_reserve=0))
    the_session = session(system_prompt=system_prompt)
    history: list[Message] = []
    for (change, argument), text in turns:
        if change == "append":
            assert isinstance(argument, list)
            history = [*history, *argument]
        elif change == "trim":
            assert isinstance(argument, int)
            history = history[argument:]
        else:
            history = [dataclasses.replace(m) for m in history]
        expected = fitted_afresh(the_session, history, text, budget)
        if expected is None:
            with pytest.raises(ContextTooLong):
                budget.build(the_session, list(history), text, model="m")
            continue
        context = budget.build(the_session, list(history), text, model="m")
        assert (context.messages, context.omitted, context.tokens) == expected
        assert context.conversation_messages == len(expected[0]) - (1 if system_prompt else 0)


def test_a_history_that_fits_exactly_is_kept_whole() -> None:
    now = utcnow()
    # Each message costs 1 token of text ("abc", estimated) and the per-message overhead.
    history = [Message(role, "abc", now) for role in (Role.USER, Role.ASSISTANT, Role.USER)]
    exact = 4 * (1 + MESSAGE_OVERHEAD_TOKENS)
    context = ContextBudget(ContextSettings(context_window=exact, reply_reserve=0)).build(
        session(), history, "abc", model="m"
    )
    assert (context.omitted, context.tokens) == (0, exact)
    # One token less: the oldest question goes, and with it its answer.
    context = ContextBudget(ContextSettings(context_window=exact - 1, reply_reserve=0)).build(
        session(), history, "abc", model="m"
    )
    assert (context.omitted, [m.content for m in context.messages]) == (2, ["abc", "abc"])
