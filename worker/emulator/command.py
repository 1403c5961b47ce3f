"""`worker emulator`: its description and flags (each with an EMULATOR_<NAME> environment
variable), and the command that serves the emulator until SIGTERM/SIGINT.

Only argparse and the standard library at import time: the `worker` command line adds
these flags to its parser for every command, `worker check` included, and the server
(aiohttp) is imported only when the emulator actually runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ssl

    from .config import EmulatorConfig


DESCRIPTION = (
    "Serve a local, strict Sitecore CDP order-contact API (v2 and v2.1) until SIGTERM: "
    "create (POST /{v}/orders/{orderRef}/contacts), list (GET the same path), get "
    "(GET /{v}/orderContacts/{ref}), update (v2 POST, v2.1 PUT or partial PATCH on "
    "/{v}/orderContacts/{ref}) and delete (DELETE it, 204). HTTP Basic auth, CDP's body "
    "validation and error bodies, no deduplication; faults on demand (rate limit, latency, "
    "5xx, hangs and dropped connections after a create, update or delete, orders that 404 "
    "for a while); statistics at GET /_emulator/stats, knobs at PATCH /_emulator/config. "
    "Prints one JSON line with its URL on stdout once listening, and on stderr the "
    "CDP_BASE_URL, CDP_CLIENT_KEY and CDP_API_TOKEN a worker needs, ready to paste."
)


def _fraction(text: str) -> float:
    value = _non_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction between 0 and 1")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `worker emulator`; each defaults to its EMULATOR_<NAME> environment variable.

    String defaults go through argparse's `type`, so a bad environment value is reported
    like a bad flag, and only when the emulator command is the one being parsed. A parser
    without a description gets `DESCRIPTION`, for `worker emulator --help`.
    """
    if parser.description is None:
        parser.description = DESCRIPTION

    def option(flag: str, kind: Callable[[str], Any], default: str | None, text: str) -> None:
        env = "EMULATOR_" + flag.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(
            flag, type=kind, default=os.environ.get(env, default), help=f"{text} (env {env})"
        )

    option("--host", str, "127.0.0.1", "interface to listen on")
    option("--port", _port, "8080", "port to listen on; 0 picks a free one")
    option("--rate-limit", _non_negative, "0", "accepted requests per second; 0 = no limit")
    option("--latency", _non_negative, "0", "seconds added to every answer")
    option("--latency-jitter", _non_negative, "0", "uniform +- seconds around --latency")
    option("--error-rate", _fraction, "0", "fraction of requests answered 500/502/503")
    option("--timeout-after-create", _fraction, "0", "fraction of POSTs that hang after creating")
    option("--reset-after-create", _fraction, "0", "fraction of POSTs dropped after creating")
    option("--timeout-after-update", _fraction, "0", "fraction of updates that hang once applied")
    option("--reset-after-update", _fraction, "0", "fraction of updates dropped once applied")
    option("--timeout-after-delete", _fraction, "0", "fraction of deletes that hang once applied")
    option("--reset-after-delete", _fraction, "0", "fraction of deletes dropped once applied")
    option("--hang-seconds", _non_negative, "30", "how long a hanging write hangs")
    option("--not-found-for", _non_negative, "0", "seconds an order 404s after its first POST")
    option("--client-key", str, "emulator-key", "HTTP Basic user (client key)")
    option("--api-token", str, "emulator-token", "HTTP Basic password (API token)")
    option("--seed", _seed, None, "seed of the random fault choices")
    option("--tls-cert", str, None, "PEM certificate (chain): serve HTTPS, as CDP does")
    option("--tls-key", str, None, "PEM private key of --tls-cert (default: in that file)")
    for flag, text in (
        ("--forbidden", "answer 403 to valid credentials"),
        ("--auth-failure", "answer 401 to every API request"),
    ):
        env = "EMULATOR_" + flag.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(
            flag,
            type=_boolean,
            nargs="?",
            const=True,
            default=os.environ.get(env, "false"),
            help=f"{text} (env {env})",
        )


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """The EmulatorConfig described by parsed `add_cli_arguments` flags."""
    from .config import EmulatorConfig

    return EmulatorConfig(
        client_key=args.client_key,
        api_token=args.api_token,
        rate_limit=args.rate_limit,
        latency=args.latency,
        latency_jitter=args.latency_jitter,
        error_rate=args.error_rate,
        timeout_after_create_rate=args.timeout_after_create,
        reset_after_create_rate=args.reset_after_create,
        timeout_after_update_rate=args.timeout_after_update,
        reset_after_update_rate=args.reset_after_update,
        timeout_after_delete_rate=args.timeout_after_delete,
        reset_after_delete_rate=args.reset_after_delete,
        hang_seconds=args.hang_seconds,
        forbidden=args.forbidden,
        auth_failure=args.auth_failure,
        not_found_for=args.not_found_for,
        seed=args.seed,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT. Prints one JSON line with the URL once listening."""
    from .. import _loops

    config = config_from_args(args)
    # Requests that arrive during a collection's pause are all timestamped after it, as
    # if sent at once: full collections over its thousands of contacts paused it 30-40 ms,
    # 5 more requests in a second (`max_posts_in_any_second`) than the workers sent.
    _loops.collect_rarely(GC_THRESHOLDS)
    try:
        _loops.run(_serve(config, args.host, args.port, tls_context(args)))
    except OSError as exc:  # typically the port is taken, or a TLS file unreadable
        import orjson

        message = {"event": "emulator.failed", "error": f"{type(exc).__name__}: {exc}"}
        sys.stderr.write(orjson.dumps(message).decode() + "\n")
        return 1
    return 0


# Allocations between two collections of the youngest generation, and collections of
# one generation between two of the next (Python's defaults: 700, 10, 10).
GC_THRESHOLDS = (50_000, 1_000, 1_000)
# How often what survived a young collection goes to the collector's permanent generation
# (see `_freeze_survivors`).
FREEZE_INTERVAL = 1.0


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server's TLS context for --tls-cert / --tls-key, or None for plain HTTP."""
    if not args.tls_cert:
        return None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.tls_cert, args.tls_key or None)
    return context


