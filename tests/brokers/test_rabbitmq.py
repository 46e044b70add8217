"""RabbitMQ (``amqp://``) against the shared conformance suite, plus what only this adapter has: its
URL and options, its topology names, the CloudEvents AMQP binding on the wire (read back with the
CloudEvents SDK), the retry buckets, reconnecting, and driver errors translated.

Everything runs against the real server on 127.0.0.1:5672. Every name this module creates lives under
one per-run prefix (``callcast-test-<run>``: the exchange option of every URL), and the module deletes
every queue and exchange under it when it ends. The restart test stops and starts the RabbitMQ
*application* of the node (``rabbitmqctl stop_app`` / ``start_app``): connections drop as in a
restart while the node and its quorum queues stay; it is the only test that does.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime

import aio_pika
import aio_pika.abc
import aiormq.exceptions
import pytest
from cloudevents.core.bindings import amqp as ce_amqp
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from callcast.brokers import connect
from callcast.brokers.rabbitmq import (
    ATTEMPTS_HEADER,
    RabbitBroker,
    _GroupReader,
    _RabbitDelivery,
    parse_url,
    queue_name,
    retry_bucket,
    retry_queue_name,
)
from callcast.envelope import UNDECODABLE_TYPE, Envelope
from callcast.exceptions import BrokerUnavailableError, ConfigurationError, TransportError
from callcast.testing import BrokerConformance
from callcast.testing.sweep import sweep_rabbitmq
from callcast.transport import Broker, Capabilities
from tests.brokers.conftest import (
    Pause,
    RecordingHolding,
    close_during,
    next_delivery,
    require_server,
    server_is_up,
)

pytestmark = pytest.mark.rabbitmq

HOST, PORT = "127.0.0.1", 5672
RUN = f"callcast-test-{uuid.uuid4().hex[:12]}"
"""Prefix of every exchange and queue this module creates; deleted when the module ends."""
RAW_URL = f"amqp://guest:guest@{HOST}:{PORT}/"
HEARTBEAT = 1
LEASE = 2.0
URL = f"{RAW_URL}?exchange={RUN}&heartbeat={HEARTBEAT}&timeout=2"
RABBITMQCTL = shutil.which("rabbitmqctl")
_app_stopped = False


def _ctl(*args: str, timeout: float = 60) -> str:
    """Run ``rabbitmqctl`` on the local node; its output."""
    assert RABBITMQCTL is not None
    result = subprocess.run(
        [RABBITMQCTL, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def _start_app() -> None:
    global _app_stopped
    _ctl("start_app", timeout=120)
    _ctl("await_startup", timeout=120)
    _app_stopped = False


async def _wait_for_port(up: bool, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while server_is_up(HOST, PORT, timeout=0.5) != up:
        if loop.time() > deadline:
            raise TimeoutError(f"RabbitMQ port {PORT} still {'down' if up else 'up'} after {timeout}s")
        await asyncio.sleep(0.05)


def _names(kind: str) -> list[str]:
    return [
        line.split("\t")[0]
        for line in _ctl(f"list_{kind}", "--quiet", "--no-table-headers", "name").splitlines()
    ]


@pytest.fixture(scope="module", autouse=True)
def _run_namespace() -> Iterator[None]:
    """The server must be up; when the module ends, the app runs again and this run's names are gone."""
    require_server("RabbitMQ", PORT, HOST)
    yield
    if _app_stopped:
        _start_app()
    if RABBITMQCTL is not None:
        asyncio.run(sweep_rabbitmq(RAW_URL, RUN))


@pytest.fixture
async def raw() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A plain aio-pika channel, as another tool reading callcast's traffic would open."""
    connection = await aio_pika.connect(RAW_URL)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


def unique(label: str) -> str:
    return f"rabbit.{label}.{uuid.uuid4().hex[:12]}"


async def _until(condition: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Wait until ``condition()`` is true; fail naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.01)


class TestRabbitBroker(BrokerConformance):
    lease = LEASE  # a silent peer is dropped after 2-3 heartbeats; a killed one at once
    can_restart = RABBITMQCTL is not None

    async def make_broker(self) -> Broker:
        return await connect(URL)

    def process_url(self) -> str:
        return URL

    async def stop_server(self) -> None:
        global _app_stopped
        _app_stopped = True
        try:
            await asyncio.to_thread(_ctl, "stop_app", timeout=120)
            await _wait_for_port(up=False, timeout=30)
        except BaseException:
            await asyncio.to_thread(_start_app)
            raise

    async def start_server(self) -> None:
        await asyncio.to_thread(_start_app)
        await _wait_for_port(up=True, timeout=30)

    async def test_capabilities(self) -> None:
        """Durable quorum queues shared by every process; delayed retries and the attempt count are
        the broker's; per-key order is not guaranteed across competing consumers."""
        broker = await self.open()
        assert isinstance(broker, RabbitBroker)
        assert broker.capabilities == Capabilities(
            durable=True,
            shared=True,
            delayed_nack=True,
            delivery_count=True,
            ordered_per_key=False,
            request_reply=False,
            replays_history=False,
        )


