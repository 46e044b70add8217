"""NATS JetStream (``nats://``) against the shared conformance suite, plus what only this adapter has:
its URL and options, how names become subjects and consumers, what a tool reading the stream
sees, ephemeral consumers on the server, error translation, and consumers that resume after a
server restart.

The suite runs on the machine's NATS server (127.0.0.1:4222) in a stream of its own (a fresh name
and subject prefix per run), deleted with everything in it when the module ends. Tests that stop
the server run a private ``nats-server`` on a free port, started and stopped by its PID.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import nats.aio.client
import nats.errors
import nats.js.errors
import pytest
from nats.js import api

from callcast.brokers import connect
from callcast.brokers.nats import GROUP_HEADER, NatsBroker, _NatsSubscription, encode_name
from callcast.envelope import UNDECODABLE_TYPE, Envelope
from callcast.exceptions import BrokerUnavailableError, ConfigurationError, PublishError, TransportError
from callcast.testing import BrokerConformance
from callcast.transport import Broker, Capabilities
from tests.brokers.conftest import (
    Pause,
    RecordingHolding,
    close_during,
    next_delivery,
    require_server,
    server_is_up,
)

pytestmark = pytest.mark.nats

HOST = "127.0.0.1"
PORT = 4222
NATS_SERVER = "/usr/sbin/nats-server"
ACK_WAIT = 1.0
RUN = uuid.uuid4().hex[:10]
STREAM = f"CCTEST_{RUN}"
PREFIX = f"cctest{RUN}"
OPTIONS = f"ack_wait={ACK_WAIT:g}&timeout=3&reconnect_wait=0.2"
SHARED_URL = f"nats://{HOST}:{PORT}?stream={STREAM}&prefix={PREFIX}&{OPTIONS}"
RESTART_TEST = "test_a_restarted_server_loses_nothing_that_was_accepted"


def _envelope(label: str) -> Envelope:
    return Envelope(type="callcast.test.Nats", source="/tests/nats", data=label.encode())


def _unique(label: str) -> str:
    return f"nats.{label}.{uuid.uuid4().hex[:12]}"


# -- servers --------------------------------------------------------------------------------------


class PrivateNatsServer:
    """A nats-server with JetStream of this test's own, on a free port; stopped by its PID."""

    def __init__(self, store: Path, *, jetstream: bool = True) -> None:
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            self.port = probe.getsockname()[1]
        self.store = store
        self.jetstream = jetstream
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if not os.access(NATS_SERVER, os.X_OK):
            require_server(f"nats-server ({NATS_SERVER} is missing)", self.port)
        command = [NATS_SERVER, "-a", HOST, "-p", str(self.port)]
        if self.jetstream:
            command += ["-js", "-sd", str(self.store)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = 10.0
        while deadline > 0 and not server_is_up(HOST, self.port, timeout=0.2):
            if self.process.poll() is not None:
                break
            deadline -= 0.05
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(0.05)
        require_server(f"private nats-server (exit status {self.process.poll()})", self.port)

    def stop(self) -> None:
        """SIGKILL: the server crashes, as a process can; what it acknowledged must survive."""
        process = self.process
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
        self.process = None

    def url(self, **options: str) -> str:
        query = "&".join(f"{key}={value}" for key, value in options.items())
        return f"nats://{HOST}:{self.port}?{OPTIONS}{'&' if query else ''}{query}"


def _process_state(pid: int) -> str:
    """The state letter of process ``pid`` (``T``: stopped), from ``/proc``."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def _stopped(pid: int, timeout: float = 5.0) -> None:
    """Wait until process ``pid`` is stopped (by ``SIGSTOP``), not merely sent the signal."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while _process_state(pid) != "T":
        assert loop.time() < deadline, f"process {pid} did not stop"
        await asyncio.sleep(0.005)


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[PrivateNatsServer]:
    server = PrivateNatsServer(tmp_path / "jetstream")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _delete_streams(url: str, *streams: str) -> None:
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=5)
        for stream in streams:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream)
    finally:
        await nc.close()


