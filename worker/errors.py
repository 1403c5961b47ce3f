"""Every exception cdp-sync raises on purpose, in one place (as httpx does)."""

from __future__ import annotations


class WorkerError(Exception):
    """Base of all cdp-sync errors."""


class ConfigError(WorkerError):
    """Bad configuration: `worker run` exits 2 with this message before consuming anything.

    The message always names the option (flag and environment variable).
    """


class MissingExtraError(ConfigError):
    """A URL needs a broker client that is not installed."""

    def __init__(self, package: str, extra: str, url_kind: str) -> None:
        super().__init__(
            f"{url_kind} URLs need the {package!r} package: pip install 'cdp-sync[{extra}]'"
        )


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


class StateError(WorkerError):
    """The state store failed or was misused (e.g. completing a claim one does not own)."""


class SourceError(WorkerError):
    """A source or dead-letter sink failed in a way a retry will not mend."""