# -- the URL ------------------------------------------------------------------------------------


def test_url_options_are_read_and_the_rest_goes_to_the_client() -> None:
    """``exchange`` and ``timeout`` are callcast's, ``heartbeat``, ``name`` and TLS options the
    client's; the vhost stays in the path; the password is only in the client's URL."""
    settings = parse_url("amqp://ann:s3cret@rabbit:5673/prod?exchange=shop&timeout=2.5&heartbeat=5")
    assert settings.exchange == "shop"
    assert settings.timeout == 2.5
    assert settings.heartbeat == 5
    assert settings.client_url == "amqp://ann:s3cret@rabbit:5673/prod?heartbeat=5&name=callcast"
    assert "s3cret" not in repr(settings)
    defaults = parse_url("amqps://rabbit/")
    assert (defaults.exchange, defaults.timeout, defaults.heartbeat) == ("callcast", 10.0, None)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://localhost:6379", "not an amqp"),
        ("amqp:///vhost", "names no host"),
        ("amqp://localhost:notaport/", "invalid port"),
        ("amqp://localhost/?exchange=", "exchange must be"),
        ("amqp://localhost/?exchange=amq.topic", "exchange must be"),
        ("amqp://localhost/?exchange=a/b", "exchange must be"),
        ("amqp://localhost/?timeout=0", "timeout must be"),
        ("amqp://localhost/?timeout=soon", "timeout must be"),
        ("amqp://localhost/?timeout=inf", "timeout must be"),
        ("amqp://localhost/?heartbeat=-1", "heartbeat must be"),
        ("amqp://localhost/?heartbeat=fast", "heartbeat must be"),
        ("amqp://localhost/?exchnage=x", "unknown option(s) exchnage"),
    ],
)
def test_a_bad_url_or_option_is_a_configuration_error(url: str, complaint: str) -> None:
    """A URL the adapter cannot honour fails before anything is opened, naming the problem."""
    with pytest.raises(ConfigurationError, match=re.escape(complaint)):
        RabbitBroker(url)


def test_the_url_attribute_hides_the_password() -> None:
    broker = RabbitBroker("amqp://ann:s3cret@rabbit:5672/prod?exchange=shop")
    assert broker.url == "amqp://ann:***@rabbit:5672/prod?exchange=shop"


# -- names --------------------------------------------------------------------------------------


def test_queue_names_are_readable_and_never_collide() -> None:
    """``<exchange>/<topic>/<group>``, with ``/`` and ``%`` escaped inside the parts; a name too long
    for AMQP is cut and made unique by a hash."""
    assert queue_name("callcast", "UserSignedUp", "emails.welcome") == "callcast/UserSignedUp/emails.welcome"
    assert queue_name("cc", "a/b", "c") != queue_name("cc", "a", "b/c")
    assert queue_name("cc", "a/b", "c") == "cc/a%2Fb/c"
    assert queue_name("cc", "a%2Fb", "c") == "cc/a%252Fb/c"
    long_a, long_b = queue_name("cc", "t" * 300, "g1"), queue_name("cc", "t" * 300, "g2")
    assert long_a != long_b
    assert len(long_a.encode()) <= 200
    assert retry_queue_name("cc/t/g", 1300) == "cc/t/g/retry/1300ms"


@pytest.mark.parametrize(
    ("delay", "bucket"),
    [
        (0.0001, 1),
        (0.001, 1),
        (0.0042, 5),
        (0.01, 10),
        (0.05, 50),
        (0.099, 100),
        (0.3, 320),
        (1.0, 1000),
        (1.234, 1300),
        (2.6, 3200),
        (30.0, 32000),
    ],
)
def test_a_delay_is_rounded_up_to_a_few_buckets(delay: float, bucket: int) -> None:
    """A retry is never early and at most 28% late (R10 series), so a group needs few buckets."""
    assert retry_bucket(delay) == bucket
    assert delay * 1000 - 1e-9 <= retry_bucket(delay) <= max(delay * 1000 * 1.28, 10)
    assert len({retry_bucket(0.1 * 1.01**n) for n in range(580)}) <= 26  # 0.1 s to 30 s


