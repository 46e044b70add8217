"""The ``redis://`` broker (Redis Streams) against the shared conformance suite, twice: on the machine's
shared Redis (no persistence, so ``durable`` is False there) and on a private ``redis-server`` this module
starts with ``appendonly yes``/``appendfsync always`` (``durable`` is True), which the restart test kills
(SIGKILL, by PID) and starts again. Plus what only this adapter has: its URL and options, its keys,
foreign entries, retries kept in Redis, trimming, ephemeral groups, and translated driver errors.

Everything a test creates on the shared server lives under a per-run key prefix, deleted at the end."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio.connection

from callcast.brokers import connect
from callcast.brokers.redis import PARKED, RedisBroker, RedisOptions, _Taken, parse_url
from callcast.envelope import UNDECODABLE_TYPE, Envelope, to_structured
from callcast.exceptions import BrokerUnavailableError, ConfigurationError, PublishError, TransportError
from callcast.testing import BrokerConformance
from callcast.transport import Broker, Capabilities, Delivery
from tests.brokers.conftest import HoldingLog, Pause, close_during
from tests.unit.conftest import wait_until

from .conftest import next_delivery, require_server

pytestmark = pytest.mark.redis

HOST, PORT = "127.0.0.1", 6379
LEASE = 1.0
OPTIONS = f"lease={LEASE:g}&poll=0.5"
RUN = uuid.uuid4().hex[:10]
SHARED_PREFIX = f"callcast-test-{RUN}"
SHARED_URL = f"redis://{HOST}:{PORT}/0?prefix={SHARED_PREFIX}&{OPTIONS}"


def _delete_prefixed(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])


@pytest.fixture(scope="module", autouse=True)
def _clean_shared_server() -> Iterator[None]:
    """Delete every key this run created on the shared server (when it is up)."""
    yield
    try:
        with redis.Redis(host=HOST, port=PORT, socket_connect_timeout=2) as client:
            _delete_prefixed(client, SHARED_PREFIX)
    except redis.RedisError:
        pass  # the server is down: nothing of ours is on it any more


def _capabilities(*, durable: bool) -> Capabilities:
    return Capabilities(
        durable=durable,
        shared=True,
        delayed_nack=True,
        delivery_count=True,
        ordered_per_key=False,
        request_reply=False,
        replays_history=False,
    )


def _envelope(label: str) -> Envelope:
    return Envelope(type="T", source="/test/redis", data=label.encode())


def _unique(label: str) -> str:
    return f"{label}.{uuid.uuid4().hex[:8]}"


# -- the conformance suite on the shared server ---------------------------------------------------


class TestRedisBroker(BrokerConformance):
    lease = LEASE

    async def make_broker(self) -> Broker:
        require_server("redis", PORT)
        return await connect(SHARED_URL)

    def process_url(self) -> str:
        return SHARED_URL

    async def test_capabilities(self) -> None:
        """Shared by every process that reaches the server; not durable on a server without
        ``appendonly yes`` and ``appendfsync always`` (this one has no persistence at all)."""
        broker = await self.open()
        assert isinstance(broker, RedisBroker)
        assert broker.capabilities == _capabilities(durable=False)


# -- a private, persistent server -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class PrivateRedis:
    """A ``redis-server`` of this module, with the append-only file fsynced on every write; started
    and stopped by its PID."""

    def __init__(self, directory: Path, binary: str) -> None:
        self.directory = directory
        self.binary = binary
        self.port = _free_port()
        self.password = f"pw-{uuid.uuid4().hex}"
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, **options: str) -> str:
        query = "&".join([OPTIONS, *(f"{name}={value}" for name, value in options.items())])
        return f"redis://:{self.password}@{HOST}:{self.port}/0?prefix=private&{query}"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        self.process = subprocess.Popen(
            [
                self.binary,
                *("--port", str(self.port), "--bind", HOST, "--dir", str(self.directory)),
                *("--appendonly", "yes", "--appendfsync", "always", "--save", ""),
                *("--requirepass", self.password, "--daemonize", "no"),
                *("--logfile", str(self.directory / "redis.log")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"the private redis-server exited ({self.process.returncode}):\n{log}")
            try:
                with redis.Redis(host=HOST, port=self.port, password=self.password) as client:
                    if client.ping():
                        return
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail("the private redis-server did not answer within 15s")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: a crash, not a clean shutdown; what was acknowledged must be in the AOF."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("redis-server is not installed (CI needs it for the restart test)")
        pytest.skip("redis-server is not installed: no private server for the durability tests")
    server = PrivateRedis(tmp_path_factory.mktemp("redis"), binary)
    server.start()
    try:
        yield server
    finally:
        server.kill()


class TestRedisBrokerWithAppendOnlyFile(BrokerConformance):
    """The whole suite again where ``durable`` holds, including the restart test."""

    lease = LEASE
    can_restart = True

    @pytest.fixture(autouse=True)
    def _server(self, private_redis: PrivateRedis) -> None:
        self.server = private_redis

    async def make_broker(self) -> Broker:
        return await connect(self.server.url())

    def process_url(self) -> str:
        return self.server.url()

    async def stop_server(self) -> None:
        await asyncio.to_thread(self.server.kill)

    async def start_server(self) -> None:
        await asyncio.to_thread(self.server.start)

    async def test_capabilities(self) -> None:
        """Durable where every accepted write is fsynced to the append-only file before Redis
        replies; ``durable=require`` accepts this server."""
        broker = await self.open()
        assert isinstance(broker, RedisBroker)
        assert broker.capabilities == _capabilities(durable=True)
        strict = await connect(self.server.url(durable="require"))
        await strict.close()

    async def test_subscribers_and_retries_outlive_a_server_crash(self) -> None:
        """The same broker object goes on after the server was killed and started again: a subscriber
        that waited through the outage gets what is published afterwards, and a delayed retry nacked
        before the crash comes back after its delay, counted, to its group only."""
        broker = await self.open()
        topic, group, other = _unique("orders"), _unique("billing"), _unique("audit")
        waiting_sub = await broker.subscribe(topic, group)
        other_sub = await broker.subscribe(topic, other)
        await broker.publish(topic, [_envelope("retried")])
        first = await next_delivery(waiting_sub)
        seen_by_other = await next_delivery(other_sub)
        await seen_by_other.ack()
        nacked_at = time.monotonic()
        await first.nack(delay=1.5)
        waiting = asyncio.create_task(next_delivery(waiting_sub, 30))
        await self.stop_server()
        await self.start_server()
        again = await waiting
        assert (again.envelope.data, again.attempt) == (b"retried", 2)
        assert time.monotonic() - nacked_at >= 1.5 - 0.02
        await again.ack()
        deadline = time.monotonic() + 10
        while True:
            try:
                await broker.publish(topic, [_envelope("after")])
                break
            except TransportError:
                assert time.monotonic() < deadline, "no publish after the restart"
                await asyncio.sleep(0.1)
        after = await next_delivery(waiting_sub, 10)
        assert after.envelope.data == b"after"
        await after.ack()
        for_other = await next_delivery(other_sub, 10)
        assert for_other.envelope.data == b"after", "the retry went to another group"
        await for_other.ack()

    async def test_a_wrong_password_is_broker_unavailable_and_never_shown(self) -> None:
        """A refused login is a :class:`BrokerUnavailableError` whose message names the redacted URL,
        never the password."""
        url = self.server.url().replace(self.server.password, "not-the-password-42")
        with pytest.raises(BrokerUnavailableError) as caught:
            await connect(url)
        assert "not-the-password-42" not in str(caught.value)
        assert ":***@" in str(caught.value)
        broker = await self.open()
        assert self.server.password not in broker.url


# -- the URL ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "target", "options"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", RedisOptions()),
        ("redis://localhost", "redis://localhost", RedisOptions()),
        (
            "redis://:p%40ss@h:1/2?prefix=app&lease=2.5&poll=0.2&durable=require&timeout=3&connect_timeout=1",
            "redis://:p%40ss@h:1/2",
            RedisOptions(prefix="app", lease=2.5, poll=0.2, durable="require", connect_timeout=1, timeout=3),
        ),
        ("redis://h/0?lease=1&lease=3", "redis://h/0", RedisOptions(lease=3)),
        (
            "rediss://u:pw@h:6380/0?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem",
            "rediss://u:pw@h:6380/0",
            RedisOptions(tls=(("ssl_ca_certs", "/ca.pem"), ("ssl_cert_reqs", "none"))),
        ),
    ],
)
def test_url_names_the_server_and_options(url: str, target: str, options: RedisOptions) -> None:
    """Host, port, credentials and database go to redis-py; the query holds callcast's options."""
    assert parse_url(url) == (target, options)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("amqp://h/0", "not a redis URL"),
        ("redis://h/zero", "database number"),
        ("redis://h:port/0", "invalid port"),
        ("redis://h/0?lease=soon", "lease must be"),
        ("redis://h/0?lease=0", "lease must be"),
        ("redis://h/0?poll=-1", "poll must be"),
        ("redis://h/0?timeout=inf", "timeout must be"),
        ("redis://h/0?lease=nan", "lease must be"),
        ("redis://h/0?prefix=", "prefix must be"),
        ("redis://h/0?durable=maybe", "durable must be"),
        ("redis://h/0?ssl_ca_certs=/ca.pem", "need a rediss:// URL"),
        ("rediss://h/0?ssl_cert_reqs=sometimes", "ssl_cert_reqs must be"),
        ("redis://h/0?leese=1", r"unknown option\(s\) leese"),
    ],
)
def test_a_bad_url_or_option_is_a_configuration_error(url: str, complaint: str) -> None:
    """A URL the adapter cannot honour fails before anything is opened, naming the problem; a misspelt
    option is not silently ignored."""
    with pytest.raises(ConfigurationError, match=complaint):
        RedisBroker(url)


