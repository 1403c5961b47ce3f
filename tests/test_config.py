"""Configuration: flags over environment over defaults, validation naming the option."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from worker import _loops
from worker.config import (
    DURATION,
    OPTIONS,
    Settings,
    add_arguments,
    format_duration,
    load_settings,
)
from worker.errors import ConfigError
from worker.sources import default_dead_letter_url

README = Path(__file__).resolve().parent.parent / "README.md"
REQUIRED = {
    "WORKER_SOURCE": "file:./events.jsonl",
    "CDP_BASE_URL": "https://api-engage-eu.sitecorecloud.io/",
    "CDP_CLIENT_KEY": "key-123",
    "CDP_API_TOKEN": "token-456",
}


def parse_flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_are_those_of_the_design() -> None:
    settings = load_settings(parse_flags(), REQUIRED)
    assert settings.state == "sqlite:///./worker-state.db"
    assert settings.dlq is None
    assert default_dead_letter_url(settings.source) == "file:./dead-letter.jsonl"
    assert settings.rate_limit == 50
    assert settings.concurrency == 32
    assert settings.max_attempts == 8
    assert settings.request_timeout == 10
    assert settings.not_found_grace == 300
    assert settings.state_retention == 30 * 24 * 3600
    assert settings.lease_seconds == 60
    assert settings.shutdown_timeout == 25
    assert settings.http_port == 9108
    assert settings.cdp_api_version == "v2"
    assert settings.cdp_base_url == "https://api-engage-eu.sitecorecloud.io"  # no trailing /


def test_flags_win_over_the_environment() -> None:
    env = {**REQUIRED, "WORKER_RATE_LIMIT": "10", "WORKER_CONCURRENCY": "4"}
    settings = load_settings(parse_flags("--rate-limit", "99", "--follow"), env)
    assert settings.rate_limit == 99
    assert settings.concurrency == 4
    assert settings.follow is True


def test_secrets_can_come_from_mounted_files(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("file-key\n")
    (tmp_path / "token").write_text("file-token\n")
    env = {k: v for k, v in REQUIRED.items() if not k.startswith("CDP_CLIENT_KEY")}
    env.pop("CDP_API_TOKEN")
    env["CDP_CLIENT_KEY_FILE"] = str(tmp_path / "key")
    env["CDP_API_TOKEN_FILE"] = str(tmp_path / "token")
    settings = load_settings(parse_flags(), env)
    assert (settings.cdp_client_key, settings.cdp_api_token) == ("file-key", "file-token")
    env["CDP_API_TOKEN_FILE"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="CDP_API_TOKEN_FILE"):
        load_settings(parse_flags(), env)


def test_a_secret_file_beside_an_empty_variable_is_read_and_a_bom_is_not_the_secret(
    tmp_path: Path,
) -> None:
    (tmp_path / "token").write_bytes(b"\xef\xbb\xbffile-token\n")  # written on Windows
    env = {**REQUIRED, "CDP_API_TOKEN": "", "CDP_API_TOKEN_FILE": str(tmp_path / "token")}
    assert load_settings(parse_flags(), env).cdp_api_token == "file-token"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"WORKER_SOURCE": ""}, "--source / WORKER_SOURCE"),
        ({"CDP_CLIENT_KEY": ""}, "CDP_CLIENT_KEY"),
        ({"CDP_BASE_URL": "ftp://x"}, "CDP_BASE_URL"),
        ({"WORKER_RATE_LIMIT": "-1"}, "--rate-limit / WORKER_RATE_LIMIT"),
        ({"WORKER_RATE_LIMIT": "fast"}, "WORKER_RATE_LIMIT: expected a number"),
        ({"WORKER_CONCURRENCY": "0"}, "--concurrency / WORKER_CONCURRENCY"),
        ({"WORKER_MAX_ATTEMPTS": "0"}, "--max-attempts / WORKER_MAX_ATTEMPTS"),
        ({"WORKER_HTTP_PORT": "70000"}, "--http-port / WORKER_HTTP_PORT"),
        ({"WORKER_LEASE_SECONDS": "5"}, "--lease-seconds / WORKER_LEASE_SECONDS"),
        ({"WORKER_LOG_FORMAT": "xml"}, "--log-format / WORKER_LOG_FORMAT"),
        ({"WORKER_LOG_LEVEL": "loud"}, "--log-level / WORKER_LOG_LEVEL"),
        ({"WORKER_FOLLOW": "maybe"}, "WORKER_FOLLOW: expected true or false"),
        ({"WORKER_RATE_LIMIT_BACKEND": "memcached://x"}, "--rate-limit-backend"),
        ({"WORKER_RATE_LIMIT": "inf"}, "--rate-limit / WORKER_RATE_LIMIT"),
        ({"WORKER_LEASE_SECONDS": "nan"}, "--lease-seconds / WORKER_LEASE_SECONDS"),
        ({"WORKER_NOT_FOUND_GRACE": "nan"}, "--not-found-grace / WORKER_NOT_FOUND_GRACE"),
        ({"WORKER_SHUTDOWN_TIMEOUT": "inf"}, "--shutdown-timeout / WORKER_SHUTDOWN_TIMEOUT"),
        ({"CDP_API_VERSION": "v3"}, "CDP_API_VERSION"),
    ],
)
def test_bad_values_are_refused_naming_the_option(change: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(parse_flags(), {**REQUIRED, **change})
    assert named in str(refused.value)


def test_a_base_url_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(parse_flags(), {**REQUIRED, "CDP_BASE_URL": "https://u:pw-123@cdp.example"})
    assert "CDP_BASE_URL" in str(refused.value)
    assert "pw-123" not in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        load_settings(parse_flags(), {**REQUIRED, "CDP_BASE_URL": "ftp://u:pw-123@x"})
    assert "pw-123" not in str(refused.value)


def test_credentials_never_show_in_errors_or_repr() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(parse_flags(), {**REQUIRED, "CDP_API_TOKEN": "", "CDP_CLIENT_KEY": ""})
    assert "token-456" not in str(refused.value)
    settings = load_settings(parse_flags(), REQUIRED)
    assert "token-456" not in repr(settings)
    assert "key-123" not in repr(settings)
    assert isinstance(settings, Settings)


def test_readme_table_lists_every_option_with_its_default() -> None:
    """The README's configuration table cannot drift from OPTIONS."""
    rows = {}
    for line in README.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`[A-Z_]+`", cells[1]):
            rows[cells[1].strip("`")] = cells
    assert set(rows) == {option.env for option in OPTIONS}
    for option in OPTIONS:
        flag, _, default, _ = rows[option.env]
        assert flag == (f"`{option.flag}`" if option.flag else "")
        if option.kind is DURATION:  # as --help shows it, and as an operator writes it
            assert f"`{format_duration(option.default)}`" in default, option.env
        elif isinstance(option.default, (int, float)) and not isinstance(option.default, bool):
            assert f"`{option.default:.10g}`" in default, option.env
        elif isinstance(option.default, str):
            assert f"`{option.default}`" in default, option.env