# -- against the server --------------------------------------------------------------------------


async def test_a_published_envelope_is_a_cloudevent_for_the_sdk(raw: aio_pika.abc.AbstractChannel) -> None:
    """On the wire, an envelope is a CloudEvent in the binary mode of the AMQP binding: the official
    CloudEvents SDK reads a message taken with a plain aio-pika consumer from the group's queue (by
    its documented name) into the same event."""
    broker = await connect(URL)
    try:
        topic, group = unique("UserSignedUp"), unique("emails")
        await broker.declare(topic, group)
        sent = Envelope(
            type="UserSignedUp",
            source="/shop/users",
            data=b'{"user_id":"u1","email":"ann@example.com"}',
            subject="u1",
            extensions={"correlationid": "corr-9", "partitionkey": "u1"},
        )
        await broker.publish(topic, [sent])
        queue = await raw.declare_queue(queue_name(RUN, topic, group), passive=True)
        message = await _get(queue)
        await message.ack()
    finally:
        await broker.close()
    assert message.content_type == "application/json"
    assert message.headers["cloudEvents_type"] == "UserSignedUp"
    event = ce_amqp.from_binary(
        ce_amqp.AMQPMessage(
            properties={"content-type": message.content_type},
            application_properties=dict(message.headers),
            application_data=message.body,
        ),
        JSONFormat(),
        CloudEvent,
    )
    assert event.get_type() == "UserSignedUp"
    assert event.get_source() == "/shop/users"
    assert event.get_id() == sent.id
    assert event.get_specversion() == "1.0"
    assert event.get_subject() == "u1"
    assert event.get_data() == {"user_id": "u1", "email": "ann@example.com"}
    assert event.get_extension("correlationid") == "corr-9"


async def test_an_event_sent_by_the_sdk_is_an_envelope(raw: aio_pika.abc.AbstractChannel) -> None:
    """The other way round: a CloudEvent the SDK put in an AMQP message (``cloudEvents_`` headers,
    an AMQP timestamp for ``time``) and a plain client published reaches a subscriber intact."""
    broker = await connect(URL)
    try:
        topic, group = unique("OrderPlaced"), unique("billing")
        subscription = await broker.subscribe(topic, group)
        event = CloudEvent(
            attributes={
                "type": "OrderPlaced",
                "source": "/sdk",
                "id": "sdk-1",
                "time": datetime(2024, 2, 29, 12, 0, 0, 250000, tzinfo=UTC),
                "datacontenttype": "application/json",
                "orderid": "o-7",
            },
            data={"total": 12},
        )
        message = ce_amqp.to_binary(event, JSONFormat())
        await (await raw.get_exchange(RUN, ensure=False)).publish(
            aio_pika.Message(
                message.application_data,
                headers=message.application_properties,
                content_type=message.properties["content-type"],
            ),
            routing_key=topic,
        )
        delivery = await next_delivery(subscription)
        await delivery.ack()
    finally:
        await broker.close()
    envelope = delivery.envelope
    assert (envelope.type, envelope.source, envelope.id) == ("OrderPlaced", "/sdk", "sdk-1")
    assert envelope.extensions == {"orderid": "o-7"}
    assert json.loads(envelope.data) == {"total": 12}
    assert envelope.time == "2024-02-29T12:00:00.250Z"
    assert envelope.datacontenttype == "application/json"


async def test_the_group_queue_is_a_quorum_queue_bound_to_a_topic_exchange(
    raw: aio_pika.abc.AbstractChannel,
) -> None:
    """The documented topology: a durable topic exchange, one durable quorum queue per (topic,
    group) bound with the topic; a delayed retry goes through the group's retry bucket."""
    broker = await connect(URL)
    try:
        topic, group = unique("topic"), unique("group")
        subscription = await broker.subscribe(topic, group)
        await broker.publish(topic, [Envelope(type="T", source="/s", data=b"x")])
        delivery = await next_delivery(subscription)
        await delivery.nack(delay=30)
        queues = {
            name: kind
            for name, kind in (
                line.split("\t")
                for line in (
                    await asyncio.to_thread(
                        _ctl, "list_queues", "--quiet", "--no-table-headers", "name", "type"
                    )
                ).splitlines()
            )
        }
        exchanges = dict(
            line.split("\t")
            for line in (
                await asyncio.to_thread(
                    _ctl, "list_exchanges", "--quiet", "--no-table-headers", "name", "type"
                )
            ).splitlines()
        )
    finally:
        await broker.close()
    group_queue = queue_name(RUN, topic, group)
    assert queues[group_queue] == "quorum"
    assert queues[retry_queue_name(group_queue, retry_bucket(30))] == "quorum"
    assert exchanges[RUN] == "topic"
    # The binding: publishing to the exchange with the topic as routing key reaches the queue.
    await (await raw.get_exchange(RUN, ensure=False)).publish(aio_pika.Message(b"probe"), routing_key=topic)
    queue = await raw.declare_queue(group_queue, passive=True)
    assert (await _get(queue)).body == b"probe"


