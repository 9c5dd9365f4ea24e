"""``chat-client`` commands through click's CliRunner, against a real chat-server process."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from chat.cli.client import EXIT_CODES, main
from tests.helpers import TIMEOUT, ServerProcess, running_server_process
from tests.proxy import ProxyThread

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
    live = ("active_watchers", "replay_turns", "replay_bytes", "replay_evicted_events")
    assert all(isinstance(data[name], int) for name in (*live, "resumed_turns"))
    table = run(server, "stats").stdout
    assert "uptime" in table
    assert re.search(r"replay log\s+\d+ turns, \d+ bytes", table)

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

    assert {0, 1, 2, 3, 4, 5, 6, 130} == set(EXIT_CODES)
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
    # The first error (/retry with nothing to retry) gives the exit status.
    assert result.exit_code == 1, result.output
    out, err = result.stdout, result.stderr
    # stdout: the replies, and what the commands were asked to show.
    # A reply is its text alone (no "Assistant ›" around it), one line per reply here.
    assert out.startswith("Echo #1 (1 message in context): first message\n")
    assert "\nEcho #1 (1 message in context): /starts with a slash\n" in out
    assert "You › first message" in out
    assert "messages sent" in out
    # stderr: everything else.
    assert "Connected to" in err
    # Printed as typed, never read as rich markup.
    assert "Title set: renamed [bold]by[/nope] a script" in err
    assert "nothing to retry" in err
    assert "unknown command /bogus" in err
    for diagnostic in ("Connected to", "Title set", "error:", "unknown command"):
        assert diagnostic not in out
    assert "never read" not in out + err
    # Not a terminal: no colour, no control sequences.
    assert "\x1b[" not in out + err


def test_interactive_mode_says_how_to_start_a_missing_server() -> None:
    port = free_port()
    result = CliRunner().invoke(main, ["--target", f"127.0.0.1:{port}"], input="hello\n/quit\n")
    assert result.exit_code == 3
    assert "cannot reach a chat server" in result.stderr
    assert f"chat-server --port {port}" in result.stderr
    assert result.stdout == ""


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port where connections are accepted (by the kernel) and never answered."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


def test_a_server_that_never_answers_is_a_timeout_of_the_timeout_given() -> None:
    with silent_listener() as port:
        result = CliRunner().invoke(
            main, ["--target", f"127.0.0.1:{port}", "--timeout", "0.5", "ping"]
        )
    assert result.exit_code == 5, result.output
    assert "within 0.5s" in result.stderr
    # Something is listening there: starting a server is not the advice.
    assert "start one" not in result.stderr


@pytest.mark.parametrize("target", ["bad target", "bad target:50051", "host/x:1"])
def test_a_malformed_target_is_a_usage_error(target: str) -> None:
    result = CliRunner().invoke(main, ["--target", target, "ping"])
    assert result.exit_code == 2, result.output
    assert "--target" in result.stderr


# -- script mode ---------------------------------------------------------------------------


def client_process(*args: str, **options: Any) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("chat-client")
    return subprocess.run(
        [str(script), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        **options,
    )


@pytest.mark.slow
def test_end_of_input_from_dev_null_exits_0(server: ServerProcess) -> None:
    # cron, CI and `ssh host cmd </dev/null` run it so: a character device, not a pipe.
    result = client_process("--target", server.address, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_a_script_from_a_pipe_streams_its_replies(server: ServerProcess) -> None:
    result = client_process("--target", server.address, input="hi\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Echo #1 (1 message in context): hi\n"


def test_an_error_in_a_script_is_on_stderr_and_in_the_exit_status(server: ServerProcess) -> None:
    result = run(server, input="hi\n/bogus\n")
    assert result.exit_code == 2
    assert result.stdout == "Echo #1 (1 message in context): hi\n"
    assert "unknown command /bogus" in result.stderr
    assert "Connected to" in result.stderr


def test_an_empty_script_needs_no_server() -> None:
    result = CliRunner().invoke(main, ["--target", f"127.0.0.1:{free_port()}"], input="")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")


# -- the summary line after each reply -------------------------------------------------------


SUMMARY = re.compile(
    r"(?P<chunks>\d+) chunks · [\d.]+ m?s · first chunk [\d.]+ m?s · "
    r"(?P<context>\d+) messages? in context · (?P<into>\d+) tokens in, (?P<out>\d+) out · stop"
)


def test_each_reply_is_followed_by_its_figures(server: ServerProcess) -> None:
    result = run(server, input="one two three\nfour\n")
    assert result.exit_code == 0, result.output
    summaries = list(SUMMARY.finditer(result.stderr))
    assert [m["context"] for m in summaries] == ["1", "3"]
    # "Echo #1 (1 message in context): one two three": 9 words, one chunk each.
    assert summaries[0]["chunks"] == "9"
    assert int(summaries[0]["out"]) == 9
    assert SUMMARY.search(result.stdout) is None


def test_quiet_and_verbose_off_drop_the_figures(server: ServerProcess) -> None:
    quiet = run(server, "--quiet", input="hello\n")
    assert quiet.exit_code == 0, quiet.output
    assert SUMMARY.search(quiet.stderr) is None
    toggled = run(server, input="hello\n/verbose off\nagain\n/verbose on\nonce more\n")
    assert toggled.exit_code == 0, toggled.output
    assert [m["context"] for m in SUMMARY.finditer(toggled.stderr)] == ["1", "5"]
    assert "Summary line after each reply: off." in toggled.stderr


def test_ask_json_carries_the_figures_of_the_summary(server: ServerProcess) -> None:
    first = json.loads(run(server, "ask", "--json", "hello").stdout)
    again = run(server, "ask", "--json", "--session", first["session_id"], "again")
    answer = json.loads(again.stdout)
    assert answer["context_messages"] == 3
    assert answer["turn_id"]
    assert answer["turn_id"] != first["turn_id"]
    assert answer["resumes"] == 0
    assert answer["omitted_messages"] == 0
    assert answer["chunks"] == 7
    assert 0 < answer["first_chunk_time"] <= answer["response_time"]


def test_client_stats_show_the_duration_and_the_chunks_per_reply(server: ServerProcess) -> None:
    result = run(server, input="one two\n/stats\n")
    assert result.exit_code == 0, result.output
    assert re.search(r"session duration\s+\d+s", result.stdout)
    # "Echo #1 (1 message in context): one two": 8 chunks in the only reply.
    assert re.search(r"average chunks per reply\s+8\.0", result.stdout), result.stdout


# -- options and their environment variables ----------------------------------------------


def _documented_name(path: tuple[str, ...], option: click.Option) -> str:
    """The README's rule: CHAT_<OPTION> for the client, CHAT_<COMMAND>_<OPTION> for commands."""
    long = next(name for name in option.opts if name.startswith("--"))
    return "_".join(["CHAT", *path, long[2:]]).upper().replace("-", "_")