_OURS = re.compile(r"(KV_)?CC(TEST|ERR)_[0-9a-f]{10}(_uncounted)?")


async def _delete_leftovers(url: str) -> None:
    """Streams of earlier runs of this module that could not clean up (a killed test process):
    recognised by name, and old enough that no run can still use them."""
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=5)
        old = datetime.now(UTC) - timedelta(minutes=10)
        for info in await js.streams_info():
            if _OURS.fullmatch(info.config.name or "") and info.created is not None and info.created < old:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_stream(info.config.name)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def shared_stream() -> Iterator[str]:
    """The run's stream on the shared server: everything the tests create lives in it (and in its
    bucket), and goes when the module ends."""
    if server_is_up(HOST, PORT):
        asyncio.run(_delete_leftovers(f"nats://{HOST}:{PORT}"))
    yield STREAM
    if server_is_up(HOST, PORT):
        asyncio.run(_delete_streams(f"nats://{HOST}:{PORT}", STREAM, f"KV_{STREAM}_uncounted"))


@pytest.fixture
async def raw(shared_stream: str) -> AsyncIterator[nats.NATS]:
    """A plain nats-py connection to the shared server: what another tool would see."""
    require_server("nats", PORT)
    nc = await nats.connect(f"nats://{HOST}:{PORT}", allow_reconnect=False, connect_timeout=2)
    yield nc
    await nc.close()


# -- the conformance suite --------------------------------------------------------------------------


class TestNatsBroker(BrokerConformance):
    lease = ACK_WAIT
    can_restart = True

    @pytest.fixture(autouse=True)
    def _server(self, request: pytest.FixtureRequest, tmp_path: Path, shared_stream: str) -> Iterator[None]:
        self.private: PrivateNatsServer | None = None
        if request.node.originalname == RESTART_TEST:
            self.private = PrivateNatsServer(tmp_path / "jetstream")
            self.private.start()
            self.url = self.private.url()
        else:
            require_server("nats", PORT)
            self.url = SHARED_URL
        try:
            yield
        finally:
            if self.private is not None:
                self.private.stop()

    async def make_broker(self) -> Broker:
        return await connect(self.url)

    def process_url(self) -> str:
        return self.url

    async def stop_server(self) -> None:
        assert self.private is not None
        await asyncio.to_thread(self.private.stop)

    async def start_server(self) -> None:
        assert self.private is not None
        await asyncio.to_thread(self.private.start)

    async def test_capabilities(self) -> None:
        """JetStream is durable and shared; the server redelivers nacks after their delay and counts
        deliveries; per-key order is not guaranteed across competing subscribers (the framework's
        gate adds it); request/reply goes over ephemeral reply topics; a new group starts at new
        envelopes."""
        broker = await self.open()
        assert isinstance(broker, NatsBroker)
        assert broker.capabilities == Capabilities(
            durable=True,
            shared=True,
            delayed_nack=True,
            delivery_count=True,
            ordered_per_key=False,
            request_reply=True,
            replays_history=False,
        )


# -- the URL --------------------------------------------------------------------------------------


def test_url_options_reach_the_adapter() -> None:
    """Every option of the query string is read; the defaults are documented ones."""
    url = (
        "nats://10.1.2.3:4333?stream=ORDERS&prefix=shop.events&ack_wait=2.5&max_ack_pending=-1"
        "&replicas=3&timeout=7&reconnect_wait=0.5&ephemeral_ttl=12"
    )
    broker = NatsBroker(url)
    assert (broker.stream, broker.prefix, broker.bucket) == ("ORDERS", "shop.events", "ORDERS_uncounted")
    assert (broker.ack_wait, broker.max_ack_pending, broker.replicas) == (2.5, -1, 3)
    assert (broker.timeout, broker.reconnect_wait, broker.ephemeral_ttl) == (7.0, 0.5, 12.0)
    assert broker.url == url
    default = NatsBroker("nats://127.0.0.1:4222")
    assert (default.stream, default.prefix, default.ack_wait, default.max_ack_pending) == (
        "CALLCAST",
        "callcast",
        30.0,
        10000,
    )
    assert default.subject("orders.v2") == "callcast.orders_v2"
    assert NatsBroker.consumer_name("orders.v2", "billing.charge") == "orders_v2==billing_charge"