def connection_help(url: str, config: EmulatorConfig) -> str:
    """What a worker needs to talk to this emulator, as lines to paste into a shell.

    The credentials are the operator's own local test ones, which the emulator accepts:
    printing them is the point. They go to stderr, never into the JSON line on stdout.
    """
    import shlex

    exports = {
        "CDP_BASE_URL": url,
        "CDP_CLIENT_KEY": config.client_key,
        "CDP_API_TOKEN": config.api_token,
    }
    lines = [f"export {name}={shlex.quote(value)}" for name, value in exports.items()]
    return (
        f"CDP emulator listening on {url}; it accepts client key {config.client_key!r} and "
        f"API token {config.api_token!r}. For a worker:\n\n" + "\n".join(lines) + "\n\n"
    )


async def _freeze_survivors() -> None:
    """Every FREEZE_INTERVAL, a young collection, then what survived it frozen.

    The contacts the emulator keeps are allocations the collector counts: at about 4,000
    of them the young generation filled up, and its collection walked them all (25-40 ms
    on a 2-core machine), with the requests arriving meanwhile timestamped together
    after it. Frozen each second, they are never walked again; the young collection
    before freezing keeps cyclic garbage out of the permanent generation (20,000
    contacts left none behind there), and reference counting frees frozen contacts on
    reset as any others.
    """
    import asyncio
    import gc

    while True:
        await asyncio.sleep(FREEZE_INTERVAL)
        gc.collect(0)
        gc.freeze()


async def _serve(config: EmulatorConfig, host: str, port: int, tls: ssl.SSLContext | None) -> None:
    import asyncio
    import signal

    import orjson

    from .app import Emulator

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with Emulator(config, host, port, tls=tls) as emulator:
            started = {
                "event": "emulator.started",
                "url": emulator.url,
                "host": host,
                "port": emulator.port,
            }
            sys.stdout.write(orjson.dumps(started).decode() + "\n")
            sys.stdout.flush()
            sys.stderr.write(connection_help(emulator.url, config))
            sys.stderr.flush()
            freezing = asyncio.create_task(_freeze_survivors())
            try:
                await stop.wait()
            finally:
                freezing.cancel()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