async def test_a_delayed_retry_reaches_only_its_group_and_counts_as_the_next_attempt() -> None:
    """``nack(delay)`` goes through the group's own retry bucket: the other group of the topic never
    sees the retry, the group gets it after the delay as attempt 2, and a second delayed nack makes
    attempt 3 (the count survives the copies)."""
    broker = await connect(URL)
    try:
        topic, retrying, other = unique("topic"), unique("retrying"), unique("other")
        retrying_sub = await broker.subscribe(topic, retrying)
        other_sub = await broker.subscribe(topic, other)
        await broker.publish(topic, [Envelope(type="T", source="/s", data=b"flaky")])
        seen = await next_delivery(other_sub)
        await seen.ack()
        attempts = []
        for _ in range(2):
            delivery = await next_delivery(retrying_sub)
            attempts.append(delivery.attempt)
            await delivery.nack(delay=0.2)
        last = await next_delivery(retrying_sub)
        attempts.append(last.attempt)
        await last.ack()
        assert attempts == [1, 2, 3]
        marker = Envelope(type="T", source="/s", data=b"marker")
        await broker.publish(topic, [marker])
        following = await next_delivery(other_sub)
        assert following.envelope.data == b"marker", "the retry reached another group"
        await following.ack()
    finally:
        await broker.close()


async def test_an_endless_delay_waits_in_the_longest_bucket(raw: aio_pika.abc.AbstractChannel) -> None:
    """``nack(delay=inf)``, or a delay too large to count in milliseconds, settles the delivery like
    the longest delay (~49 days): the copy waits in the longest retry bucket, the group's queue keeps
    nothing, and the holding hears the deliveries returned."""
    broker = await connect(URL)
    holding = RecordingHolding()
    try:
        topic, group = unique("topic"), unique("group")
        subscription = await broker.subscribe(topic, group, holding=holding)
        await broker.publish(topic, [Envelope(type="T", source="/s", data=b"x") for _ in range(2)])
        for delay in (math.inf, 1e308):
            delivery = await next_delivery(subscription)
            await delivery.nack(delay=delay)
        assert holding.held == set()
    finally:
        await broker.close()
    group_queue = queue_name(RUN, topic, group)
    longest = retry_queue_name(group_queue, 2**32 - 1 - 15 * 60 * 1000)  # ms, the bucket's TTL
    assert (await raw.declare_queue(longest, passive=True)).declaration_result.message_count == 2
    assert (await raw.declare_queue(group_queue, passive=True)).declaration_result.message_count == 0


async def test_a_subscription_that_joins_holds_what_the_group_buffered() -> None:
    """A second subscription of a group in the same broker shares the group's buffer: its holding
    hears of what is buffered already when it joins, so it never hands out (or returns) a delivery
    its holding did not hear of."""
    broker = await connect(URL)
    first_holding, second_holding = RecordingHolding(), RecordingHolding()
    try:
        topic, group = unique("topic"), unique("group")
        first = await broker.subscribe(topic, group, prefetch=1, holding=first_holding)
        sent = Envelope(type="T", source="/s", data=b"buffered")
        await broker.publish(topic, [sent])
        await _until(lambda: sent.id in first_holding.held, "the envelope never reached the buffer")
        second = await broker.subscribe(topic, group, prefetch=1, holding=second_holding)
        delivery = await next_delivery(second)
        assert delivery.envelope.id == sent.id
        assert sent.id in second_holding.held, "handed out a delivery its holding never heard of"
        assert first_holding.held == set()
        await delivery.ack()
        assert (second_holding.held, second_holding.unknown) == (set(), [])
        await first.close()
    finally:
        await broker.close()


