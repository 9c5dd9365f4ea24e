"""Replies as Markdown while they stream: finished blocks printed once, the open one redrawn.

A reply arrives in pieces, and Markdown cannot be rendered piece by piece (a ``*`` may open
emphasis, a fence may open a code block). Redrawing the whole reply at each chunk would
flicker and, past a screenful, scroll the terminal. So the text is cut into top-level
blocks (paragraphs, lists, code blocks, tables...) with the parser rich renders with: every
block but the last is finished, printed once and never touched again; only the last one,
still growing, is drawn in a live region, at most ``1 / min_interval`` times a second, and
cut to its last lines when it is taller than the terminal.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import time
from collections.abc import Callable, Iterable

from markdown_it import MarkdownIt
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.text import Text

__all__ = ["StreamingMarkdown", "split_finished"]

# The parser rich.markdown.Markdown uses, so that blocks are cut where rich sees them.
_PARSER = MarkdownIt().enable("strikethrough").enable("table")
_LINES = re.compile(r"(?<=\n)")


def split_finished(text: str) -> tuple[list[str], str]:
    """Cut ``text`` into its finished top-level blocks and the rest (the block still open).

    A block is finished once the next one has started: nothing written after that can
    change it (bar link reference definitions further down, which are rare in replies).

    >>> split_finished("# Title\\n\\nSome *text*\\n\\n- one\\n- tw")
    (['# Title\\n\\n', 'Some *text*\\n\\n'], '- one\\n- tw')
    >>> split_finished("```\\nopen code\\n\\nstill code")
    ([], '```\\nopen code\\n\\nstill code')
    """
    starts = sorted(
        {
            token.map[0]
            for token in _PARSER.parse(text)
            if token.level == 0 and token.map is not None and token.nesting >= 0
        }
    )
    if len(starts) < 2:
        return [], text
    lines = _LINES.split(text)
    # The first block takes whatever comes before it (blank lines, link definitions).
    bounds = [0, *starts[1:]]
    blocks = ["".join(lines[a:b]) for a, b in itertools.pairwise(bounds)]
    return blocks, "".join(lines[bounds[-1] :])


def _blank(line: list[Segment]) -> bool:
    return not "".join(segment.text for segment in line).strip()


class _Block:
    """One block of Markdown, without the blank lines rich puts around some elements.

    Blocks are rendered one by one, so the space between them is set here: one blank line
    before each block but the first (``gap``), as in a document rendered whole. With
    ``last_lines``, only the last lines are drawn (the open block in the live region).
    """

    def __init__(self, markdown: Markdown, *, gap: bool, last_lines: int | None = None) -> None:
        self._markdown = markdown
        self._gap = gap
        self._last_lines = last_lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self._markdown, options, pad=False)
        while lines and _blank(lines[0]):
            del lines[0]
        while lines and _blank(lines[-1]):
            del lines[-1]
        if self._gap:
            lines.insert(0, [])
        if self._last_lines is not None:
            lines = lines[-self._last_lines :]
        for line in lines:
            yield from line
            yield Segment.line()


class StreamingMarkdown:
    """Feed it the pieces of a reply; :meth:`close` when the reply ends.

    ``clock`` and ``min_interval`` set how often the open block is redrawn (the redraws
    are counted in :attr:`redraws`); pieces that arrive in between only wait for the next
    redraw, which a timer on the running event loop makes at the latest ``min_interval``
    later.
    """

    def __init__(
        self,
        console: Console,
        *,
        min_interval: float = 1 / 12,
        clock: Callable[[], float] = time.monotonic,
        code_theme: str = "monokai",
    ) -> None:
        self._console = console
        self._min_interval = min_interval
        self._clock = clock
        self._code_theme = code_theme
        self._open = ""
        self._printed = 0
        self._last_redraw = -math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._live: Live | None = None
        self._closed = False
        #: How many times the open block was drawn.
        self.redraws = 0

    @property
    def printed_blocks(self) -> int:
        """Finished blocks printed so far."""
        return self._printed

    def feed(self, text: str) -> None:
        if self._closed:
            raise RuntimeError("the reply was closed")
        self._open += text.replace("\r\n", "\n")
        wait = self._last_redraw + self._min_interval - self._clock()
        if wait <= 0:
            self._redraw()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop: the next feed (or close) draws it
            self._timer = loop.call_later(wait, self._redraw)

    def close(self) -> None:
        """Print what is left in full and end the live region."""
        if self._closed:
            return
        self._closed = True
        self._cancel_timer()
        blocks, rest = split_finished(self._open)
        self._open = ""
        if self._live is not None:
            # Drawn empty and then dropped: the rest is printed below in full, whatever
            # its height (the live region only ever shows what fits).
            self._live.update(Text(""), refresh=True)
            self._live.stop()
            self._live = None
        for block in [*blocks, rest]:
            self._print_block(block)

    def _markdown(self, text: str) -> Markdown:
        return Markdown(text, code_theme=self._code_theme)

    def _print_block(self, block: str) -> None:
        if not block.strip():
            return
        self._console.print(_Block(self._markdown(block), gap=self._printed > 0))
        self._printed += 1

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _redraw(self) -> None:
        self._cancel_timer()
        if self._closed:
            return
        self._last_redraw = self._clock()
        blocks, self._open = split_finished(self._open)
        self._print_blocks(blocks)
        if not self._open.strip():
            return
        # One line is kept free, so that the live region never scrolls the screen.
        room = max(1, self._console.size.height - 1)
        tail = _Block(self._markdown(self._open), gap=self._printed > 0, last_lines=room)
        if self._live is None:
            self._live = Live(
                tail,
                console=self._console,
                auto_refresh=False,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
                vertical_overflow="visible",
            )
            self._live.start(refresh=True)
        else:
            self._live.update(tail, refresh=True)
        self.redraws += 1

    def _print_blocks(self, blocks: Iterable[str]) -> None:
        # While the live region is up, rich prints above it.
        for block in blocks:
            self._print_block(block)
