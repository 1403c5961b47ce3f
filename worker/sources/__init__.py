"""Sources of events, dead-letter sinks and publishers, chosen by URL (DESIGN section 5).

Broker clients are extras: a broker's module is imported only when its URL is used.
"""

from __future__ import annotations

import importlib
from typing import Any
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

# URL scheme -> (module, source class, dead-letter sink class, publisher class). Each
# module also has `dead_letter_url(source_url)`: where dead letters go by default.
_BROKERS: dict[str, tuple[str, str, str, str]] = {
    "redis": ("redis", "RedisStreamSource", "RedisDeadLetterSink", "RedisPublisher"),
    "amqp": ("rabbitmq", "RabbitMQSource", "RabbitMQDeadLetterSink", "RabbitMQPublisher"),
    "nats": ("nats", "NatsSource", "NatsDeadLetterSink", "NatsPublisher"),
}
_BROKERS["rediss"] = _BROKERS["redis"]
_BROKERS["amqps"] = _BROKERS["amqp"]
_BROKERS["tls"] = _BROKERS["nats"]
_SOURCE, _SINK, _PUBLISHER = 1, 2, 3
_ACCEPTED = (
    "file:PATH, file:-, redis://HOST:6379/0?stream=NAME&group=NAME, "
    "amqp://USER:PASS@HOST:5672/VHOST?queue=NAME or nats://HOST:4222?stream=NAME&subject=NAME"
)


def _broker(scheme: str, label: str) -> Any:
    """The module of the broker behind `scheme`, or a ConfigError naming the option."""
    if scheme not in _BROKERS:
        # The URL itself is not echoed: it may carry a password.
        raise ConfigError(f"{label}: unsupported URL scheme {scheme!r}; expected {_ACCEPTED}")
    return importlib.import_module(f".{_BROKERS[scheme][0]}", __name__)


def _build(url: str, label: str, role: int) -> Any:
    scheme = urlsplit(url).scheme
    module = _broker(scheme, label)
    return getattr(module, _BROKERS[scheme][role])(url)


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
    if urlsplit(url).scheme == "file":
        return FileSource(_file_path(url, label), state=state, follow=follow)
    source: Source = _build(url, label, _SOURCE)
    return source


def default_dead_letter_url(source_url: str) -> str:
    """Dead letters go beside the source: a file, `<stream>.dead-letter`... (DESIGN 5)."""
    scheme = urlsplit(source_url).scheme
    if scheme == "memory":
        return "memory:"
    if scheme in _BROKERS:
        dead_letter_url: str = _broker(scheme, "--source / WORKER_SOURCE").dead_letter_url(
            source_url
        )
        return dead_letter_url
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
    sink: DeadLetterSink = _build(url, label, _SINK)
    return sink


def open_publisher(url: str) -> Publisher:
    """Where `worker publish --to URL` puts events."""
    label = "--to"
    if urlsplit(url).scheme == "file":
        path = _file_path(url, label)
        if path == "-":
            raise ConfigError(f"{label}: publish to a file, not stdout")
        return FilePublisher(path)
    publisher: Publisher = _build(url, label, _PUBLISHER)
    return publisher
