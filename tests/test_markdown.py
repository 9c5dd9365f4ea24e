"""Replies rendered as Markdown while they stream (chat/cli/_markdown.py), on a fake terminal."""

from __future__ import annotations

import io
import re

from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from rich.markdown import Markdown

from chat.cli._markdown import StreamingMarkdown, split_finished

REPLY = (
    "Here is **bold** and a list:\n\n- one\n- two\n\n"
    "```python\nprint('hi')\nx = 1\n```\n\nThe *end*."
)
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def terminal(height: int = 24) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    console = Console(
        file=out, force_terminal=True, width=60, height=height, color_system=None, markup=False
    )
    return console, out


def screen(output: str) -> list[str]:
    """What a terminal shows after ``output`` (the sequences rich's live display uses)."""
    lines, row, col = [""], 0, 0
    for match in re.finditer(r"\x1b\[([0-9;?]*)([A-Za-z])|\r|\n|[^\x1b\r\n]+", output):
        text = match.group(0)
        if text == "\r":
            col = 0
        elif text == "\n":
            row, col = row + 1, 0
            lines.extend([""] * (row + 1 - len(lines)))
        elif match.group(2) == "A":
            row = max(0, row - int(match.group(1) or 1))
        elif match.group(2) == "K":
            lines[row] = lines[row][:col] if match.group(1) in ("", "0") else ""
        elif match.group(2) is None:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + text + line[col + len(text) :]
            col += len(text)
    return [line.rstrip() for line in lines[:row]]


def whole(text: str) -> list[str]:
    """The same text rendered at once, as a document."""
    console, out = terminal()
    console.print(Markdown(text))
    return [line for line in screen(out.getvalue()) if line]


def streamed(text: str, pieces: int, height: int = 24) -> tuple[list[str], StreamingMarkdown, str]:
    console, out = terminal(height)
    now = [0.0]
    stream = StreamingMarkdown(console, clock=lambda: now[0])
    size = max(1, len(text) // pieces)
    for start in range(0, len(text), size):
        stream.feed(text[start : start + size])
        now[0] += 0.02
    stream.close()
    return screen(out.getvalue()), stream, out.getvalue()


def test_a_streamed_reply_ends_as_the_whole_document_renders() -> None:
    shown, stream, _ = streamed(REPLY, pieces=len(REPLY))
    assert [line for line in shown if line] == whole(REPLY)
    assert "```" not in "\n".join(shown)
    assert "**" not in "\n".join(shown)
    assert stream.printed_blocks == 4


def test_finished_blocks_are_printed_once_and_not_redrawn() -> None:
    _, stream, raw = streamed(REPLY, pieces=len(REPLY))
    plain = _CONTROL.sub("", raw)
    # The first paragraph was finished before the list began: written once, whatever the
    # number of redraws of the blocks after it.
    assert plain.count("Here is bold and a list:") == 1
    assert stream.redraws > 1


def test_redraws_are_bounded_by_time_not_by_chunks() -> None:
    console, _ = terminal()
    stream = StreamingMarkdown(console, min_interval=0.1, clock=lambda: 5.0)
    for word in ("word " * 500).split(" "):
        stream.feed(word + " ")
    stream.close()
    # 1000 pieces in the same instant: one redraw (the first), then the final print.
    assert stream.redraws == 1


def test_an_open_block_taller_than_the_terminal_shows_its_last_lines() -> None:
    code = "```\n" + "".join(f"line {i}\n" for i in range(50)) + "```\n"
    shown, stream, raw = streamed(code, pieces=60, height=10)
    # In the end, all of it, once.
    assert [line.strip() for line in shown if line.strip()] == [f"line {i}" for i in range(50)]
    # While it grew past the screen, the redraws showed its end, not its top.
    assert _CONTROL.sub("", raw).count("line 0 ") < stream.redraws


@given(st.lists(st.sampled_from(["para", "", "- item", "```", "code", "# head", "> quote"])))
def test_blocks_and_rest_are_the_text_cut_at_line_starts(lines: list[str]) -> None:
    text = "\n".join(lines)
    blocks, rest = split_finished(text)
    assert "".join(blocks) + rest == text
    assert all(block.endswith("\n") for block in blocks)
