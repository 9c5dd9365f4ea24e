"""``chat-client`` commands through click's CliRunner, against a real chat-server process."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator

import pytest
from click.testing import CliRunner, Result

from chat.cli.client import EXIT_CODES, main
from tests.helpers import ServerProcess, running_server_process

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    # Module-scoped, so set up before the per-test data directory: name the store.
    with running_server_process("--store", "memory://") as process:
        yield process


def run(server: ServerProcess, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, ["--target", server.address, *args], input=input)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ask_streams_the_reply_to_stdout_and_names_the_session_on_stderr(
    server: ServerProcess,
) -> None:
    result = run(server, "ask", "hello there")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Echo #1 (1 message in context): hello there\n"
    found = UUID.search(result.stderr)
    assert found is not None

    again = run(server, "ask", "--session", found.group()[:13], "and again")
    assert again.exit_code == 0, again.output
    assert again.stdout == "Echo #2 (3 messages in context): and again\n"
    assert again.stderr == ""


def test_ask_reads_stdin_and_speaks_json(server: ServerProcess) -> None:
    result = run(server, "ask", "--json", "--system", "Be brief.", "-", input="from a pipe\n")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["text"] == "Echo #1 (1 message in context): from a pipe"
    assert answer["finish_reason"] == "stop"
    assert answer["message_count"] == 2
    assert answer["usage"]["completion_tokens"] > 0
    shown = run(server, "sessions", "show", answer["session_id"], "--json")
    session = json.loads(shown.stdout)
    assert session["system_prompt"] == "Be brief."
    assert session["title"] == "from a pipe"
    assert [m["role"] for m in session["messages"]] == ["user", "assistant"]


def test_sessions_create_list_show_delete(server: ServerProcess) -> None:
    created = run(server, "sessions", "create", "--title", "scripted", "--context-policy", "reject")
    assert created.exit_code == 0, created.output
    session_id = created.stdout.strip()
    assert UUID.fullmatch(session_id)

    listed = json.loads(run(server, "sessions", "list", "--json").stdout)
    assert session_id in [s["session_id"] for s in listed["sessions"]]
    assert listed["total"] >= 1
    table = run(server, "sessions", "list")
    assert table.exit_code == 0
    assert session_id[:8] in table.stdout
    assert "scripted" in table.stdout
    everything = json.loads(
        run(server, "sessions", "list", "--all", "--limit", "1", "--json").stdout
    )
    assert everything["total"] == listed["total"]

    shown = run(server, "sessions", "show", session_id[:10])
    assert shown.exit_code == 0
    assert "scripted" in shown.stdout
    assert "reject" in shown.stdout

    deleted = run(server, "sessions", "delete", session_id, "--json")
    assert json.loads(deleted.stdout) == {"session_id": session_id, "deleted_messages": 0}
    gone = run(server, "sessions", "show", session_id)
    assert gone.exit_code == 4
    assert gone.stderr.startswith("error: session")


def test_stats_health_and_ping(server: ServerProcess) -> None:
    stats = run(server, "stats", "--json")
    assert stats.exit_code == 0, stats.output
    data = json.loads(stats.stdout)
    assert (data["backend"], data["store"]) == ("echo", "memory")
    assert "uptime" in run(server, "stats").stdout

    health = run(server, "health")
    assert (health.exit_code, health.stdout) == (0, "SERVING\n")
    service = json.loads(run(server, "health", "--service", "ChatService", "--json").stdout)
    assert service["status"] == "SERVING"
    unknown = run(server, "health", "--service", "Nope")
    assert (unknown.exit_code, unknown.stdout) == (1, "SERVICE_UNKNOWN\n")

    ping = run(server, "ping", "--count", "2")
    assert ping.exit_code == 0
    assert ping.stdout.count("pong from") == 2
    pings = json.loads(run(server, "ping", "--json").stdout)
    assert len(pings["round_trip_ms"]) == 1
    assert pings["average_ms"] > 0


def test_errors_have_documented_exit_codes(server: ServerProcess) -> None:
    missing = run(server, "ask", "--session", "no-such-session", "hi")
    assert missing.exit_code == 4
    assert "not found" in missing.stderr

    empty = run(server, "ask", "   ")
    assert empty.exit_code == 2
    both = run(server, "ask", "--new", "--session", "x", "hi")
    assert both.exit_code == 2

    too_long = run(server, "sessions", "create", "--title", "t" * 1000)
    assert too_long.exit_code == 2
    assert "title" in too_long.stderr

    bad_target = CliRunner().invoke(main, ["--target", "a:b:c", "stats"])
    assert bad_target.exit_code == 2

    nobody = CliRunner().invoke(main, ["--target", f"127.0.0.1:{free_port()}", "ping"])
    assert nobody.exit_code == 3
    assert "cannot reach a chat server" in nobody.stderr
    assert "chat-server --port" in nobody.stderr

    assert {0, 1, 2, 3, 4, 5, 130} == set(EXIT_CODES)
    help_text = CliRunner().invoke(main, ["--help"]).stdout
    assert all(meaning in help_text for meaning in EXIT_CODES.values())


def test_the_target_comes_from_the_environment(server: ServerProcess) -> None:
    result = CliRunner().invoke(main, ["health"], env={"CHAT_TARGET": server.address})
    assert (result.exit_code, result.stdout) == (0, "SERVING\n")


def test_interactive_mode_reads_a_script_from_stdin(server: ServerProcess) -> None:
    script = "\n".join(
        [
            "first message",
            "/info",
            "/title renamed [bold]by[/nope] a script",
            "/history",
            "/new another",
            "/sessions",
            "/retry",
            "/bogus",
            "//starts with a slash",
            "/stats",
            "/quit",
            "never read",
        ]
    )
    result = run(server, input=script + "\n")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Connected to" in out
    assert "Assistant › Echo #1 (1 message in context): first message" in out
    # Printed as typed, never read as rich markup.
    assert "Title set: renamed [bold]by[/nope] a script" in out
    assert "You › first message" in out
    assert "nothing to retry" in out
    assert "unknown command /bogus" in out
    assert "Echo #1 (1 message in context): /starts with a slash" in out
    assert "messages sent" in out
    assert "never read" not in out
    # Not a terminal: no colour, no control sequences.
    assert "\x1b[" not in out


def test_interactive_mode_says_how_to_start_a_missing_server() -> None:
    port = free_port()
    result = CliRunner().invoke(main, ["--target", f"127.0.0.1:{port}"], input="hello\n/quit\n")
    assert result.exit_code == 0
    assert "cannot reach a chat server" in result.stdout
    assert f"chat-server --port {port}" in result.stdout


def test_a_session_with_a_reply_limit(server: ServerProcess) -> None:
    created = run(server, "sessions", "create", "--max-reply-tokens", "3", "--json")
    assert created.exit_code == 0, created.output
    session = json.loads(created.stdout)
    assert session["max_reply_tokens"] == 3
    answer = json.loads(
        run(server, "ask", "--json", "--session", session["session_id"], "hi").stdout
    )
    # The echo backend counts words as tokens.
    assert (answer["text"], answer["finish_reason"]) == ("Echo #1 (1 ", "length")
    shown = run(server, "sessions", "show", session["session_id"])
    assert "3 tokens" in shown.stdout
