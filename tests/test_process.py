"""`worker run` as a user runs it: a real process, a JSONL file, SQLite state, signals.

The emulator runs in the test's event loop; the worker is a subprocess talking to it over
real HTTP. These tests prove the exit codes, the JSON logs without personal data, the rerun
that sends nothing, SIGTERM within the shutdown timeout, and SIGKILL mid-run followed by a
rerun that leaves every order with exactly one contact.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import SECRET_KEY, SECRET_TOKEN
from harness import TcpProxy, free_port, valid_order_refs, worker_env

from worker.demo import convergence_problems, expected_bodies, generate_events, write_events
from worker.emulator import Emulator, EmulatorConfig

Run = Callable[..., "asyncio.Future[tuple[int, list[bytes], bytes]]"]


def pii_event(number: int) -> dict[str, Any]:
    """An event whose personal data is unmistakable in any log line."""
    return {
        "eventId": f"pii-{number}",
        "orderRef": f"00000000-0000-4000-8000-{number:012d}",
        "contact": {
            "title": "Dr",
            "firstName": f"Zyxfirst{number}",
            "lastName": f"Qwvlast{number}",
            "gender": "female",
            "dateOfBirth": "1971-03-04",
            "emails": [f"leak{number}@pii.example"],
            "phoneNumbers": [f"+35399{number:06d}"],
            "passportNumber": f"PXLEAK{number}",
            "passportExpiry": "2033-05-06",
            "identifiers": [{"provider": "Booking", "id": f"IDLEAK{number}"}],
        },
    }


def forbidden_strings(events: list[dict[str, Any]]) -> list[str]:
    found = [
        SECRET_KEY,
        SECRET_TOKEN,
        base64.b64encode(f"{SECRET_KEY}:{SECRET_TOKEN}".encode()).decode(),
    ]
    for event in events:
        contact = event["contact"]
        found += [contact["firstName"], contact["lastName"], contact["passportNumber"]]
        found += contact["emails"] + contact["phoneNumbers"]
        found += [contact["identifiers"][0]["id"]]
    return [*found, "1971-03-04", "2033-05-06"]


@pytest.fixture
async def cdp() -> AsyncIterator[Emulator]:
    config = EmulatorConfig(client_key=SECRET_KEY, api_token=SECRET_TOKEN, seed=3)
    async with Emulator(config) as running:
        yield running


def run_env(cdp: Emulator, tmp_path: Path, **extra: str) -> dict[str, str]:
    """`worker_env` for a file in `tmp_path`, quick timeouts, and `extra` variables."""
    env = worker_env(
        cdp.url,
        SECRET_KEY,
        SECRET_TOKEN,
        source=f"file:{tmp_path / 'events.jsonl'}",
        state=f"sqlite:///{tmp_path / 'state.db'}",
        dlq=f"file:{tmp_path / 'dead-letter.jsonl'}",
        rate_limit="0",
        request_timeout="1",
        lease_seconds="3",
    )
    env.update(extra)
    return env


async def start_worker(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def finish(
    process: asyncio.subprocess.Process, timeout: float = 60
) -> tuple[int, list[bytes], bytes]:
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, stdout.splitlines(), stderr


def dead_letters(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "dead-letter.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def assert_json_logs_without_secrets(lines: list[bytes], forbidden: list[str]) -> None:
    assert lines, "the worker logged nothing"
    for line in lines:
        record = orjson.loads(line)  # every stdout line is one JSON object
        assert "event" in record
        assert "level" in record
        text = line.decode()
        for secret in forbidden:
            assert secret not in text, f"{secret!r} leaked into a log line"


@pytest.mark.parametrize(
    ("env_change", "named"),
    [
        ({"WORKER_SOURCE": ""}, "--source / WORKER_SOURCE"),
        ({"CDP_BASE_URL": ""}, "CDP_BASE_URL"),
        ({"CDP_API_TOKEN": ""}, "CDP_API_TOKEN"),
        # A bad value names where it came from: here the variable.
        ({"WORKER_CONCURRENCY": "many"}, "WORKER_CONCURRENCY: expected a whole number"),
        ({"WORKER_LEASE_SECONDS": "1"}, "--lease-seconds / WORKER_LEASE_SECONDS"),
        ({"WORKER_STATE": "mysql://db"}, "--state / WORKER_STATE"),
        ({"WORKER_SOURCE": "kafka://broker"}, "--source / WORKER_SOURCE"),
        ({"CDP_API_VERSION": "v3"}, "CDP_API_VERSION"),
        ({"WORKER_SOURCE": "file:/nonexistent/events.jsonl"}, "--source"),
    ],
)
async def test_bad_configuration_exits_2_naming_the_option(
    cdp: Emulator, tmp_path: Path, env_change: dict[str, str], named: str
) -> None:
    write_events(tmp_path / "events.jsonl", [orjson.dumps(pii_event(1))])
    env = run_env(cdp, tmp_path, **env_change)
    code, _, stderr = await finish(await start_worker(env))
    assert code == 2
    assert named in stderr.decode()
    assert SECRET_TOKEN not in stderr.decode()
    assert cdp.stats()["requests"] == {}


async def test_flags_win_over_the_environment(cdp: Emulator, tmp_path: Path) -> None:
    write_events(tmp_path / "other.jsonl", [orjson.dumps(pii_event(1))])
    env = run_env(cdp, tmp_path, WORKER_SOURCE="file:/nonexistent")
    code, _, _ = await finish(
        await start_worker(env, "--source", f"file:{tmp_path / 'other.jsonl'}")
    )
    assert code == 0
    assert cdp.stats()["contacts"] == 1


async def test_run_delivers_logs_json_without_personal_data_and_reruns_send_nothing(
    cdp: Emulator, tmp_path: Path
) -> None:
    events = [pii_event(n) for n in range(1, 41)]
    bad = [b"{oops", orjson.dumps({**events[0], "orderRef": "nope"})]
    write_events(tmp_path / "events.jsonl", [orjson.dumps(e) for e in events] + bad)
    cdp.config.error_rate = 0.2
    cdp.config.timeout_after_create_rate = 0.1
    cdp.config.hang_seconds = 1.5
    env = run_env(cdp, tmp_path, WORKER_LOG_LEVEL="debug")
    code, lines, stderr = await finish(await start_worker(env))
    assert code == 0, stderr.decode()
    assert cdp.stats()["orders"] == 40
    assert cdp.stats()["duplicate_orders"] == 0
    assert Counter(letter["reason"] for letter in dead_letters(tmp_path)) == {
        "malformed_json": 1,
        "invalid_order_ref": 1,
    }
    assert_json_logs_without_secrets(lines, forbidden_strings(events))
    # Off a terminal, stderr has the run's one summary line: no bar, no table, no data.
    summary = stderr.decode()
    assert summary.count("\n") == 1, summary
    assert summary.startswith("worker run: events.jsonl: 42 lines done; "), summary
    assert "2 dead letters (invalid_order_ref 1, malformed_json 1)" in summary, summary
    assert not any(text in summary for text in forbidden_strings(events))

    requests = dict(cdp.stats()["requests"])
    code, lines, _ = await finish(await start_worker(env))
    assert code == 0
    assert cdp.stats()["requests"] == requests  # nothing sent, not even a listing
    assert len(dead_letters(tmp_path)) == 2


@pytest.mark.parametrize(("loop", "runs_on"), [("", "uvloop"), ("asyncio", "asyncio")])
async def test_the_loop_is_uvloop_unless_asked_otherwise(
    cdp: Emulator, tmp_path: Path, loop: str, runs_on: str
) -> None:
    write_events(tmp_path / "events.jsonl", [orjson.dumps(pii_event(1))])
    env = run_env(cdp, tmp_path, **({"WORKER_LOOP": loop} if loop else {}))
    code, lines, stderr = await finish(await start_worker(env))
    assert code == 0, stderr.decode()
    started = [orjson.loads(line) for line in lines if b'"worker.started"' in line]
    assert [record["loop"] for record in started] == [runs_on]


async def test_sigterm_drains_within_the_shutdown_timeout(cdp: Emulator, tmp_path: Path) -> None:
    events = [pii_event(n) for n in range(1, 201)]
    write_events(tmp_path / "events.jsonl", [orjson.dumps(e) for e in events])
    cdp.config.latency = 0.3
    env = run_env(cdp, tmp_path, WORKER_SHUTDOWN_TIMEOUT="2", WORKER_CONCURRENCY="8")
    process = await start_worker(env)
    while cdp.stats()["requests"].get("POST", 0) < 10:
        await asyncio.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    code, lines, _ = await finish(process, timeout=10)
    assert code == 0
    assert time.monotonic() - started < 2 + 2.0  # the timeout, plus start-up slack
    assert any(orjson.loads(line)["event"] == "worker.stopping" for line in lines)
    assert cdp.stats()["orders"] < 200

    cdp.config.latency = 0.0
    code, _, _ = await finish(await start_worker(env))
    assert code == 0
    assert cdp.stats()["orders"] == 200
    assert cdp.stats()["duplicate_orders"] == 0


@pytest.mark.slow
async def test_sigkill_mid_run_then_rerun_loses_and_doubles_nothing(
    cdp: Emulator, tmp_path: Path
) -> None:
    # Orders with changes, erasures and redeliveries, shuffled: SIGKILLs land while
    # creates, updates and deletes are in flight. The reruns must leave every order with
    # exactly its latest version (and erased ones with none): the model says which.
    lines = generate_events(600, duplicate_share=0.2, change_share=0.5, invalid_rounds=3, seed=99)
    write_events(tmp_path / "events.jsonl", lines)
    cdp.config.latency = 0.01
    cdp.config.timeout_after_create_rate = 0.02
    cdp.config.reset_after_create_rate = 0.02
    cdp.config.timeout_after_update_rate = 0.02
    cdp.config.reset_after_update_rate = 0.02
    cdp.config.hang_seconds = 1.5
    env = run_env(cdp, tmp_path, WORKER_CONCURRENCY="16", WORKER_RATE_LIMIT="400")
    for kill_after in (150, 400, 650):
        process = await start_worker(env)
        while (stats := cdp.stats())["creates"] + stats["updates"] < kill_after:
            await asyncio.sleep(0.005)
        process.kill()
        await process.communicate()
    assert cdp.stats()["updates"] > 0, "no update was in flight at any kill"
    code, _, stderr = await finish(await start_worker(env), timeout=120)
    assert code == 0, stderr.decode()
    expected = expected_bodies(lines, base_url=cdp.url)
    assert valid_order_refs(lines) == set(expected)  # every order is in the model
    assert convergence_problems(cdp, expected) == []  # nothing lost, doubled or stale
    assert cdp.stats()["duplicate_orders"] == 0
    reasons = Counter(letter["reason"] for letter in dead_letters(tmp_path))
    assert reasons == {"malformed_json": 3, "invalid_order_ref": 3, "invalid_event": 6}


async def test_validate_and_schema(tmp_path: Path) -> None:
    path = write_events(
        tmp_path / "events.jsonl", [orjson.dumps(pii_event(1)), b"{nope", b'{"orderRef": 1}']
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "validate", str(path), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    assert process.returncode == 1
    text = out.decode()
    assert "line 2, column 2: malformed_json" in text
    assert "line 3: invalid_order_ref" in text
    assert "1 valid, 2 invalid" in text
    assert "Zyxfirst1" not in text

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "schema", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    assert process.returncode == 0
    schema = orjson.loads(out)
    assert "orderRef" in schema["required"]


async def test_check_reports_readiness(cdp: Emulator, tmp_path: Path) -> None:
    write_events(tmp_path / "events.jsonl", [orjson.dumps(pii_event(1))])
    port = free_port()
    env = run_env(cdp, tmp_path, WORKER_HTTP_PORT=str(port), WORKER_FOLLOW="true")

    async def check() -> int:
        probe = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "check",
            env={**env, "WORKER_HTTP_PORT": str(port)},
            stdout=asyncio.subprocess.DEVNULL,
        )
        return await probe.wait()

    assert await check() == 1  # nothing listens yet
    process = await start_worker(env)
    deadline = time.monotonic() + 20
    while await check() != 0:
        assert time.monotonic() < deadline, "the worker never became ready"
        await asyncio.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    code, _, _ = await finish(process)
    assert code == 0


# What `worker check` (every container health probe) must not load: the server side of
# the worker, the emulator and the demo. It needs the standard library and config.
HEAVY = ("aiohttp", "asyncio", "structlog", "prometheus_client", "worker.emulator", "worker.demo",
         "worker.pipeline", "worker.sources", "worker.state", "rich", "worker._console",
         "worker.inspection")  # fmt: skip
LOADED_BY_CHECK = (
    "import sys\n"
    "from worker.cli import main\n"
    "try:\n"
    "    main(['check', '--url', 'http://127.0.0.1:1/readyz', '--timeout', '0.5'])\n"
    "except SystemExit as exit:\n"
    "    code = exit.code\n"
    "print(code, sorted({m.split('.')[0] if not m.startswith('worker') else m\n"
    "                    for m in sys.modules}))\n"
)


def test_check_starts_without_the_server_the_emulator_or_the_demo() -> None:
    done = subprocess.run(
        [sys.executable, "-c", LOADED_BY_CHECK], capture_output=True, text=True, timeout=60
    )
    code, _, modules = done.stdout.strip().splitlines()[-1].partition(" ")
    assert code == "1"  # nothing listens there
    loaded = [m for m in eval(modules) if m.startswith(HEAVY)]
    assert loaded == []


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    done = subprocess.run(
        [sys.executable, "-m", "worker", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == f"cdp-sync {version('cdp-sync')}"
    import worker

    assert worker.__version__ == version("cdp-sync")


def _file_with(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


SOURCE, STATE, DLQ = "--source / WORKER_SOURCE", "--state / WORKER_STATE", "--dlq / WORKER_DLQ"
NOT_UTF8, BLANK = ("token", b"\xff\xfe\x00s3cret"), ("token", b" \n")
# (what is changed, the option the one line must name, the case's name)
BAD = [
    ({"CDP_BASE_URL": "http://[::1"}, "CDP_BASE_URL", "base-url-malformed"),
    ({"CDP_BASE_URL": "http://127.0.0.1:99999"}, "CDP_BASE_URL", "base-url-port"),
    ({"CDP_BASE_URL": "https://cdp.example/?t=1"}, "CDP_BASE_URL", "base-url-query"),
    ({"CDP_BASE_URL": "https://cdp.example/#top"}, "CDP_BASE_URL", "base-url-fragment"),
    ({"WORKER_SOURCE": "redis://:s3cret@[::1?stream=s"}, SOURCE, "source-malformed"),
    ({"WORKER_SOURCE": "redis://:s3cret@h:70000/0?stream=s"}, SOURCE, "source-port"),
    ({"WORKER_STATE": "redis://:s3cret@[::1/0"}, STATE, "state-malformed"),
    ({"WORKER_DLQ": "nats://:s3cret@[::1?stream=S&subject=s"}, DLQ, "dlq-malformed"),
    ({"WORKER_RATE_LIMIT_BACKEND": "redis://:s3cret@[::1"}, "--rate-limit-backend", "limit"),
    ({"CDP_API_TOKEN": "", "CDP_API_TOKEN_FILE": NOT_UTF8}, "CDP_API_TOKEN_FILE", "not-utf8"),
    ({"CDP_API_TOKEN": "", "CDP_API_TOKEN_FILE": BLANK}, "CDP_API_TOKEN_FILE", "secret-empty"),
]
BAD_CONFIGURATIONS = [pytest.param(change, named, id=name) for change, named, name in BAD]


@pytest.mark.parametrize(("env_change", "named"), BAD_CONFIGURATIONS)
async def test_bad_configuration_exits_2_at_once_in_one_line_creating_nothing(
    cdp: Emulator, tmp_path: Path, env_change: dict[str, Any], named: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    changes = {
        name: _file_with(tmp_path, *value) if isinstance(value, tuple) else value
        for name, value in env_change.items()
    }
    env = run_env(cdp, work, **changes)
    started = time.monotonic()
    code, _, stderr = await finish(await start_worker(env), timeout=30)
    assert code == 2
    assert time.monotonic() - started < 5
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, stderr.decode()  # one line naming the option, no traceback
    assert named in lines[0]
    assert "s3cret" not in lines[0]
    assert sorted(p.name for p in work.iterdir()) == []  # no state, no dead letters
    assert cdp.stats()["requests"] == {}


async def test_a_busy_health_port_exits_2_before_anything_is_opened(
    cdp: Emulator, tmp_path: Path
) -> None:
    write_events(tmp_path / "events.jsonl", [orjson.dumps(pii_event(1))])
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = run_env(cdp, tmp_path, WORKER_HTTP_PORT=str(port))
        code, _, stderr = await finish(await start_worker(env), timeout=30)
    assert code == 2
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, stderr.decode()
    assert "--http-port / WORKER_HTTP_PORT" in lines[0]
    assert str(port) in lines[0]
    assert not (tmp_path / "state.db").exists()
    assert not (tmp_path / "dead-letter.jsonl").exists()
    assert cdp.stats()["requests"] == {}


async def test_missing_cdp_settings_are_named_together_with_their_file_forms(
    cdp: Emulator, tmp_path: Path
) -> None:
    env = run_env(cdp, tmp_path, CDP_BASE_URL="", CDP_CLIENT_KEY="", CDP_API_TOKEN="")
    code, _, stderr = await finish(await start_worker(env), timeout=30)
    assert code == 2
    (line,) = stderr.decode().splitlines()
    for named in ("CDP_BASE_URL", "CDP_CLIENT_KEY (or CDP_CLIENT_KEY_FILE)",
                  "CDP_API_TOKEN (or CDP_API_TOKEN_FILE)"):  # fmt: skip
        assert named in line


async def test_a_replaced_event_file_is_read_whole_and_nothing_is_skipped(
    cdp: Emulator, tmp_path: Path
) -> None:
    first = [pii_event(n) for n in range(1, 7)]
    write_events(tmp_path / "events.jsonl", [orjson.dumps(e) for e in first])
    env = run_env(cdp, tmp_path)
    code, _, stderr = await finish(await start_worker(env))
    assert code == 0, stderr.decode()
    # Today's file replaces yesterday's at the same path (a new inode, other events).
    second = [pii_event(n) for n in range(101, 107)]
    new = tmp_path / "new.jsonl"
    write_events(new, [orjson.dumps(e) for e in second])
    os.replace(new, tmp_path / "events.jsonl")
    code, _, stderr = await finish(await start_worker(env))
    assert code == 0, stderr.decode()
    assert cdp.stats()["orders"] == 12  # all six new orders sent, none skipped
    assert dead_letters(tmp_path) == []  # and no fragment of a line dead-lettered


async def test_a_missing_source_file_exits_2_before_the_state_or_letters_exist(
    cdp: Emulator, tmp_path: Path
) -> None:
    env = run_env(cdp, tmp_path, WORKER_SOURCE=f"file:{tmp_path / 'typo.jsonl'}")
    code, _, stderr = await finish(await start_worker(env), timeout=30)
    assert code == 2
    assert "--source" in stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


async def test_a_cdp_outage_under_a_running_worker_dead_letters_nothing(
    cdp: Emulator, tmp_path: Path
) -> None:
    events = [pii_event(n) for n in range(1, 301)]
    write_events(tmp_path / "events.jsonl", [orjson.dumps(e) for e in events])
    cdp.config.latency = 0.01
    port = free_port()
    async with TcpProxy(cdp.url) as proxy:
        env = run_env(
            cdp, tmp_path, CDP_BASE_URL=proxy.url(cdp.url), WORKER_MAX_ATTEMPTS="3",
            WORKER_HTTP_PORT=str(port), WORKER_CONCURRENCY="8", WORKER_RATE_LIMIT="200",
        )  # fmt: skip
        process = await start_worker(env)
        async with asyncio.timeout(30):
            while cdp.stats()["contacts"] < 50:
                await asyncio.sleep(0.02)
        proxy.refusing = True
        await proxy.drop()
        readiness = f"http://127.0.0.1:{port}/readyz"
        async with asyncio.timeout(20):
            while True:
                probe = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "worker", "check", "--url", readiness,
                    stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, _ = await probe.communicate()
                if b"CDP is unreachable" in out:
                    break
                await asyncio.sleep(0.1)
        assert probe.returncode == 1
        await asyncio.sleep(3)  # down for seconds: every event would have used its 3 tries
        proxy.refusing = False
        code, lines, stderr = await finish(process, timeout=90)
    assert code == 0, stderr.decode()
    assert dead_letters(tmp_path) == []
    assert cdp.stats()["orders"] == 300
    assert cdp.stats()["duplicate_orders"] == 0
    logged = {orjson.loads(line)["event"] for line in lines}
    assert {"cdp.outage", "cdp.outage_recovered"} <= logged
