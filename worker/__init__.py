"""cdp-sync: keeps the primary contact of each order in Sitecore CDP right, exactly once.

The public surface is small (as in httpx): the `Worker` and its `Settings`, the CDP client,
the parts' factories and the exceptions. Everything else is private to its module.

Names are imported when first used (PEP 562), so that `worker check`, run by every
container health probe, starts without loading aiohttp, the brokers or the emulator.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cdp import CdpClient, Outcome, Verdict, classify
    from .config import Settings, load_settings
    from .contact import Event, build_body, event_json_schema, parse_event
    from .errors import (
        ConfigError,
        InvalidEvent,
        MissingExtraError,
        SourceError,
        StateError,
        WorkerError,
    )
    from .pipeline import Worker
    from .sources import open_dead_letter_sink, open_source
    from .state import open_state_store

    __version__: str

# Public name -> the module it lives in.
_EXPORTS = {
    "CdpClient": "cdp",
    "Outcome": "cdp",
    "Verdict": "cdp",
    "classify": "cdp",
    "Settings": "config",
    "load_settings": "config",
    "Event": "contact",
    "build_body": "contact",
    "event_json_schema": "contact",
    "parse_event": "contact",
    "ConfigError": "errors",
    "InvalidEvent": "errors",
    "MissingExtraError": "errors",
    "SourceError": "errors",
    "StateError": "errors",
    "WorkerError": "errors",
    "Worker": "pipeline",
    "open_dead_letter_sink": "sources",
    "open_source": "sources",
    "open_state_store": "state",
}

__all__ = [
    "CdpClient",
    "ConfigError",
    "Event",
    "InvalidEvent",
    "MissingExtraError",
    "Outcome",
    "Settings",
    "SourceError",
    "StateError",
    "Verdict",
    "Worker",
    "WorkerError",
    "__version__",
    "build_body",
    "classify",
    "event_json_schema",
    "load_settings",
    "open_dead_letter_sink",
    "open_source",
    "open_state_store",
    "parse_event",
]


def __getattr__(name: str) -> object:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("cdp-sync")  # pyproject.toml's, the one place it is written
        except PackageNotFoundError:  # run from a checkout that was never installed
            return "0+unknown"
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
