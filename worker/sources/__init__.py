"""Sources of events, dead-letter sinks and publishers, chosen by URL (DESIGN section 5).

Files (and, for tests, memory) are built in; each broker is a module ending with its
typed `Broker`, imported only when its URL is used and its client (an extra) is there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from .. import _extras
from .._urls import refuse_bare_path
from ..errors import ConfigError
from ..state.base import StateStore
from .base import Broker, DeadLetterSink, Message, Publisher, Source, dead_letter, letter_key
from .file import FileDeadLetterSink, FilePublisher, FileSource
from .memory import MemoryDeadLetterSink, MemorySource

__all__ = [
    "Broker",
    "DeadLetterSink",
    "FileDeadLetterSink",
    "FilePublisher",
    "FileSource",
    "MemoryDeadLetterSink",
    "MemorySource",
    "Message",
    "Publisher",
    "Source",
    "dead_letter",
    "default_dead_letter_url",
    "letter_key",
    "open_dead_letter_sink",
    "open_publisher",
    "open_source",
]

SOURCE_OPTION = "--source / WORKER_SOURCE"
DLQ_OPTION = "--dlq / WORKER_DLQ"
DEFAULT_DEAD_LETTERS = "file:./dead-letter.jsonl"


def _redis() -> Broker:
    from .redis import BROKER

    return BROKER


def _rabbitmq() -> Broker:
    from .rabbitmq import BROKER

    return BROKER


def _nats() -> Broker:
    from .nats import BROKER

    return BROKER


@dataclass(frozen=True, slots=True)
class _Registered:
    """A broker's client library (an extra) and how to load its module."""

    extra: _extras.Extra
    load: Callable[[], Broker]


_REDIS = _Registered(_extras.REDIS, _redis)
_RABBITMQ = _Registered(_extras.RABBITMQ, _rabbitmq)
_NATS = _Registered(_extras.NATS, _nats)
# URL scheme -> broker; the TLS schemes share their broker's module.
_BROKERS: dict[str, _Registered] = {
    "redis": _REDIS,
    "rediss": _REDIS,
    "amqp": _RABBITMQ,
    "amqps": _RABBITMQ,
    "nats": _NATS,
    "tls": _NATS,
}
# What each kind of URL may be, for the messages: a source reads stdin and joins a
# consumer group; a sink or a publisher writes a file, a stream, a queue or a subject.
_BROKER_URLS = (
    "amqp://USER:PASS@HOST:5672/VHOST?queue=NAME or nats://HOST:4222?stream=NAME&subject=NAME"
)
_SOURCES = f"file:PATH, file:-, redis://HOST:6379/0?stream=NAME&group=NAME, {_BROKER_URLS}"
_WRITABLE = f"file:PATH, redis://HOST:6379/0?stream=NAME, {_BROKER_URLS}"


def _broker(url: str, label: str, accepted: str) -> Broker:
    """The broker behind `url`'s scheme, or a ConfigError naming the option and what it
    `accepted` (a bare path: the file: URL it likely meant)."""
    refuse_bare_path(url, label, suggest="file:")
    scheme = urlsplit(url).scheme
    registered = _BROKERS.get(scheme)
    if registered is None:
        # The URL itself is not echoed: it may carry a password.
        raise ConfigError(f"{label}: unsupported URL scheme {scheme!r}; expected {accepted}")
    _extras.require(registered.extra, label)
    return registered.load()


def _file_path(url: str, label: str) -> str:
    path = url[len("file:") :]
    if path.startswith("//"):  # file:///abs/path as well as file:PATH
        path = urlsplit(url).path
    if not path:
        raise ConfigError(f"{label}: file: URL needs a path, e.g. file:./events.jsonl or file:-")
    return path


def open_source(url: str, *, state: StateStore | None = None, follow: bool = False) -> Source:
    """The source for `url`. Raises ConfigError (naming --source) for a bad URL."""
    scheme = urlsplit(url).scheme
    if scheme == "file":
        return FileSource(_file_path(url, SOURCE_OPTION), state=state, follow=follow)
    return _broker(url, SOURCE_OPTION, _SOURCES).source(url)


def default_dead_letter_url(source_url: str) -> str:
    """Dead letters go beside the source: a file, `<stream>.dead-letter`... (DESIGN 5)."""
    scheme = urlsplit(source_url).scheme
    if scheme == "memory":
        return "memory:"
    if scheme in _BROKERS:
        return _broker(source_url, SOURCE_OPTION, _SOURCES).dead_letter_url(source_url)
    return DEFAULT_DEAD_LETTERS


def open_dead_letter_sink(url: str, *, label: str = DLQ_OPTION) -> DeadLetterSink:
    """The dead-letter sink for `url`. Raises ConfigError (naming `label`) for a bad URL."""
    scheme = urlsplit(url).scheme
    if scheme == "file":
        path = _file_path(url, label)
        if path == "-":
            raise ConfigError(f"{label}: dead letters need a file, not stdout")
        return FileDeadLetterSink(path)
    if scheme == "memory":
        return MemoryDeadLetterSink()
    return _broker(url, label, _WRITABLE).dead_letters(url)


def open_publisher(url: str, *, label: str = "--to") -> Publisher:
    """Where `worker publish --to URL` puts events."""
    if urlsplit(url).scheme == "file":
        path = _file_path(url, label)
        if path == "-":
            raise ConfigError(f"{label}: publish to a file, not stdout")
        return FilePublisher(path)
    return _broker(url, label, _WRITABLE).publisher(url)