def test_settings_built_directly_are_validated_and_defaulted_like_loaded_ones() -> None:
    # The demo (and any embedding) builds Settings itself: the same checks apply.
    given = {
        "source": "file:./events.jsonl",
        "cdp_base_url": "https://api-engage-eu.sitecorecloud.io/",
        "cdp_client_key": "key-123",
        "cdp_api_token": "token-456",
    }
    assert Settings(**given) == load_settings(parse_flags(), REQUIRED)
    with pytest.raises(ConfigError, match="CDP_BASE_URL"):
        Settings(**{**given, "cdp_base_url": "ftp://cdp"})
    with pytest.raises(ConfigError, match="--lease-seconds / WORKER_LEASE_SECONDS"):
        Settings(**given, lease_seconds=5.0)  # not above the 10 s request timeout
    with pytest.raises(ConfigError, match="--log-level"):
        Settings(**given, log_level="chatty")


def test_the_loop_is_one_of_three_and_uvloop_must_be_there_when_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError, match="--loop / WORKER_LOOP: expected auto, uvloop or asyncio"):
        load_settings(parse_flags("--loop", "tokio"), REQUIRED)
    assert _loops.loop_factory("asyncio") is None
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert _loops.loop_factory("auto") is None  # falls back to asyncio's loop
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        _loops.loop_factory("uvloop")