async def test_a_forged_attempts_header_is_not_believed(raw: aio_pika.abc.AbstractChannel) -> None:
    """The attempts stamp counts only on a message RabbitMQ dead-lettered out of the group's own
    retry bucket; a publisher that sets it (and even a fake ``x-death``) gets attempt 1."""
    broker = await connect(URL)
    try:
        topic, group = unique("topic"), unique("group")
        subscription = await broker.subscribe(topic, group)
        headers = {
            "cloudEvents_specversion": "1.0",
            "cloudEvents_id": "forged",
            "cloudEvents_type": "T",
            "cloudEvents_source": "/s",
            ATTEMPTS_HEADER: 7,
        }
        exchange = await raw.get_exchange(RUN, ensure=False)
        await exchange.publish(aio_pika.Message(b"a", headers=headers), routing_key=topic)
        fake_death = [{"queue": "elsewhere/retry/5ms", "reason": "expired", "count": 1}]
        await exchange.publish(
            aio_pika.Message(b"b", headers={**headers, "x-death": fake_death}), routing_key=topic
        )
        got = [await next_delivery(subscription) for _ in range(2)]
        assert [(d.envelope.data, d.attempt) for d in got] == [(b"a", 1), (b"b", 1)]
        for delivery in got:
            await delivery.ack()
    finally:
        await broker.close()


async def test_a_foreign_message_is_delivered_quarantined(raw: aio_pika.abc.AbstractChannel) -> None:
    """A message on the exchange that is not a CloudEvent does not break the subscription: it is a
    ``callcast.undecodable`` envelope with the body and the reason, and the next one follows."""
    broker = await connect(URL)
    try:
        topic, group = unique("topic"), unique("group")
        subscription = await broker.subscribe(topic, group)
        exchange = await raw.get_exchange(RUN, ensure=False)
        await exchange.publish(aio_pika.Message(b"just bytes", headers={"x": 1}), routing_key=topic)
        await exchange.publish(
            aio_pika.Message(b"old", headers={"cloudEvents_id": "i", "cloudEvents_specversion": "0.3"}),
            routing_key=topic,
        )
        good = Envelope(type="T", source="/s", data=b"good")
        await broker.publish(topic, [good])
        got = [await next_delivery(subscription) for _ in range(3)]
        for delivery in got:
            await delivery.ack()
    finally:
        await broker.close()
    assert [d.envelope.type for d in got[:2]] == [UNDECODABLE_TYPE] * 2
    assert [d.envelope.data for d in got[:2]] == [b"just bytes", b"old"]
    assert "missing attribute" in got[0].envelope.extensions["decodeerror"]
    assert got[1].envelope.id == "i"
    assert got[2].envelope == good


async def test_an_ephemeral_queue_is_exclusive_and_deleted_on_close(
    raw: aio_pika.abc.AbstractChannel,
) -> None:
    """An ephemeral subscription is an exclusive queue of its connection, deleted when it closes."""
    broker = await connect(URL)
    try:
        topic, group = unique("replies"), unique("replies")
        subscription = await broker.subscribe(topic, group, ephemeral=True)
        name = queue_name(RUN, topic, group)
        with pytest.raises(aiormq.exceptions.ChannelLockedResource):
            await raw.declare_queue(name, passive=True)
        await subscription.close()
    finally:
        await broker.close()
    connection = await aio_pika.connect(RAW_URL)
    try:
        probe = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await probe.declare_queue(name, passive=True)
    finally:
        await connection.close()


async def test_an_ephemeral_queue_keeps_its_messages_when_its_channel_closes() -> None:
    """Only the connection's end (or the subscription's close) deletes an ephemeral queue: when the
    reader's channel alone closes, the unacked delivery and a message published meanwhile wait in
    the queue and come on the restored channel."""
    broker = await connect(URL)
    try:
        assert isinstance(broker, RabbitBroker)
        topic, group = unique("replies"), unique("replies")
        subscription = await broker.subscribe(topic, group, ephemeral=True)
        await broker.publish(topic, [Envelope(type="T", source="/s", data=b"held")])
        held = await next_delivery(subscription)
        assert held.envelope.data == b"held"
        channel = broker._readers[(topic, group)].channel
        assert channel is not None
        await channel.close()
        await broker.publish(topic, [Envelope(type="T", source="/s", data=b"meanwhile")])
        got = []
        for _ in range(2):
            delivery = await next_delivery(subscription, 10)
            got.append(delivery.envelope.data)
            await delivery.ack()
        assert sorted(got) == [b"held", b"meanwhile"]
        await subscription.close()
    finally:
        await broker.close()


