"""The public API is declared once, in chat/__init__.py."""

from __future__ import annotations

import types

import chat


def test_all_exports_are_importable_and_complete() -> None:
    exported = set(chat.__all__)
    assert len(exported) == len(chat.__all__), "duplicates in __all__"
    for name in exported:
        assert hasattr(chat, name), name
    public = {
        name
        for name, value in vars(chat).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - exported == set(), "public names missing from chat.__all__"
    assert sorted(chat.__all__) == list(chat.__all__)


def test_exported_classes_say_they_belong_to_the_package() -> None:
    for name in chat.__all__:
        value = getattr(chat, name)
        if isinstance(value, type):
            assert value.__module__.startswith("chat."), (name, value.__module__)
            assert value.__doc__, f"{name} has no docstring"