def test_worker_run_collects_rarely_with_start_up_frozen_out() -> None:
    # In a process of its own: freezing is for the whole interpreter.
    script = (
        "import gc; from worker import _loops, cli;"
        "_loops.collect_rarely(cli.WORKER_GC_THRESHOLDS);"
        "print(gc.get_threshold(), gc.get_freeze_count() > 10_000)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split("\n")[0] == "(50000, 20, 20) True"  # imports' objects frozen


# --- durations, and messages that say what is expected (issue 11) -------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30d", 30 * 24 * 3600.0),
        ("12h", 12 * 3600.0),
        ("90m", 5400.0),
        ("60s", 60.0),
        ("500ms", 0.5),
        ("1h30m", 5400.0),
        ("1.5", 1.5),  # a plain number is seconds, as it always was
        ("300", 300.0),
        (" 2.5e1 ", 25.0),
        ("12H", 12 * 3600.0),
    ],
)
def test_durations_are_accepted_with_units_in_flags_and_environment(
    text: str, seconds: float
) -> None:
    from_env = load_settings(parse_flags(), {**REQUIRED, "WORKER_SHUTDOWN_TIMEOUT": text})
    from_flag = load_settings(parse_flags("--shutdown-timeout", text), REQUIRED)
    assert from_env.shutdown_timeout == from_flag.shutdown_timeout == seconds


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(2592000.0, "30d"), (300.0, "5m"), (10.0, "10s"), (3600.0, "1h"), (0.5, "500ms"),
     (1.5, "1.5s"), (0.0, "0s"), (90.0, "90s")],
)  # fmt: skip
def test_durations_are_shown_as_written(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


def test_every_duration_option_takes_units() -> None:
    env = {
        **REQUIRED,
        "WORKER_REQUEST_TIMEOUT": "15s",
        "WORKER_NOT_FOUND_GRACE": "5m",
        "WORKER_STATE_RETENTION": "7d",
        "WORKER_LEASE_SECONDS": "2m",
        "WORKER_SHUTDOWN_TIMEOUT": "500ms",
    }
    settings = load_settings(parse_flags(), env)
    assert settings.request_timeout == 15
    assert settings.not_found_grace == 300
    assert settings.state_retention == 7 * 24 * 3600
    assert settings.lease_seconds == 120
    assert settings.shutdown_timeout == 0.5


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (
            (),
            {"WORKER_FOLLOW": "maybe"},
            "WORKER_FOLLOW: expected true or false (1/0, yes/no, on/off), got 'maybe'",
        ),
        (
            (),
            {"WORKER_STATE_RETENTION": "30 days"},
            "WORKER_STATE_RETENTION: expected a duration such as 30d, 12h, 60s, 500ms or 1.5 "
            "(seconds), got '30 days'",
        ),
        (
            ("--request-timeout", "10sec"),
            {},
            "--request-timeout: expected a duration such as 30d, 12h, 60s, 500ms or 1.5 "
            "(seconds), got '10sec'",
        ),
        ((), {"WORKER_CONCURRENCY": "lots"}, "WORKER_CONCURRENCY: expected a whole number"),
        (("--max-attempts", "2.5"), {}, "--max-attempts: expected a whole number"),
        ((), {"WORKER_RATE_LIMIT": "fast"}, "WORKER_RATE_LIMIT: expected a number"),
        ((), {"WORKER_HTTP_PORT": "http"}, "WORKER_HTTP_PORT: expected a port number"),
    ],
)
def test_a_bad_value_says_where_it_came_from_and_what_is_expected(
    flags: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(parse_flags(*flags), {**REQUIRED, **env})
    assert str(refused.value).startswith(message)


def test_no_option_reports_a_python_name_for_a_bad_value() -> None:
    messages = []
    for option in OPTIONS:
        try:
            load_settings({}, {**REQUIRED, option.env: "§bad§"})
        except ConfigError as refused:
            messages.append(str(refused))
    assert len(messages) > 10
    for message in messages:
        assert not re.search(r"expected (_|float|int|str\b)", message), message


@pytest.mark.parametrize(
    ("env", "hint"),
    [
        ({"WORKER_SOURCE": "./events.jsonl"}, "did you mean file:./events.jsonl?"),
        ({"WORKER_SOURCE": "events.jsonl"}, "did you mean file:events.jsonl?"),
        ({"WORKER_DLQ": "dead.jsonl"}, "did you mean file:dead.jsonl?"),
        ({"WORKER_STATE": "./state.db"}, "did you mean sqlite:///./state.db?"),
    ],
)
def test_a_bare_path_where_a_url_belongs_gets_a_suggestion(env: dict[str, str], hint: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(parse_flags(), {**REQUIRED, **env})
    assert hint in str(refused.value)
    assert (next(iter(env))) in str(refused.value)


def run_help() -> str:
    from worker.cli import build_parser

    (commands,) = (a for a in build_parser("run")._actions if a.choices)  # the subcommands
    assert isinstance(commands.choices, dict)
    text: str = commands.choices["run"].format_help()
    return text


def test_run_help_names_what_goes_where_and_shows_defaults_humanly() -> None:
    text = " ".join(run_help().split())  # argparse wraps lines
    for shown in (
        "--source URL",
        "--state URL",
        "--dlq URL",
        "--rate-limit RATE",
        "--concurrency N",
        "--max-attempts N",
        "--state-retention DURATION",
        "--request-timeout DURATION",
        "--http-port PORT",
        "--on-change update|ignore",
        "--log-format json|console|auto",
        "(default 30d)",
        "(default 10s)",
        "(default 5m)",
    ):
        assert shown in text, shown
    assert "2592000" not in text
    assert "default False" not in text
    assert "default None" not in text
    assert not re.search(r"--[a-z-]+ [A-Z]+_[A-Z_]+", text), "a metavar is argparse's dest"


def test_run_help_marks_what_is_required() -> None:
    text = " ".join(run_help().split())
    assert re.search(r"--source URL .*\(required\)", text)
    for env in ("CDP_BASE_URL", "CDP_CLIENT_KEY", "CDP_API_TOKEN"):
        assert f"{env} (required)" in text, env
    assert "CDP_API_VERSION (required)" not in text
