"""Configuration: flags over environment over defaults, validation naming the option."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest

from worker import _loops
from worker.config import OPTIONS, Settings, add_arguments, load_settings
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
        ({"WORKER_RATE_LIMIT": "fast"}, "--rate-limit / WORKER_RATE_LIMIT"),
        ({"WORKER_CONCURRENCY": "0"}, "--concurrency / WORKER_CONCURRENCY"),
        ({"WORKER_MAX_ATTEMPTS": "0"}, "--max-attempts / WORKER_MAX_ATTEMPTS"),
        ({"WORKER_HTTP_PORT": "70000"}, "--http-port / WORKER_HTTP_PORT"),
        ({"WORKER_LEASE_SECONDS": "5"}, "--lease-seconds / WORKER_LEASE_SECONDS"),
        ({"WORKER_LOG_FORMAT": "xml"}, "--log-format / WORKER_LOG_FORMAT"),
        ({"WORKER_LOG_LEVEL": "loud"}, "--log-level / WORKER_LOG_LEVEL"),
        ({"WORKER_FOLLOW": "maybe"}, "--follow / WORKER_FOLLOW"),
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
        if isinstance(option.default, (int, float)) and not isinstance(option.default, bool):
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
