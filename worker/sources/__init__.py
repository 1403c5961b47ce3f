"""Sources of events and dead-letter sinks, chosen by URL (DESIGN section 5).

Broker clients are extras, imported only when their URL is used.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ..errors import ConfigError
from ..state.base import StateStore
from .base import DeadLetterSink, Message, Source
from .file import FileDeadLetterSink, FileSource
from .memory import MemoryDeadLetterSink, MemorySource

__all__ = [
    "DeadLetterSink",
    "FileDeadLetterSink",
    "FileSource",
    "MemoryDeadLetterSink",
    "MemorySource",
    "Message",
    "Source",
    "open_dead_letter_sink",
    "open_source",
]

_BROKERS = ("redis", "rediss", "amqp", "amqps", "nats")


def _file_path(url: str, label: str) -> str:
    path = url[len("file:") :]
    if path.startswith("//"):  # file:///abs/path as well as file:PATH
        path = urlsplit(url).path
    if not path:
        raise ConfigError(f"{label}: file: URL needs a path, e.g. file:./events.jsonl or file:-")
    return path


def open_source(url: str, *, state: StateStore | None = None, follow: bool = False) -> Source:
    """The source for `url`. Raises ConfigError (naming --source) for a bad URL."""
    label = "--source / WORKER_SOURCE"
    scheme = urlsplit(url).scheme
    if scheme == "file":
        return FileSource(_file_path(url, label), state=state, follow=follow)
    if scheme in _BROKERS:
        raise ConfigError(f"{label}: {scheme}:// sources are not available in this version yet")
    raise ConfigError(f"{label}: unsupported URL {url!r}; expected file:PATH or file:-")


def open_dead_letter_sink(url: str) -> DeadLetterSink:
    """The dead-letter sink for `url`. Raises ConfigError (naming --dlq) for a bad URL."""
    label = "--dlq / WORKER_DLQ"
    scheme = urlsplit(url).scheme
    if scheme == "file":
        path = _file_path(url, label)
        if path == "-":
            raise ConfigError(f"{label}: dead letters need a file, not stdout")
        return FileDeadLetterSink(path)
    if scheme == "memory":
        return MemoryDeadLetterSink()
    raise ConfigError(f"{label}: unsupported URL {url!r}; expected file:PATH")