def test_the_url_attribute_and_errors_never_show_the_password() -> None:
    """``url`` is the redacted URL; so is the URL quoted in a configuration error."""
    broker = RedisBroker("redis://user:hunter2@127.0.0.1:6379/0?prefix=x")
    assert broker.url == "redis://user:***@127.0.0.1:6379/0?prefix=x"
    with pytest.raises(ConfigurationError) as caught:
        RedisBroker("redis://user:hunter2@127.0.0.1:6379/0?nope=1")
    assert "hunter2" not in str(caught.value)


# -- against the shared server ----------------------------------------------------------------------


@pytest.fixture
async def broker() -> AsyncIterator[RedisBroker]:
    require_server("redis", PORT)
    opened = await connect(SHARED_URL)
    assert isinstance(opened, RedisBroker)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    """A plain client of the shared server, as another tool would use."""
    with redis.Redis(host=HOST, port=PORT) as client:
        yield client


def _data(fields: dict[bytes, bytes]) -> bytes:
    """The data of an entry callcast wrote (one structured-mode CloudEvent, field ``event``)."""
    return base64.b64decode(json.loads(fields[b"event"])["data_base64"])


async def test_the_keys_are_the_documented_ones(broker: RedisBroker, raw: redis.Redis) -> None:
    """A topic is the stream ``<prefix>:<topic>`` with one consumer group per callcast group; each
    group has its ``:direct`` stream and, while a retry waits, its ``:retry`` sorted set. ``:`` and
    ``%`` in names are escaped, so names cannot collide."""
    topic, group = f"shop:{_unique('orders')}", "billing%team"
    await broker.declare(topic, group)
    escaped_topic = topic.replace(":", "%3A")
    topic_key = f"{SHARED_PREFIX}:{escaped_topic}"
    direct_key = f"{topic_key}:billing%25team:direct"
    retry_key = f"{topic_key}:billing%25team:retry"
    assert raw.type(topic_key) == b"stream"
    assert raw.type(direct_key) == b"stream"
    assert [g["name"] for g in raw.xinfo_groups(topic_key)] == [group.encode()]
    assert [g["name"] for g in raw.xinfo_groups(direct_key)] == [group.encode()]

    sent = _envelope("hello").with_extensions(correlationid="c-1")
    await broker.publish(topic, [sent])
    [(_, fields)] = raw.xrange(topic_key)
    assert list(fields) == [b"event"]
    event = json.loads(fields[b"event"])
    assert (event["specversion"], event["id"], event["type"]) == ("1.0", sent.id, "T")
    assert (event["correlationid"], event["datacontenttype"]) == ("c-1", "application/json")
    assert _data(fields) == b"hello"

    subscription = await broker.subscribe(topic, group)
    delivery = await next_delivery(subscription)
    before = time.time() * 1000
    await delivery.nack(delay=30)
    [(member, due)] = raw.zrange(retry_key, 0, -1, withscores=True)
    entry_id = raw.xrange(topic_key)[0][0]
    assert member == b"t:" + entry_id
    assert before + 29_000 < due < before + 31_000
    [pending] = raw.xpending_range(topic_key, group, "-", "+", 10)
    assert (pending["consumer"], pending["times_delivered"]) == (PARKED.encode(), 1)

    await broker.publish(topic, [_envelope("direct")], group=group)
    assert raw.xlen(direct_key) == 1


