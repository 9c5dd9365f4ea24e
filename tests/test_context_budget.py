"""The context budget: what is kept, what is dropped, and how the client is told."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chat.backends import PromptMessage
from chat.context import (
    CALIBRATION_SAMPLES,
    MESSAGE_OVERHEAD_TOKENS,
    Calibration,
    ContextBudget,
    ContextSettings,
    _history,
    build_context,
    estimate_tokens,
    fit_messages,
)
from chat.errors import ConfigurationError, ContextTooLong
from chat.types import ContextPolicy, Message, MessageStatus, Role, Session, utcnow
from tests.strategies import histories, messages, prompt_text, turn_histories, user_message

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


def answered_turns(history: list[Message]) -> list[tuple[str, str]]:
    """The (question, answer) pairs of a stored history that a model may see."""
    return [
        (question.content, answer.content)
        for question, answer in itertools.pairwise(history)
        if question.role is Role.USER
        and answer.role is Role.ASSISTANT
        and question.content
        and answer.content
        and MessageStatus.FAILED not in (question.status, answer.status)
    ]


def assert_alternates(
    messages: list[PromptMessage], system_prompt: str, newest: str, history: list[Message]
) -> None:
    """The prompt invariant chat templates rely on (issue 15, defect 1)."""
    if system_prompt:
        assert messages[0] == PromptMessage(Role.SYSTEM, system_prompt)
        messages = messages[1:]
    roles = [m.role for m in messages]
    # user, assistant, user, assistant, ..., and the new user message last.
    assert roles == [Role.USER, Role.ASSISTANT] * (len(roles) // 2) + [Role.USER]
    assert messages[-1] == PromptMessage(Role.USER, newest)
    # Every answer goes with its own question, and the turns sent are the newest answered
    # ones, in order.
    pairs = [(q.content, a.content) for q, a in zip(messages[:-1:2], messages[1::2], strict=True)]
    answered = answered_turns(history)
    assert pairs == answered[len(answered) - len(pairs) :]


@given(
    history=turn_histories | st.lists(messages, max_size=20),
    system_prompt=st.sampled_from(["", "Be brief."]),
    newest=user_message,
    room=st.integers(0, 400),
    count=counters,
)
def test_the_prompt_alternates_user_and_assistant_whatever_the_history(
    history: list[Message],
    system_prompt: str,
    newest: str,
    room: int,
    count: Callable[[str], int],
) -> None:
    """Cancelled, failed and empty turns never leave two user messages in a row."""
    subject = session(system_prompt=system_prompt)
    assert_alternates(
        build_context(subject, history, newest).messages, system_prompt, newest, history
    )
    # A window where the new message always fits, and ``room`` tokens for history.
    required = sum(
        count(text) + MESSAGE_OVERHEAD_TOKENS for text in (newest, system_prompt) if text
    )
    window = max(16, required + room + 8)
    budget = ContextBudget(ContextSettings(context_window=window, reply_reserve=8))

    def counter(text: str) -> int:
        return count(text)

    budget._counters["m"] = counter
    context = budget.build(subject, history, newest, model="m")
    assert_alternates(context.messages, system_prompt, newest, history)
    sent = context.conversation_messages - 1
    assert context.omitted == 2 * len(answered_turns(history)) - sent


def test_an_unanswered_turn_is_left_out_with_its_question() -> None:
    now = utcnow()
    history = [
        Message(Role.USER, "cancelled at once", now),
        Message(Role.ASSISTANT, "", now, MessageStatus.CANCELLED),
        Message(Role.USER, "nothing said", now),
        Message(Role.ASSISTANT, "", now),
        Message(Role.USER, "cut short", now),
        Message(Role.ASSISTANT, "Once upon", now, MessageStatus.INTERRUPTED),
    ]
    context = ContextBudget().build(session(), history, "next", model="m")
    assert [(m.role, m.content) for m in context.messages] == [
        (Role.USER, "cut short"),
        (Role.ASSISTANT, "Once upon"),
        (Role.USER, "next"),
    ]


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


# -- the reply limit (issue 15, defect 4) -----------------------------------------------------


def test_the_reply_reserve_is_the_reply_limit_sent_to_the_model() -> None:
    settings = ContextSettings(context_window=1000, reply_reserve=100)
    context = ContextBudget(settings).build(session(), history_of(2), "hi", model="m")
    assert context.max_output_tokens == 100
    assert context.budget == 900


def test_a_session_limit_replaces_the_reserve_and_is_kept_free_of_prompt() -> None:
    budget = ContextBudget(ContextSettings(context_window=1000, reply_reserve=100))
    limited = dataclasses.replace(session(), max_reply_tokens=300)
    context = budget.build(limited, history_of(2), "hi", model="m")
    assert (context.max_output_tokens, context.budget) == (300, 700)
    # Beyond half the window the prompt keeps its half, and the reply may use the rest.
    limited = dataclasses.replace(session(), max_reply_tokens=5000)
    context = budget.build(limited, history_of(2), "hi", model="m")
    assert context.budget == 500
    assert context.max_output_tokens == 1000 - context.tokens


def test_a_reply_reserve_of_0_sends_no_limit() -> None:
    context = ContextBudget(ContextSettings(reply_reserve=0)).build(session(), [], "hi", model="m")
    assert context.max_output_tokens is None


# -- calibration from reported usage (issue 15, defect 5) -------------------------------------


def true_prompt_tokens(messages: list[PromptMessage]) -> int:
    """A model whose tokenizer needs more tokens than the estimate: 2.5 characters a token,
    3 template tokens a message and a 5-token preamble (a small vocabulary, as in the issue)."""
    return 5 + sum(-(-len(m.content) * 2 // 5) + 3 for m in messages)


def grow_conversation(budget: ContextBudget, *, learn: bool) -> list[int]:
    """The true prompt size of each turn of a conversation that outgrows the window."""
    now = utcnow()
    history: list[Message] = []
    sizes = []
    for n in range(30):
        text = f"question {n}: " + "how does this work, and why? " * (1 + n % 4)
        context = budget.build(session(system_prompt="Be brief."), history, text, model="m")
        real = true_prompt_tokens(context.messages)
        sizes.append(real)
        if learn:
            budget.observe("m", context, real)
        answer = f"answer {n}: " + "it works because it does. " * (2 + n % 3)
        history += [Message(Role.USER, text, now), Message(Role.ASSISTANT, answer, now)]
    return sizes


def test_the_estimate_is_calibrated_so_that_what_fits_by_it_fits_for_real() -> None:
    settings = ContextSettings(context_window=1000, reply_reserve=200)
    uncalibrated = grow_conversation(ContextBudget(settings), learn=False)
    assert max(uncalibrated) > 800, "the estimate alone runs under this model's count"
    calibrated = grow_conversation(ContextBudget(settings), learn=True)
    # From the first report on, every prompt fits the 800 tokens the reply leaves free.
    assert max(calibrated[1:]) <= 800
    # And the calibration does not throw history away: the window stays well used.
    assert max(calibrated[1:]) > 700


def test_a_model_whose_count_runs_lower_keeps_the_plain_estimate() -> None:
    budget = ContextBudget(ContextSettings(context_window=1000, reply_reserve=200))
    context = budget.build(session(), history_of(4), "hi", model="m")
    budget.observe("m", context, context.counted // 2)
    calibration = budget.calibration("m")
    assert (calibration.scale, calibration.overhead) == (1.0, 0)
    # Per model: another model's reports teach nothing about this one.
    assert budget.calibration("other").samples == []


@given(
    samples=st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 20000)), min_size=1),
)
def test_a_calibration_covers_every_prompt_it_has_seen(samples: list[tuple[int, int]]) -> None:
    calibration = Calibration()
    for counted, reported in samples:
        calibration.observe(counted=counted, reported=reported)
    for counted, reported in samples[-CALIBRATION_SAMPLES:]:
        assert calibration.tokens(counted) >= reported
        # The count a budget allows is one whose bound is within that budget.
        assert calibration.tokens(calibration.budget(reported)) <= reported


# -- reuse across turns: the same prompts as fitting the whole history afresh ---------------

stored_messages = st.builds(
    Message,
    st.sampled_from([Role.USER, Role.ASSISTANT]),
    st.text("ab ", max_size=40),
    st.just(utcnow()),
    st.sampled_from(list(MessageStatus)),
)
#: Mostly answered turns (what the model sees), some single messages of any kind: a question
#: whose answer comes with the next append, failed or empty ones.
appended = st.lists(
    st.one_of(
        st.builds(
            lambda question, answer: [
                Message(Role.USER, question, utcnow()),
                Message(Role.ASSISTANT, answer, utcnow()),
            ],
            st.text("ab ", min_size=1, max_size=40),
            st.text("ab ", min_size=1, max_size=40),
        ),
        stored_messages.map(lambda m: [m]),
    ),
    max_size=3,
).map(lambda parts: [m for part in parts for m in part])
#: What happens to a session's history between two turns.
changes = st.one_of(
    st.tuples(st.just("append"), appended),
    st.tuples(st.just("trim"), st.integers(1, 5)),
    # A store that decodes its messages anew on each read (equal messages, new objects).
    st.tuples(st.just("decode"), st.none()),
)


def fitted_afresh(
    session: Session, history: list[Message], text: str, budget: ContextBudget
) -> tuple[list[PromptMessage], int, int] | None:
    """The specification: fit_messages over the whole history the model sees."""
    seen = _history(session, history)
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
        assert (context.messages, context.omitted, context.counted) == expected
        assert context.conversation_messages == len(expected[0]) - (1 if system_prompt else 0)


def test_a_history_that_fits_exactly_is_kept_whole() -> None:
    now = utcnow()
    # Each message costs 1 token of text ("abc", estimated) and the per-message overhead.
    roles = (Role.USER, Role.ASSISTANT) * 2
    history = [Message(role, "abc", now) for role in roles]
    exact = 5 * (1 + MESSAGE_OVERHEAD_TOKENS)
    context = ContextBudget(ContextSettings(context_window=exact, reply_reserve=0)).build(
        session(), history, "abc", model="m"
    )
    assert (context.omitted, context.counted) == (0, exact)
    # One token less: the oldest question goes, and with it its answer.
    context = ContextBudget(ContextSettings(context_window=exact - 1, reply_reserve=0)).build(
        session(), history, "abc", model="m"
    )
    assert (context.omitted, len(context.messages)) == (2, 3)


def test_an_answer_stored_after_the_last_turn_completes_its_question() -> None:
    now = utcnow()
    question = Message(Role.USER, "asked", now)
    budget = ContextBudget()
    # The question alone is no turn yet (its answer is still streaming, say)...
    assert budget.build(session(), [question], "next", model="m").conversation_messages == 1
    # ...and with its answer, read as the same message objects, it is one.
    history = [question, Message(Role.ASSISTANT, "answer", now)]
    context = budget.build(session(), history, "next", model="m")
    assert [m.content for m in context.messages] == ["asked", "answer", "next"]
