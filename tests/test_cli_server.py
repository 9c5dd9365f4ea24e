"""chat-server's command line, with click's CliRunner (the server itself is not started)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import chat.cli.server as cli
from chat import ServerConfig
from tests.helpers import TIMEOUT, ServerProcess, running_server_process


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    configs: list[ServerConfig] = []

    async def fake_serve(config: ServerConfig, **_: object) -> None:
        configs.append(config)

    monkeypatch.setattr(cli, "serve", fake_serve)
    return configs


def test_options_build_one_config(captured: list[ServerConfig]) -> None:
    result = CliRunner().invoke(
        cli.main,
        ["--port", "6000", "--model", "m", "--pace", "0.5", "--max-message-chars", "10"],
    )
    assert result.exit_code == 0, result.output
    (config,) = captured
    assert (config.port, config.model, config.pace) == (6000, "m", 0.5)
    assert config.limits.max_message_chars == 10
    assert config.host == "localhost"


def test_receive_limit_and_store_checks_are_options(captured: list[ServerConfig]) -> None:
    result = CliRunner().invoke(
        cli.main, ["--max-receive-bytes", "65536", "--store-check-interval", "0.5"]
    )
    assert result.exit_code == 0, result.output
    (config,) = captured
    assert config.limits.max_receive_bytes == 65536
    assert config.store_check_interval == 0.5
    defaults = CliRunner().invoke(cli.main, ["--help"]).output
    assert "4194304" in defaults


def test_environment_variables_map_onto_options(captured: list[ServerConfig]) -> None:
    env = {"CHAT_PORT": "7000", "CHAT_BACKEND": "echo", "CHAT_GRACE_PERIOD": "2.5"}
    result = CliRunner().invoke(cli.main, [], env=env)
    assert result.exit_code == 0, result.output
    assert (captured[0].port, captured[0].grace_period) == (7000, 2.5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "70000 is not in the range 0<=x<=65535"),
        (["--backend", "nope"], "Invalid value for '--backend'"),
        (["--pace", "-1"], "-1.0 is not in the range x>=0"),
    ],
)
def test_bad_options_are_usage_errors(
    captured: list[ServerConfig], args: list[str], message: str
) -> None:
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2
    assert message in result.output
    assert captured == []


def test_help_lists_the_options() -> None:
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0
    for option in ("--host", "--port", "--backend", "--model", "--store", "--grace-period"):
        assert option in result.output
    assert "CHAT_PORT" in result.output


def test_an_address_in_use_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    async def busy(config: ServerConfig, **_: object) -> None:
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(cli, "serve", busy)
    result = CliRunner().invoke(cli.main, ["--port", "50051"])
    assert result.exit_code == 1
    assert "cannot listen on localhost:50051" in result.output
    assert "Address already in use" in result.output
    assert "choose another port with --port N" in result.output


def _banner(server: ServerProcess) -> str:
    """The whole banner: the process's output up to its last line ("stop it: ...")."""
    deadline = time.monotonic() + TIMEOUT
    while not any("stop it:" in line for line in server.output):
        assert time.monotonic() < deadline, f"no whole banner in {server.output}"
        time.sleep(0.01)  # polled: the output is read by another thread
    return "".join(server.output)


@pytest.mark.slow
def test_the_banner_says_when_another_process_has_the_store_open(tmp_path: Path) -> None:
    store = ("--store", f"sqlite://{tmp_path / 'chat.db'}")
    shared = "another process has this file open too"
    with running_server_process(*store) as first:
        assert shared not in _banner(first)
        with running_server_process(*store) as second:
            assert shared in _banner(second)
    # Both gone: the next one is alone again (the locks went with the processes).
    with running_server_process(*store) as third:
        assert shared not in _banner(third)


def test_model_check_is_an_option_and_a_variable(captured: list[ServerConfig]) -> None:
    assert CliRunner().invoke(cli.main, ["--model-check", "off"]).exit_code == 0
    assert CliRunner().invoke(cli.main, [], env={"CHAT_MODEL_CHECK": "warn"}).exit_code == 0
    assert CliRunner().invoke(cli.main, []).exit_code == 0
    assert [c.model_check for c in captured] == ["off", "warn", None]
    refused = CliRunner().invoke(cli.main, ["--model-check", "sometimes"])
    assert refused.exit_code == 2