def _options() -> Iterator[tuple[tuple[str, ...], click.Command, click.Option]]:
    def walk(
        command: click.Command, path: tuple[str, ...]
    ) -> Iterator[tuple[tuple[str, ...], click.Command, click.Option]]:
        for param in command.params:
            if isinstance(param, click.Option) and param.expose_value:
                yield path, command, param
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, (*path, name))

    return walk(main, ())


def _value_from_the_environment(option: click.Option) -> tuple[str, Any]:
    """A value for ``option``'s variable, and what the command must then receive."""
    kind = option.type
    if option.is_flag:
        on_by_default = option.default is True
        return ("0" if on_by_default else "1"), not on_by_default
    if isinstance(kind, click.Choice):
        choice = str(kind.choices[-1])
        return choice, choice
    if isinstance(kind, click.IntRange):
        return "7", 7
    if isinstance(kind, click.FloatRange):
        return "7.5", 7.5
    if isinstance(kind, click.Path):
        return "/tmp/from-env", Path("/tmp/from-env")
    return "from-env", "from-env"


@pytest.mark.parametrize(
    ("path", "name"),
    [(path, option.name) for path, _, option in _options()],
    ids=lambda value: "-".join(value) if isinstance(value, tuple) else str(value),
)
def test_every_option_reads_its_documented_environment_variable(
    monkeypatch: pytest.MonkeyPatch, path: tuple[str, ...], name: str
) -> None:
    ((command, option),) = [(c, o) for p, c, o in _options() if p == path and o.name == name]
    variable = _documented_name(path, option)
    text, expected = _value_from_the_environment(option)
    monkeypatch.setenv(variable, text)
    args = ["x" for param in command.params if isinstance(param, click.Argument)]
    with command.make_context(command.name or "chat-client", args) as ctx:
        assert ctx.params[name] == expected, variable


