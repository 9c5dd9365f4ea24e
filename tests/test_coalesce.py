"""Coalescing deltas: nothing lost or reordered, nothing held past the window, closing closes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chat.backends import Delta
from chat.backends.coalesce import coalesce
from chat.errors import BackendUnavailable
from chat.types import FinishReason, Usage
from tests.backends import collect
from tests.helpers import TIMEOUT


async def scripted(
    texts: list[str], pauses: list[int] | None = None
) -> AsyncGenerator[Delta, None]:
    for index, text in enumerate(texts):
        for _ in range((pauses or [])[index] if pauses and index < len(pauses) else 0):
            await asyncio.sleep(0)
        yield Delta(text)
    yield Delta(finish_reason=FinishReason.LENGTH, usage=Usage(3, 4))


async def drain(deltas: AsyncGenerator[Delta, None]) -> list[Delta]:
    async with contextlib.aclosing(deltas) as stream:
        return [d async for d in stream]


@given(
    texts=st.lists(st.text(min_size=1, max_size=5), max_size=20),
    pauses=st.lists(st.integers(0, 3), max_size=20),
    window=st.sampled_from([0.0, 0.001, 60.0]),
)
def test_coalescing_keeps_every_character_in_order_and_the_ending(
    texts: list[str], pauses: list[int], window: float
) -> None:
    deltas = asyncio.run(drain(coalesce(scripted(texts, pauses), window)))
    assert "".join(d.text for d in deltas) == "".join(texts)
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert deltas[-1].usage == Usage(3, 4)
    assert all(d.finish_reason is None for d in deltas[:-1])
    if window == 0:
        assert len(deltas) == len(texts) + 1


async def test_a_burst_leaves_as_one_chunk() -> None:
    deltas = await drain(coalesce(scripted(["a", "b", "c", "d"]), 60.0))
    assert [d.text for d in deltas] == ["abcd"]
    assert deltas[0].finish_reason is FinishReason.LENGTH


async def test_a_lone_delta_is_forwarded_at_once_and_a_held_one_within_the_window() -> None:
    more = asyncio.Event()
    go_on = asyncio.Event()

    async def source() -> AsyncGenerator[Delta, None]:
        yield Delta("first")
        await more.wait()
        yield Delta("second")
        # Nothing more for as long as the test likes: "second" must not wait for more.
        await go_on.wait()
        yield Delta("third")

    deltas = coalesce(source(), 0.05)
    try:
        # "first" comes while the source is blocked until the test has received it.
        assert (await asyncio.wait_for(anext(deltas), TIMEOUT)).text == "first"
        more.set()
        # "second" arrives within the window: held, then sent when the window has passed,
        # while the source is still waiting.
        assert (await asyncio.wait_for(anext(deltas), TIMEOUT)).text == "second"
        assert not go_on.is_set()
        go_on.set()
        assert (await asyncio.wait_for(anext(deltas), TIMEOUT)).text == "third"
    finally:
        await deltas.aclose()


def blocking_source(closed: asyncio.Event, blocked: asyncio.Event) -> AsyncGenerator[Delta, None]:
    async def source() -> AsyncGenerator[Delta, None]:
        try:
            yield Delta("a")
            blocked.set()
            await asyncio.Event().wait()
            yield Delta("never")
        finally:
            closed.set()

    return source()


async def test_closing_while_the_source_waits_closes_the_source() -> None:
    closed, blocked = asyncio.Event(), asyncio.Event()
    deltas = coalesce(blocking_source(closed, blocked), 60.0)
    assert (await anext(deltas)).text == "a"
    await asyncio.wait_for(blocked.wait(), TIMEOUT)
    await asyncio.wait_for(deltas.aclose(), TIMEOUT)
    assert closed.is_set()


async def test_cancelling_the_consumer_while_it_waits_closes_the_source() -> None:
    closed, blocked = asyncio.Event(), asyncio.Event()
    deltas = coalesce(blocking_source(closed, blocked), 60.0)
    assert (await anext(deltas)).text == "a"
    with pytest.raises(TimeoutError):
        # Waits for a delta that never comes, and is cancelled by the timeout.
        await asyncio.wait_for(anext(deltas), 0.05)
    assert closed.is_set()
    with pytest.raises(StopAsyncIteration):
        await anext(deltas)


async def test_text_held_when_the_source_fails_is_sent_before_the_error() -> None:
    async def source() -> AsyncGenerator[Delta, None]:
        yield Delta("a")
        yield Delta("b")
        yield Delta("c")
        raise BackendUnavailable("gone")

    received: list[str] = []
    with pytest.raises(BackendUnavailable):
        await collect(coalesce(source(), 60.0), into=received)
    assert "".join(received) == "abc"