async def test_an_ephemeral_queue_is_deleted_on_close_while_its_channel_is_being_restored(
    raw: aio_pika.abc.AbstractChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closed while its channel is down (the restore not done yet), an ephemeral subscription
    still deletes its queue: nothing is kept for it while the connection lives on."""

    async def restore_later(self: _GroupReader) -> None:
        """The restore has not got anywhere yet."""

    monkeypatch.setattr(_GroupReader, "_restore", restore_later)
    broker = await connect(URL)
    try:
        assert isinstance(broker, RabbitBroker)
        topic, group = unique("replies"), unique("replies")
        subscription = await broker.subscribe(topic, group, ephemeral=True)
        channel = broker._readers[(topic, group)].channel
        assert channel is not None
        await channel.close()
        await subscription.close()
        name = queue_name(RUN, topic, group)
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await raw.declare_queue(name, passive=True)
    finally:
        await broker.close()


async def test_a_subscribe_racing_close_is_closed_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``subscribe`` that finishes opening its consumer after ``close`` began does not outlive the
    broker: it is closed and raises, rather than returning a subscription no one will close."""
    opened = Pause(monkeypatch, _GroupReader, "start")
    broker = await connect(URL)
    await close_during(broker, broker.subscribe(unique("topic"), unique("group")), opened)


async def test_a_subscription_resumes_after_the_server_drops_its_connection() -> None:
    """Reconnect without restarting the node: RabbitMQ closes this broker's connection (as in a
    restart); the held delivery is requeued (its ack raises BrokerUnavailableError, nothing else
    breaks), the same subscription gets it again as attempt 2, and publishing works again."""
    name = f"{RUN}-drop-{uuid.uuid4().hex[:8]}"
    broker = await connect(f"{URL}&name={name}")
    try:
        topic, group = unique("topic"), unique("group")
        subscription = await broker.subscribe(topic, group)
        await broker.publish(topic, [Envelope(type="T", source="/s", data=b"held")])
        held = await next_delivery(subscription)
        await asyncio.to_thread(_close_connection_named, name)
        again = await next_delivery(subscription, 15)
        assert (again.envelope.data, again.attempt) == (b"held", 2)
        with pytest.raises(BrokerUnavailableError):
            await held.ack()
        await again.ack()
        await broker.publish(topic, [Envelope(type="T", source="/s", data=b"after")])
        after = await next_delivery(subscription)
        assert after.envelope.data == b"after"
        await after.ack()
    finally:
        await broker.close()


async def test_while_the_server_is_unreachable_calls_fail_fast_and_close_still_works() -> None:
    """Through a TCP proxy this test cuts and restores (the node itself keeps running): while the
    broker is unreachable a publish raises a TransportError within ``?timeout=`` (it neither hangs
    nor returns); once it is reachable again the same objects publish and consume; and closing a
    broker that is cut off returns promptly and ends its consumers."""
    proxy = _Proxy()
    await proxy.start()
    broker = await connect(f"amqp://guest:guest@{HOST}:{proxy.port}/?exchange={RUN}&timeout=1&heartbeat=1")
    try:
        topic, group = unique("topic"), unique("group")
        subscription = await broker.subscribe(topic, group)
        await proxy.stop()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TransportError):
            await broker.publish(topic, [Envelope(type="T", source="/s", data=b"lost")])
        assert loop.time() - started < 5
        await proxy.start()
        deadline = loop.time() + 15
        while True:
            try:
                await broker.publish(topic, [Envelope(type="T", source="/s", data=b"back")])
                break
            except TransportError:
                assert loop.time() < deadline, "no publish succeeded after the broker was reachable again"
                await asyncio.sleep(0.1)
        delivery = await next_delivery(subscription, 10)
        assert delivery.envelope.data == b"back"
        await delivery.ack()
        waiting = asyncio.create_task(subscription.__anext__())
        await proxy.stop()
        closing_started = loop.time()
        await asyncio.wait_for(broker.close(), 10)
        assert loop.time() - closing_started < 5
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, 5)
    finally:
        await broker.close()
        await proxy.stop()