async def test_nothing_is_stored_for_nobody(broker: RedisBroker, raw: redis.Redis) -> None:
    """A publish to a topic without groups, or for a group that was not declared, creates no key."""
    topic = _unique("nobody")
    await broker.publish(topic, [_envelope("lost")])
    await broker.publish(topic, [_envelope("lost")], group="ghost")
    assert list(raw.scan_iter(match=f"{SHARED_PREFIX}:{topic}*")) == []


async def test_a_foreign_entry_is_delivered_quarantined(broker: RedisBroker, raw: redis.Redis) -> None:
    """An entry another tool added that is not a CloudEvent does not stop the subscription: it is a
    ``callcast.undecodable`` envelope keeping the ``data`` field and the reason; the next follows."""
    topic, group = _unique("foreign"), _unique("reader")
    subscription = await broker.subscribe(topic, group)
    topic_key = broker.keys(topic, group).topic
    raw.xadd(topic_key, {"ce-id": "odd-1", "ce-source": "/x", "data": b"\xff\x00raw"})
    raw.xadd(topic_key, {"whatever": "value"})
    raw.xadd(topic_key, {"event": b"not json"})
    good = _envelope("good")
    await broker.publish(topic, [good])
    odd, bare, broken, last = [await next_delivery(subscription) for _ in range(4)]
    assert (odd.envelope.type, odd.envelope.id) == (UNDECODABLE_TYPE, "odd-1")
    assert odd.envelope.data == b"\xff\x00raw"
    assert "missing attribute" in odd.envelope.extensions["decodeerror"]
    assert (bare.envelope.type, bare.envelope.data) == (UNDECODABLE_TYPE, b"")
    assert (broken.envelope.type, broken.envelope.data) == (UNDECODABLE_TYPE, b"not json")
    assert "not a JSON event document" in broken.envelope.extensions["decodeerror"]
    assert last.envelope == good
    for delivery in (odd, bare, broken, last):
        await delivery.ack()


async def test_a_binary_mode_entry_is_read(broker: RedisBroker, raw: redis.Redis) -> None:
    """Entries whose fields are binary-mode headers and ``data`` (another tool, or an older callcast)
    are delivered as the envelopes they describe."""
    topic, group = _unique("binary"), _unique("reader")
    subscription = await broker.subscribe(topic, group)
    sent = _envelope("old style").with_extensions(correlationid="c-2")
    raw.xadd(broker.keys(topic, group).topic, {**sent.headers(), "data": sent.data})
    delivery = await next_delivery(subscription)
    assert delivery.envelope == sent
    await delivery.ack()


