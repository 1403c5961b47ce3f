"""Configuration of `worker run`: one table of options, read from flags and environment.

Every option has a flag and an environment variable (flags win). The table `OPTIONS` is
the single source for argparse, the environment, `--help` and the README's table, so they
cannot drift apart. Each option has a `Kind`: how its text is read (durations take units,
`30d`, `12h`, `500ms`, or a plain number of seconds), what its flag's metavar is, what a bad
value is told to look like, and how its default is written in `--help`.

Validation happens here, before anything is consumed: a bad value raises `ConfigError`
naming the flag or the variable it came from, and `worker run` exits 2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ._urls import refuse_bare_path
from .contact import API_VERSIONS
from .errors import ConfigError

DAY = 24 * 3600.0


@dataclass(frozen=True)
class Kind:
    """How an option's text is read (`parse` raises ValueError), the metavar of its flag,
    what a bad value is told to look like, and how its default is shown in `--help`."""

    parse: Callable[[str], Any]
    metavar: str
    expected: str
    show: Callable[[Any], str] = str


@dataclass(frozen=True)
class Option:
    """One setting: its attribute name, flag, environment variable, kind and default."""

    name: str
    env: str
    kind: Kind
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

    @property
    def required(self) -> bool:
        return self.name in _REQUIRED


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true or false")


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY}
_AMOUNT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")  # ms before m


def parse_duration(text: str) -> float:
    """Seconds: a plain number is seconds (what the variables always took, read by float()
    exactly as before); else amounts with units, summed: 30d, 12h, 90m, 60s, 500ms, 1h30m."""
    try:
        return float(text)
    except ValueError:
        pass
    compact = "".join(text.split()).lower()
    amounts = _AMOUNT.findall(compact)
    if not amounts or "".join(number + unit for number, unit in amounts) != compact:
        raise ValueError("not a duration")
    return sum(float(number) * _UNITS[unit] for number, unit in amounts)


def format_duration(seconds: float) -> str:
    """`seconds` in the largest unit that holds it whole: 2592000 -> 30d, 300 -> 5m."""
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms" if 0 < seconds < 1 else f"{seconds:g}s"


def _choice(*words: str) -> Kind:
    # Checked in _validate, after the value is read, with its own message.
    return Kind(str, "|".join(words), " or ".join(words))


URL = Kind(str, "URL", "a URL")
COUNT = Kind(int, "N", "a whole number such as 8")
RATE = Kind(float, "RATE", "a number such as 50 (requests per second; 0 = no limit)", "{:g}".format)
PORT = Kind(int, "PORT", "a port number such as 9108 (0 = off)")
DURATION = Kind(
    parse_duration,
    "DURATION",
    "a duration such as 30d, 12h, 60s, 500ms or 1.5 (seconds)",
    format_duration,
)
SWITCH = Kind(_bool, "", "true or false (1/0, yes/no, on/off)")  # a flag without a value
TEXT = Kind(str, "TEXT", "text")
PATH = Kind(str, "PATH", "a file path")


OPTIONS: tuple[Option, ...] = (
    Option(
        "source",
        "WORKER_SOURCE",
        URL,
        None,
        "where events come from: file:PATH (JSONL), file:- (stdin), "
        "redis://HOST:6379/0?stream=S&group=G, amqp://USER:PASS@HOST/VHOST?queue=Q, "
        "nats://HOST:4222?stream=S&subject=SUBJ",
    ),
    Option(
        "state",
        "WORKER_STATE",
        URL,
        "sqlite:///./worker-state.db",
        "state store URL: memory:, sqlite:///PATH, redis://, postgresql://",
    ),
    Option(
        "dlq",
        "WORKER_DLQ",
        URL,
        None,
        "dead-letter sink URL (default: beside the source: file:./dead-letter.jsonl, or "
        "the stream, queue or subject named <source's>.dead-letter)",
    ),
    Option("rate_limit", "WORKER_RATE_LIMIT", RATE, 50.0, "CDP requests per second, 0 = no limit"),
    Option(
        "rate_limit_backend",
        "WORKER_RATE_LIMIT_BACKEND",
        Kind(str, "local|URL", "local or a redis:// URL"),
        "local",
        "local, or redis://HOST:6379/0 for one limit shared by all replicas",
    ),
    Option("concurrency", "WORKER_CONCURRENCY", COUNT, 32, "most CDP requests in flight"),
    Option(
        "max_attempts",
        "WORKER_MAX_ATTEMPTS",
        COUNT,
        8,
        "attempts per event before retries_exhausted",
    ),
    Option(
        "request_timeout",
        "WORKER_REQUEST_TIMEOUT",
        DURATION,
        10.0,
        "time each CDP request may take",
    ),
    Option(
        "not_found_grace",
        "WORKER_NOT_FOUND_GRACE",
        DURATION,
        300.0,
        "how long to keep retrying a 404 before order_not_found",
    ),
    Option(
        "state_retention",
        "WORKER_STATE_RETENTION",
        DURATION,
        30 * DAY,
        "how long to keep done records",
    ),
    Option(
        "lease_seconds",
        "WORKER_LEASE_SECONDS",
        DURATION,
        60.0,
        "claim lease, renewed while working; above the request timeout",
    ),
    Option(
        "shutdown_timeout",
        "WORKER_SHUTDOWN_TIMEOUT",
        DURATION,
        25.0,
        "time to finish in-flight work on SIGTERM",
    ),
    Option(
        "http_port", "WORKER_HTTP_PORT", PORT, 9108, "port of /metrics, /healthz, /readyz; 0 = off"
    ),
    Option(
        "on_change",
        "WORKER_ON_CHANGE",
        _choice("update", "ignore"),
        "update",
        "update: a changed contact is updated at CDP; ignore: created once, never updated",
    ),
    Option(
        "verify_new",
        "WORKER_VERIFY_NEW",
        SWITCH,
        False,
        "list an order's contacts at CDP before creating one the state store does not know "
        "(a new or lost state store in front of a CDP that holds contacts)",
    ),
    Option(
        "follow",
        "WORKER_FOLLOW",
        SWITCH,
        False,
        "file source: tail the file instead of exiting at its end",
    ),
    Option(
        "loop",
        "WORKER_LOOP",
        _choice("auto", "uvloop", "asyncio"),
        "auto",
        "event loop: auto (uvloop where it is installed), uvloop or asyncio",
    ),
    Option(
        "log_format",
        "WORKER_LOG_FORMAT",
        _choice("json", "console", "auto"),
        "auto",
        "json, console or auto (console on a TTY)",
    ),
    Option(
        "log_level",
        "WORKER_LOG_LEVEL",
        _choice("debug", "info", "warning", "error"),
        "info",
        "debug, info, warning, error",
    ),
    Option(
        "cdp_base_url",
        "CDP_BASE_URL",
        URL,
        None,
        "Sitecore CDP base URL, e.g. https://api-engage-eu.sitecorecloud.io",
    ),
    Option(
        "cdp_client_key",
        "CDP_CLIENT_KEY",
        TEXT,
        None,
        "CDP client key (or CDP_CLIENT_KEY_FILE)",
        secret=True,
    ),
    Option(
        "cdp_api_token",
        "CDP_API_TOKEN",
        TEXT,
        None,
        "CDP API token (or CDP_API_TOKEN_FILE)",
        secret=True,
    ),
    Option("cdp_api_version", "CDP_API_VERSION", _choice(*API_VERSIONS), "v2", "v2 or v2.1"),
    Option(
        "cdp_ca_file",
        "CDP_CA_FILE",
        PATH,
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


def argument_type(kind: Kind) -> Callable[[str], Any]:
    """`kind` as an argparse `type=`, so that a bad flag says what is expected, as above."""

    def parse(text: str) -> Any:
        try:
            return kind.parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.expected}, got {text!r}") from None

    return parse


def default_note(option: Option) -> str:
    """The note after an option's help: "(required)", or its default as an operator
    writes it, "(default 30d)" and not 2592000.0; none for a switch (off unless given)
    or an option without a default."""
    if option.required:
        return " (required)"
    if option.default is None or option.kind is SWITCH:
        return ""
    return f" (default {option.kind.show(option.default)})"


def help_text(option: Option) -> str:
    return option.help + default_note(option)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `worker run`, from `OPTIONS`. Defaults stay None so the env can fill in."""
    for option in OPTIONS:
        if option.flag is None:
            continue
        text = f"{help_text(option)} [env {option.env}]"
        if option.kind is SWITCH:
            parser.add_argument(
                option.flag,
                dest=option.name,
                action="store_const",
                const="true",
                default=None,
                help=text,
            )
        else:
            parser.add_argument(
                option.flag,
                dest=option.name,
                default=None,
                metavar=option.kind.metavar,
                help=text,
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
        origin = option.flag or option.env  # named in a message about the value
        if text is None:
            text, origin = env.get(option.env), option.env
        if not text and option.secret:  # an empty variable beside its _FILE: the file
            text = _read_secret_file(env, option.env) or text
        if text is None or text == "":
            values[option.name] = option.default
            continue
        try:
            values[option.name] = option.kind.parse(text) if isinstance(text, str) else text
        except ValueError:
            raise ConfigError(_bad_value(option, origin, text)) from None
    return Settings(**values)


def _bad_value(option: Option, origin: str, text: str) -> str:
    """What is expected and what was given, unless a secret or a URL (URLs hold
    passwords): "WORKER_FOLLOW: expected true or false (...), got 'maybe'"."""
    shown = "" if option.secret or "://" in text else f", got {text!r}"
    return f"{origin}: expected {option.kind.expected}{shown}"


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


# A bare path where a URL belongs is taken for the URL an operator most likely meant.
_PATH_URLS = {"source": "file:", "dlq": "file:", "state": "sqlite:///"}


def _validate(values: dict[str, Any]) -> None:
    _require(values)
    for name, prefix in _PATH_URLS.items():
        if values[name]:
            refuse_bare_path(values[name], _BY_NAME[name].label, suggest=prefix)
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
            f"{_BY_NAME['lease_seconds'].label} ({format_duration(values['lease_seconds'])}) must "
            f"be longer than {_BY_NAME['request_timeout'].label} "
            f"({format_duration(values['request_timeout'])}): a lease that "
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
