"""URL helpers shared by the brokers, state stores and the shared rate limit."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit


def safe_url(url: str) -> str:
    """The URL without user info (user, password, token), for logs and messages.

    Works for server lists too (`nats://u:p@n1:4222,n2:4222`): the host part is
    everything after the last '@'.
    """
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, hosts, parts.path, parts.query, ""))


def split_url_params(url: str, own: set[str]) -> tuple[str, dict[str, str]]:
    """(the URL without our own query parameters, our parameters); the client's stay."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    ours = {k: v for k, v in query.items() if k in own}
    rest = urlencode({k: v for k, v in query.items() if k not in own})
    return urlunsplit((parts.scheme, parts.netloc, parts.path, rest, "")), ours


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
