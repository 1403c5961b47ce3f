"""The memory state store against the contract, plus the `--state` URL factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

pytest.register_assert_rewrite("state_contract")

from state_contract import StateStoreContract, closing  # noqa: E402

from worker.errors import ConfigError  # noqa: E402
from worker.state import (  # noqa: E402
    MemoryStateStore,
    SqliteStateStore,
    StateStore,
    open_state_store,
)


class TestMemoryState(StateStoreContract):
    shared = False  # one process: a replica is the same store
    durable = False

    @pytest.fixture
    async def make_store(self) -> AsyncIterator[Callable[..., StateStore]]:
        async with closing(MemoryStateStore) as make:
            yield make


# -- open_state_store ------------------------------------------------------------------------


def test_factory_memory() -> None:
    assert isinstance(open_state_store("memory:"), MemoryStateStore)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///./worker-state.db", "./worker-state.db"),
        ("sqlite:///state.db", "state.db"),
        ("sqlite:////var/lib/cdp-sync/state.db", "/var/lib/cdp-sync/state.db"),
    ],
)
def test_factory_sqlite_paths(url: str, path: str) -> None:
    store = open_state_store(url)
    assert isinstance(store, SqliteStateStore)
    assert store.path == path


@pytest.mark.parametrize(
    "url", ["mysql://u:secret@db/x", "sqlite://state.db", "sqlite:///", "./state.db", ""]
)
def test_factory_rejects_other_urls_naming_the_option(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_state_store(url)
    message = str(info.value)
    assert "--state / WORKER_STATE" in message
    assert "sqlite:///" in message
    assert "secret" not in message