def test_url_never_shows_a_password_or_token() -> None:
    """``url`` is safe to log: a password, or a token given as the user, is replaced by ``***``."""
    assert NatsBroker("nats://app:s3cret@127.0.0.1:4222").url == "nats://app:***@127.0.0.1:4222"
    token = NatsBroker("nats://t0ken@127.0.0.1:4222?ack_wait=3")
    assert token.url == "nats://:***@127.0.0.1:4222?ack_wait=3"
    assert "t0ken" not in token.url


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://127.0.0.1:4222", "not a nats:// URL"),
        ("nats://127.0.0.1:4222/db", "takes no path"),
        ("nats://127.0.0.1:99999", "invalid port"),
        ("nats://127.0.0.1:4222?ackwait=1", "unknown option(s) ackwait"),
        ("nats://127.0.0.1:4222?stream=a.b", "stream must be"),
        ("nats://127.0.0.1:4222?stream=", "stream must be"),
        ("nats://127.0.0.1:4222?prefix=a.*", "prefix must be"),
        ("nats://127.0.0.1:4222?prefix=a..b", "prefix must be"),
        ("nats://127.0.0.1:4222?ack_wait=0", "ack_wait must be"),
        ("nats://127.0.0.1:4222?ack_wait=nan", "ack_wait must be"),
        ("nats://127.0.0.1:4222?timeout=soon", "timeout must be"),
        ("nats://127.0.0.1:4222?max_ack_pending=0", "max_ack_pending must be"),
        ("nats://127.0.0.1:4222?max_ack_pending=many", "max_ack_pending must be"),
        ("nats://127.0.0.1:4222?replicas=7", "replicas must be"),
        ("nats://app:s3cret@127.0.0.1:4222?leese=1", r"app:\*\*\*@"),
    ],
)
def test_a_bad_url_or_option_is_a_configuration_error(url: str, complaint: str) -> None:
    """A URL the adapter cannot honour fails before anything is opened, naming the problem (and
    never the password)."""
    if not complaint.startswith("app"):
        complaint = complaint.replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ConfigurationError, match=complaint) as raised:
        NatsBroker(url)
    assert "s3cret" not in str(raised.value)


# -- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "token"),
    [
        ("UserSignedUp", "UserSignedUp"),
        ("orders.v2", "orders_v2"),
        ("emails.send_welcome", "emails_send=5Fwelcome"),
        ("a b*c>d", "a=20b=2Ac=3Ed"),
        ("façade", "fa=C3=A7ade"),
        ("x=41", "x=3D41"),
        ("kebab-case", "kebab-case"),
    ],
)
def test_names_become_one_safe_token(name: str, token: str) -> None:
    """Letters, digits and ``-`` stay; ``.`` becomes ``_``; any other byte is ``=XX``."""
    assert encode_name(name) == token


def test_distinct_names_never_share_a_token() -> None:
    """The encoding is injective (``.`` vs ``_``, an escape vs its character, long names that share
    their beginning), and every token is legal in subjects, consumer names and file names."""
    names = ["a.b", "a_b", "a=2Eb", "A", "=41", "a..b", "a._b", "x" * 300, "x" * 299 + "y", "é" * 200]
    tokens = [encode_name(name) for name in names]
    assert len(set(tokens)) == len(names)
    for token in tokens:
        assert len(token) <= 120
        assert all(c.isascii() and (c.isalnum() or c in "_=-") for c in token), token
    with pytest.raises(ConfigurationError, match="must not be empty"):
        encode_name("")


