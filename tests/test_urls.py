"""`worker/_urls.py`: every broker and store URL is split, and scrubbed, in one place."""

from __future__ import annotations

import pytest

from worker._urls import (
    ParsedUrl,
    check_server_url,
    dead_letters_beside,
    refuse_bare_path,
    safe_url,
)
from worker.errors import ConfigError
from worker.sources.nats import split_url as split_nats_url
from worker.sources.rabbitmq import _AmqpClient


def test_our_parameters_are_taken_out_and_the_clients_kept() -> None:
    parsed = ParsedUrl.split(
        "amqp://u:p@h:5672/v?queue=q&heartbeat=30&prefetch=8", "--source", {"queue", "prefetch"}
    )
    assert parsed.params == {"queue": "q", "prefetch": "8"}
    assert parsed.client_url == "amqp://u:p@h:5672/v?heartbeat=30"
    assert parsed.safe == "amqp://h:5672/v?heartbeat=30"


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("amqp://user:p%40ss%2Fw0rd@h/?queue=q", "p@ss/w0rd"),  # written percent-encoded
        ("redis://:plain-s3cret@h:6379/0?stream=s", "plain-s3cret"),
    ],
)
def test_the_password_is_scrubbed_as_written_and_decoded(url: str, secret: str) -> None:
    parsed = ParsedUrl.split(url, "--source", {"queue", "stream"})
    written = url.split(":")[2].split("@")[0]
    text = f"failed for {written} (that is, {secret})"
    assert parsed.scrub(text) == "failed for *** (that is, ***)"
    assert secret not in parsed.quote(RuntimeError(f"auth {secret} refused"))


def test_a_rabbitmq_failure_never_shows_the_decoded_password() -> None:
    client = _AmqpClient("amqp://user:p%40ss@broker/?queue=q", "--source / WORKER_SOURCE", "x")
    failure = str(client.failure("cannot reach RabbitMQ", OSError("login p@ss refused")))
    assert "p@ss" not in failure
    assert "p%40ss" not in failure
    assert failure.startswith("--source / WORKER_SOURCE: cannot reach RabbitMQ (amqp://broker/)")


def test_a_nats_token_is_a_secret_too() -> None:
    servers, parsed = split_nats_url("nats://t0ken@n1:4222,n2:4222?stream=S&subject=s", "--x")
    assert servers == ["nats://t0ken@n1:4222", "nats://t0ken@n2:4222"]
    assert parsed.describe(OSError("bad t0ken")) == "OSError: bad ***"


def test_strict_urls_refuse_unknown_parameters_and_malformed_urls_never_echo() -> None:
    with pytest.raises(ConfigError, match=r"unknown nats:// URL parameter.*stram"):
        ParsedUrl.split("nats://h?stram=S", "--source", {"stream"}, strict=True)
    with pytest.raises(ConfigError) as caught:
        ParsedUrl.split("redis://:s3cret@[::1", "--state / WORKER_STATE")
    assert str(caught.value) == "--state / WORKER_STATE: not a valid URL"


def test_server_urls_are_checked_for_scheme_and_port() -> None:
    usage = "a redis state URL is redis://HOST:6379/DB"
    args = {"kind": "redis", "schemes": ("redis",), "usage": usage}
    assert check_server_url("redis://h:6379/0", "--state", **args).port == 6379
    with pytest.raises(ConfigError, match=f"--state: {usage}"):
        check_server_url("redis:h", "--state", **args)
    with pytest.raises(ConfigError, match="invalid redis URL") as caught:
        check_server_url("redis://:s3cret@h:99999/0", "--state", **args)
    assert "s3cret" not in str(caught.value)


def test_helpers_for_logs_and_dead_letters() -> None:
    assert safe_url("nats://u:p@n1:4222,n2:4222?x=1") == "nats://n1:4222,n2:4222?x=1"
    beside = dead_letters_beside("redis://h/0?stream=s&group=g", "stream", drop=("group",))
    assert beside == "redis://h/0?stream=s.dead-letter"


def test_a_password_given_as_a_query_parameter_is_a_secret_too() -> None:
    # redis-py (and others) take ?password=; it must not reach logs or messages.
    parsed = ParsedUrl.split("redis://h:6379/0?stream=s&password=qs3cret&db=0", "--x", {"stream"})
    assert parsed.client_url == "redis://h:6379/0?password=qs3cret&db=0"  # the client needs it
    assert "qs3cret" not in parsed.safe
    assert parsed.safe == "redis://h:6379/0?db=0"
    assert parsed.quote(OSError("auth qs3cret failed")) == "auth *** failed"
    assert "qs3cret" not in safe_url("redis://h/0?password=qs3cret")


@pytest.mark.parametrize(
    ("value", "meant"),
    [
        ("./events.jsonl", "file:./events.jsonl"),
        ("events.jsonl", "file:events.jsonl"),
        ("/data/events.jsonl", "file:/data/events.jsonl"),
    ],
)
def test_a_bare_path_is_refused_with_the_url_it_likely_meant(value: str, meant: str) -> None:
    with pytest.raises(ConfigError) as refused:
        refuse_bare_path(value, "--source", suggest="file:")
    assert str(refused.value) == (
        f"--source: unsupported URL without a scheme; did you mean {meant}?"
    )


@pytest.mark.parametrize(
    "value", ["file:x", "memory:", "redis://h:6379/0?stream=s", "//user:pw@h/x", "C:x"]
)
def test_urls_and_host_forms_are_no_bare_paths(value: str) -> None:
    refuse_bare_path(value, "--source", suggest="file:")  # left to the URL's own checks


@pytest.mark.parametrize(
    "value", ["postgres//u:s3cret@h/db", "amqp//user:s3cret@host/vhost", "my_user:s3cret@db:5432/x"]
)
def test_a_server_url_with_a_slip_in_its_scheme_is_refused_without_echoing_it(value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        refuse_bare_path(value, "--state", suggest="sqlite:///")
    assert "s3cret" not in str(refused.value)
    assert str(refused.value) == (
        "--state: unsupported URL without a scheme; did you mean sqlite:///PATH, or a server URL?"
    )
