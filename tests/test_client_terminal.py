"""``chat-client`` in a real pseudo-terminal, used the way a person would (pexpect).

Every step waits for what the person would see, with a timeout; nothing sleeps.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from click.testing import CliRunner

from chat.cli.client import main
from tests.helpers import TIMEOUT, ServerProcess, running_server_process
from tests.proxy import ProxyThread

pytestmark = pytest.mark.slow

# prompt_toolkit draws the prompt with terminal control sequences between its parts. A fresh
# prompt is followed by cursor movements; the redrawn line of an accepted input ("You › /x")
# by the text typed, which must not count as the prompt coming back.
_CONTROL = r"(?:\x1b\[[0-9;?]*[A-Za-z]|\s)*"
PROMPT = re.compile(
    "You"
    + _CONTROL
    + r"(?:\[(?P<session>[0-9a-f]{8})\])?"
    + _CONTROL
    + r"(?:\(offline\))?"
    + _CONTROL
    + r"›(?=\x1b\[)"
)


def client_command() -> str:
    script = Path(sys.executable).with_name("chat-client")
    assert script.exists(), "chat-client is not installed in this environment"
    return str(script)


def spawn(*args: str) -> pexpect.spawn[str]:
    env = {
        **os.environ,
        "TERM": "xterm-256color",
        "NO_COLOR": "1",
        # pexpect is not a terminal emulator: it never answers cursor position requests.
        "PROMPT_TOOLKIT_NO_CPR": "1",
    }
    env.pop("CHAT_TARGET", None)
    return pexpect.spawn(
        client_command(),
        list(args),
        env=env,
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(50, 200),
    )


def matched(child: pexpect.spawn[str], group: str) -> str | None:
    match = child.match
    assert isinstance(match, re.Match)
    value = match[group]
    assert value is None or isinstance(value, str)
    return value


def prompt_session(child: pexpect.spawn[str]) -> str | None:
    """Wait for the prompt; return the session it shows."""
    child.expect(PROMPT)
    return matched(child, "session")


def expect_reply_start(child: pexpect.spawn[str]) -> None:
    """Wait until a reply streams (on a terminal, Markdown: the label has a line of its own)."""
    child.expect("Assistant ›")
    child.expect("Echo")


def finish(child: pexpect.spawn[str]) -> int:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus is not None, f"killed by signal {child.signalstatus}"
    return child.exitstatus


@pytest.fixture(scope="module")
def paced_server() -> Iterator[ServerProcess]:
    # Slow enough that a long reply is still streaming when Ctrl-C arrives. Module-scoped, so
    # set up before the per-test data directory: name the store.
    with running_server_process("--pace", "0.05", "--store", "memory://") as process:
        yield process


def test_chat_switch_sessions_and_quit(paced_server: ServerProcess) -> None:
    child = spawn("--target", paced_server.address)
    child.expect("Connected to")
    assert prompt_session(child) is None

    child.sendline("hello terminal")
    child.expect(re.escape("Echo #1 (1 message in context): hello terminal"))
    first = prompt_session(child)
    assert first is not None

    child.sendline("/sessions")
    child.expect(first)
    assert prompt_session(child) == first

    child.sendline("/new second one")
    child.expect(r"New session (?P<id>[0-9a-f]{8})")
    second = matched(child, "id")
    assert second != first
    assert prompt_session(child) == second

    child.sendline(f"/join {first[:6]}")
    child.expect(f"Joined session {first}")
    assert prompt_session(child) == first
    child.sendline("and back")
    child.expect(re.escape("Echo #2 (3 messages in context): and back"))
    prompt_session(child)

    child.sendline("/nonsense")
    child.expect("unknown command /nonsense")
    prompt_session(child)
    child.sendline("/quit")
    assert finish(child) == 0


def test_ctrl_c_cancels_a_streaming_reply_and_the_history_shows_it(
    paced_server: ServerProcess,
) -> None:
    child = spawn("--target", paced_server.address)
    prompt_session(child)
    words = " ".join(f"w{i}" for i in range(400))
    child.sendline(words)
    expect_reply_start(child)
    child.sendintr()
    child.expect(re.escape("[cancelled: the partial reply is kept]"))
    session = prompt_session(child)
    assert session is not None

    child.sendline("/history")
    child.expect(r"Assistant › Echo[^\r\n]*\[cancelled\]")
    prompt_session(child)

    # /cancel typed (with Enter) while a reply streams does the same.
    child.sendline(words)
    expect_reply_start(child)
    child.sendline("/cancel")
    child.expect(re.escape("[cancelled: the partial reply is kept]"))
    prompt_session(child)

    # The stream is still usable after the cancels.
    child.sendline("/ping")
    child.expect("pong from")
    prompt_session(child)
    # Ctrl-C on an empty line leaves, cleanly.
    child.sendintr()
    assert finish(child) == 0


def test_join_shows_another_clients_reply_live_marked_as_not_yours(
    paced_server: ServerProcess,
) -> None:
    created = CliRunner().invoke(main, ["-t", paced_server.address, "sessions", "create"])
    assert created.exit_code == 0, created.output
    session_id = created.stdout.strip()
    child = spawn("--target", paced_server.address)
    prompt_session(child)
    child.sendline(f"/join {session_id[:8]}")
    # Said once the session is watched: what another client sends from now on shows here.
    child.expect(f"Joined session {session_id[:8]}")
    assert prompt_session(child) == session_id[:8]

    elsewhere = CliRunner().invoke(
        main, ["-t", paced_server.address, "ask", "--session", session_id, "sent from elsewhere"]
    )
    assert elsewhere.exit_code == 0, elsewhere.output
    # Labelled as another client's, and streamed whole to its end.
    child.expect(re.escape("Other client › "))
    child.expect(re.escape("Echo #1 (1 message in context): sent from elsewhere"))
    assert prompt_session(child) == session_id[:8]

    # This client's own reply in the session is not labelled as another's.
    child.logfile_read = transcript = io.StringIO()
    child.sendline("and mine")
    child.expect(re.escape("Echo #2 (3 messages in context): and mine"))
    prompt_session(child)
    # (The end of the other client's reply may still be drawn meanwhile: only this reply
    # is looked at.)
    assert "Other client › Echo #2" not in transcript.getvalue()
    assert re.search(r"Assistant ›[^›]*Echo #2", transcript.getvalue())
    child.sendline("/quit")
    assert finish(child) == 0


def test_a_reply_streaming_when_the_connection_drops_goes_on_to_its_end(
    paced_server: ServerProcess,
) -> None:
    words = " ".join(f"w{i}" for i in range(40))
    with ProxyThread(paced_server.port) as proxy:
        child = spawn("--target", proxy.target, "--render", "plain")
        child.logfile_read = transcript = io.StringIO()
        prompt_session(child)
        child.sendline(words)
        expect_reply_start(child)
        assert proxy.cut_all() == 1
        child.expect("reconnected to")
        child.expect(re.escape("w38 w39"))
        session = prompt_session(child)
        child.sendline("/history")
        # Stored whole, not cut short: no tag after it.
        child.expect(r"Assistant › Echo #1 \(1 message in context\): w0 w1[^\r\n]*w39\r?\n")
        prompt_session(child)
        child.sendline("/quit")
        assert finish(child) == 0
    assert session is not None
    output = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", transcript.getvalue())
    assert "cut short" not in output
    # Plain rendering writes each chunk as it comes: each word of the reply once, around
    # the notices of the loss and the reconnection.
    start = output.index("Echo #1")
    reply = re.sub(r"· [^\r\n]*\r?\n", "", output[start : output.index("w39", start) + 3])
    assert reply == f"Echo #1 (1 message in context): {words}"


def colours(output: str) -> list[str]:
    """The colour parameters of the SGR sequences in ``output`` (bold and the like allowed)."""
    found = []
    for params in re.findall(r"\x1b\[([0-9;]*)m", output):
        for param in params.split(";"):
            if param.isdigit() and (30 <= int(param) <= 49 or 90 <= int(param) <= 107):
                found.append(param)
    return found


def test_ctrl_d_leaves_and_help_lists_the_commands(paced_server: ServerProcess) -> None:
    child = spawn("--target", paced_server.address)
    child.logfile_read = transcript = io.StringIO()
    prompt_session(child)
    child.sendline("/help")
    for command in ("/join", "/history", "/retry", "/cancel", "/disconnect"):
        child.expect(re.escape(command))
    prompt_session(child)
    child.sendline("/sessions")
    child.expect(["last activity", "No sessions yet"])
    prompt_session(child)
    child.sendeof()
    assert finish(child) == 0
    # NO_COLOR is set: a terminal, but no colour.
    assert "\x1b[" in transcript.getvalue()
    assert colours(transcript.getvalue()) == []


def test_a_missing_server_is_explained_and_the_client_stays_usable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    child = spawn("--target", f"127.0.0.1:{port}")
    child.expect("cannot reach a chat server")
    child.expect(f"chat-server --port {port}")
    child.expect(PROMPT)
    assert isinstance(child.after, str)
    assert "(offline)" in child.after
    child.sendline("/quit")
    assert finish(child) == 0


def test_ask_prints_the_partial_reply_and_exits_130_on_ctrl_c(
    paced_server: ServerProcess,
) -> None:
    words = " ".join(f"w{i}" for i in range(400))
    child = spawn("--target", paced_server.address, "ask", words)
    child.expect("Echo #1")
    child.sendintr()
    child.expect("interrupted: the reply was cancelled")
    assert finish(child) == 130


def test_ask_stops_waiting_on_a_second_ctrl_c_when_the_server_does_not_answer() -> None:
    # A frozen server takes the CANCEL and says nothing: without a way out, `ask` would wait
    # for the keepalive (15 s) and its PING's deadline before giving up.
    with running_server_process("--pace", "0.05", "--store", "memory://") as server:
        words = " ".join(f"w{i}" for i in range(400))
        child = spawn("--target", server.address, "ask", words)
        try:
            child.expect("Echo #1")
            server.process.send_signal(signal.SIGSTOP)
            child.sendintr()
            child.expect("Ctrl-C again")
            child.sendintr()
            child.expect("interrupted")
            assert finish(child) == 130
        finally:
            server.process.send_signal(signal.SIGCONT)


def test_another_client_on_the_session_shows_up_above_the_prompt(
    paced_server: ServerProcess,
) -> None:
    child = spawn("--target", paced_server.address)
    prompt_session(child)
    child.sendline("I was here first")
    child.expect(re.escape("Echo #1 (1 message in context): I was here first"))
    session = prompt_session(child)
    assert session is not None

    other = CliRunner().invoke(
        main, ["--target", paced_server.address, "ask", "--session", session, "me too"]
    )
    assert other.exit_code == 0, other.output
    child.expect(f"session {session}: reply completed \\(4 messages\\)")
    assert prompt_session(child) == session
    child.sendline("/quit")
    assert finish(child) == 0


def test_the_client_reconnects_when_the_server_restarts_and_keeps_its_session(
    tmp_path: Path,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server_args = ("--port", str(port), "--store", f"sqlite:///{tmp_path / 'chat.db'}")
    with running_server_process(*server_args) as first:
        child = spawn("--target", first.address)
        prompt_session(child)
        child.sendline("before the restart")
        child.expect(re.escape("Echo #1 (1 message in context): before the restart"))
        before = prompt_session(child)
        assert before is not None
        first.terminate()
        # Shown while the person sits at the prompt, which then says the client is offline.
        child.expect(r"the server is shutting down[^\r\n]*")
        # In people's words: what to do about it is the client's business, not theirs.
        assert isinstance(child.after, str)
        assert "stream" not in child.after
        assert prompt_session(child) == before
        assert isinstance(child.after, str)
        assert "(offline)" in child.after
    with running_server_process(*server_args):
        child.sendline("after the restart")
        child.expect("reconnecting to")
        child.expect(f"reconnected to 127.0.0.1:{port}; still in session {before}")
        child.expect(re.escape("Echo #2 (3 messages in context): after the restart"))
        assert prompt_session(child) == before
        child.sendline("/stats")
        child.expect(r"reconnections\s+1")
        prompt_session(child)
        child.sendline("/quit")
        assert finish(child) == 0


def test_a_session_the_new_server_does_not_know_is_dropped_with_a_note() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server_args = ("--port", str(port), "--store", "memory://")
    with running_server_process(*server_args) as first:
        child = spawn("--target", first.address)
        prompt_session(child)
        child.sendline("before the restart")
        child.expect(re.escape("Echo #1 (1 message in context): before the restart"))
        before = prompt_session(child)
        first.terminate()
        child.expect("shutting down")
    with running_server_process(*server_args):
        # The memory store of the first server went with it.
        child.sendline("after the restart")
        child.expect("not found")
        child.expect("your next message starts a new one")
        assert prompt_session(child) is None
        child.sendline("after the restart")
        child.expect(r"New session (?P<id>[0-9a-f]{8})")
        assert matched(child, "id") != before
        child.expect(re.escape("Echo #1 (1 message in context): after the restart"))
        prompt_session(child)
        child.sendline("/quit")
        assert finish(child) == 0


def test_what_is_typed_while_a_reply_streams_is_not_drawn_inside_it(
    paced_server: ServerProcess,
) -> None:
    child = spawn("--target", paced_server.address)
    prompt_session(child)
    child.sendline(" ".join(f"w{i}" for i in range(400)))
    expect_reply_start(child)
    child.sendline("gamma delta")
    child.sendline("/cancel")
    child.expect(re.escape("[cancelled: the partial reply is kept]"))
    assert isinstance(child.before, str)
    assert "gamma" not in child.before
    assert "/cancel" not in child.before
    # The line typed meanwhile is shown at the prompt, then sent.
    child.expect("gamma delta")
    child.expect(re.escape("Echo #2 (3 messages in context): gamma delta"))
    prompt_session(child)
    child.sendline("/quit")
    assert finish(child) == 0


def test_a_reply_cut_short_by_a_lost_connection_is_said_once_and_retried(
    tmp_path: Path,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server_args = (
        "--port",
        str(port),
        "--pace",
        "0.05",
        "--store",
        f"sqlite:///{tmp_path / 'chat.db'}",
    )
    words = " ".join(f"w{i}" for i in range(60))
    with running_server_process(*server_args) as first:
        child = spawn("--target", first.address)
        child.logfile_read = transcript = io.StringIO()
        prompt_session(child)
        child.sendline(words)
        expect_reply_start(child)
        first.kill()
        child.expect("lost the connection")
        child.expect("The reply was cut short; /retry sends your message again")
        prompt_session(child)
    with running_server_process(*server_args):
        child.sendline("/retry")
        child.expect("Sending your message again")
        # The killed server stored nothing of that turn: the message goes again, alone.
        child.expect(re.escape("Echo #1 (1 message in context): w0"))
        child.expect(re.escape("w59"))
        prompt_session(child)
        child.sendline("/quit")
        assert finish(child) == 0
    assert transcript.getvalue().count("lost the connection") == 1
    assert "nothing to retry" not in transcript.getvalue()


def test_ask_renders_markdown_on_a_terminal(paced_server: ServerProcess) -> None:
    message = "intro\n\n```python\nprint(1)\n```\n\nand **bold** text"
    child = spawn("--target", paced_server.address, "ask", message)
    child.logfile_read = transcript = io.StringIO()
    child.expect("print\\(1\\)")
    child.expect("bold")
    assert finish(child) == 0
    shown = transcript.getvalue()
    assert "```" not in shown
    assert "**bold**" not in shown


def test_disconnect_and_connect_say_it_once_and_a_failed_connect_keeps_the_server(
    paced_server: ServerProcess,
) -> None:
    child = spawn("--target", paced_server.address)
    child.logfile_read = transcript = io.StringIO()
    prompt_session(child)
    child.sendline("/disconnect")
    child.expect("Disconnected from")
    prompt_session(child)
    child.sendline("/disconnect")
    child.expect("Not connected")
    prompt_session(child)
    child.sendline("/connect")
    child.expect(f"Connected to {re.escape(paced_server.address)}")
    prompt_session(child)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{sock.getsockname()[1]}"
    child.sendline(f"/connect {nowhere}")
    child.expect("cannot reach a chat server")
    child.expect(f"Still using {re.escape(paced_server.address)}")
    prompt_session(child)
    child.sendline("/ping")
    child.expect(f"pong from {re.escape(paced_server.address)}")
    prompt_session(child)
    child.sendline("/quit")
    assert finish(child) == 0
    shown = transcript.getvalue()
    assert shown.count("Disconnected from") == 1
    assert shown.count("Type a message to chat") == 1