# -- what lives on the server ---------------------------------------------------------------------


async def test_topology_is_what_the_docstring_says(raw: nats.NATS) -> None:
    """The stream takes ``<prefix>.>`` with interest retention; a group is a durable pull consumer
    ``<topic>==<group>`` on the topic's subject with deliver policy ``new`` and the URL's ack wait;
    a tool subscribed to the subject sees the envelope as a CloudEvents JSON document (structured
    mode, the data as ``data_base64``, no headers), and a ``publish(group=...)`` carries the group
    header."""
    topic, group = "nats.orders v2", "billing.charge_card"
    broker = await connect(SHARED_URL)
    try:
        assert isinstance(broker, NatsBroker)
        await broker.declare(topic, group)
        js = raw.jetstream()
        stream = await js.stream_info(STREAM)
        assert stream.config.subjects == [f"{PREFIX}.>"]
        assert stream.config.retention == api.RetentionPolicy.INTEREST
        consumer = await js.consumer_info(STREAM, "nats_orders=20v2==billing_charge=5Fcard")
        assert consumer.config.filter_subject == f"{PREFIX}.nats_orders=20v2"
        assert consumer.config.deliver_policy == api.DeliverPolicy.NEW
        assert consumer.config.ack_wait == ACK_WAIT
        assert consumer.config.durable_name == consumer.name

        tool = await raw.subscribe(f"{PREFIX}.nats_orders=20v2")
        await raw.flush()  # the server knows of the subscription before anything is published
        sent = _envelope("seen").with_extensions(note='50% "off" ✓')
        await broker.publish(topic, [sent])
        await broker.publish(topic, [_envelope("replayed")], group=group)
        seen = await tool.next_msg(5)
        assert not seen.headers
        document = json.loads(seen.data)
        assert document["specversion"] == "1.0"
        assert document["id"] == sent.id
        assert document["type"] == "callcast.test.Nats"
        assert document["note"] == '50% "off" ✓'
        assert base64.b64decode(document["data_base64"]) == b"seen"
        replayed = await tool.next_msg(5)
        assert replayed.headers is not None
        assert replayed.headers[GROUP_HEADER] == "billing.charge_card"
        await tool.unsubscribe()
    finally:
        await broker.close()


async def test_a_foreign_message_is_delivered_quarantined(raw: nats.NATS) -> None:
    """A message put on a topic's subject by something other than callcast (not a JSON event, or
    incomplete CloudEvent headers) does not crash the subscription: it arrives as
    ``callcast.undecodable`` with its body and the reason; a binary-mode CloudEvent (headers) from
    another tool is read as such; the next envelope follows normally."""
    topic, group = _unique("foreign"), _unique("group")
    broker = await connect(SHARED_URL)
    try:
        assert isinstance(broker, NatsBroker)
        subscription = await broker.subscribe(topic, group)
        js = raw.jetstream()
        await js.publish(broker.subject(topic), b"no headers at all")
        await js.publish(broker.subject(topic), b"half", headers={"ce-id": "bad-1", "ce-source": "/x"})
        binary = _envelope("binary")
        headers = {"ce-id": binary.id, "ce-source": binary.source, "ce-specversion": "1.0"}
        headers |= {"ce-type": binary.type, "ce-time": binary.time, "content-type": binary.datacontenttype}
        await js.publish(broker.subject(topic), b"binary", headers=headers)
        good = _envelope("good")
        await broker.publish(topic, [good])
        received = [await next_delivery(subscription) for _ in range(4)]
        assert [d.envelope.type for d in received[:2]] == [UNDECODABLE_TYPE] * 2
        assert [d.envelope.data for d in received[:2]] == [b"no headers at all", b"half"]
        assert received[1].envelope.id == "bad-1"
        assert "not a JSON event" in received[0].envelope.extensions["decodeerror"]
        assert "missing attribute" in received[1].envelope.extensions["decodeerror"]
        assert received[2].envelope == binary
        assert received[3].envelope == good
        for delivery in received:
            await delivery.ack()
    finally:
        await broker.close()


