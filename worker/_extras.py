"""Broker and database clients are extras (`pip install 'cdp-sync[redis]'`).

Each is imported only when a URL needs it. `require` is the one check, made before the
module that uses the client is imported, at every URL position (source, state, dead
letters, rate-limit backend, publish, dlq): a missing client is always the same clear
`MissingExtraError` naming the option, never a `ModuleNotFoundError`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .errors import MissingExtraError


@dataclass(frozen=True, slots=True)
class Extra:
    """One optional client: the module imported, the package pip installs, the extra."""

    module: str
    package: str
    name: str
    url_kind: str  # how its URLs begin, for the message


REDIS = Extra("redis", "redis", "redis", "redis://")
RABBITMQ = Extra("aio_pika", "aio-pika", "rabbitmq", "amqp://")
NATS = Extra("nats", "nats-py", "nats", "nats://")
POSTGRES = Extra("asyncpg", "asyncpg", "postgres", "postgresql://")


def require(extra: Extra, label: str) -> None:
    """Import `extra`'s client, or raise MissingExtraError naming `label` (the option)."""
    try:
        importlib.import_module(extra.module)
    except ModuleNotFoundError as exc:
        if exc.name != extra.module:
            raise  # installed, but something it needs is broken: that error is the news
        raise MissingExtraError(label, extra.package, extra.name, extra.url_kind) from None
