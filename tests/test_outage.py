"""An outage costs time, not data (DESIGN section 3): CDP unreachable, answering 5xx to
nearly everything, or presenting a certificate we do not trust, pauses every request
(readiness off, `paused{reason="outage"}`), probes with backoff, and resumes by itself;
no attempt counts meanwhile, so nothing is dead-lettered, even with --max-attempts 3.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import SECRET_KEY, SECRET_TOKEN
from harness import Harness, TcpProxy

from worker.config import Settings
from worker.emulator import Emulator, EmulatorConfig
from worker.pipeline import Worker
from worker.sources import MemoryDeadLetterSink, MemorySource
from worker.state import MemoryStateStore

Events = Callable[[int], list[dict[str, Any]]]
MakeWorker = Callable[..., Harness]
FAST = 0.01
OUTAGE = "paused: CDP is unreachable"


def paused(harness: Harness, reason: str) -> float:
    value: float = harness.worker.metrics.paused.labels(reason)._value.get()
    return value


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


def one_contact_each(emulator: Emulator, events: list[dict[str, Any]]) -> None:
    per_order = emulator.stats()["contacts_per_order"]
    assert all(per_order.get(event["orderRef"]) == 1 for event in events)
    assert emulator.stats()["duplicate_orders"] == 0


async def test_cdp_unreachable_for_a_while_pauses_and_dead_letters_nothing(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    emulator.config.latency = 0.005
    batch = events(80)
    async with TcpProxy(emulator.url) as proxy:
        harness = make_worker(
            batch, cdp_base_url=proxy.url(emulator.url), concurrency=8, max_attempts=3,
            backoff_base=FAST,
        )  # fmt: skip
        run = asyncio.create_task(harness.run())
        await until(lambda: emulator.stats()["contacts"] >= 15)
        proxy.refusing = True  # CDP goes away: connections refused
        await proxy.drop()
        await until(lambda: harness.worker.ready() == (False, OUTAGE))
        assert paused(harness, "outage") == 1
        await asyncio.sleep(1.0)  # down for a while: many retries would be due by now
        assert harness.worker.ready() == (False, OUTAGE)
        proxy.refusing = False  # back
        await asyncio.wait_for(run, 60)
    assert harness.reasons == []  # nothing dead-lettered for an outage
    one_contact_each(emulator, batch)
    assert paused(harness, "outage") == 0


async def test_5xx_on_nearly_every_request_is_an_outage_too(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    batch = events(60)
    harness = make_worker(batch, concurrency=8, max_attempts=3, backoff_base=FAST)
    run = asyncio.create_task(harness.run())
    await until(lambda: emulator.stats()["contacts"] >= 10)
    emulator.config.error_rate = 1.0  # 500, 502 and 503 to everything
    await until(lambda: harness.worker.ready() == (False, OUTAGE))
    await asyncio.sleep(1.0)
    emulator.config.error_rate = 0.0
    await asyncio.wait_for(run, 60)
    assert harness.reasons == []
    one_contact_each(emulator, batch)


# -- certificates ----------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    """A self-signed certificate (and its key, in the same PEM file) for 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: it makes the test's certificate")
    pem = tmp_path / "cdp.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(pem), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    pem.write_bytes(pem.read_bytes() + (tmp_path / "cert.pem").read_bytes())
    return pem


def https_worker(
    url: str, events: list[dict[str, Any]], state: MemoryStateStore, ca_file: str | None
) -> Harness:
    settings = Settings(
        source="memory:", state="memory:", dlq="memory:", cdp_base_url=url,
        cdp_client_key=SECRET_KEY, cdp_api_token=SECRET_TOKEN, rate_limit=0.0,
        request_timeout=2.0, lease_seconds=10.0, http_port=0, max_attempts=3,
        cdp_ca_file=ca_file,
    )  # fmt: skip
    source = MemorySource([orjson.dumps(event) for event in events])
    dead = MemoryDeadLetterSink()
    worker = Worker(settings, source=source, state=state, dead_letters=dead, backoff_base=FAST)
    return Harness(worker, source, state, dead)


async def test_an_untrusted_certificate_is_an_outage_named_once_per_probe_and_the_ca_file_fixes_it(
    certificate: Path,
    events: Events,
    state: MemoryStateStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certificate)
    config = EmulatorConfig(client_key=SECRET_KEY, api_token=SECRET_TOKEN)
    batch = events(10)
    async with Emulator(config, tls=tls) as cdp:
        assert cdp.url.startswith("https://")
        untrusting = https_worker(cdp.url, batch, state, ca_file=None)
        run = asyncio.create_task(untrusting.run())
        await until(lambda: untrusting.worker.ready() == (False, OUTAGE))
        await asyncio.sleep(0.5)  # a few probes
        untrusting.worker.stop()
        await asyncio.wait_for(run, 20)
        assert untrusting.reasons == []
        assert cdp.stats()["contacts"] == 0
        records = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
        tls_lines = [r for r in records if r["event"] == "cdp.tls_failed"]
        assert tls_lines
        assert all("certificate" in r["error"] for r in tls_lines)  # the verification error
        probes = [r["probe"] for r in tls_lines]
        assert probes == sorted(set(probes))  # once per probe

        trusting = https_worker(cdp.url, batch, state, ca_file=str(certificate))
        await asyncio.wait_for(trusting.run(), 20)
        assert trusting.reasons == []
        one_contact_each(cdp, batch)