async def test_an_envelope_handed_back_unseen_leaves_no_record_once_acked(raw: nats.NATS) -> None:
    """What a closing subscription fetched ahead is recorded in the bucket, so the next delivery
    is attempt 1; the record goes when the envelope is acked."""
    topic, group = _unique("ahead"), _unique("group")
    broker = await connect(SHARED_URL)
    try:
        assert isinstance(broker, NatsBroker)
        first = await broker.subscribe(topic, group, prefetch=5)
        await broker.publish(topic, [_envelope("taken"), _envelope("ahead")])
        taken = await next_delivery(first)
        await first.close()
        second = await broker.subscribe(topic, group, prefetch=5)
        again = {d.envelope.data: d for d in [await next_delivery(second), await next_delivery(second)]}
        assert (again[b"taken"].attempt, again[b"ahead"].attempt) == (2, 1)
        kv = await raw.jetstream().key_value(broker.bucket)
        key = f"{broker.consumer_name(topic, group)}.{again[b'ahead'].seq}"  # type: ignore[attr-defined]
        assert (await kv.get(key)).value == b"1"
        for delivery in again.values():
            await delivery.ack()
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            try:
                await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                break
            assert asyncio.get_running_loop().time() < deadline, "the record outlived the ack"
            await asyncio.sleep(0.05)
        assert taken.attempt == 1
    finally:
        await broker.close()


async def test_a_lease_renewal_never_follows_a_settle_on_the_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    """A renewal (``+WPI``) sent after a delayed nak would restart the nak's wait at ack_wait. Here
    the second delivery is nacked while the renewal is under way, between two of its sends."""
    topic, group = _unique("renew"), _unique("group")
    broker = await connect(SHARED_URL)
    try:
        assert isinstance(broker, NatsBroker)
        subscription = await broker.subscribe(topic, group, prefetch=5)
        assert isinstance(subscription, _NatsSubscription)
        await broker.publish(topic, [_envelope("first"), _envelope("second")])
        first, second = await next_delivery(subscription), await next_delivery(subscription)
        sent: list[tuple[str, bytes]] = []
        publish = subscription.nc.publish

        async def recording(subject: str, payload: bytes = b"", **options: object) -> None:
            sent.append((subject, payload))
            if len(sent) == 1:  # the renewal's first send: the other delivery is settled meanwhile
                await second.nack(delay=30)
            await publish(subject, payload, **options)  # type: ignore[arg-type]

        monkeypatch.setattr(subscription.nc, "publish", recording)
        await subscription.renew_leases()
        replies = {first.reply: "first", second.reply: "second"}  # type: ignore[attr-defined]
        assert [(replies[subject], payload[:4]) for subject, payload in sent] == [
            ("first", b"+WPI"),
            ("second", b"-NAK"),
        ]
        await first.ack()
        await subscription.close()
    finally:
        await broker.close()