def test_the_readme_variables_continue_a_session_and_speak_json(server: ServerProcess) -> None:
    first = json.loads(run(server, "ask", "--json", "hello").stdout)
    env = {
        "CHAT_TARGET": server.address,
        "CHAT_TIMEOUT": "5",
        "CHAT_ASK_SESSION": first["session_id"][:8],
        "CHAT_ASK_JSON": "1",
    }
    result = CliRunner().invoke(main, ["ask", "and again"], env=env)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["session_id"] == first["session_id"]
    assert answer["text"] == "Echo #2 (3 messages in context): and again"


def test_client_options_work_after_the_command_too(server: ServerProcess) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    asked = CliRunner().invoke(
        main, ["--target", nowhere, "ask", "--target", server.address, "--timeout", "5", "hi"]
    )
    assert asked.exit_code == 0, asked.output
    assert asked.stdout == "Echo #1 (1 message in context): hi\n"
    listed = CliRunner().invoke(main, ["sessions", "list", "-t", server.address, "--json"])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout)["total"] >= 1
    bad = CliRunner().invoke(main, ["ping", "--target", "bad target"])
    assert bad.exit_code == 2


def test_sessions_list_into_a_pipe_is_plain_columns(server: ServerProcess) -> None:
    created = run(server, "sessions", "create", "--title", "piped  title").stdout.strip()
    result = run(server, "sessions", "list")
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split("\t") == ["id", "title", "messages", "model", "last activity"]
    assert [created, "piped title", "0", "echo"] in [row.split("\t")[:4] for row in rows]
    assert not set("┃━│╇") & set(result.stdout)


# -- refusals and errors -----------------------------------------------------------------------


def _total_sessions(server: ServerProcess) -> int:
    listed = run(server, "sessions", "list", "--json")
    assert listed.exit_code == 0, listed.output
    return int(json.loads(listed.stdout)["total"])


def test_a_refused_ask_leaves_no_empty_session(server: ServerProcess) -> None:
    before = _total_sessions(server)
    result = run(server, "ask", "x" * 40_000)
    assert result.exit_code == 2
    assert "message: is 40000 characters" in result.stderr
    assert "session " not in result.stderr.replace("error: message", "")
    assert _total_sessions(server) == before


def test_json_errors_carry_the_status_and_messages_do_not(server: ServerProcess) -> None:
    result = run(server, "sessions", "show", "no-such-session", "--json")
    assert result.exit_code == 4
    assert json.loads(result.stdout)["error"]["code"] == "NOT_FOUND"
    assert "CreateSession" not in result.stderr
    assert "NOT_FOUND" not in result.stderr
    refused = run(server, "ask", "--json", "x" * 40_000)
    error = json.loads(refused.stdout)["error"]
    assert (error["code"], error["field"]) == ("INVALID_ARGUMENT", "message")
    retried = run(server, input="hello\n/retry\n")
    assert "nothing to retry" in retried.stderr
    assert "FAILED_PRECONDITION" not in retried.stderr


