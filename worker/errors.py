"""Every exception cdp-sync raises on purpose, in one place (as httpx does)."""

from __future__ import annotations


class WorkerError(Exception):
    """Base of all cdp-sync errors."""


class ConfigError(WorkerError):
    """Bad configuration: `worker run` exits 2 with this message before consuming anything.

    The message always names the option (flag and environment variable).
    """


class MissingExtraError(ConfigError):
    """A URL needs a broker or database client that is not installed.

    Raised by `worker._extras.require` for every URL position (source, state, dead
    letters, rate-limit backend, publish, dlq), always with the option's label.
    """

    def __init__(self, label: str, package: str, extra: str, url_kind: str) -> None:
        super().__init__(
            f"{label}: {url_kind} URLs need the {package!r} package: "
            f"pip install 'cdp-sync[{extra}]'"
        )
        self.package = package
        self.extra = extra


class InvalidEvent(WorkerError):
    """An event that can never be delivered: it becomes a dead letter with `reason`.

    `reason` is one of the reason codes of DESIGN section 5 (`malformed_json`,
    `invalid_event`, `invalid_order_ref`); the message names the offending field and never
    quotes its value, since values may be personal data.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        event: dict[str, object] | None = None,
        order_ref: str | None = None,
        event_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.event = event
        self.order_ref = order_ref
        self.event_id = event_id


class FieldRejected(WorkerError):
    """One rule of the envelope failed (`contact.py`); `parse_event` turns it into an
    `InvalidEvent` with the event's context. The message names the field, never its value."""


class StateError(WorkerError):
    """The state store failed or was misused (e.g. completing a claim one does not own)."""


class NotOwner(StateError):
    """Completing, failing... a record this owner does not hold (any more): another
    worker took the order over, and it will reconcile. Retrying cannot mend it."""


class SourceError(WorkerError):
    """A source or dead-letter sink failed in a way a retry will not mend."""


class Draining(WorkerError):
    """Raised inside a delivery that must give its message back because the worker stops."""


class LeaseLost(WorkerError):
    """Raised before a request when our claim on the order may have passed to another worker."""