async def test_an_ephemeral_consumer_lives_while_subscribed_and_no_longer(raw: nats.NATS) -> None:
    """An ephemeral subscription's consumer stays on the server while it is subscribed, even idle
    for longer than its inactivity threshold; closing deletes it; and the server deletes the
    consumer of a process that vanished without closing, after the threshold."""
    url = f"{SHARED_URL}&ephemeral_ttl=1"
    js = raw.jetstream()
    broker = await connect(url)
    try:
        assert isinstance(broker, NatsBroker)
        topic = _unique("replies")
        name = broker.consumer_name(topic, topic)
        subscription = await broker.subscribe(topic, topic, ephemeral=True)
        assert (await js.consumer_info(STREAM, name)).config.inactive_threshold == 1.0
        await asyncio.sleep(2.0)  # idle for twice the threshold: must not be deleted meanwhile
        await js.consumer_info(STREAM, name)
        await broker.publish(topic, [_envelope("still here")])
        delivery = await next_delivery(subscription)
        assert delivery.envelope.data == b"still here"
        await delivery.ack()
        await subscription.close()
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.consumer_info(STREAM, name)
    finally:
        await broker.close()

    crashed = await connect(url)
    assert isinstance(crashed, NatsBroker)
    topic = _unique("replies")
    name = crashed.consumer_name(topic, topic)
    await crashed.subscribe(topic, topic, ephemeral=True)
    assert crashed._nc is not None
    await crashed._nc.close()  # the process "dies": no unsubscribe, no delete
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        try:
            await js.consumer_info(STREAM, name)
        except nats.js.errors.NotFoundError:
            break
        assert asyncio.get_running_loop().time() < deadline, "the vanished subscriber's consumer stayed"
        await asyncio.sleep(0.1)
    await crashed.close()


# -- native request/reply ---------------------------------------------------------------------------


async def test_cancelled_waits_of_a_server_take_no_turn() -> None:
    """A wait in a server's ``__anext__`` that is cancelled (a caller's timeout) keeps no permit:
    after ``prefetch`` such waits the server still hands out the next request."""
    broker = await connect(SHARED_URL)
    try:
        assert isinstance(broker, NatsBroker)
        topic, group = _unique("rpc"), _unique("servers")
        server = await broker.serve(topic, group, prefetch=2)
        for _ in range(2):
            with pytest.raises(TimeoutError):
                await next_delivery(server, 0.05)
        asking = asyncio.create_task(broker.request(topic, _envelope("after"), timeout=5))
        delivery = await next_delivery(server)
        assert delivery.envelope.data == b"after"
        await delivery.reply(_envelope("answer"))
        assert (await asyncio.wait_for(asking, 5)).data == b"answer"
    finally:
        await broker.close()


async def test_closing_a_server_ends_a_wait_for_a_free_turn() -> None:
    """A consumer waiting in a server's ``__anext__`` because ``prefetch`` requests are unsettled
    gets ``StopAsyncIteration`` when the server closes, as one waiting for a request does."""
    broker = await connect(SHARED_URL)
    try:
        assert isinstance(broker, NatsBroker)
        topic, group = _unique("rpc"), _unique("servers")
        server = await broker.serve(topic, group, prefetch=1)
        asking = asyncio.create_task(broker.request(topic, _envelope("held"), timeout=5))
        await next_delivery(server)  # held, unsettled
        waiting = asyncio.create_task(server.__anext__())
        done, _ = await asyncio.wait({waiting}, timeout=0.2)
        assert not done, "the one request of prefetch 1 is unsettled: the next one must wait"
        await server.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, 5)
        asking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asking
    finally:
        await broker.close()