async def test_a_delayed_retry_survives_the_subscribers_process() -> None:
    """``nack(delay=...)`` is kept in Redis, not in a task: after every connection closed, a new one
    still gets the envelope only once its delay ran out, as attempt 2."""
    require_server("redis", PORT)
    topic, group = _unique("orders"), _unique("billing")
    first = await connect(SHARED_URL)
    subscription = await first.subscribe(topic, group)
    await first.publish(topic, [_envelope("later")])
    delivery = await next_delivery(subscription)
    nacked_at = time.monotonic()
    await delivery.nack(delay=1.0)
    await first.close()

    second = await connect(SHARED_URL)
    try:
        subscription = await second.subscribe(topic, group)
        again = await next_delivery(subscription, 6)
        assert time.monotonic() - nacked_at >= 1.0 - 0.02
        assert (again.envelope.data, again.attempt) == (b"later", 2)
        await again.ack()
    finally:
        await second.close()


async def test_settled_entries_are_trimmed_and_held_ones_kept(broker: RedisBroker, raw: redis.Redis) -> None:
    """Housekeeping trims a topic's stream up to the oldest entry some group still needs: acked
    entries go, an entry pending in any group (held, or waiting for a retry) and everything after
    it stays."""
    topic, fast, slow = _unique("trim"), _unique("fast"), _unique("slow")
    fast_sub = await broker.subscribe(topic, fast, prefetch=10)
    slow_sub = await broker.subscribe(topic, slow, prefetch=10)
    await broker.publish(topic, [_envelope(f"e{n}") for n in range(6)])
    topic_key = broker.keys(topic, fast).topic
    for delivery in [await next_delivery(fast_sub) for _ in range(6)]:
        await delivery.ack()
    slow_got = [await next_delivery(slow_sub) for _ in range(6)]
    for delivery in slow_got[:2]:
        await delivery.ack()
    await slow_got[3].nack(delay=0.5)
    await broker.housekeeping()
    assert [_data(fields) for _, fields in raw.xrange(topic_key)] == [b"e2", b"e3", b"e4", b"e5"]
    await slow_got[2].ack()
    await broker.housekeeping()
    assert [_data(fields) for _, fields in raw.xrange(topic_key)] == [b"e3", b"e4", b"e5"]
    for delivery in (slow_got[4], slow_got[5]):
        await delivery.ack()
    await broker.housekeeping()
    assert [_data(fields) for _, fields in raw.xrange(topic_key)] == [b"e3", b"e4", b"e5"]
    retried = await next_delivery(slow_sub)
    assert (retried.envelope.data, retried.attempt) == (b"e3", 2)
    await retried.ack()
    await broker.housekeeping()
    assert raw.xlen(topic_key) == 0


async def test_an_ephemeral_group_leaves_nothing_behind(broker: RedisBroker, raw: redis.Redis) -> None:
    """Closing an ephemeral subscription destroys its group, its direct stream and retry set, and the
    topic's stream once no group is left; so does housekeeping for one whose process died."""
    topic, group = _unique("replies"), _unique("client")
    subscription = await broker.subscribe(topic, group, ephemeral=True)
    keys = broker.keys(topic, group)
    assert raw.zscore(broker.registry, keys.member) is not None
    await broker.publish(topic, [_envelope("reply")])
    await (await next_delivery(subscription)).nack(delay=60)
    await subscription.close()
    assert raw.exists(keys.topic, keys.direct, keys.retry) == 0
    assert raw.zscore(broker.registry, keys.member) is None

    durable_group, dead_group = _unique("durable"), _unique("dead")
    await broker.declare(topic, durable_group)
    dead = broker.keys(topic, dead_group)
    raw.xgroup_create(dead.topic, dead_group, id="$", mkstream=True)
    raw.xgroup_create(dead.direct, dead_group, id="$", mkstream=True)
    raw.zadd(broker.registry, {dead.member: 1})  # last heartbeat long ago
    await broker.housekeeping()
    assert raw.exists(dead.direct) == 0
    assert [g["name"] for g in raw.xinfo_groups(dead.topic)] == [durable_group.encode()]
    assert raw.zscore(broker.registry, dead.member) is None