async def test_a_subscription_outlives_its_queue_being_deleted(raw: aio_pika.abc.AbstractChannel) -> None:
    """When someone deletes a group's queue, RabbitMQ cancels its consumers; the subscription
    declares the queue again and goes on receiving what is published afterwards."""
    broker = await connect(URL)
    try:
        topic, group = unique("topic"), unique("group")
        subscription = await broker.subscribe(topic, group)
        waiting = asyncio.create_task(subscription.__anext__())
        name = queue_name(RUN, topic, group)
        await raw.queue_delete(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while name not in await asyncio.to_thread(_names, "queues"):
            assert loop.time() < deadline, "the queue was not declared again"
            await asyncio.sleep(0.1)
        await broker.publish(topic, [Envelope(type="T", source="/s", data=b"after")])
        delivery = await asyncio.wait_for(waiting, 10)
        assert (delivery.envelope.data, delivery.attempt) == (b"after", 1)
        await delivery.ack()
    finally:
        await broker.close()


async def test_driver_errors_surface_as_transport_errors(raw: aio_pika.abc.AbstractChannel) -> None:
    """Connection trouble is BrokerUnavailableError without the password in it; a name RabbitMQ
    refuses (a queue or exchange that exists with other arguments) is a TransportError naming it;
    a topic that would be a binding wildcard is a configuration error."""
    with pytest.raises(BrokerUnavailableError, match="cannot connect") as refused:
        await connect(f"amqp://guest:s3cret-pw@{HOST}:1/?exchange={RUN}&timeout=2")
    assert "s3cret-pw" not in str(refused.value)
    with pytest.raises(BrokerUnavailableError) as denied:
        await connect(f"amqp://guest:wrong-s3cret@{HOST}:{PORT}/?exchange={RUN}&timeout=2")
    assert "wrong-s3cret" not in str(denied.value)
    assert denied.value.__cause__ is None

    taken = f"{RUN}-direct"
    await raw.declare_exchange(taken, aio_pika.ExchangeType.DIRECT)
    with pytest.raises(TransportError, match=re.escape(taken)) as clash:
        await connect(f"{RAW_URL}?exchange={taken}&timeout=2")
    assert not isinstance(clash.value, aiormq.exceptions.AMQPError)

    broker = await connect(URL)
    try:
        topic, group = unique("topic"), unique("group")
        await raw.declare_queue(queue_name(RUN, topic, group), durable=True)  # classic, not quorum
        with pytest.raises(TransportError, match="cannot declare queue") as mismatch:
            await broker.subscribe(topic, group)
        assert not isinstance(mismatch.value, aiormq.exceptions.AMQPError)
        with pytest.raises(ConfigurationError, match="may not contain"):
            await broker.publish("orders.*", [Envelope(type="T", source="/s", data=b"")])
        # The broker still works after the refused declaration.
        other = unique("group")
        subscription = await broker.subscribe(topic, other)
        await broker.publish(topic, [Envelope(type="T", source="/s", data=b"fine")])
        delivery = await next_delivery(subscription)
        await delivery.ack()
    finally:
        await broker.close()


async def test_a_publish_to_an_undeclared_group_stores_nothing(raw: aio_pika.abc.AbstractChannel) -> None:
    """``publish(group=G)`` for a group that was never declared is accepted and kept nowhere: no
    queue is made for it, and the topic's declared group gets nothing."""
    broker = await connect(URL)
    try:
        topic, declared, nobody = unique("topic"), unique("group"), unique("nobody")
        await broker.declare(topic, declared)
        await broker.publish(topic, [Envelope(type="T", source="/s", data=b"x")], group=nobody)
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await raw.declare_queue(queue_name(RUN, topic, nobody), passive=True)
    finally:
        await broker.close()
    async with await aio_pika.connect(RAW_URL) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name(RUN, topic, declared), passive=True)
        assert queue.declaration_result.message_count == 0