async def test_a_server_keeps_a_bounded_backlog_of_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests that arrive while a server is busy wait for it up to its backlog (made small here);
    the others are dropped at once, and their callers time out."""
    prefetch, extra = 2, 3
    backlog = 4 * prefetch
    monkeypatch.setattr("callcast.brokers.nats._SERVER_BACKLOG", backlog)
    broker = await connect(SHARED_URL)
    try:
        assert isinstance(broker, NatsBroker)
        topic, group = _unique("rpc"), _unique("servers")
        server = await broker.serve(topic, group, prefetch=prefetch)
        callers = [
            asyncio.create_task(broker.request(topic, _envelope(f"q{n}"), timeout=2))
            for n in range(backlog + extra)
        ]
        sub = server.sub
        assert sub is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while sub.delivered < backlog + extra or sub.pending_msgs:  # all arrived and were taken in
            assert loop.time() < deadline, f"{sub.delivered} of {backlog + extra} requests arrived"
            await asyncio.sleep(0.01)
        served = 0
        while True:
            try:
                delivery = await next_delivery(server, 0.2)
            except TimeoutError:
                break
            served += 1
            await delivery.reply(_envelope("answer"))
        outcomes = await asyncio.gather(*callers, return_exceptions=True)
        assert served == backlog
        assert sum(isinstance(outcome, Envelope) for outcome in outcomes) == backlog
        assert sum(isinstance(outcome, TimeoutError) for outcome in outcomes) == extra
    finally:
        await broker.close()


# -- errors -----------------------------------------------------------------------------------------


async def test_nobody_listening_is_broker_unavailable_without_the_password() -> None:
    """A server that cannot be reached is :class:`BrokerUnavailableError` (not a nats-py error),
    promptly, and the message shows the URL without its password."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    started = asyncio.get_running_loop().time()
    with pytest.raises(BrokerUnavailableError, match="cannot connect") as raised:
        await connect(f"nats://app:s3%40cret@{HOST}:{port}?timeout=1&reconnect_wait=0.1")
    assert asyncio.get_running_loop().time() - started < 5
    assert "s3%40cret" not in str(raised.value)
    assert "s3@cret" not in str(raised.value)
    assert f"app:***@{HOST}:{port}" in str(raised.value)


async def test_a_server_without_jetstream_is_broker_unavailable(tmp_path: Path) -> None:
    """A NATS server without JetStream cannot be this broker: connecting says so."""
    server = PrivateNatsServer(tmp_path / "unused", jetstream=False)
    server.start()
    try:
        with pytest.raises(BrokerUnavailableError, match="JetStream is not enabled"):
            await connect(f"nats://{HOST}:{server.port}?timeout=2")
    finally:
        server.stop()


