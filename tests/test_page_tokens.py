"""Page tokens are opaque and tamper-evident, and every server sharing a store accepts them."""

from __future__ import annotations

import base64

import pytest

from chat import ChatCore, EchoBackend, MemoryStore
from chat._page_tokens import PageTokens
from chat.errors import InvalidArgument
from chat.store._cursor import decode_cursor


async def _cores_sharing_a_store() -> tuple[ChatCore, ChatCore]:
    store = MemoryStore()
    one, two = ChatCore(store, EchoBackend()), ChatCore(store, EchoBackend())
    for n in range(5):
        await one.create_session(title=str(n))
    return one, two


async def test_a_token_from_one_server_pages_on_another_sharing_the_store() -> None:
    one, two = await _cores_sharing_a_store()
    first, token, total = await one.list_sessions(2)
    assert total == 5
    assert token
    second, token, _ = await two.list_sessions(2, token)
    third, token, _ = await one.list_sessions(2, token)
    assert token == ""
    titles = [s.title for s in (*first, *second, *third)]
    assert titles == ["4", "3", "2", "1", "0"]


async def test_a_token_of_another_store_is_refused() -> None:
    one, _ = await _cores_sharing_a_store()
    other, _ = await _cores_sharing_a_store()
    _, token, _ = await one.list_sessions(2)
    with pytest.raises(InvalidArgument) as raised:
        await other.list_sessions(2, token)
    assert raised.value.field == "page_token"


async def test_the_tokens_do_not_show_the_cursor_in_plain_text() -> None:
    one, _ = await _cores_sharing_a_store()
    sessions, token, _ = await one.list_sessions(2)
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert sessions[-1].session_id.encode() not in raw
    with pytest.raises(InvalidArgument):
        decode_cursor(token)


def test_every_changed_byte_is_noticed() -> None:
    tokens = PageTokens(b"k" * 32)
    token = tokens.seal("some cursor")
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    for index in range(len(raw)):
        changed = bytearray(raw)
        changed[index] ^= 0x01
        forged = base64.urlsafe_b64encode(bytes(changed)).decode().rstrip("=")
        with pytest.raises(InvalidArgument):
            tokens.open(forged)
    for junk in ("", "=", "!!!", "AAAA", token[:-1], token + "A"):
        with pytest.raises(InvalidArgument):
            tokens.open(junk)
