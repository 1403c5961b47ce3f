"""Sources of events, dead-letter sinks and publishers, chosen by URL (DESIGN section 5).

Broker clients are extras, imported only when their URL is used.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ..errors import ConfigError
from ..state.base import StateStore
from .base import DeadLetterSink, Message, Publisher, Source, letter_key
from .file import FileDeadLetterSink, FilePublisher, FileSource
from .memory import MemoryDeadLetterSink, MemorySource

__all__ = [
    "DeadLetterSink",
    "FileDeadLetterSink",
    "FilePublisher",
    "FileSource",
    "MemoryDeadLetterSink",
    "MemorySource",
    "Message",
    "Publisher",
    "Source",
    "default_dead_letter_url",
    "letter_key",
    "open_dead_letter_sink",
    "open_publisher",
    "open_source",
]

_REDIS = ("redis", "rediss")
_NOT_YET = ("amqp", "amqps", "nats")
_ACCEPTED = "file:PATH, file:- or redis://HOST:6379/0?stream=NAME&group=NAME"


def _file_path(url: str, label: str) -> str:
    path = url[len("file:") :]
    if path.startswith("//"):  # file:///abs/path as well as file:PATH
        path = urlsplit(url).path
    if not path:
        raise ConfigError(f"{label}: file: URL needs a path, e.g. file:./events.jsonl or file:-")
    return path


def _unsupported(label: str, scheme: str) -> ConfigError:
    if scheme in _NOT_YET:
        return ConfigError(f"{label}: {scheme}:// is not available in this version yet")
    # The URL itself is not echoed: it may carry a password.
    return ConfigError(f"{label}: unsupported URL scheme {scheme!r}; expected {_ACCEPTED}")


def open_source(url: str, *, state: StateStore | None = None, follow: bool = False) -> Source:
    """The source for `url`. Raises ConfigError (naming --source) for a bad URL."""
    label = "--source / WORKER_SOURCE"
    scheme = urlsplit(url).scheme
    if scheme == "file":
        return FileSource(_file_path(url, label), state=state, follow=follow)
    if scheme in _REDIS:
        from .redis import RedisStreamSource

        return RedisStreamSource(url)
    raise _unsupported(label, scheme)


def default_dead_letter_url(source_url: str) -> str:
    """Dead letters go beside the source: a file, or `<stream>.dead-letter` (DESIGN 5)."""
    scheme = urlsplit(source_url).scheme
    if scheme in _REDIS:
        from .redis import dead_letter_url

        return dead_letter_url(source_url)
    if scheme == "memory":
        return "memory:"
    return "file:./dead-letter.jsonl"


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
    if scheme in _REDIS:
        from .redis import RedisDeadLetterSink

        return RedisDeadLetterSink(url)
    raise _unsupported(label, scheme)


def open_publisher(url: str) -> Publisher:
    """Where `worker publish --to URL` puts events."""
    label = "--to"
    scheme = urlsplit(url).scheme
    if scheme == "file":
        path = _file_path(url, label)
        if path == "-":
            raise ConfigError(f"{label}: publish to a file, not stdout")
        return FilePublisher(path)
    if scheme in _REDIS:
        from .redis import RedisPublisher

        return RedisPublisher(url)
    raise _unsupported(label, scheme)