async def _recorded_acks(subscription: object) -> list[tuple[int, bool]]:
    """The ``basic.ack`` frames the subscription's channel writes from now on: (tag, multiple)."""
    reader = getattr(subscription, "reader", None)
    assert isinstance(reader, _GroupReader)
    assert reader.channel is not None
    underlay = await reader.channel.get_underlay_channel()
    written: list[tuple[int, bool]] = []
    send = underlay.basic_ack

    async def recording(delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        written.append((delivery_tag, multiple))
        await send(delivery_tag, multiple=multiple, wait=wait)

    underlay.basic_ack = recording  # type: ignore[method-assign]
    return written


async def _ready_in(queue: str) -> int:
    """Messages ready in ``queue`` (unacked ones of a closed broker are back among them)."""
    async with await aio_pika.connect(RAW_URL) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


async def test_acks_of_one_loop_turn_are_one_multiple_ack() -> None:
    """Deliveries acked together, in the order RabbitMQ gave them, are settled by one
    ``basic.ack`` with ``multiple`` up to the last of them; the queue keeps none of them."""
    broker = await connect(URL)
    topic, group = unique("topic"), unique("group")
    try:
        subscription = await broker.subscribe(topic, group, prefetch=8)
        await broker.publish(topic, [Envelope(type="T", source="/s", data=b"%d" % n) for n in range(5)])
        deliveries = [await next_delivery(subscription) for _ in range(5)]
        written = await _recorded_acks(subscription)
        await asyncio.gather(*(delivery.ack() for delivery in deliveries))
        tags = [delivery.tag for delivery in deliveries if isinstance(delivery, _RabbitDelivery)]
        assert len(tags) == 5
        assert written == [(max(tags), True)]
    finally:
        await broker.close()
    assert await _ready_in(queue_name(RUN, topic, group)) == 0


async def test_a_multiple_ack_never_covers_a_delivery_still_held_or_nacked() -> None:
    """Acks of later deliveries, made while an earlier one is still handled or being nacked, go
    out one by one: the earlier one stays the consumer's, and its nack puts it back."""
    broker = await connect(URL)
    topic, group = unique("topic"), unique("group")
    try:
        subscription = await broker.subscribe(topic, group, prefetch=8)
        await broker.publish(topic, [Envelope(type="T", source="/s", data=b"%d" % n) for n in range(6)])
        _held, second, *rest = [await next_delivery(subscription) for _ in range(6)]
        written = await _recorded_acks(subscription)
        await asyncio.gather(second.nack(), *(delivery.ack() for delivery in rest))
        assert all(not multiple for _, multiple in written), written
        again = await next_delivery(subscription)
        assert (again.envelope.data, again.attempt) == (second.envelope.data, 2)
        await again.ack()
    finally:
        await broker.close()  # the first delivery still held: RabbitMQ takes it back
    assert await _ready_in(queue_name(RUN, topic, group)) == 1


async def test_an_ack_whose_caller_is_cancelled_is_written_all_the_same() -> None:
    """A handler cancelled while its ack waits for the batch's write does not take the ack back:
    it is written, and only the delivery still held returns to the queue."""
    broker = await connect(URL)
    topic, group = unique("topic"), unique("group")
    try:
        subscription = await broker.subscribe(topic, group, prefetch=4)
        await broker.publish(topic, [Envelope(type="T", source="/s", data=b"%d" % n) for n in range(2)])
        acked, _held = [await next_delivery(subscription) for _ in range(2)]
        assert isinstance(broker, RabbitBroker)
        assert isinstance(acked, _RabbitDelivery)
        reader = broker._readers[(topic, group)]
        acking = asyncio.ensure_future(acked.ack())
        await asyncio.sleep(0)  # one loop step: the ack task runs up to its wait for the batch
        assert reader.acks is not None
        assert acked.tag in reader.acks.outcomes, "the ack is not waiting in a batch"
        acking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await acking
    finally:
        await broker.close()  # the batch is written before the channel closes
    assert await _ready_in(queue_name(RUN, topic, group)) == 1


async def test_a_delivery_acked_while_a_restored_channel_starts_its_next_consumer_is_acked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When a group's channel is restored, its first consumer may deliver before the second one has
    started: acking that delivery meanwhile works, and the message is gone from the queue."""
    broker = await connect(URL)
    topic, group = unique("topic"), unique("group")
    try:
        assert isinstance(broker, RabbitBroker)
        first = await broker.subscribe(topic, group, prefetch=4)
        await broker.subscribe(topic, group, prefetch=4)
        reader = broker._readers[(topic, group)]
        channel = reader.channel
        assert channel is not None
        starting = Pause(monkeypatch, _GroupReader, "_consume")  # held after each consumer starts
        try:
            await channel.close()
            await asyncio.wait_for(starting.reached.wait(), 10)  # the first one started, not the second
            await broker.publish(topic, [Envelope(type="T", source="/s", data=b"early")])
            delivery = await next_delivery(first, 10)
            await delivery.ack()
        finally:
            starting.go_on()
    finally:
        await broker.close()
    assert await _ready_in(queue_name(RUN, topic, group)) == 0


# -- helpers --------------------------------------------------------------------------------------


async def _get(queue: aio_pika.abc.AbstractQueue, timeout: float = 5) -> aio_pika.abc.AbstractIncomingMessage:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        message = await queue.get(fail=False)
        if message is not None:
            return message
        if loop.time() > deadline:
            pytest.fail(f"no message in {queue.name} within {timeout}s")
        await asyncio.sleep(0.02)


class _Proxy:
    """A TCP relay to RabbitMQ on a free local port, which the test cuts (every connection reset,
    nothing listening) and restores (on the same port), as a network outage would."""

    def __init__(self) -> None:
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, HOST, self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(HOST, PORT)
        except OSError:
            writer.transport.abort()
            return
        self.writers += [writer, upstream_writer]
        for source, target in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pipe(source, target))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                target.write(data)
                await target.drain()
        except OSError:
            pass
        finally:
            target.transport.abort()


def _close_connection_named(name: str) -> None:
    """Have RabbitMQ close the one connection whose client named itself ``name``."""
    listing = _ctl("list_connections", "--quiet", "--no-table-headers", "pid", "client_properties")
    pids = [line.split("\t")[0] for line in listing.splitlines() if f'{{"connection_name","{name}"}}' in line]
    assert len(pids) == 1, f"expected one connection named {name}, found {len(pids)}"
    _ctl("close_connection", pids[0], "callcast test: dropped on purpose")