async def test_a_batch_is_one_round_trip(broker: RedisBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """A publish of many envelopes is sent in one write to the server (a pipeline)."""
    topic, group = _unique("batch"), _unique("counter")
    await broker.declare(topic, group)
    writes = 0
    connection_class = redis.asyncio.connection.AbstractConnection
    original = connection_class.send_packed_command

    async def counting(
        self: redis.asyncio.connection.AbstractConnection, *args: object, **kw: object
    ) -> None:
        nonlocal writes
        writes += 1
        await original(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(connection_class, "send_packed_command", counting)
    await broker.publish(topic, [_envelope(f"b{n}") for n in range(200)])
    monkeypatch.undo()
    assert writes == 1


async def test_new_connections_do_not_read_package_metadata(
    broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client identity is built once: a pool growing under load never reads redis-py's package
    metadata from disk on the event loop (redis-py 7.2+ does so per connection unless given one)."""
    import redis.utils

    reads = 0
    original = redis.utils.get_lib_version

    def counting() -> str:
        nonlocal reads
        reads += 1
        return str(original())

    monkeypatch.setattr(redis.utils, "get_lib_version", counting)
    for pool in broker._pools:
        for _ in range(3):
            pool.make_connection()
    assert reads == 0
    # The check can fail: a connection given no identity reads the metadata (on redis-py 7.2+).
    plain = redis.asyncio.connection.Connection(host=HOST, port=PORT)
    assert reads == (1 if hasattr(plain, "driver_info") else 0)


async def test_driver_errors_become_transport_errors(broker: RedisBroker, raw: redis.Redis) -> None:
    """What the driver raises reaches callers as the ``TransportError`` tree: a key of another type
    where a stream belongs, a server that is not there, a server that is not durable enough."""
    topic = _unique("clash")
    raw.set(broker.keys(topic, "g").topic, "not a stream")
    with pytest.raises(TransportError, match="WRONGTYPE"):
        await broker.declare(topic, "g")
    with pytest.raises(PublishError, match="not confirmed"):
        await broker.publish(topic, [_envelope("x")])
    with pytest.raises(BrokerUnavailableError) as caught:
        await connect(f"redis://:secret-77@{HOST}:{_free_port()}/0?connect_timeout=2")
    assert "secret-77" not in str(caught.value)
    with pytest.raises(ConfigurationError, match="durable=require"):
        await connect(f"{SHARED_URL}&durable=require")


async def test_publishing_after_close_is_broker_unavailable() -> None:
    """After ``close``, the broker refuses work with :class:`BrokerUnavailableError`; close twice is fine."""
    require_server("redis", PORT)
    broker = await connect(SHARED_URL)
    await broker.close()
    await broker.close()
    with pytest.raises(BrokerUnavailableError, match="closed"):
        await broker.publish("t", [_envelope("x")])


async def test_a_failed_call_loses_nothing_and_counts_right(
    broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a take's reply is lost (the server gave entries to this subscriber, it never saw them) or
    an ack fails, the subscriber gives back what it does not know at its next take: the lost take's
    entries come again as attempt 1 (they were never handed out), the delivery whose ack failed as
    attempt 2; nothing waits for the lease."""
    topic, group = _unique("lossy"), _unique("worker")
    subscription = await broker.subscribe(topic, group, prefetch=4)
    await broker.publish(topic, [_envelope("a"), _envelope("b")])
    real_script = broker._script
    failures = {"take": 1}

    async def reply_lost(script: Any, keys: Any, args: Any) -> Any:
        reply = await real_script(script, keys, args)
        if failures.get(script.name, 0) > 0:
            failures[script.name] -= 1
            raise BrokerUnavailableError("redis broker: the reply was lost")
        return reply

    monkeypatch.setattr(broker, "_script", reply_lost)
    first, second = await next_delivery(subscription), await next_delivery(subscription)
    assert [(d.envelope.data, d.attempt) for d in (first, second)] == [(b"a", 1), (b"b", 1)]
    await second.ack()

    real_scripts = broker._scripts

    async def settle_fails(calls: Any) -> Any:
        raise BrokerUnavailableError("redis broker: connection lost")

    monkeypatch.setattr(broker, "_scripts", settle_fails)
    with pytest.raises(BrokerUnavailableError):
        await first.ack()
    monkeypatch.setattr(broker, "_scripts", real_scripts)
    again = await next_delivery(subscription)
    assert (again.envelope.data, again.attempt) == (b"a", 2)
    await again.ack()
    marker = _envelope("marker")
    await broker.publish(topic, [marker])
    assert (await next_delivery(subscription)).envelope == marker


async def test_a_nack_here_ends_the_blocking_read_of_a_subscriber_here() -> None:
    """A subscriber of this connection blocked in its read (which would last 30 s here) is interrupted
    by a nack of the same connection (``CLIENT UNBLOCK``), takes the nacked delivery as the next
    attempt, and keeps its reading connection (the same client id)."""
    patient = await connect(f"redis://{HOST}:{PORT}/0?prefix={SHARED_PREFIX}&lease=60&poll=60")
    assert isinstance(patient, RedisBroker)
    try:
        topic, group = _unique("unblock"), _unique("workers")
        holder = await patient.subscribe(topic, group, prefetch=1)
        reader = await patient.subscribe(topic, group, prefetch=1)
        await patient.publish(topic, [_envelope("retried")])
        held = await next_delivery(holder)
        waiting = asyncio.create_task(next_delivery(reader, timeout=30))
        await wait_until(lambda: reader.blocked)
        client_id = reader.reader_id
        await held.nack()
        got = await asyncio.wait_for(waiting, 10)
        assert (got.envelope.data, got.attempt) == (b"retried", 2)
        assert reader.reader_id == client_id
        await got.ack()
    finally:
        await patient.close()


async def test_a_blocking_read_never_leaves_more_than_the_prefetch_held(
    broker: RedisBroker, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blocking read counts per stream: when entries reach the direct and the topic stream between
    a take that found nothing and the read, both are claimed, and the one beyond the free prefetch goes
    straight back, uncounted. ``holding`` hears of the surplus while the server counts it as ours."""
    topic, group = _unique("surplus"), _unique("one-at-a-time")
    holding = HoldingLog()
    told = holding.told
    subscription = await broker.subscribe(topic, group, prefetch=1, holding=holding)
    keys = broker.keys(topic, group)
    raw.xadd(keys.direct, {"event": to_structured(_envelope("direct"))})
    topic_id = raw.xadd(keys.topic, {"event": to_structured(_envelope("topic"))})
    take = broker._take
    takes = 0

    async def first_finds_nothing(*args: Any) -> Any:
        nonlocal takes
        takes += 1
        return _Taken([]) if takes == 1 else await take(*args)

    monkeypatch.setattr(broker, "_take", first_finds_nothing)
    first = await next_delivery(subscription)
    assert (first.envelope.data, first.attempt) == (b"direct", 1)
    assert subscription.held() == [first.token]
    assert raw.zrange(keys.retry, 0, -1) == [b"t:" + topic_id]  # the surplus, parked and due now
    assert told == [("fetched", b"direct"), ("fetched", b"topic"), ("returned", b"topic")]
    await first.ack()
    second = await next_delivery(subscription)
    assert (second.envelope.data, second.attempt) == (b"topic", 1)
    await second.ack()


@pytest.mark.parametrize(
    ("rule", "warns"),
    [("-@dangerous", True), ("-client", False)],  # no CLIENT UNBLOCK; no CLIENT command at all
)
async def test_a_user_without_client_commands_still_reads_and_retries(
    raw: redis.Redis, rule: str, warns: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Where ACLs forbid ``CLIENT ID`` or ``CLIENT UNBLOCK``, blocking reads still deliver, and a
    nack here reaches a waiting subscriber within ``poll`` (0.5 s here) instead of at once, said
    once in a warning when the unblock was refused."""
    require_server("redis", PORT)
    user, password = f"callcast-test-{RUN}", uuid.uuid4().hex
    raw.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys="*", channels="*", commands=["+@all", rule]
    )
    restricted = await connect(f"redis://{user}:{password}@{HOST}:{PORT}/0?prefix={SHARED_PREFIX}&{OPTIONS}")
    try:
        topic, group = _unique("acl"), _unique("workers")
        holder = await restricted.subscribe(topic, group, prefetch=1)
        reader = await restricted.subscribe(topic, group, prefetch=1)
        await restricted.publish(topic, [_envelope("first")])
        held = await next_delivery(holder)  # a blocking read or a take, whichever came first
        waiting = asyncio.create_task(next_delivery(reader, timeout=10))
        await wait_until(lambda: reader.blocked)
        await held.nack()
        got = await waiting
        assert (got.envelope.data, got.attempt) == (b"first", 2)
        await got.ack()
        refusals = [r for r in caplog.records if "CLIENT UNBLOCK is not allowed" in r.getMessage()]
        assert len(refusals) == (1 if warns else 0)
        assert password not in caplog.text
    finally:
        await restricted.close()
        raw.acl_deluser(user)


async def test_another_connection_sees_a_nack_or_a_close_within_poll() -> None:
    """A subscriber of another connection (as in another process) that already waits is not woken by
    a nack or a close here, but finds what they gave back within ``poll`` seconds (0.5 here; the
    lease, 10 s, is far from it), counted as the next attempt."""
    url = f"redis://{HOST}:{PORT}/0?prefix={SHARED_PREFIX}&lease=10&poll=0.5"
    broker, other = await connect(url), await connect(url)
    try:
        topic, group = _unique("handback"), _unique("workers")
        here = await broker.subscribe(topic, group, prefetch=2)
        there = await other.subscribe(topic, group)
        await broker.publish(topic, [_envelope("nacked"), _envelope("closed")])
        nacked = await next_delivery(here)
        await next_delivery(here)  # "closed": held until here.close()
        for give_back, expected in ((nacked.nack, b"nacked"), (here.close, b"closed")):
            waiting = asyncio.create_task(next_delivery(there))
            done, _ = await asyncio.wait({waiting}, timeout=0.1)
            assert not done, "nothing was available yet"
            started = time.monotonic()
            await give_back()
            got = await asyncio.wait_for(waiting, 10)
            assert time.monotonic() - started < 0.5 + 2.5, "found after the lease, not the poll"
            assert (got.envelope.data, got.attempt) == (expected, 2)
            await got.ack()
    finally:
        await other.close()
        await broker.close()


def _idle_ms(raw: redis.Redis, key: str, group: str) -> int:
    """How long the group's one pending entry of a stream has been idle (since delivered or renewed)."""
    [entry] = raw.xpending_range(key, group, "-", "+", 1)
    return int(entry["time_since_delivered"])


def _pending(raw: redis.Redis, key: str, group: str) -> list[tuple[bytes, bytes, int]]:
    """The group's pending entries of a stream: (entry id, consumer, delivery count), oldest first."""
    return [
        (p["message_id"], p["consumer"], p["times_delivered"])
        for p in raw.xpending_range(key, group, "-", "+", 100)
    ]


def _hold_settles(
    broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the broker's settle round trips wait: returns (reached, go): ``reached`` is set once a settle
    is about to be written, which waits until ``go`` is set. Other calls pass."""
    reached, go = asyncio.Event(), asyncio.Event()
    real_scripts = broker._scripts

    async def held_back(calls: Any) -> Any:
        if calls and calls[0][0].name == "settle":
            reached.set()
            await go.wait()
        return await real_scripts(calls)

    monkeypatch.setattr(broker, "_scripts", held_back)
    return reached, go


async def test_a_late_settle_of_an_older_delivery_leaves_the_newer_one_alone(
    broker: RedisBroker, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber that did not renew its lease (its housekeeping stalled) loses the entry to another
    one (which reclaims after 1 s) and gets it back after that one's nack: the late ack of its first
    delivery then changes nothing; the entry stays its own, and the newer delivery's ack settles it."""
    slow = await connect(f"redis://{HOST}:{PORT}/0?prefix={SHARED_PREFIX}&lease={LEASE:g}&poll=0.2")
    assert isinstance(slow, RedisBroker)

    async def stalled(*, trim: bool = True) -> None:
        """No renewal: as when the process stalls longer than its lease."""

    monkeypatch.setattr(slow, "housekeeping", stalled)
    try:
        topic, group = _unique("stale"), _unique("workers")
        here = await slow.subscribe(topic, group, prefetch=2)
        there = await broker.subscribe(topic, group)
        await broker.publish(topic, [_envelope("x")])
        old = await next_delivery(here)
        reclaimed = await next_delivery(there)
        assert (reclaimed.envelope.data, reclaimed.attempt) == (b"x", 2)
        await reclaimed.nack()
        newer = await next_delivery(here)
        assert (newer.envelope.data, newer.attempt, newer.token) == (b"x", 3, old.token)
        await old.ack()
        topic_key = broker.keys(topic, group).topic
        assert [(c, n) for _, c, n in _pending(raw, topic_key, group)] == [(here.consumer.encode(), 3)]
        assert here.held() == [newer.token]
        await newer.ack()
        assert _pending(raw, topic_key, group) == []
    finally:
        await slow.close()


async def test_a_failed_settle_never_gives_back_the_entry_taken_again(
    broker: RedisBroker, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nack reaches the server but its reply is lost, and a take that ran after it took the entry
    again: the give-back that follows the failure leaves the newer delivery held (it is neither handed
    out again nor counted again); the next take brings what came next."""
    topic, group = _unique("regained"), _unique("worker")
    subscription = await broker.subscribe(topic, group, prefetch=2)
    await broker.publish(topic, [_envelope("x")])
    first = await next_delivery(subscription)
    real_scripts = broker._scripts
    regained: list[Delivery] = []

    async def reply_lost_after_a_take(calls: Any) -> Any:
        replies = await real_scripts(calls)
        if calls[0][0].name == "settle" and not regained:
            regained.append(await next_delivery(subscription))  # taken again before the reply is lost
            raise BrokerUnavailableError("redis broker: the reply was lost")
        return replies

    monkeypatch.setattr(broker, "_scripts", reply_lost_after_a_take)
    with pytest.raises(BrokerUnavailableError):
        await first.nack()
    monkeypatch.setattr(broker, "_scripts", real_scripts)
    [again] = regained
    assert (again.envelope.data, again.attempt, again.token) == (b"x", 2, first.token)
    await broker.publish(topic, [_envelope("next")])
    after = await next_delivery(subscription)  # its take first gives back what the failure left unknown
    assert (after.envelope.data, after.attempt) == (b"next", 1)
    topic_key = broker.keys(topic, group).topic
    consumer = subscription.consumer.encode()
    assert [(c, n) for _, c, n in _pending(raw, topic_key, group)] == [(consumer, 2), (consumer, 1)]
    await again.ack()
    await after.ack()
    assert _pending(raw, topic_key, group) == []


async def test_holding_hears_the_return_of_a_failed_or_cancelled_settle(
    broker: RedisBroker, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``holding`` hears ``returned`` once per delivery it heard ``fetched`` of, also when the settle
    failed (the entry came back, counted) or its caller was cancelled (the ack is written anyway)."""
    topic, group = _unique("told"), _unique("worker")
    holding = HoldingLog()
    told = holding.told
    subscription = await broker.subscribe(topic, group, prefetch=2, holding=holding)
    await broker.publish(topic, [_envelope("failed"), _envelope("cancelled")])
    failed, cancelled = await next_delivery(subscription), await next_delivery(subscription)
    real_scripts = broker._scripts

    async def settle_fails(calls: Any) -> Any:
        if calls[0][0].name == "settle":
            raise BrokerUnavailableError("redis broker: connection lost")
        return await real_scripts(calls)

    monkeypatch.setattr(broker, "_scripts", settle_fails)
    with pytest.raises(BrokerUnavailableError):
        await failed.ack()
    monkeypatch.setattr(broker, "_scripts", real_scripts)
    reached, go = _hold_settles(broker, monkeypatch)
    acking = asyncio.create_task(cancelled.ack())
    await asyncio.wait_for(reached.wait(), 5)
    acking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await acking
    go.set()
    topic_key = broker.keys(topic, group).topic
    cancelled_id = cancelled.token[2:].encode()
    await wait_until(lambda: cancelled_id not in [i for i, _, _ in _pending(raw, topic_key, group)])
    again = await next_delivery(subscription)
    assert (again.envelope.data, again.attempt) == (b"failed", 2)
    await again.ack()
    assert _pending(raw, topic_key, group) == []
    fetched = sorted(data for what, data in told if what == "fetched")
    returned = sorted(data for what, data in told if what == "returned")
    assert fetched == returned == [b"cancelled", b"failed", b"failed"]


async def test_a_settle_waiting_to_be_written_keeps_its_lease(
    raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While an ack waits for its round trip, housekeeping still renews the entry's lease (its idle
    time starts again); another subscriber takes new work instead; the ack, once written, settles
    the entry."""
    require_server("redis", PORT)
    slow = await connect(f"redis://{HOST}:{PORT}/0?prefix={SHARED_PREFIX}&lease=60&poll=60")
    quick = await connect(f"redis://{HOST}:{PORT}/0?prefix={SHARED_PREFIX}&lease=0.4&poll=0.5")
    assert isinstance(slow, RedisBroker)
    reached, go = _hold_settles(slow, monkeypatch)
    try:
        topic, group = _unique("slow-ack"), _unique("workers")
        here = await slow.subscribe(topic, group)
        there = await quick.subscribe(topic, group, prefetch=1)
        await slow.publish(topic, [_envelope("x")])
        delivery = await next_delivery(here)
        acking = asyncio.create_task(delivery.ack())
        await asyncio.wait_for(reached.wait(), 5)
        topic_key = slow.keys(topic, group).topic
        await wait_until(lambda: _idle_ms(raw, topic_key, group) >= 500)
        await slow.housekeeping(trim=False)  # what it does every lease/3 on its own
        assert _idle_ms(raw, topic_key, group) < 500
        await slow.publish(topic, [_envelope("next")])
        got = await next_delivery(there)
        assert (got.envelope.data, got.attempt) == (b"next", 1)
        go.set()
        await asyncio.wait_for(acking, 5)
        assert [c for _, c, _ in _pending(raw, topic_key, group)] == [there.consumer.encode()]
        await got.ack()
    finally:
        go.set()
        await quick.close()
        await slow.close()


async def test_a_shorter_lease_elsewhere_does_not_take_a_live_delivery(raw: redis.Redis) -> None:
    """Processes of one group configured with different leases: one with ``lease=0.4`` does not
    take what a live one with ``lease=30`` holds once it was idle 0.4 s; it waits for the holder's
    lease (written in its consumer name), and takes new work instead."""
    require_server("redis", PORT)
    patient = await connect(f"redis://{HOST}:{PORT}/0?prefix={SHARED_PREFIX}&lease=30&poll=60")
    eager = await connect(f"redis://{HOST}:{PORT}/0?prefix={SHARED_PREFIX}&lease=0.4&poll=0.5")
    assert isinstance(patient, RedisBroker)
    try:
        topic, group = _unique("leases"), _unique("workers")
        here = await patient.subscribe(topic, group)
        there = await eager.subscribe(topic, group, prefetch=1)
        await patient.publish(topic, [_envelope("held")])
        held = await next_delivery(here)
        topic_key = patient.keys(topic, group).topic
        await wait_until(lambda: _idle_ms(raw, topic_key, group) >= 500)  # the holder renews every 10 s
        await patient.publish(topic, [_envelope("next")])
        got = await next_delivery(there)
        assert (got.envelope.data, got.attempt) == (b"next", 1)
        await got.ack()
        await held.ack()
        assert _pending(raw, topic_key, group) == []
    finally:
        await eager.close()
        await patient.close()


async def test_close_gives_back_a_delivery_whose_ack_is_unwritten_as_an_attempt(
    raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ack still not written when ``close`` stops waiting for it (after ``timeout``, 0.5 s here): the
    delivery was handed out, so it goes back keeping its count, and comes again as attempt 2."""
    require_server("redis", PORT)
    brief = await connect(f"{SHARED_URL}&timeout=0.5")
    assert isinstance(brief, RedisBroker)
    reached, go = _hold_settles(brief, monkeypatch)
    try:
        topic, group = _unique("unwritten"), _unique("workers")
        here = await brief.subscribe(topic, group)
        await brief.publish(topic, [_envelope("x")])
        delivery = await next_delivery(here)
        acking = asyncio.create_task(delivery.ack())
        await asyncio.wait_for(reached.wait(), 5)
        await here.close()
        topic_key = brief.keys(topic, group).topic
        assert [(c, n) for _, c, n in _pending(raw, topic_key, group)] == [(PARKED.encode(), 1)]
        go.set()
        await asyncio.wait_for(acking, 5)  # written after the give-back: it changes nothing
        other = await brief.subscribe(topic, group)
        again = await next_delivery(other)
        assert (again.envelope.data, again.attempt) == (b"x", 2)
        await again.ack()
    finally:
        go.set()
        await brief.close()


async def test_a_subscribe_racing_close_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``subscribe`` whose group declaration finishes after ``close`` began does not outlive the
    broker: it raises instead of returning a subscription no one closes."""
    require_server("redis", PORT)
    declared = Pause(monkeypatch, RedisBroker, "_declare")
    broker = await connect(SHARED_URL)
    await close_during(broker, broker.subscribe(_unique("race"), _unique("group")), declared)