@pytest.mark.slow
def test_health_while_the_server_drains_is_not_serving() -> None:
    words = " ".join(f"w{i}" for i in range(200))
    server_args = ("--pace", "0.05", "--grace-period", "30", "--store", "memory://")
    with running_server_process(*server_args) as draining:
        # A reply in flight keeps the server draining (not stopped) after the signal.
        asking = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("chat-client")),
                "-t",
                draining.address,
                "ask",
                words,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert asking.stdout is not None
            assert asking.stdout.read(4) == b"Echo"
            draining.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + TIMEOUT
            while True:
                result = CliRunner().invoke(main, ["-t", draining.address, "health"])
                if result.exit_code != 0 or time.monotonic() > deadline:
                    break
            assert (result.exit_code, result.stdout) == (1, "NOT_SERVING\n"), result.output
            service = CliRunner().invoke(
                main, ["-t", draining.address, "health", "--service", "ChatService", "--json"]
            )
            assert json.loads(service.stdout)["status"] == "NOT_SERVING"
        finally:
            asking.kill()
            asking.wait(TIMEOUT)
            if asking.stdout is not None:
                asking.stdout.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_a_server_on_the_other_loopback_address_is_pointed_to(server: ServerProcess) -> None:
    # The module's server listens on 127.0.0.1 only: [::1] is refused, but a server runs.
    result = CliRunner().invoke(main, ["--target", f"[::1]:{server.port}", "ping"])
    assert result.exit_code == 3
    assert f"a server is listening on 127.0.0.1:{server.port}" in result.stderr
    assert "start one" not in result.stderr


def test_the_echo_backend_refuses_a_model_it_does_not_have(server: ServerProcess) -> None:
    result = run(server, "sessions", "create", "--model", "gpt-4o")
    assert result.exit_code == 2
    assert "'gpt-4o' is not served by the echo backend; available: echo" in result.stderr


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


# -- live sessions -----------------------------------------------------------------------------


def test_sessions_take_their_concurrency_and_disconnect_policies(server: ServerProcess) -> None:
    created = run(
        server,
        "sessions",
        "create",
        "--concurrency",
        "reject",
        "--on-disconnect",
        "cancel",
        "--json",
    )
    assert created.exit_code == 0, created.output
    session = json.loads(created.stdout)
    assert (session["concurrency_policy"], session["on_disconnect"]) == ("reject", "cancel")
    assert (session["turn_running"], session["watchers"]) == (False, 0)
    session_id = session["session_id"]

    updated = run(
        server, "sessions", "update", session_id[:10], "--concurrency", "interrupt", "--json"
    )
    assert updated.exit_code == 0, updated.output
    changed = json.loads(updated.stdout)
    # Only what was given changes.
    assert (changed["concurrency_policy"], changed["on_disconnect"]) == ("interrupt", "cancel")
    renamed = run(server, "sessions", "update", session_id, "--on-disconnect", "continue")
    assert renamed.exit_code == 0, renamed.output
    assert re.search(r"on disconnect\s+continue", renamed.stdout)
    shown = run(server, "sessions", "show", session_id)
    assert re.search(r"concurrency\s+interrupt", shown.stdout)
    assert re.search(r"now\s+idle, 0 watching", shown.stdout)

    bad = run(server, "sessions", "update", session_id, "--concurrency", "sometimes")
    assert bad.exit_code == 2
    missing = run(server, "sessions", "update", "0" * 8, "--title", "x")
    assert missing.exit_code == 4


class _Lines:
    """The lines a process writes to a pipe, read by a thread: ``next`` waits, bounded."""

    def __init__(self, stream: Any) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put("")

    def next(self) -> str:
        line = self._lines.get(timeout=TIMEOUT)
        assert line, "the process closed its output"
        return line

    def join(self) -> None:
        """Wait for the end of the output (the process has exited)."""
        self._thread.join(TIMEOUT)


