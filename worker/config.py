"""Configuration of `worker run`: one table of options, read from flags and environment.

Every option has a flag and an environment variable (flags win). The table `OPTIONS` is
the single source for argparse, the environment, `--help` and the README's table, so they
cannot drift apart. Validation happens here, before anything is consumed: a bad value
raises `ConfigError` naming the flag and the variable, and `worker run` exits 2.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .contact import API_VERSIONS
from .errors import ConfigError

DAY = 24 * 3600.0


@dataclass(frozen=True)
class Option:
    """One setting: its attribute name, flag, environment variable, parser and default."""

    name: str
    env: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    secret: bool = False  # never echoed in messages or logs

    @property
    def flag(self) -> str | None:
        # CDP_* settings are environment-only, as DESIGN section 6 lists them.
        return None if self.env.startswith("CDP_") else "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        return f"{self.flag} / {self.env}" if self.flag else self.env


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true or false")


OPTIONS: tuple[Option, ...] = (
    Option(
        "source",
        "WORKER_SOURCE",
        str,
        None,
        "where events come from: file:PATH (JSONL), file:- (stdin), "
        "redis://HOST:6379/0?stream=S&group=G, amqp://USER:PASS@HOST/VHOST?queue=Q, "
        "nats://HOST:4222?stream=S&subject=SUBJ",
    ),
    Option(
        "state",
        "WORKER_STATE",
        str,
        "sqlite:///./worker-state.db",
        "state store URL: memory:, sqlite:///PATH, redis://, postgresql://",
    ),
    Option(
        "dlq",
        "WORKER_DLQ",
        str,
        None,
        "dead-letter sink URL (default: beside the source: file:./dead-letter.jsonl, or "
        "the stream, queue or subject named <source's>.dead-letter)",
    ),
    Option("rate_limit", "WORKER_RATE_LIMIT", float, 50.0, "CDP requests per second, 0 = no limit"),
    Option(
        "rate_limit_backend",
        "WORKER_RATE_LIMIT_BACKEND",
        str,
        "local",
        "local, or redis://HOST:6379/0 for one limit shared by all replicas",
    ),
    Option("concurrency", "WORKER_CONCURRENCY", int, 32, "most CDP requests in flight"),
    Option(
        "max_attempts", "WORKER_MAX_ATTEMPTS", int, 8, "attempts per event before retries_exhausted"
    ),
    Option("request_timeout", "WORKER_REQUEST_TIMEOUT", float, 10.0, "seconds per CDP request"),
    Option(
        "not_found_grace",
        "WORKER_NOT_FOUND_GRACE",
        float,
        300.0,
        "seconds to keep retrying a 404 before order_not_found",
    ),
    Option(
        "state_retention",
        "WORKER_STATE_RETENTION",
        float,
        30 * DAY,
        "seconds to keep done records",
    ),
    Option(
        "lease_seconds",
        "WORKER_LEASE_SECONDS",
        float,
        60.0,
        "claim lease, renewed while working; above the request timeout",
    ),
    Option(
        "shutdown_timeout",
        "WORKER_SHUTDOWN_TIMEOUT",
        float,
        25.0,
        "seconds to finish in-flight work on SIGTERM",
    ),
    Option(
        "http_port", "WORKER_HTTP_PORT", int, 9108, "port of /metrics, /healthz, /readyz; 0 = off"
    ),
    Option(
        "on_change",
        "WORKER_ON_CHANGE",
        str,
        "update",
        "update: a changed contact is updated at CDP; ignore: created once, never updated",
    ),
    Option(
        "verify_new",
        "WORKER_VERIFY_NEW",
        _bool,
        False,
        "list an order's contacts at CDP before creating one the state store does not know "
        "(a new or lost state store in front of a CDP that holds contacts)",
    ),
    Option(
        "follow",
        "WORKER_FOLLOW",
        _bool,
        False,
        "file source: tail the file instead of exiting at its end",
    ),
    Option(
        "loop",
        "WORKER_LOOP",
        str,
        "auto",
        "event loop: auto (uvloop where it is installed), uvloop or asyncio",
    ),
    Option(
        "log_format", "WORKER_LOG_FORMAT", str, "auto", "json, console or auto (console on a TTY)"
    ),
    Option("log_level", "WORKER_LOG_LEVEL", str, "info", "debug, info, warning, error"),
    Option(
        "cdp_base_url",
        "CDP_BASE_URL",
        str,
        None,
        "Sitecore CDP base URL, e.g. https://api-engage-eu.sitecorecloud.io",
    ),
    Option(
        "cdp_client_key",
        "CDP_CLIENT_KEY",
        str,
        None,
        "CDP client key (or CDP_CLIENT_KEY_FILE)",
        secret=True,
    ),
    Option(
        "cdp_api_token",
        "CDP_API_TOKEN",
        str,
        None,
        "CDP API token (or CDP_API_TOKEN_FILE)",
        secret=True,
    ),
    Option("cdp_api_version", "CDP_API_VERSION", str, "v2", "v2 or v2.1"),
    Option(
        "cdp_ca_file",
        "CDP_CA_FILE",
        str,
        None,
        "PEM bundle of CAs to trust for CDP_BASE_URL, besides the system's",
    ),
)
_BY_NAME = {option.name: option for option in OPTIONS}


def default(name: str) -> Any:
    """The default of one option: written in `OPTIONS` only."""
    return _BY_NAME[name].default


@dataclass(frozen=True)
class Settings:
    """Validated settings of one worker process.

    Built by `load_settings` from flags and the environment, or directly (the demo, the
    tests): either way `__post_init__` validates and normalises them, and a default not
    given comes from `OPTIONS`, where each is written once.
    """

    source: str
    cdp_base_url: str
    cdp_client_key: str
    cdp_api_token: str
    state: str = default("state")
    dlq: str | None = default("dlq")
    rate_limit: float = default("rate_limit")
    rate_limit_backend: str = default("rate_limit_backend")
    concurrency: int = default("concurrency")
    max_attempts: int = default("max_attempts")
    request_timeout: float = default("request_timeout")
    not_found_grace: float = default("not_found_grace")
    state_retention: float = default("state_retention")
    lease_seconds: float = default("lease_seconds")
    shutdown_timeout: float = default("shutdown_timeout")
    http_port: int = default("http_port")
    on_change: str = default("on_change")
    verify_new: bool = default("verify_new")
    follow: bool = default("follow")
    loop: str = default("loop")
    log_format: str = default("log_format")
    log_level: str = default("log_level")
    cdp_api_version: str = default("cdp_api_version")
    cdp_ca_file: str | None = default("cdp_ca_file")

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        _validate(values)
        for name, value in values.items():  # what _validate normalised
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        # Credentials never appear in a repr, hence never in a traceback or log line.
        shown = {f.name: getattr(self, f.name) for f in fields(self) if not _BY_NAME[f.name].secret}
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `worker run`, from `OPTIONS`. Defaults stay None so the env can fill in."""
    for option in OPTIONS:
        if option.flag is None:
            continue
        default = "" if option.default is None else f" (default {option.default})"
        help_text = f"{option.help}{default} [env {option.env}]"
        if option.parse is _bool:
            parser.add_argument(
                option.flag,
                dest=option.name,
                action="store_const",
                const="true",
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                option.flag,
                dest=option.name,
                default=None,
                metavar=option.name.upper(),
                help=help_text,
            )


