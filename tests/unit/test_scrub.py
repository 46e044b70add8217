"""``scrub``: no password (or NATS token) of a broker URL survives in an error text, whatever form
the driver printed it in; and the three places that report driver errors use it."""

from __future__ import annotations

import pytest

from callcast.brokers import scrub
from callcast.exceptions import ConfigurationError
from callcast.lab.namespace import _reason


@pytest.mark.parametrize(
    ("url", "secrets"),
    [
        ("redis://:s3cret@localhost:6379/0", ["s3cret"]),
        ("redis://app:p%40ss%2Fw@localhost/0", ["p%40ss%2Fw", "p@ss/w"]),
        ("rediss://default:x%25y@cache:6380/1", ["x%25y", "x%y"]),
        ("nats://app:hunter2@127.0.0.1:4222", ["hunter2"]),
        ("nats://app:p%3Ass@127.0.0.1:4222", ["p%3Ass", "p:ss"]),
        ("nats://t%2Bk3n@127.0.0.1:4222", ["t%2Bk3n", "t+k3n"]),  # a user alone is a token
        ("amqp://guest:gu%23st@127.0.0.1:5672/vh", ["gu%23st", "gu#st"]),
        ("postgresql://app:pg%20pw@db/x", ["pg%20pw", "pg pw"]),
    ],
)
def test_no_password_survives_as_written_or_decoded(url: str, secrets: list[str]) -> None:
    for shown in [url, *secrets]:
        text = scrub(f"cannot connect to {shown}: refused", url)
        assert text.startswith("cannot connect to ")
        for secret in secrets:
            assert secret not in text, (shown, text)


def test_the_url_becomes_its_redacted_form_and_a_user_that_is_no_secret_is_kept() -> None:
    assert scrub("at redis://app:pw@h/0.", "redis://app:pw@h/0") == "at redis://app:***@h/0."
    assert scrub("user app, password pw", "amqp://app:pw@h/") == "user app, password ***"
    assert scrub("user app refused", "nats://app:pw@h:4222") == "user app refused"


def test_a_password_urlsplit_misreads_is_hidden_where_the_url_is_quoted() -> None:
    url = "postgresql://app:pa/ss@db/x"  # an unescaped '/': the parser's netloc ends before it
    assert scrub(f"bad URL {url}", url) == "bad URL postgresql://app:***@db/x"


def test_text_without_secrets_and_urls_without_them_are_unchanged() -> None:
    assert scrub("Connection refused", "redis://:pw@h/0") == "Connection refused"
    assert scrub("no user app here", "redis://app@h/0") == "no user app here"
    assert scrub("empty password app", "nats://app:@h:4222") == "empty password app"


def test_the_lab_reason_names_the_error_without_the_password_in_300_characters() -> None:
    url = "redis://:p%40ss@127.0.0.1:6379/0?prefix=callcast_lab_x"
    reason = _reason(ConnectionError(f"AUTH p@ss failed for {url}" + "." * 400), url)
    assert reason.startswith("ConnectionError: AUTH *** failed for redis://:***@127.0.0.1")
    assert "p@ss" not in reason
    assert "p%40ss" not in reason
    assert len(reason) == 300
    assert _reason(TimeoutError(), url) == "TimeoutError"
    assert "t0k" not in _reason(OSError("token t0k refused"), "nats://t0k@127.0.0.1:4222?stream=x")


def test_the_nats_broker_errors_carry_neither_password_nor_token() -> None:
    nats = pytest.importorskip("callcast.brokers.nats")
    for url, secrets in [
        ("nats://app:p%40ss@127.0.0.1:4222", ("p%40ss", "p@ss")),
        ("nats://t%2Bk@127.0.0.1:4222", ("t%2Bk", "t+k")),
    ]:
        broker = nats.NatsBroker(url)
        message = str(broker._error(OSError(f"refused: {secrets[0]} / {secrets[1]}"), "connect"))
        assert message.startswith("nats broker nats://")
        assert "refused: *** / ***" in message
        assert not any(secret in message for secret in secrets), message


def test_the_redis_broker_errors_carry_no_password() -> None:
    redis = pytest.importorskip("callcast.brokers.redis")
    from redis.exceptions import ResponseError

    from callcast.exceptions import TransportError

    broker = redis.RedisBroker("redis://app:p%40ss@127.0.0.1:6379/0?prefix=x")
    with pytest.raises(TransportError) as caught, broker._translate("publish"):
        raise ResponseError("WRONGPASS p@ss for redis://app:p%40ss@127.0.0.1:6379/0")
    message = str(caught.value)
    assert "p@ss" not in message
    assert "p%40ss" not in message
    assert message.endswith("WRONGPASS *** for redis://app:***@127.0.0.1:6379/0")
    assert broker._scrub(OSError()) == "OSError"


@pytest.mark.parametrize(
    ("adapter", "url"),
    [
        ("nats:NatsBroker", "nats://app:pw?d@127.0.0.1:4222"),
        ("redis:RedisBroker", "redis://:se#cret@127.0.0.1:6379/0"),
        ("rabbitmq:RabbitBroker", "amqp://guest:pa/ss@127.0.0.1:5672/"),
        ("postgres:PostgresBroker", "postgresql://postgres:x#y9@127.0.0.1:5432/test"),
    ],
)
def test_a_password_that_cuts_the_url_short_gets_a_hint_and_stays_hidden(adapter: str, url: str) -> None:
    """A raw ``/ ? #`` in a password ends the URL's host part early, so the parser reads the start
    of the password as the port: the adapter (checking its URL before opening anything) names
    the problem and shows no piece of the password."""
    module, _, name = adapter.partition(":")
    broker_class = getattr(pytest.importorskip(f"callcast.brokers.{module}"), name)
    password = url.partition("://")[2].rpartition("@")[0].partition(":")[2]
    with pytest.raises(ConfigurationError) as caught:
        broker_class(url)
    shown = url.replace(f":{password}@", ":***@")
    assert str(caught.value) == (
        f"{module} broker: invalid port in {shown!r}; a user or password holding / ? # or @ must be "
        "percent-encoded (%2F %3F %23 %40)"
    )