def test_watch_json_prints_another_clients_reply_one_event_per_line_until_ctrl_c(
    server: ServerProcess,
) -> None:
    session_id = run(server, "sessions", "create").stdout.strip()
    command = [str(Path(sys.executable).with_name("chat-client")), "-t", server.address]
    watcher = subprocess.Popen(
        [*command, "watch", session_id[:8], "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = _Lines(watcher.stdout), _Lines(watcher.stderr)
    try:
        # Said once the server has taken the WATCH: what is sent from now on is seen.
        assert err.next().startswith(f"watching session {session_id}")
        asked = run(server, "ask", "--session", session_id, "watched from afar")
        assert asked.exit_code == 0, asked.output
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] != "completed":
            events.append(json.loads(out.next()))
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(TIMEOUT) == 0
    finally:
        watcher.kill()
        watcher.wait(TIMEOUT)
        for lines, pipe in ((out, watcher.stdout), (err, watcher.stderr)):
            lines.join()
            if pipe is not None:
                pipe.close()
    turn = [e for e in events if e["type"] != "session_update"]
    assert turn[0]["type"] == "started"
    assert [e["seq"] for e in turn] == list(range(1, len(turn) + 1))
    assert len({e["turn_id"] for e in turn}) == 1
    assert not any(e["mine"] for e in turn)
    assert "".join(e["text"] for e in turn if e["type"] == "chunk") + "\n" == asked.stdout
    assert turn[-1]["finish_reason"] == "stop"


def test_watch_of_an_unknown_session_is_not_found(server: ServerProcess) -> None:
    result = run(server, "watch", "0" * 8)
    assert result.exit_code == 4


@pytest.mark.slow
def test_ask_keeps_its_reply_through_a_dropped_connection() -> None:
    words = " ".join(f"w{i}" for i in range(40))
    with (
        running_server_process("--pace", "0.02", "--store", "memory://") as paced,
        ProxyThread(paced.port) as proxy,
    ):
        asking = subprocess.Popen(
            [str(Path(sys.executable).with_name("chat-client")), "-t", proxy.target, "ask", words],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Unbuffered: what is read before communicate() must not stay in a buffer.
            bufsize=0,
        )
        try:
            assert asking.stdout is not None
            head = b""
            while len(head) < 4:
                piece = asking.stdout.read(4 - len(head))
                assert piece, "chat-client ended before the reply"
                head += piece
            assert head == b"Echo"
            # Mid-reply: the connection dies (the server lives on, and so does the turn).
            assert proxy.cut_all() == 1
            out, err = asking.communicate(timeout=TIMEOUT)
        finally:
            asking.kill()
            asking.wait(TIMEOUT)
        assert asking.returncode == 0, err
        session_id = UUID.search(err.decode())
        assert session_id is not None
        shown = run(paced, "sessions", "show", session_id.group(), "--json")
        messages = json.loads(shown.stdout)["messages"]
        assert [(m["role"], m["status"]) for m in messages] == [
            ("user", "complete"),
            ("assistant", "complete"),
        ]
        # Each chunk once: stdout is the stored reply exactly.
        assert head + out == (messages[1]["content"] + "\n").encode()


def test_watch_shows_each_reply_on_a_line_of_its_own_marked_by_whose_it_is(
    server: ServerProcess,
) -> None:
    session_id = run(server, "sessions", "create").stdout.strip()
    command = [str(Path(sys.executable).with_name("chat-client")), "-t", server.address]
    watcher = subprocess.Popen(
        [*command, "watch", session_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = _Lines(watcher.stdout), _Lines(watcher.stderr)
    try:
        assert err.next().startswith(f"watching session {session_id}")
        for text in ("first words", "second words"):
            assert run(server, "ask", "--session", session_id, text).exit_code == 0
        lines = [out.next(), out.next()]
        # Deleting the session ends the watch, which says so.
        assert run(server, "sessions", "delete", session_id).exit_code == 0
        assert watcher.wait(TIMEOUT) == 0
        deleted = out.next()
    finally:
        watcher.kill()
        watcher.wait(TIMEOUT)
        for lines_of, pipe in ((out, watcher.stdout), (err, watcher.stderr)):
            lines_of.join()
            if pipe is not None:
                pipe.close()
    # (A turn id is the server's to choose: any characters but those that end it here.)
    turn = r"\[turn [^\s,\]]{1,8}, another client\] Assistant › "
    assert re.fullmatch(turn + re.escape("Echo #1 (1 message in context): first words\n"), lines[0])
    assert re.fullmatch(
        turn + re.escape("Echo #2 (3 messages in context): second words\n"), lines[1]
    )
    assert deleted.startswith("· ")
