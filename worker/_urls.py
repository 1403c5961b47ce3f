"""URL helpers shared by the brokers, state stores and the shared rate limit.

Every URL of a broker or a store is split here, once (`ParsedUrl.split`): our own query
parameters taken out, the rest left for the client library, and the URL's secret kept
so that any message quoting a client's error can be scrubbed of it, in the form written
in the URL and percent-decoded. A bare path where a URL belongs is refused here too, with
the URL it most likely meant (`refuse_bare_path`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from .errors import ConfigError

# Query parameters that carry a credential (redis-py takes ?password=): kept for the
# client, scrubbed from messages, left out of what is logged.
SECRET_PARAMS = frozenset({"password", "passwd", "token", "auth_token", "secret"})


@dataclass(frozen=True, slots=True)
class ParsedUrl:
    """A URL split once; `params` are ours, `rest` the client's (still encoded)."""

    scheme: str
    userinfo: str  # "user:password@" or ""
    hosts: str  # what follows the last "@": host[:port], or a list (nats://h1,h2)
    path: str
    rest: str
    params: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def split(
        cls,
        url: str,
        label: str,
        own: Collection[str] = (),
        *,
        strict: bool = False,
        user_is_secret: bool = False,
    ) -> ParsedUrl:
        """Split `url` for the option `label`; ConfigError (never echoing it) if it cannot be.

        `strict`: a query parameter that is not one of `own` is refused (a typo) instead of
        passed on. `user_is_secret`: a user without a password is a token (nats://TOKEN@h).
        """
        try:
            parts = urlsplit(url)
            password = parts.password
            username = parts.username
        except ValueError:
            raise ConfigError(f"{label}: not a valid URL") from None
        query = dict(parse_qsl(parts.query))
        unknown = sorted(set(query) - set(own))
        if strict and unknown:
            raise ConfigError(
                f"{label}: unknown {parts.scheme}:// URL parameter(s) {', '.join(unknown)}; "
                f"expected {', '.join(sorted(own))}"
            )
        userinfo, at, hosts = parts.netloc.rpartition("@")
        secrets = [password or (username if user_is_secret else None)]
        secrets += [value for key, value in query.items() if key.lower() in SECRET_PARAMS]
        return cls(
            scheme=parts.scheme,
            userinfo=userinfo + at,
            hosts=hosts,
            path=parts.path,
            rest=urlencode({k: v for k, v in query.items() if k not in own}),
            params={k: v for k, v in query.items() if k in own},
            secrets=tuple(secret for secret in secrets if secret),
        )

    @property
    def client_url(self) -> str:
        """The URL for the client library: ours taken out, credentials kept."""
        netloc = self.userinfo + self.hosts
        return urlunsplit((self.scheme, netloc, self.path, self.rest, ""))

    @property
    def safe(self) -> str:
        """The client's URL without user info or secret parameters, for logs and messages."""
        return urlunsplit((self.scheme, self.hosts, self.path, _without_secrets(self.rest), ""))

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = scrub_password(text, secret)
        return text

    def quote(self, exc: BaseException) -> str:
        """An exception's text (its type, if blank) for a message, scrubbed."""
        return self.scrub(str(exc) or type(exc).__name__)

    def describe(self, exc: BaseException) -> str:
        """Like `quote`, with the type always named (for clients whose texts are terse)."""
        text = str(exc)
        return self.scrub(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def check_server_url(
    url: str, label: str, *, kind: str, schemes: Collection[str], usage: str
) -> SplitResult:
    """`url` split, if it is `scheme://...` with one of `schemes` and a valid port.

    ConfigError naming `label` otherwise: `usage` (what such a URL looks like), or that
    the `kind` of URL is invalid; never the URL itself.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(f"{label}: not a valid URL; {usage}") from None
    if parts.scheme.lower() not in schemes or not url[len(parts.scheme) :].startswith("://"):
        raise ConfigError(f"{label}: {usage}")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number in range
    except ValueError as exc:
        raise ConfigError(
            f"{label}: invalid {kind} URL: {scrub_password(str(exc), parts.password)}"
        ) from None
    return parts


def refuse_bare_path(url: str, label: str, *, suggest: str) -> None:
    """ConfigError if `url` is a path (no scheme, no //host) where a URL belongs, saying
    what was likely meant: `./events.jsonl` -> "did you mean file:./events.jsonl?".

    Such a value is echoed only if it cannot be a server URL with a slip in its scheme
    (`postgres//user:secret@host`): one with `@` or `//` may carry a password.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return  # not a path either: the URL's own check reports it
    if not parts.scheme and not parts.netloc and not url.startswith("//"):
        if "@" in url or "//" in url:  # a server URL with a slip in its scheme: it may
            meant = f"{suggest}PATH, or a server URL"  # hold a password, never echoed
        else:
            meant = f"{suggest}{url}"
        raise ConfigError(f"{label}: unsupported URL without a scheme; did you mean {meant}?")


def _without_secrets(query: str) -> str:
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(k, v) for k, v in pairs if k.lower() not in SECRET_PARAMS])


def safe_url(url: str) -> str:
    """The URL without user info (user, password, token) or secret parameters.

    Works for server lists too (`nats://u:p@n1:4222,n2:4222`): the host part is
    everything after the last '@'.
    """
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, hosts, parts.path, _without_secrets(parts.query), ""))


def dead_letters_beside(source_url: str, name: str, *, drop: tuple[str, ...] = ()) -> str:
    """The source URL with `?name=<its value>.dead-letter`, less the consumer's `drop`
    parameters; connection parameters (TLS files, heartbeats, timeouts) stay."""
    parts = urlsplit(source_url)
    query = {k: v for k, v in parse_qsl(parts.query) if k not in drop}
    query[name] = query.get(name, "") + ".dead-letter"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def scrub_password(text: str, password: str | None) -> str:
    """`text` without the password, as written in the URL or percent-decoded."""
    if password:
        for form in (password, unquote(password)):
            text = text.replace(form, "***")
    return text
