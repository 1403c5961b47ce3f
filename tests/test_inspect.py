"""`worker inspect ORDER_REF`: a delivered, a dead-lettered, an in-flight and an unknown
order, on every state backend, against the emulator over HTTP; never personal data
unless --show-contact."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import services
from conftest import SECRET_KEY, SECRET_TOKEN
from harness import Harness, worker_env

from worker.cdp import CdpClient, basic_authorization
from worker.emulator import Emulator
from worker.inspection import FOUND, UNKNOWN, inspect_order
from worker.state import MemoryStateStore, SqliteStateStore, StateStore
from worker.state.base import Want

DELIVERED = "00000000-0000-4000-8000-00000000d001"
DEAD = "00000000-0000-4000-8000-00000000dead"
IN_FLIGHT = "00000000-0000-4000-8000-00000000f117"
UNKNOWN_REF = "00000000-0000-4000-8000-00000000beef"


def event(order_ref: str, number: int) -> dict[str, Any]:
    return {
        "eventId": f"e-{number}",
        "orderRef": order_ref,
        "version": 3,
        "contact": {
            "firstName": f"Zyxfirst{number}",
            "lastName": f"Qwvlast{number}",
            "emails": [f"leak{number}@pii.example"],
            "phoneNumbers": [f"+35399{number:06d}"],
        },
    }


PERSONAL = ["Zyxfirst", "Qwvlast", "leak", "+35399"]


@asynccontextmanager
async def store_of(backend: str, tmp_path: Path) -> AsyncIterator[tuple[StateStore, str | None]]:
    """An opened store of `backend`, and the URL a `worker inspect` process reaches it
    by (None: an in-process store)."""
    store: StateStore
    url: str | None = None
    if backend == "memory":
        store = MemoryStateStore()
    elif backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
        store = SqliteStateStore(tmp_path / "state.db")
    elif backend == "redis":
        services.require("redis")
        from worker.state.redis import RedisStateStore

        prefix = f"test-inspect-{uuid.uuid4().hex[:8]}:"
        url = f"{services.REDIS_URL}?prefix={prefix}"
        store = RedisStateStore(services.REDIS_URL, key_prefix=prefix)
    else:
        services.require("postgresql")
        from worker.state.postgres import PostgresStateStore

        prefix = f"test_inspect_{uuid.uuid4().hex[:8]}_"
        store = PostgresStateStore(services.POSTGRES_URL, table_prefix=prefix)
    await store.open()
    try:
        yield store, url
    finally:
        await store.close()
        if backend == "redis":
            await services.delete_redis_keys(prefix)
        elif backend == "postgres":
            await services.drop_postgres_tables(prefix)


async def four_orders(
    make_worker: Callable[..., Harness], emulator: Emulator, store: StateStore
) -> None:
    """DELIVERED delivered, DEAD dead-lettered (CDP keeps answering 500), IN_FLIGHT held
    by another replica; UNKNOWN_REF never seen."""
    emulator.config.error_orders = [DEAD]
    harness = make_worker(
        [event(DELIVERED, 1), event(DEAD, 2)], state=store, max_attempts=2, backoff_base=0.001
    )
    await harness.run()
    assert harness.reasons == ["retries_exhausted"]
    assert (await store.claim(IN_FLIGHT, "replica-b", 60.0, Want("fp"))).held


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def inspected(store: StateStore, order_ref: str, **options: Any) -> tuple[int, str]:
    lines: list[str] = []
    code = await inspect_order(order_ref, store, write=lines.append, **options)
    return code, "\n".join(lines)


async def test_each_kind_of_order_on_every_backend(
    backend: str,
    tmp_path: Path,
    make_worker: Callable[..., Harness],
    emulator: Emulator,
) -> None:
    async with store_of(backend, tmp_path) as (store, _):
        await four_orders(make_worker, emulator, store)
        (contact,) = emulator.stats()["per_order"][DELIVERED]["live"]

        code, text = await inspected(store, DELIVERED)
        assert code == FOUND
        assert "status         done  (delivered" in text
        assert f"contact        {contact}" in text
        assert "version        3  (the event's version)" in text

        code, text = await inspected(store, DEAD)
        assert code == FOUND
        assert "status         dead  (dead-lettered" in text
        assert "reason         retries_exhausted" in text

        code, text = await inspected(store, IN_FLIGHT)
        assert code == FOUND
        assert "status         in_flight" in text
        assert "owner          replica-b" in text
        assert "left" in text  # the lease is live
        # Reading took nothing: it is still the other replica's.
        assert (await store.claim(IN_FLIGHT, "w", 60.0)).status.value == "busy"

        code, text = await inspected(store, UNKNOWN_REF)
        assert code == UNKNOWN
        assert "record         none" in text
        assert not any(word in text for word in PERSONAL)


async def test_with_cdp_it_shows_what_cdp_holds_and_only_names_it(
    tmp_path: Path, make_worker: Callable[..., Harness], emulator: Emulator
) -> None:
    async with store_of("memory", tmp_path) as (store, _):
        await four_orders(make_worker, emulator, store)
        client = CdpClient(emulator.url, SECRET_KEY, SECRET_TOKEN)
        await client.open()
        try:
            _, text = await inspected(store, DELIVERED, client=client)
            (contact,) = emulator.stats()["per_order"][DELIVERED]["live"]
            assert "at CDP         1 contact" in text
            assert f"{contact}  the record's contact; its fields match the record's" in text
            assert not any(word in text for word in PERSONAL)

            _, shown = await inspected(store, DELIVERED, client=client, show_contact=True)
            assert "Zyxfirst1" in shown
            assert "leak1@pii.example" in shown

            # Changed at CDP behind the worker's back: the fields no longer match.
            await emulator_update(emulator, contact, {"firstName": "Other"})
            _, text = await inspected(store, DELIVERED, client=client)
            assert "its fields differ from what the record says was sent" in text

            _, text = await inspected(store, DEAD, client=client)
            assert "at CDP         no contact" in text
            code, text = await inspected(store, UNKNOWN_REF, client=client)
            assert code == UNKNOWN
            assert "at CDP         no contact" in text
        finally:
            await client.close()


async def emulator_update(emulator: Emulator, contact_ref: str, fields: dict[str, Any]) -> None:
    """A partial update sent to CDP by someone else (v2.1's PATCH)."""
    import aiohttp

    url = f"{emulator.url}/v2.1/orderContacts/{contact_ref}"
    headers = {
        "Authorization": basic_authorization(SECRET_KEY, SECRET_TOKEN),
        "Content-Type": "application/json",
    }
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.patch(url, data=orjson.dumps(fields)) as response,
    ):
        assert response.status == 200, await response.text()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_the_command_prints_no_personal_data_unless_asked(
    backend: str, tmp_path: Path, make_worker: Callable[..., Harness], emulator: Emulator
) -> None:
    async with store_of(backend, tmp_path) as (store, url):
        await four_orders(make_worker, emulator, store)
        assert url is not None
        env = worker_env(emulator.url, SECRET_KEY, SECRET_TOKEN)

        async def inspect(*args: str) -> tuple[int, str, str]:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "worker", "inspect", *args, "--state", url,
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(process.communicate(), 60)
            assert process.returncode is not None
            return process.returncode, out.decode(), err.decode()

        code, out, err = await inspect(DELIVERED, "--cdp")
        assert (code, err) == (0, "")
        assert "fields match the record's fingerprint" in out
        for secret in [*PERSONAL, SECRET_KEY, SECRET_TOKEN]:
            assert secret not in out
        code, out, _ = await inspect(DELIVERED, "--cdp", "--show-contact")
        assert code == 0
        assert "Zyxfirst1" in out
        code, out, _ = await inspect(IN_FLIGHT)
        assert code == 0
        assert "replica-b" in out
        code, out, _ = await inspect(UNKNOWN_REF)
        assert code == 1
        code, out, _ = await inspect(DELIVERED.upper())  # as a person may paste it
        assert code == 0
        assert "status         done" in out
        code, out, err = await inspect("not-a-uuid", "--cdp")
        assert (code, out) == (2, "")
        assert err == "worker inspect: ORDER_REF: expected a UUID, as events' orderRef\n"


async def test_a_state_file_that_is_not_there_is_an_error_not_an_empty_store(
    tmp_path: Path,
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "inspect", DELIVERED,
        cwd=tmp_path, env={k: v for k, v in os.environ.items() if not k.startswith("WORKER_")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert f"{tmp_path / 'worker-state.db'} does not exist" in err.decode()
    assert not (tmp_path / "worker-state.db").exists()
    assert out == b""
