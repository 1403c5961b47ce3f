"""cdp-sync: creates the primary contact of each order in Sitecore CDP, exactly once.

The public surface is small (as in httpx): the `Worker` and its `Settings`, the CDP client,
the parts' factories and the exceptions. Everything else is private to its module.
"""

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

__version__ = "0.1.0"

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
