"""``chat-server tokens``, the exposure warning, and chat-client with a token."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from chat.cli._exit import EXIT_DENIED
from chat.cli.client import main as client_main
from chat.cli.server import main as server_main
from chat.config import ServerConfig
from chat.server import exposure_warning
from tests.helpers import ISSUED_TOKENS, running_server_process


def add_token(runner: CliRunner, *args: str, env: dict[str, str] | None = None) -> str:
    result = runner.invoke(server_main, ["tokens", "add", *args], env=env)
    assert result.exit_code == 0, result.output
    token = result.stdout.splitlines()[-1]
    ISSUED_TOKENS.add(token)
    return token


def test_tokens_add_prints_the_token_alone_on_the_last_line_and_keeps_a_hash(
    tmp_path: Path,
) -> None:
    runner = CliRunner()
    env = {"CHAT_TOKENS_FILE": str(tmp_path / "tokens.json")}
    token = add_token(runner, "alice", env=env)
    admin = add_token(runner, "root", "--admin", env=env)
    assert token.startswith("gct_")
    assert " " not in token
    assert token not in (tmp_path / "tokens.json").read_text()
    listed = runner.invoke(server_main, ["tokens", "list"], env=env)
    assert listed.exit_code == 0
    rows = [line.split("\t")[:2] for line in listed.stdout.splitlines()]
    assert rows == [["alice", "user"], ["root", "admin"]]
    assert token not in listed.output
    assert admin not in listed.output
    again = runner.invoke(server_main, ["tokens", "add", "alice"], env=env)
    assert again.exit_code != 0
    assert "exists" in again.output
    revoked = runner.invoke(server_main, ["tokens", "revoke", "alice"], env=env)
    assert revoked.exit_code == 0
    missing = runner.invoke(server_main, ["tokens", "revoke", "alice"], env=env)
    assert missing.exit_code != 0


def test_tokens_live_in_the_servers_store_by_default(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'chat.db'}"
    runner = CliRunner()
    add_token(runner, "alice", "--store", store)
    listed = runner.invoke(server_main, ["tokens", "list", "--store", store])
    assert listed.stdout.startswith("alice\tuser")
    memory = runner.invoke(server_main, ["tokens", "add", "x", "--store", "memory://"])
    assert memory.exit_code != 0
    assert "--tokens-file" in memory.output


def test_a_server_reachable_from_other_machines_without_protection_says_so() -> None:
    warning = exposure_warning(ServerConfig(host="0.0.0.0"))
    assert warning is not None
    assert "anyone who can reach the port can read every session" in warning
    assert "TLS" in warning
    assert exposure_warning(ServerConfig(host="127.0.0.1")) is None
    assert exposure_warning(ServerConfig(host="localhost")) is None
    assert exposure_warning(ServerConfig(host="::1")) is None


@pytest.mark.slow
def test_chat_client_sends_its_token_and_reports_refusals(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'chat.db'}"
    runner = CliRunner()
    token = add_token(runner, "alice", "--store", store)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    with running_server_process("--store", store, "--auth", "tokens") as server:
        target = ["--target", server.address]
        me = runner.invoke(client_main, [*target, "whoami"], env={"CHAT_TOKEN": token})
        assert me.exit_code == 0, me.output
        assert me.stdout.startswith("alice (user; the server authenticates with tokens")
        from_file = runner.invoke(
            client_main, [*target, "--token-file", str(token_file), "ask", "hi"]
        )
        assert from_file.exit_code == 0, from_file.output
        nobody = runner.invoke(client_main, [*target, "sessions", "list"], env={"CHAT_TOKEN": ""})
        assert nobody.exit_code == EXIT_DENIED
        assert "bearer token" in nobody.stderr
    assert not any(token in line for line in server.output)