async def test_driver_errors_surface_as_callcast_errors(raw: nats.NATS) -> None:
    """What goes wrong on the server reaches the caller as the ``TransportError`` tree: an envelope
    over the server's ``max_payload`` is refused before anything is sent; a publish whose stream
    was deleted, or whose subjects another stream took, is a :class:`PublishError`; a stream that
    does not take the prefix is a configuration error."""
    stream = f"CCERR_{uuid.uuid4().hex[:10]}"
    prefix = f"ccerr{uuid.uuid4().hex[:10]}"
    js = raw.jetstream()
    broker = await connect(f"nats://{HOST}:{PORT}?stream={stream}&prefix={prefix}&{OPTIONS}")
    try:
        assert isinstance(broker, NatsBroker)
        topic, group = _unique("errors"), _unique("group")
        subscription = await broker.subscribe(topic, group)
        huge = Envelope(type="T", source="/s", data=b"x" * raw.max_payload)
        with pytest.raises(PublishError, match="max_payload"):
            await broker.publish(topic, [_envelope("first"), huge])
        marker = _envelope("marker")
        await broker.publish(topic, [marker])
        assert (await next_delivery(subscription)).envelope == marker, "part of a refused batch was stored"

        await js.delete_stream(stream)
        with pytest.raises(PublishError, match="no stream answered") as raised:
            await broker.publish(topic, [_envelope("lost")])
        assert isinstance(raised.value, TransportError)
        with pytest.raises(TransportError):
            await broker.declare(topic, group)

        await js.add_stream(name=f"{stream}_X", subjects=[f"{prefix}.>"])  # another stream took the subjects
        with pytest.raises(PublishError, match=f"stored in stream '{stream}_X', not '{stream}'"):
            await broker.publish(topic, [_envelope("elsewhere")])
    finally:
        await broker.close()
        for name in (stream, f"{stream}_X"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(f"KV_{stream}_uncounted")

    other = f"CCERR_{uuid.uuid4().hex[:10]}"
    await js.add_stream(name=other, subjects=[f"{other.lower()}.only"])
    try:
        with pytest.raises(ConfigurationError, match="does not take"):
            await connect(f"nats://{HOST}:{PORT}?stream={other}&prefix={prefix}&{OPTIONS}")
    finally:
        await js.delete_stream(other)


# -- a server that restarts -------------------------------------------------------------------------


async def test_waiting_consumers_resume_after_a_server_restart(private_server: PrivateNatsServer) -> None:
    """A subscriber waiting in ``__anext__`` across a server crash and restart is served again
    without the application doing anything, and one that held a delivery through the outage can
    still settle it; while the server is down, publish fails loudly."""
    broker = await connect(private_server.url())
    try:
        topic, group = _unique("resume"), _unique("group")
        subscription = await broker.subscribe(topic, group, prefetch=2)
        await broker.publish(topic, [_envelope("held")])
        held = await next_delivery(subscription)
        waiting = asyncio.create_task(subscription.__anext__())
        await asyncio.to_thread(private_server.stop)
        with pytest.raises(TransportError):
            await asyncio.wait_for(broker.publish(topic, [_envelope("refused")]), 10)
        await asyncio.to_thread(private_server.start)
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            try:
                await broker.publish(topic, [_envelope("after")])
                break
            except TransportError:
                assert asyncio.get_running_loop().time() < deadline, "publish never worked again"
                await asyncio.sleep(0.1)
        # A refused publish may still have been stored (the contract allows it): it may come first.
        first = await asyncio.wait_for(waiting, 15)
        assert first.envelope.data in (b"after", b"refused")
        await first.ack()
        if first.envelope.data == b"refused":
            after = await next_delivery(subscription, 10)
            assert after.envelope.data == b"after"
            await after.ack()
        await held.ack()
        marker = _envelope("marker")
        await broker.publish(topic, [marker])
        following = await next_delivery(subscription, 10)
        assert following.envelope.data == b"marker", "the delivery held through the restart came back"
        await following.ack()
    finally:
        await broker.close()


# -- close ------------------------------------------------------------------------------------------


async def test_closing_leaves_no_task_running(private_server: PrivateNatsServer) -> None:
    """``close`` ends every task the broker started, even the flush of a settle whose ``PONG`` never
    comes (a server that hangs), and the holding hears of that settle."""
    assert private_server.process is not None
    pid = private_server.process.pid
    before = asyncio.all_tasks()
    broker = await connect(private_server.url(timeout="10"))
    holding = RecordingHolding()
    try:
        topic, group = _unique("tasks"), _unique("group")
        subscription = await broker.subscribe(topic, group, prefetch=1, holding=holding)
        await broker.publish(topic, [_envelope("acked")])
        delivery = await next_delivery(subscription)
        os.kill(pid, signal.SIGSTOP)  # the server hangs: the ack's flush waits for its PONG
        try:
            await _stopped(pid)
            await delivery.ack()
            await asyncio.wait_for(broker.close(), 10)
        finally:
            os.kill(pid, signal.SIGCONT)
        running = [task for task in asyncio.all_tasks() - before if not task.done()]
        assert running == [], f"still running after close: {[task.get_name() for task in running]}"
        assert holding.held == set(), "the ack was never reported"
    finally:
        await broker.close()


async def test_a_subscribe_or_serve_racing_close_is_closed_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``subscribe`` or ``serve`` that finishes opening after ``close`` began does not outlive the
    broker: what it opened is closed and it raises, rather than returning something no one closes."""
    started = Pause(monkeypatch, _NatsSubscription, "start")
    broker = await connect(SHARED_URL)
    await close_during(broker, broker.subscribe(_unique("race"), _unique("group")), started)
    broker = await connect(SHARED_URL)
    assert isinstance(broker, NatsBroker)
    served = Pause(monkeypatch, nats.aio.client.Client, "subscribe")
    await close_during(broker, broker.serve(_unique("race"), _unique("group")), served)
    assert not broker._servers