def _read_secret_file(env: Mapping[str, str], name: str) -> str | None:
    path = env.get(name + "_FILE")
    if not path:
        return None
    try:
        # utf-8-sig: a byte-order mark (editors on Windows write one) is not the secret's.
        secret = Path(path).read_text(encoding="utf-8-sig").strip()
    except OSError as exc:
        raise ConfigError(f"{name}_FILE: cannot read the file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}_FILE: the file is not UTF-8 text") from None
    if not secret:
        raise ConfigError(f"{name}_FILE: the file is empty")
    return secret


def load_settings(
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Merge flags over environment over defaults, parse and validate. Raises ConfigError."""
    env = os.environ if env is None else env
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    values: dict[str, Any] = {}
    for option in OPTIONS:
        text = given.get(option.name)
        if text is None:
            text = env.get(option.env)
        if not text and option.secret:  # an empty variable beside its _FILE: the file
            text = _read_secret_file(env, option.env) or text
        if text is None or text == "":
            values[option.name] = option.default
            continue
        try:
            values[option.name] = option.parse(str(text)) if isinstance(text, str) else text
        except ValueError:
            shown = (
                "" if option.secret or "://" in str(text) else f" {text!r}"
            )  # URLs hold passwords
            raise ConfigError(
                f"{option.label}: invalid value{shown}, "
                f"expected {getattr(option.parse, '__name__', 'a value')}"
            ) from None
    return Settings(**values)


# What must be given, and how else it may be given.
_REQUIRED = ("source", "cdp_base_url", "cdp_client_key", "cdp_api_token")


def _require(values: Mapping[str, Any]) -> None:
    """Every missing setting named in one message, with its _FILE form where it has one."""
    missing = []
    for name in _REQUIRED:
        if not values.get(name):
            option = _BY_NAME[name]
            missing.append(
                f"{option.label} (or {option.env}_FILE)" if option.secret else option.label
            )
    if len(missing) == 1:
        raise ConfigError(f"{missing[0]} is required")
    if missing:
        raise ConfigError(f"{', '.join(missing[:-1])} and {missing[-1]} are required")


def _check_ca_file(path: str) -> None:
    """CDP_CA_FILE must be a PEM bundle the TLS library takes (checked now, not at the
    first request, which would look like an outage)."""
    import ssl

    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except ssl.SSLError:  # before OSError, which it is a kind of
        raise ConfigError(f"CDP_CA_FILE: {path!r} holds no PEM certificate") from None
    except OSError as exc:
        raise ConfigError(f"CDP_CA_FILE: cannot read {path!r} ({exc.strerror})") from None


# Options holding a URL: each must at least split (a host, a port in range), whatever
# reads it later; the value is never echoed, since URLs carry passwords.
_URL_OPTIONS = ("source", "state", "dlq", "rate_limit_backend", "cdp_base_url")


def _check_urls(values: Mapping[str, Any]) -> None:
    for name in _URL_OPTIONS:
        value = values.get(name)
        if not value or value == "local":
            continue
        try:
            parts = urlsplit(value)
            # Every host of a server list (nats://h1:4222,h2:4222) must have a valid port.
            for host in parts.netloc.rpartition("@")[2].split(","):
                urlsplit(f"//{host}").port  # noqa: B018 - raises for a bad or out-of-range port
        except ValueError as exc:
            problem = "port out of range" if "range" in str(exc) else "not a valid URL"
            raise ConfigError(f"{_BY_NAME[name].label}: {problem}") from None


def _positive(values: Mapping[str, Any], name: str, *, zero_ok: bool = False) -> None:
    value = values[name]
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"{_BY_NAME[name].label}: must be {bound}, got {value}")


def _validate(values: dict[str, Any]) -> None:
    _require(values)
    _check_urls(values)
    base = urlsplit(values["cdp_base_url"])
    if base.scheme not in {"http", "https"} or not base.hostname:
        raise ConfigError(
            "CDP_BASE_URL: expected an http(s) URL such as https://api-engage-eu.sitecorecloud.io"
        )
    if base.query or base.fragment or values["cdp_base_url"].endswith(("?", "#")):
        raise ConfigError(
            "CDP_BASE_URL: must not have a query or a fragment: it is the base of every path"
        )
    if base.username or base.password:
        # The value is not echoed: it holds a credential.
        raise ConfigError(
            "CDP_BASE_URL: must not carry credentials; set CDP_CLIENT_KEY and CDP_API_TOKEN"
        )
    values["cdp_base_url"] = values["cdp_base_url"].rstrip("/")
    if values["cdp_ca_file"]:
        _check_ca_file(values["cdp_ca_file"])
    if values["cdp_api_version"] not in API_VERSIONS:
        raise ConfigError(f"CDP_API_VERSION: expected one of {', '.join(API_VERSIONS)}")
    for name in ("rate_limit", "not_found_grace", "state_retention", "shutdown_timeout"):
        _positive(values, name, zero_ok=True)
    for name in ("concurrency", "max_attempts", "request_timeout", "lease_seconds"):
        _positive(values, name)
    if not 0 <= values["http_port"] <= 65535:
        raise ConfigError(f"{_BY_NAME['http_port'].label}: must be a port number or 0")
    if values["lease_seconds"] <= values["request_timeout"]:
        raise ConfigError(
            f"{_BY_NAME['lease_seconds'].label} ({values['lease_seconds']}) must be longer than "
            f"{_BY_NAME['request_timeout'].label} ({values['request_timeout']}): a lease that "
            "runs out mid-request lets another replica send a second POST"
        )
    if values["loop"] not in {"auto", "uvloop", "asyncio"}:
        raise ConfigError(f"{_BY_NAME['loop'].label}: expected auto, uvloop or asyncio")
    if values["on_change"] not in {"update", "ignore"}:
        raise ConfigError(f"{_BY_NAME['on_change'].label}: expected update or ignore")
    if values["log_format"] not in {"json", "console", "auto"}:
        raise ConfigError(f"{_BY_NAME['log_format'].label}: expected json, console or auto")
    if values["log_level"].lower() not in {"debug", "info", "warning", "error"}:
        raise ConfigError(f"{_BY_NAME['log_level'].label}: expected debug, info, warning or error")
    values["log_level"] = values["log_level"].lower()
    backend = values["rate_limit_backend"]
    if backend != "local" and urlsplit(backend).scheme not in {"redis", "rediss"}:
        raise ConfigError(f"{_BY_NAME['rate_limit_backend'].label}: expected local or redis://...")
