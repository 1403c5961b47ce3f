"""`worker` command line (DESIGN section 6): run, emulator, demo, check, validate,
publish, dlq, inspect, schema."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import (
    COUNT,
    DURATION,
    OPTIONS,
    RATE,
    add_arguments,
    argument_type,
    default,
    default_note,
)
from .contact import API_VERSIONS, is_blank
from .errors import ConfigError, InvalidEvent, SourceError, StateError

if TYPE_CHECKING:
    from . import _console
    from .pipeline import Worker
    from .sources import Publisher

# What each command needs is imported inside it: `worker check` runs in every container
# health probe and must start quickly, without aiohttp, the brokers or the emulator.

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
# `worker run`'s garbage collector (see _loops.collect_rarely): a young collection every
# 50,000 allocations (about 50 events), an older one every 20 of those.
WORKER_GC_THRESHOLDS = (50_000, 20, 20)


class _Version(argparse.Action):
    """--version, reading the package metadata only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kwargs: Any) -> None:
        from . import __version__

        print(f"cdp-sync {__version__}")  # on stdout, as argparse's own action
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """A parser that refuses an unknown argument itself: a command's typo is then told
    with that command's usage (`usage: worker run ...`), not the top level's, which
    argparse would give, and with the closest flag there is."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, unknown = super().parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}{self._suggest(unknown)}")
        return parsed, unknown

    def _suggest(self, unknown: list[str]) -> str:
        import difflib

        flags = [word.partition("=")[0] for word in unknown if word.startswith("--")]
        known = [flag for flag in self._option_string_actions if flag.startswith("--")]
        close = difflib.get_close_matches(flags[0], known, n=1) if flags else []
        return f" (did you mean {close[0]}?)" if close else ""


def _environment_only() -> str:
    """The epilog's list of environment-only settings: required, or their defaults."""
    return ", ".join(option.env + default_note(option) for option in OPTIONS if option.flag is None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; given `command`, only that command's flags are added to it
    (the emulator's come from its package, which `worker check` must not load)."""
    parser = _Parser(
        prog="worker",
        description="cdp-sync: keeps the primary contact of each order in Sitecore CDP "
        "right from order-contact events: created once, updated when it changes, deleted on "
        "erasure.",
    )
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="consume events and sync each order's contact to CDP",
        description="Consume order-contact events and keep each order's contact in CDP: "
        "created once, updated when it changes (newer versions only), deleted on erasure. "
        "Over a file (without --follow), a terminal shows a progress bar on stderr and, at "
        "the end, a summary of the run and where it stopped; stdout carries the logs only.",
        epilog="Environment only: "
        + _environment_only()
        + " (CDP_CLIENT_KEY_FILE / CDP_API_TOKEN_FILE read a secret from a file). "
        "DURATION: 30d, 12h, 90m, 60s, 500ms, or a number of seconds (1.5). "
        "Exit codes: 0 finished or stopped cleanly, 1 unexpected failure, 2 bad configuration.",
    )
    add_arguments(run)

    emulator = commands.add_parser("emulator", help="serve a local Sitecore CDP order-contact API")
    if command in (None, "emulator"):
        from .emulator.command import add_cli_arguments

        add_cli_arguments(emulator)

    demo = commands.add_parser(
        "demo",
        help="emulator + generated events + worker in one process, then a summary",
        description="Run a local CDP emulator with injected faults, generate events (with "
        "duplicates, changes, erasures and bad ones) and sync them with a worker, all in one "
        "process; then print a summary and whether CDP converged. Exit 0 if it did.",
    )
    demo.add_argument(
        "--events", type=argument_type(COUNT), default=2000, metavar="N",
        help="valid orders (default 2000)",
    )  # fmt: skip
    demo.add_argument(
        "--rate-limit", type=argument_type(RATE), default=500.0, metavar="RATE",
        help="requests/s (default 500)",
    )  # fmt: skip
    demo.add_argument(
        "--workdir", metavar="DIR", help="keep the event file, state and dead letters here"
    )

    check = commands.add_parser(
        "check",
        help="probe a running worker's /readyz; exit 0 if ready",
        description="Ask a running worker's /readyz whether it is consuming, and print its "
        "answer: exit 0 if ready, 1 if not or unreachable (container health checks).",
    )
    check.add_argument(
        "--url",
        default=None,
        metavar="URL",
        help="readiness URL (default http://127.0.0.1:$WORKER_HTTP_PORT/readyz, "
        f"port {default('http_port')})",
    )
    check.add_argument(
        "--timeout", type=argument_type(DURATION), default=3.0, metavar="DURATION",
        help="how long to wait for the answer: 3s, 500ms, or seconds (default 3s)",
    )  # fmt: skip

    validate = commands.add_parser(
        "validate",
        help="check a JSONL file of events offline",
        description="Check every non-blank line of FILE against the event envelope, offline, "
        "and print each problem with its line (and column, for bad JSON) without quoting "
        "the data; exit 1 if any event is invalid.",
    )
    validate.add_argument("file", metavar="FILE", help="JSONL file, or - for standard input")
    _add_api_version(validate)

    publish = commands.add_parser(
        "publish",
        help="enqueue a JSONL file of events into a source",
        description="Enqueue every non-blank line of FILE as one message into the source at "
        "--to (file:PATH appends; redis://...?stream=NAME adds stream entries). A progress "
        "bar shows on a terminal. Lines are sent as they are, byte for byte, spaces included "
        "(only the line end, \\n or \\r\\n, is cut): run `worker validate` first.",
    )
    publish.add_argument("--to", required=True, metavar="URL", help="the source URL")
    publish.add_argument("file", metavar="FILE", help="JSONL file, or - for standard input")
    publish.add_argument(
        "--batch", type=argument_type(COUNT), default=500, metavar="N",
        help="messages per round trip (default 500)",
    )  # fmt: skip

    dlq = commands.add_parser(
        "dlq",
        help="look at dead letters, and send them again",
        description="Read the dead letters of any sink (file, Redis stream, RabbitMQ queue, "
        "NATS subject) without taking them away: `list` counts and lists them, `replay` "
        "publishes them again after a fix.",
    )
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_list = dlq_commands.add_parser(
        "list",
        help="dead letters by reason, newest first",
        description="Counts the dead letters at URL by reason (newest first) and lists them "
        "without personal data; --show-events prints each letter whole.",
    )
    dlq_list.add_argument("url", metavar="URL", help=_SINK_HELP)
    dlq_list.add_argument(
        "--show-events", action="store_true", help="print whole letters (personal data!)"
    )
    dlq_replay = dlq_commands.add_parser(
        "replay",
        help="publish dead letters again after a fix",
        description="Removes each letter's `dead` order from the state store, so it is worked "
        "again, and publishes the letter's event to --to. Letters stay in the sink.",
    )
    dlq_replay.add_argument("url", metavar="URL", help=_SINK_HELP)
    dlq_replay.add_argument("--to", required=True, metavar="SOURCE", help="the source URL")
    dlq_replay.add_argument(
        "--state",
        default=None,
        metavar="URL",
        help=f"state store URL (default $WORKER_STATE or {default('state')})",
    )
    dlq_replay.add_argument(
        "--reason", action="append", metavar="REASON", help="only letters with this reason"
    )
    dlq_replay.add_argument("--dry-run", action="store_true", help="say what would be done")

    inspect = commands.add_parser(
        "inspect",
        help="what happened to one order: its record, and with --cdp what CDP holds",
        description="Print the state store's record of ORDER_REF (status, contact, version, "
        "attempts, lease owner and expiry, a dead letter's reason and when) without taking "
        "it, and with --cdp the order's contacts at CDP now and whether they still hold what "
        "the record says was sent. No personal data is printed unless --show-contact. "
        "Exit 0 if the store knows the order, 1 if not, 2 on a configuration error.",
        epilog="--cdp reads CDP_BASE_URL, CDP_CLIENT_KEY, CDP_API_TOKEN (or their _FILE "
        "forms), CDP_API_VERSION and CDP_CA_FILE from the environment, as `worker run` does.",
    )
    inspect.add_argument("order_ref", metavar="ORDER_REF", help="the order's orderRef")
    inspect.add_argument(
        "--state",
        default=None,
        metavar="URL",
        help=f"state store URL (default $WORKER_STATE or {default('state')})",
    )
    inspect.add_argument(
        "--cdp", action="store_true", help="also list what CDP holds for the order now"
    )
    inspect.add_argument(
        "--show-contact",
        action="store_true",
        help="with --cdp, print each contact's fields (personal data!)",
    )

    schema = commands.add_parser(
        "schema",
        help="print the event envelope's JSON Schema",
        description="Print the JSON Schema of the event envelope (for --api-version) on "
        "standard output, for producers to validate against.",
    )
    _add_api_version(schema)
    return parser


_SINK_HELP = (
    "the dead-letter sink: file:PATH, redis://HOST:6379/0?stream=S, "
    "amqp://USER:PASS@HOST/VHOST?queue=Q or nats://HOST:4222?stream=S&subject=SUBJ"
)


def _add_api_version(parser: argparse.ArgumentParser) -> None:
    """--api-version of the offline commands (validate, schema); see `_api_version`."""
    parser.add_argument(
        "--api-version",
        choices=API_VERSIONS,
        default=None,
        help=f"CDP API version (default $CDP_API_VERSION or {default('cdp_api_version')})",
    )


def main(argv: Sequence[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else list(argv)
    command = next((word for word in words if not word.startswith("-")), None)
    args = build_parser(command).parse_args(words)
    handler = {
        "run": command_run,
        "emulator": command_emulator,
        "demo": command_demo,
        "check": command_check,
        "validate": command_validate,
        "publish": command_publish,
        "dlq": command_dlq,
        "schema": command_schema,
        "inspect": command_inspect,
    }[args.command]
    try:
        code = handler(args)
        sys.stdout.flush()  # here, where a closed pipe can still be told apart
    except BrokenPipeError:
        # The reader went away (`worker dlq list URL | head`): stop quietly, as other
        # command-line tools do, and keep Python from complaining again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_FAILURE
    sys.exit(code)


def command_run(args: argparse.Namespace) -> int:
    from . import _loops
    from .config import load_settings
    from .observability import configure_logging
    from .pipeline import Worker

    try:
        settings = load_settings(args)
        configure_logging(settings.log_format, settings.log_level)
        worker = Worker(settings)
        # 25 us of CPU per event went to the collector with Python's thresholds.
        _loops.collect_rarely(WORKER_GC_THRESHOLDS)
        return _loops.run(_run(worker), settings.loop)
    except ConfigError as exc:
        print(f"worker run: {exc}", file=sys.stderr)
        return EXIT_CONFIG


async def _run(worker: Worker) -> int:
    import asyncio
    import contextlib
    import signal

    from .observability import get_logger

    log = get_logger("worker.cli")
    loop = asyncio.get_running_loop()
    signals: list[int] = []  # received: a finite run's summary says where it stopped

    def stop(signum: int) -> None:
        signals.append(signum)
        worker.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    view = _file_run(worker)
    code = EXIT_OK
    try:
        async with view or contextlib.nullcontext():
            await worker.run()
    except (ConfigError, SourceError) as exc:
        # Raised while opening the parts: nothing was consumed yet (and nothing to sum up).
        print(f"worker run: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception:
        log.exception("worker.crashed")
        code = EXIT_FAILURE
    finally:
        await worker.close()  # before the summary: it writes the file's last checkpoint
    if view is not None:
        view.report(finished=code == EXIT_OK and not signals)
    return code


def _file_run(worker: Worker) -> _console.FileRun | None:
    """The bar and summary of a run over a finite file (the bar and the table only on a
    terminal; the summary line on stderr always). None for a broker or --follow."""
    from .sources.file import FileSource

    source = worker.source
    if not isinstance(source, FileSource) or not source.finite:
        return None
    from . import _console  # rich: only for a run that can show or sum up its progress

    label = "stdin" if source.path == "-" else Path(source.path).name
    return _console.FileRun(worker, source, label=label)


def command_emulator(args: argparse.Namespace) -> int:
    from .emulator.command import run_from_args

    return run_from_args(args)


def command_demo(args: argparse.Namespace) -> int:
    from . import _loops
    from .demo import run_demo

    return _loops.run(
        run_demo(events=args.events, rate_limit=args.rate_limit, workdir=args.workdir)
    )


def command_check(args: argparse.Namespace) -> int:
    import math
    import urllib.error
    import urllib.request

    if not (math.isfinite(args.timeout) and args.timeout > 0):
        print("worker check: --timeout: expected a duration above 0, such as 3s", file=sys.stderr)
        return EXIT_CONFIG
    port = os.environ.get("WORKER_HTTP_PORT") or default("http_port")
    url = args.url or f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:  # noqa: S310
            body = response.read().decode("utf-8", "replace")
            print(body)
            return EXIT_OK if response.status == 200 else EXIT_FAILURE
    except urllib.error.HTTPError as exc:
        print(exc.read().decode("utf-8", "replace") or f"HTTP {exc.code}")
    except (urllib.error.URLError, OSError) as exc:
        print(f"not ready: {url}: {getattr(exc, 'reason', exc)}")
    return EXIT_FAILURE


def _api_version(args: argparse.Namespace) -> str:
    version: str = (
        args.api_version or os.environ.get("CDP_API_VERSION") or default("cdp_api_version")
    )
    if version not in API_VERSIONS:
        raise SystemExit(f"CDP_API_VERSION: expected one of {', '.join(API_VERSIONS)}")
    return version


def command_validate(args: argparse.Namespace) -> int:
    from .contact import MALFORMED_JSON, NOT_JSON, parse_event

    api_version = _api_version(args)
    stream = sys.stdin.buffer if args.file == "-" else None
    try:
        lines = stream.readlines() if stream else Path(args.file).read_bytes().splitlines()
    except OSError as exc:
        print(f"worker validate: cannot read {args.file!r}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    reasons: Counter[str] = Counter()
    valid = 0
    for number, line in enumerate(lines, start=1):
        if is_blank(line):
            continue
        try:
            parse_event(line, default_event_id=f"line-{number}", api_version=api_version)
        except InvalidEvent as invalid:
            reasons[invalid.reason] += 1
            position = _json_position(line) if invalid.reason == MALFORMED_JSON else None
            if position is None:
                print(f"line {number}: {invalid.reason}: {invalid.message}")
            else:  # the file's line, not the decoder's "line 1" of a one-line document
                line_in_event, column = position
                where = f"line {number + line_in_event - 1}, column {column}"
                print(f"{where}: {invalid.reason}: {NOT_JSON}")
        else:
            valid += 1
    invalid_count = sum(reasons.values())
    by_reason = ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))
    print(f"{valid} valid, {invalid_count} invalid" + (f" ({by_reason})" if by_reason else ""))
    return EXIT_FAILURE if invalid_count else EXIT_OK


def _json_position(line: bytes) -> tuple[int, int] | None:
    """(line, column) in `line` where the JSON decoder gave up, or None if it did not:
    found again here, for bad lines only, as parse_event's message keeps it in text."""
    import orjson

    from .contact import without_bom

    try:
        orjson.loads(without_bom(line))
    except orjson.JSONDecodeError as exc:
        return exc.lineno, exc.colno
    return None


def command_publish(args: argparse.Namespace) -> int:
    import asyncio

    from .sources import open_publisher

    try:
        lines = _read_lines(args.file)
        publisher = open_publisher(args.to)
    except ConfigError as exc:
        print(f"worker publish: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"worker publish: cannot read {args.file!r}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        asyncio.run(_publish(publisher, lines, max(1, args.batch)))
    except (ConfigError, SourceError) as exc:
        print(f"worker publish: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _read_lines(path: str) -> list[bytes]:
    r"""Every line of the file that is not blank (`is_blank`, as `worker validate` skips),
    byte for byte: a line ends at \n, and only its \n or \r\n is cut. Not splitlines(),
    which also ends a line at a lone \r, nor strip(): spaces are part of the message."""
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    lines = (line.removesuffix(b"\r") for line in data.split(b"\n"))
    return [line for line in lines if not is_blank(line)]


async def _publish(publisher: Publisher, lines: list[bytes], batch: int) -> None:
    from . import _console

    await publisher.open()
    try:
        with _console.Bar("publish", "messages", total=len(lines)) as bar:
            for start in range(0, len(lines), batch):
                chunk = lines[start : start + batch]
                await publisher.publish(chunk)
                bar.advance(len(chunk))
    finally:
        await publisher.close()
    print(f"published {bar.done} of {len(lines)} messages")


def command_dlq(args: argparse.Namespace) -> int:
    import asyncio

    from . import dlq
    from ._urls import refuse_bare_path
    from .sources import open_publisher

    try:
        letters = asyncio.run(dlq.read_letters(args.url, label="URL"))
        if args.dlq_command == "list":
            return _dlq_list(letters, show_events=args.show_events)
        if args.reason:
            letters = [letter for letter in letters if letter.get("reason") in args.reason]
        state = args.state or os.environ.get("WORKER_STATE") or default("state")
        refuse_bare_path(state, "--state / WORKER_STATE", suggest="sqlite:///")
        # Built only to check --to: a bad URL must stop the replay before it reopens orders.
        open_publisher(args.to)
        from . import _console

        drawn = False if args.dry_run else None  # None: on a terminal
        with _console.Bar("replay", "letters", total=len(letters), enabled=drawn) as bar:
            published, reopened = asyncio.run(
                dlq.replay(
                    letters, to=args.to, state_url=state, dry_run=args.dry_run,
                    progress=bar.advance,
                )
            )  # fmt: skip
    except (ConfigError, SourceError, StateError) as exc:
        print(f"worker dlq {args.dlq_command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILURE
    if args.dry_run:
        print(f"would publish {published} dead letters and reopen those of {reopened} orders")
    else:
        print(f"published {published} dead letters; {reopened} dead orders reopened")
    return EXIT_OK


def _dlq_list(letters: list[dict[str, object]], *, show_events: bool) -> int:
    import orjson

    from . import dlq

    for reason, count, newest in dlq.summary(letters):
        print(f"{reason:20} {count:8}  newest {newest}")
    print(f"{len(letters)} dead letters")
    for letter in reversed(letters):  # newest first
        if show_events:
            print(orjson.dumps(letter).decode())
        else:
            print(dlq.describe(letter))
    return EXIT_OK


def command_inspect(args: argparse.Namespace) -> int:
    from . import _loops, inspection
    from .contact import order_ref_path

    try:
        order_ref = order_ref_path(args.order_ref)  # as the worker keys it: lowercase
    except ValueError:
        print("worker inspect: ORDER_REF: expected a UUID, as events' orderRef", file=sys.stderr)
        return EXIT_CONFIG
    try:
        state, client = inspection.open_parts(args.state, cdp=args.cdp)
    except ConfigError as exc:
        print(f"worker inspect: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return _loops.run(inspection.run(order_ref, state, client, show_contact=args.show_contact))
    except (ConfigError, StateError) as exc:
        print(f"worker inspect: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILURE


def command_schema(args: argparse.Namespace) -> int:
    import orjson

    from .contact import event_json_schema

    schema = event_json_schema(_api_version(args))
    sys.stdout.write(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    main()
