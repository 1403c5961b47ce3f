"""A broker or database client that is not installed: the same clear error everywhere.

Every URL position (source, state, dead letters, rate-limit backend, publish, dlq) gives a
`MissingExtraError` naming the option and the extra to install, never a
`ModuleNotFoundError`; `worker run` exits 2 with that one line. The client is hidden by
`sys.modules[name] = None`, which makes `import name` fail as if it were not installed.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from harness import worker_env

from worker import _extras, dlq
from worker.errors import MissingExtraError
from worker.limits import SharedRateLimit
from worker.sources import (
    default_dead_letter_url,
    open_dead_letter_sink,
    open_publisher,
    open_source,
)
from worker.state import open_state_store

# One URL per extra, each with a password that must not reach the message.
URLS = {
    _extras.REDIS: "redis://:s3cret@127.0.0.1:6379/0?stream=order-contacts",
    _extras.RABBITMQ: "amqp://guest:s3cret@127.0.0.1:5672/?queue=order-contacts",
    _extras.NATS: "nats://cdp:s3cret@127.0.0.1:4222?stream=S&subject=s",
    _extras.POSTGRES: "postgresql://cdp:s3cret@127.0.0.1:5432/cdp",
}


def _dlq_list(url: str) -> Any:
    return asyncio.run(dlq.read_letters(url))


BROKERS = (_extras.REDIS, _extras.RABBITMQ, _extras.NATS)
# (where, the option the message names, what opens the URL, the extras it takes)
POSITIONS: list[tuple[str, str, Callable[[str], Any], tuple[_extras.Extra, ...]]] = [
    ("source", "--source / WORKER_SOURCE", open_source, BROKERS),
    ("default-dead-letters", "--source / WORKER_SOURCE", default_dead_letter_url, BROKERS),
    ("dead-letters", "--dlq / WORKER_DLQ", open_dead_letter_sink, BROKERS),
    ("publish", "--to", open_publisher, BROKERS),
    ("dlq", "URL", _dlq_list, BROKERS),  # `worker dlq list URL`: the positional
    ("state", "--state / WORKER_STATE", open_state_store, (_extras.REDIS, _extras.POSTGRES)),
    (
        "rate-limit-backend",
        "--rate-limit-backend / WORKER_RATE_LIMIT_BACKEND",
        SharedRateLimit,
        (_extras.REDIS,),
    ),
]
CASES = [
    pytest.param(extra, label, opener, id=f"{where}-{extra.name}")
    for where, label, opener, extras in POSITIONS
    for extra in extras
]


@pytest.mark.parametrize(("extra", "label", "opener"), CASES)
def test_every_url_position_names_the_extra_and_the_option(
    monkeypatch: pytest.MonkeyPatch, extra: _extras.Extra, label: str, opener: Callable[[str], Any]
) -> None:
    monkeypatch.setitem(sys.modules, extra.module, None)
    with pytest.raises(MissingExtraError) as caught:
        opener(URLS[extra])
    message = str(caught.value)
    assert message == (
        f"{label}: {extra.url_kind} URLs need the {extra.package!r} package: "
        f"pip install 'cdp-sync[{extra.name}]'"
    )
    assert "s3cret" not in message


def test_each_extra_is_named_in_pyproject() -> None:
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    for extra in (_extras.REDIS, _extras.RABBITMQ, _extras.NATS, _extras.POSTGRES):
        assert any(dep.startswith(extra.package) for dep in extras[extra.name]), extra


HIDE_AND_RUN = (
    "import sys; sys.modules[sys.argv.pop(1)] = None; from worker.cli import main; main()"
)


@pytest.mark.parametrize(
    ("module", "env"),
    [
        ("redis", {"WORKER_SOURCE": URLS[_extras.REDIS]}),
        ("aio_pika", {"WORKER_SOURCE": URLS[_extras.RABBITMQ]}),
        ("nats", {"WORKER_SOURCE": URLS[_extras.NATS]}),
        ("asyncpg", {"WORKER_STATE": URLS[_extras.POSTGRES]}),
        ("redis", {"WORKER_RATE_LIMIT_BACKEND": "redis://127.0.0.1:6379/0"}),
    ],
)
def test_worker_run_without_the_extra_exits_2_with_one_line(
    tmp_path: Any, module: str, env: dict[str, str]
) -> None:
    base = worker_env(
        "http://127.0.0.1:1",
        "key",
        "token",
        source=f"file:{tmp_path / 'events.jsonl'}",
        state=f"sqlite:///{tmp_path / 'state.db'}",
    )
    done = subprocess.run(
        [sys.executable, "-c", HIDE_AND_RUN, module, "run"],
        env={**base, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "pip install 'cdp-sync[" in lines[0]
    assert "s3cret" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created before the error


def test_a_broken_client_is_reported_as_itself_not_as_missing(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Installed, but one of its own dependencies is gone: "pip install the extra" would
    # send the operator the wrong way.
    (tmp_path / "brokenclient.py").write_text("import a_dependency_that_is_gone\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    broken = _extras.Extra("brokenclient", "brokenclient", "broken", "broken://")
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_gone"):
        _extras.require(broken, "--source / WORKER_SOURCE")
