"""The broker conformance suite: the transport seam's contract, as tests every adapter runs.

An adapter's test module subclasses :class:`BrokerConformance` and says how to open its broker::

    class TestSqliteBroker(BrokerConformance):
        lease = 1.0

        @pytest.fixture(autouse=True)
        def _store(self, tmp_path):
            self.url = f"sqlite:///{tmp_path}/broker.db?lease=1"

        async def make_broker(self):
            return await connect(self.url)

        def process_url(self):
            return self.url

Each test reads as a scenario, and its docstring names the clause of the contract
(:mod:`callcast.transport`) that it checks. The adapter's :class:`~callcast.transport.Capabilities`
decide which tests apply: a test that needs a capability the adapter does not claim is skipped with
the reason, never silently passed.

Rules the suite keeps, so that it can run against real brokers:

* every topic and group name is fresh (a uuid), so tests never see each other's envelopes;
* every wait for something that must happen has a deadline (:attr:`BrokerConformance.timeout`);
  the only timed observations are of things that must *not* happen
  (:attr:`BrokerConformance.quiet`), and most such checks use a *marker* instead: publish one more
  envelope and check that it is the next one to arrive;
* every broker opened through :meth:`BrokerConformance.open` is closed when the test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlsplit

import pytest

from callcast.envelope import Envelope
from callcast.exceptions import BrokerUnavailableError, TransportError
from callcast.transport import Broker, Capabilities, Delivery, RequestReply, ServedRequest, Subscription

__all__ = ["BrokerConformance"]

EVENT_TYPE = "callcast.conformance.Tested"
SOURCE = "/callcast/testing/conformance"

# A subscriber in another process: takes COUNT deliveries (with a prefetch of PREFETCH), says
# which, then holds them unsettled until it is killed (or, if the test runner died, gives up after
# a minute). It prints what its subscription tells its ``holding`` as it happens.
_HOLDER_SCRIPT = """
import asyncio, sys
from callcast.brokers import connect

class Printed:
    def fetched(self, envelope):
        print("fetched", envelope.id, flush=True)

    def returned(self, envelope):
        print("returned", envelope.id, flush=True)

async def main(url, topic, group, count, prefetch):
    broker = await connect(url)
    subscription = await broker.subscribe(topic, group, prefetch=prefetch, holding=Printed())
    held = [await asyncio.wait_for(subscription.__anext__(), 30) for _ in range(count)]
    print("holding", *[delivery.envelope.id for delivery in held], flush=True)
    await asyncio.sleep(60)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
"""

# A subscriber in another process: takes COUNT deliveries, acks them one after the other, and kills
# itself (SIGKILL) the moment its ``holding`` has heard all of them returned (else it exits with 3).
_SETTLE_AND_DIE_SCRIPT = """
import asyncio, os, signal, sys
from callcast.brokers import connect

class DieWhenAllReturned:
    def __init__(self, count):
        self.left = count

    def fetched(self, envelope):
        pass

    def returned(self, envelope):
        self.left -= 1
        if self.left == 0:
            os.kill(os.getpid(), signal.SIGKILL)

async def main(url, topic, group, count):
    broker = await connect(url)
    subscription = await broker.subscribe(topic, group, prefetch=count, holding=DieWhenAllReturned(count))
    taken = [await asyncio.wait_for(subscription.__anext__(), 30) for _ in range(count)]
    for delivery in taken:
        await delivery.ack()
    await asyncio.sleep(15)
    sys.exit(3)  # not every ack was returned

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


def unique(label: str) -> str:
    """A topic or group name no other test (or earlier run on a durable broker) has used."""
    return f"conformance.{label}.{uuid.uuid4().hex[:12]}"


def envelope(label: str, *, key: str | None = None) -> Envelope:
    """A test envelope whose data is ``label`` (read back with :func:`label_of`)."""
    extensions = {"partitionkey": key} if key is not None else {}
    return Envelope(type=EVENT_TYPE, source=SOURCE, data=label.encode(), extensions=extensions)


def label_of(delivery: Delivery) -> str:
    return delivery.envelope.data.decode()


def labels(deliveries: Sequence[Delivery]) -> list[str]:
    return [label_of(delivery) for delivery in deliveries]


def label_of_envelope(sent: Envelope) -> str:
    return sent.data.decode()


async def _next(subscription: Subscription) -> Delivery:
    return await subscription.__anext__()


async def _drain(subscription: Subscription) -> list[Delivery]:
    """Iterate until the subscription ends; what a consumer's ``async for`` loop does."""
    return [delivery async for delivery in subscription]


class _ChildProcess:
    """A python process this test started; stopped by its own PID, never by name."""

    def __init__(self, script: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.output: tuple[str, str] | None = None

    async def read_line(self, timeout: float) -> str:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            line = await asyncio.wait_for(asyncio.to_thread(stdout.readline), timeout)
        except TimeoutError:
            self.kill()
            pytest.fail(f"child process said nothing within {timeout}s")
        if not line:
            _, errors = await self.finish()
            pytest.fail(
                f"child process exited (status {self.process.returncode}) before it was ready:\n{errors}"
            )
        return line

    async def read_until(self, word: str, timeout: float) -> tuple[list[str], str]:
        """The lines before the first that starts with ``word``, and that line's other words."""
        before: list[str] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            line = await self.read_line(max(0.001, deadline - asyncio.get_running_loop().time()))
            if line.startswith(word):
                return before, line[len(word) :].strip()
            before.append(line)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)

    async def finish(self, wait: float = 0.0) -> tuple[str, str]:
        """Kill the process if it still runs after ``wait`` seconds, reap it, close its pipes; its
        remaining output."""
        if wait:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.process.wait, wait)
        self.kill()
        if self.output is None:
            self.output = await asyncio.to_thread(self.process.communicate, None, 30)
        return self.output


class _Held:
    """A :class:`~callcast.transport.Holding` that keeps the ids it holds."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def fetched(self, envelope: Envelope) -> None:
        self.ids.add(envelope.id)

    def returned(self, envelope: Envelope) -> None:
        assert envelope.id in self.ids, f"{envelope.id} returned but never announced"
        self.ids.discard(envelope.id)


class _Pulls:
    """One waiting ``__anext__`` per subscription: whichever subscriber gets a delivery first."""

    def __init__(self, subscriptions: Sequence[Subscription]) -> None:
        self.subscriptions = list(subscriptions)
        self.tasks = [asyncio.create_task(_next(s)) for s in self.subscriptions]

    async def next(self, timeout: float) -> Delivery:
        done, _ = await asyncio.wait(self.tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            pytest.fail(f"no subscriber got a delivery within {timeout}s")
        index = next(i for i, task in enumerate(self.tasks) if task in done)
        delivery = self.tasks[index].result()
        self.tasks[index] = asyncio.create_task(_next(self.subscriptions[index]))
        return delivery

    async def assert_quiet(self, seconds: float, why: str) -> None:
        done, _ = await asyncio.wait(self.tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            outcome = "nothing" if task.exception() else repr(label_of(task.result()))
            pytest.fail(f"{why}, but a subscriber got {outcome} within {seconds}s")

    async def end(self, timeout: float) -> None:
        """After the subscriptions were closed: every waiting ``__anext__`` ends."""
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), timeout)


class BrokerConformance:
    """The transport contract as a pytest test class. Subclass it as ``Test<Adapter>``.

    A subclass implements :meth:`make_broker` and, where the adapter can be reached from another
    process, :meth:`process_url`; it may tune :attr:`timeout`, :attr:`quiet` and :attr:`lease`.
    """

    timeout: float = 5.0
    """Deadline, in seconds, of every wait for something the contract says must happen."""
    quiet: float = 0.3
    """How long, in seconds, the suite watches for something that must not happen."""
    lease: float | None = None
    """Seconds after which the deliveries of a subscriber that vanished without closing (killed)
    return to its group: the adapter's lease or heartbeat timeout, as configured by the URL of
    :meth:`make_broker`. ``None``: the adapter notices at once (a dropped connection)."""

    _brokers: list[Broker]

    # -- what a subclass provides ---------------------------------------------------------------

    async def make_broker(self) -> Broker:
        """A new, connected broker object. Each call of one test must reach the *same* store where
        ``capabilities.shared`` or ``capabilities.durable`` (so a test can open a second
        connection, as a second process would, or reopen after a close); otherwise each call may
        return an independent broker, and the suite calls it once per test."""
        raise NotImplementedError

    def process_url(self) -> str | None:
        """A URL that :func:`callcast.brokers.connect` in *another process* opens to reach the
        store of :meth:`make_broker`, or ``None`` to skip the multi-process tests."""
        return None

    can_restart: bool = False
    """Whether :meth:`stop_server` and :meth:`start_server` work (else the restart test skips)."""

    async def stop_server(self) -> None:
        """Stop the broker *server* the brokers of :meth:`make_broker` talk to (one the test owns,
        e.g. a private instance on a free port), so connections drop. Returns once it is down."""
        raise NotImplementedError

    async def start_server(self) -> None:
        """Start the server stopped by :meth:`stop_server` again, with its data; returns once it
        accepts connections."""
        raise NotImplementedError

    # -- plumbing -------------------------------------------------------------------------------

    @pytest.fixture(autouse=True)
    async def _close_brokers(self) -> AsyncIterator[None]:
        self._brokers = []
        yield
        for broker in reversed(self._brokers):
            await broker.close()

    async def open(self) -> Broker:
        """A broker from :meth:`make_broker`, closed when the test ends."""
        broker = await self.make_broker()
        self._brokers.append(broker)
        return broker

    @staticmethod
    def require(broker: Broker, capability: str, why: str) -> None:
        """Skip the test unless ``broker.capabilities.<capability>`` is true."""
        __tracebackhide__ = True  # pytest reports the skip at the test's line
        if not getattr(broker.capabilities, capability):
            pytest.skip(f"capabilities.{capability} is False: {why}")

    def killable_process_url(self, broker: Broker) -> str:
        """:meth:`process_url`, for a test that kills a subscriber in another process: skips the
        test where there is no such process (or no SIGKILL)."""
        __tracebackhide__ = True
        self.require(broker, "shared", "no other process can share this broker")
        url = self.process_url()
        if url is None:
            pytest.skip("process_url() is None: the adapter cannot be reached from another process")
        if not hasattr(signal, "SIGKILL"):
            pytest.skip("this platform has no SIGKILL")
        return url

    async def next(self, subscription: Subscription, timeout: float | None = None) -> Delivery:
        """The subscription's next delivery; fails the test if none comes within the deadline."""
        __tracebackhide__ = True
        timeout = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(_next(subscription), timeout)
        except TimeoutError:
            pytest.fail(f"no delivery within {timeout}s")

    async def take(self, subscription: Subscription, count: int) -> list[Delivery]:
        """The next ``count`` deliveries, unsettled."""
        return [await self.next(subscription) for _ in range(count)]

    async def assert_pending(self, task: asyncio.Task[Delivery], why: str, longer: float = 0.0) -> None:
        """``task`` (waiting in ``__anext__``) stays waiting for :attr:`quiet` (+ ``longer``) seconds."""
        __tracebackhide__ = True
        seconds = self.quiet + longer
        done, _ = await asyncio.wait({task}, timeout=seconds)
        if done:
            outcome = "nothing" if task.exception() else repr(label_of(task.result()))
            pytest.fail(f"{why}, but __anext__ returned {outcome} within {seconds:g}s")

    async def finish(self, task: asyncio.Task[Delivery], timeout: float | None = None) -> Delivery:
        """The delivery a waiting ``__anext__`` task returns, within the deadline."""
        __tracebackhide__ = True
        timeout = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(task, timeout)
        except TimeoutError:
            pytest.fail(f"the waiting __anext__ got no delivery within {timeout}s")

    async def publish_marker(self, broker: Broker, topic: str) -> str:
        """Publish one more envelope and return its label: when it arrives, whatever was published
        before it and did not arrive was not kept."""
        marker = unique("marker")
        await broker.publish(topic, [envelope(marker)])
        return marker

    # -- the broker object ----------------------------------------------------------------------

    async def test_broker_describes_itself_as_data(self) -> None:
        """A broker satisfies the :class:`Broker` protocol and states its guarantees as a
        :class:`Capabilities` value (data the framework, this suite and the docs read) and its URL
        as a string with no password in it."""
        broker = await self.open()
        assert isinstance(broker, Broker)
        assert isinstance(broker.capabilities, Capabilities)
        assert isinstance(broker.url, str)
        assert urlsplit(broker.url).password in (None, "***")

    # -- publish and subscribe ------------------------------------------------------------------

    async def test_round_trip_keeps_every_attribute_and_the_data(self) -> None:
        """An envelope arrives exactly as it was published: id, type, source, time,
        datacontenttype, every extension and the data bytes (binary, not only JSON). The first
        delivery is attempt 1, whatever the envelope's extensions say."""
        broker = await self.open()
        topic, group = unique("topic"), unique("group")
        subscription = await broker.subscribe(topic, group)
        binary = Envelope(
            type="callcast.conformance.RoundTrip",
            source="/shop/orders",
            data=bytes(range(256)),
            id="a1b2c3d4-0000-4000-8000-000000000001",
            time="2024-02-29T23:59:59.123456Z",
            datacontenttype="application/octet-stream",
            extensions={
                "correlationid": "corr-1",
                "causationid": "cause-1",
                "partitionkey": "order-17",
                "sequence": "3",
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "attempt": "7",
                "note": 'héllo, wörld ✓ "quoted" \\ back',
            },
        )
        plain = Envelope(type="UserSignedUp", source="/shop/users", data=b'{"user_id":"u1"}')
        await broker.publish(topic, [binary, plain])
        first, second = await self.take(subscription, 2)
        assert first.envelope == binary
        assert second.envelope == plain
        assert (first.attempt, second.attempt) == (1, 1)
        assert isinstance(first, Delivery)
        await first.ack()
        await second.ack()

    async def test_a_batch_keeps_its_order_for_a_subscriber(self) -> None:
        """The envelopes of one ``publish`` call to one topic reach a subscriber in their order,
        even with many unsettled at once; publishing an empty batch stores nothing."""
        broker = await self.open()
        topic, group = unique("topic"), unique("group")
        subscription = await broker.subscribe(topic, group, prefetch=8)
        await broker.publish(topic, [])
        batch = [envelope(f"m{n:03}") for n in range(60)]
        await broker.publish(topic, batch)
        received: list[str] = []
        for _ in batch:
            delivery = await self.next(subscription)
            received.append(label_of(delivery))
            await delivery.ack()
        assert received == [label_of_envelope(e) for e in batch]

    async def test_concurrent_publishers_lose_nothing(self) -> None:
        """Publishes from concurrent tasks of the event loop are all stored, once each, and each
        call's batch keeps its own order."""
        broker = await self.open()
        topic, group = unique("topic"), unique("group")
        subscription = await broker.subscribe(topic, group, prefetch=16)
        batches = [[f"p{p}-{n}" for n in range(8)] for p in range(12)]
        await asyncio.wait_for(
            asyncio.gather(
                *(broker.publish(topic, [envelope(label) for label in batch]) for batch in batches)
            ),
            self.timeout,
        )
        received: list[str] = []
        for _ in range(sum(map(len, batches))):
            delivery = await self.next(subscription)
            received.append(label_of(delivery))
            await delivery.ack()
        assert sorted(received) == sorted(label for batch in batches for label in batch)
        for batch in batches:
            assert [label for label in received if label in batch] == batch

    async def test_every_group_gets_every_envelope(self) -> None:
        """Fan-out: each group declared on a topic gets its own copy of every envelope published
        after it was declared, in order, however the other groups settle theirs."""
        broker = await self.open()
        topic = unique("topic")
        billing, shipping = unique("billing"), unique("shipping")
        await broker.declare(topic, billing)
        await broker.declare(topic, shipping)
        sent = [envelope(f"e{n}") for n in range(10)]
        await broker.publish(topic, sent)
        billing_sub = await broker.subscribe(topic, billing)
        shipping_sub = await broker.subscribe(topic, shipping)
        billed = await self.take(billing_sub, len(sent))
        for delivery in billed:
            await delivery.ack()
        shipped = await self.take(shipping_sub, len(sent))
        expected = [label_of_envelope(e) for e in sent]
        assert labels(billed) == expected
        assert labels(shipped) == expected
        assert [d.envelope.id for d in shipped] == [e.id for e in sent]

    async def test_a_publish_to_one_group_reaches_only_that_group(self) -> None:
        """``publish(topic, envelopes, group=G)``: only group ``G`` of the topic receives them (how a
        dead letter is replayed to its one subscriber); the other groups see only what follows."""
        broker = await self.open()
        topic = unique("topic")
        chosen, other = unique("chosen"), unique("other")
        await broker.declare(topic, chosen)
        await broker.declare(topic, other)
        await broker.publish(topic, [envelope("only for chosen")], group=chosen)
        await broker.publish(topic, [envelope("for everyone")])
        chosen_sub = await broker.subscribe(topic, chosen)
        other_sub = await broker.subscribe(topic, other)
        got = await self.take(chosen_sub, 2)
        assert labels(got) == ["only for chosen", "for everyone"]
        first_for_other = await self.next(other_sub)
        assert label_of(first_for_other) == "for everyone"

    async def test_subscribers_of_one_group_share_its_envelopes(self) -> None:
        """Competing consumers: while one subscriber holds its prefetch, the group hands the next
        envelope to another subscriber; all envelopes are delivered, none to both subscribers."""
        broker = await self.open()
        topic, group = unique("topic"), unique("group")
        first = await broker.subscribe(topic, group, prefetch=1)
        second = await broker.subscribe(topic, group, prefetch=1)
        await broker.publish(topic, [envelope("a"), envelope("b")])
        held = await self.next(first)
        other = await self.next(second)
        assert {label_of(held), label_of(other)} == {"a", "b"}
        await held.ack()
        await other.ack()

        sent = [envelope(f"n{n}") for n in range(40)]
        received: list[tuple[str, str]] = []
        all_in = asyncio.Event()

        async def consume(name: str, subscription: Subscription) -> None:
            async for delivery in subscription:
                received.append((name, label_of(delivery)))
                await delivery.ack()
                if len(received) >= len(sent):
                    all_in.set()

        consumers = [
            asyncio.create_task(consume("first", first)),
            asyncio.create_task(consume("second", second)),
        ]
        await broker.publish(topic, sent)
        try:
            await asyncio.wait_for(all_in.wait(), self.timeout)
        finally:
            await first.close()
            await second.close()
            await asyncio.wait_for(asyncio.gather(*consumers), self.timeout)
        got = [label for _, label in received]
        assert sorted(got) == sorted(label_of_envelope(e) for e in sent)
        assert len(got) == len(set(got)), "an envelope was delivered to both subscribers"

    async def test_a_group_gets_only_what_is_published_after_it_was_declared(self) -> None:
        """A group receives the envelopes published after ``declare`` returned, not older ones
        (unless ``capabilities.replays_history``)."""
        broker = await self.open()
        if broker.capabilities.replays_history:
            pytest.skip("capabilities.replays_history is True: a new group also sees older envelopes")
        topic, group = unique("topic"), unique("group")
        await broker.publish(topic, [envelope("before")])
        await broker.declare(topic, group)
        await broker.publish(topic, [envelope("after")])
        subscription = await broker.subscribe(topic, group)
        delivery = await self.next(subscription)
        assert label_of(delivery) == "after"
        await delivery.ack()

    async def test_declaring_a_group_twice_is_harmless(self) -> None:
        """Declaring an existing group again neither loses what it holds nor doubles what it gets
        (subscribing declares too)."""
        broker = await self.open()
        topic, group = unique("topic"), unique("group")
        await broker.declare(topic, group)
        await broker.publish(topic, [envelope("kept")])
        await broker.declare(topic, group)
        await broker.publish(topic, [envelope("once")])
        subscription = await broker.subscribe(topic, group)
        await broker.declare(topic, group)
        marker = await self.publish_marker(broker, topic)
        got: list[str] = []
        while not got or got[-1] != marker:
            delivery = await self.next(subscription)
            got.append(label_of(delivery))
            await delivery.ack()
        assert got == ["kept", "once", marker]

    async def test_a_group_name_belongs_to_its_topic(self) -> None:
        """A group is a group *on a topic*: the same group name on two topics is two independent
        groups, and neither receives the other topic's envelopes."""
        broker = await self.open()
        orders, users = unique("orders"), unique("users")
        group = unique("audit")
        on_orders = await broker.subscribe(orders, group)
        on_users = await broker.subscribe(users, group)
        await broker.publish(orders, [envelope("order")])
        await broker.publish(users, [envelope("user")])
        order_marker = await self.publish_marker(broker, orders)
        user_marker = await self.publish_marker(broker, users)
        for subscription, expected in (
            (on_orders, ["order", order_marker]),
            (on_users, ["user", user_marker]),
        ):
            got = await self.take(subscription, 2)
            assert labels(got) == expected
            for delivery in got:
                await delivery.ack()

    async def test_a_durable_group_keeps_envelopes_while_nobody_listens(self) -> None:
        """Subscribing declares the group; after its only subscriber closed, the group keeps
        receiving, and the next subscriber gets what was published meanwhile."""
        broker = await self.open()
        topic, group = unique("topic"), unique("group")
        subscription = await broker.subscribe(topic, group)
        await subscription.close()
        await broker.publish(topic, [envelope("while away")])
        again = await broker.subscribe(topic, group)
        delivery = await self.next(again)
        assert label_of(delivery) == "while away"
        assert delivery.attempt == 1
        await delivery.ack()

    # -- ack and nack ---------------------------------------------------------------------------

    async def test_ack_is_final_and_idempotent(self) -> None:
        """An acked envelope is never delivered to the group again: a second ``ack`` and a later
        ``nack`` are ignored without error."""
        broker = await self.open()
        topic, group = unique("topic"), unique("group")
        subscription = await broker.subscribe(topic, group)
        await broker.publish(topic, [envelope("done")])
        delivery = await self.next(subscription)
        await delivery.ack()
        await delivery.ack()
        await delivery.nack()
        marker = await self.publish_marker(broker, topic)
        following = await self.next(subscription)
        assert label_of(following) == marker
        await following.ack()

    async def test_nack_redelivers_with_the_attempt_counted(self) -> None:
        """``nack()`` gives the envelope back; it is delivered again, intact, and each delivery's
        ``attempt`` is one more than the previous one's."""
        broker = await self.open()
        topic, group = unique("topic"), unique("group")
        subscription = await broker.subscribe(topic, group)
        sent = envelope("retry me")
        await broker.publish(topic, [sent])
        attempts = []
        for _ in range(3):
            delivery = await self.next(subscription)
            assert delivery.envelope == sent
            attempts.append(delivery.attempt)
            await delivery.nack()
        last = await self.next(subscription)
        assert last.envelope == sent
        await last.ack()
        assert [*attempts, last.attempt] == [1, 2, 3, 4]

    async def test_envelopes_fetched_ahead_but_never_handed_out_are_no_attempt(self) -> None:
        """Prefetch is the adapter's business: closing a subscription that fetched envelopes ahead
        but handed out only one counts an attempt for that one only; its ``holding`` was told of
        each delivery by the time it was handed out, and of those given back on close."""
        broker = await self.open()
        topic, group = unique("topic"), unique("group")
        holding = _Held()
        first = await broker.subscribe(topic, group, prefetch=10, holding=holding)
        await broker.publish(topic, [envelope(f"e{n}") for n in range(3)])
        taken = await self.next(first)
        assert taken.attempt == 1
        assert taken.envelope.id in holding.ids
        await first.close()
        assert holding.ids == {taken.envelope.id}
        second = await broker.subscribe(topic, group, prefetch=10)
        again = await self.take(second, 3)
        assert {label_of(d): d.attempt for d in again} == {"e0": 2, "e1": 1, "e2": 1}

    async def test_nack_with_delay_holds_the_envelope_back(self) -> None:
        """``nack(delay=d)`` makes the envelope available again only after ``d`` seconds; meanwhile
        other envelopes flow, and afterwards it comes back with the next attempt number."""
        broker = await self.open()
        self.require(broker, "delayed_nack", "the framework schedules delayed retries itself")
        topic, group = unique("topic"), unique("group")
        subscription = await broker.subscribe(topic, group)
        await broker.publish(topic, [envelope("later")])
        delivery = await self.next(subscription)
        delay = 1.0
        loop = asyncio.get_running_loop()
        nacked_at = loop.time()
        await delivery.nack(delay=delay)
        await broker.publish(topic, [envelope("meanwhile")])
        meanwhile = await self.next(subscription)
        assert label_of(meanwhile) == "meanwhile"
        assert loop.time() - nacked_at < delay, "a delayed nack held up the other envelopes"
        await meanwhile.ack()
        again = await self.next(subscription, delay + self.timeout)
        waited = loop.time() - nacked_at
        assert label_of(again) == "later"
        assert again.attempt == 2
        assert waited >= delay - 0.02, f"redelivered after {waited:.3f}s, before the {delay}s delay"
        await again.ack()

    # -- subscribers that go away ---------------------------------------------------------------

    async def test_a_closed_subscribers_deliveries_go_to_another_subscriber(self) -> None:
        """A subscriber that closes without settling hands its deliveries back: another
        subscriber of the group, already waiting, gets them, counted as attempt 2."""
        broker = await self.open()
        topic, group = unique("topic"), unique("group")
        leaving = await broker.subscribe(topic, group, prefetch=2)
        await broker.publish(topic, [envelope("x"), envelope("y")])
        held = await self.take(leaving, 2)
        staying = await broker.subscribe(topic, group)
        waiting = asyncio.create_task(_next(staying))
        await self.assert_pending(waiting, "the other subscriber still holds both envelopes")
        await leaving.close()
        first = await self.finish(waiting)
        second = await self.next(staying)
        assert labels([first, second]) == labels(held)
        assert (first.attempt, second.attempt) == (2, 2)
        await first.ack()
        await second.ack()

    async def test_settling_after_close_is_ignored(self) -> None:
        """Acks and nacks of a closed subscription are ignored, without error: they do not settle
        the envelope that now belongs to another subscriber."""
        broker = await self.open()
        topic, group = unique("topic"), unique("group")
        leaving = await broker.subscribe(topic, group)
        await broker.publish(topic, [envelope("contested")])
        stale = await self.next(leaving)
        await leaving.close()
        staying = await broker.subscribe(topic, group)
        current = await self.next(staying)
        assert label_of(current) == "contested"
        assert current.attempt == 2
        await stale.ack()
        await stale.nack()
        await current.nack()
        back = await self.next(staying)
        assert label_of(back) == "contested", "the stale ack settled another subscriber's delivery"
        assert back.attempt == 3
        await back.ack()

    @pytest.mark.slow
    async def test_a_killed_subscriber_in_another_process_loses_its_deliveries(self) -> None:
        """A subscriber in another process that is killed (SIGKILL: no goodbye) while holding
        deliveries loses them to the group's other subscribers, after the adapter's lease; while
        it lives, it keeps them past the lease. The redeliveries count as attempt 2."""
        broker = await self.open()
        url = self.killable_process_url(broker)
        topic, group = unique("topic"), unique("group")
        await broker.declare(topic, group)
        sent = [envelope(f"held{n}") for n in range(3)]
        await broker.publish(topic, sent)
        child = _ChildProcess(_HOLDER_SCRIPT, url, topic, group, str(len(sent)), str(len(sent)))
        waiting: asyncio.Task[Delivery] | None = None
        try:
            _, held = await child.read_until("holding", self.timeout + 25)  # it first imports callcast
            assert sorted(held.split()) == sorted(e.id for e in sent)
            subscription = await broker.subscribe(topic, group)
            waiting = asyncio.create_task(_next(subscription))
            if self.lease is not None:
                done, _ = await asyncio.wait({waiting}, timeout=self.lease * 1.5)
                assert not done, "a live subscriber's deliveries were taken after its lease"
            child.kill()
            await child.finish()
            redelivery_deadline = (self.lease or 0.0) + self.timeout
            redelivered = [await self.finish(waiting, redelivery_deadline)]
            redelivered += await self.take(subscription, len(sent) - 1)
        finally:
            if waiting is not None and not waiting.done():
                waiting.cancel()
            await child.finish()
        assert sorted(d.envelope.id for d in redelivered) == sorted(e.id for e in sent)
        assert [d.attempt for d in redelivered] == [2] * len(sent)
        for delivery in redelivered:
            await delivery.ack()

    async def test_an_ack_reported_returned_survives_the_process_being_killed(self) -> None:
        """``holding.returned`` hears of a settle once it is the broker's (not only queued in the
        process): a subscriber killed the moment its holding heard all its acks returned does not
        get its envelopes redelivered to the group, past the adapter's lease."""
        broker = await self.open()
        url = self.killable_process_url(broker)
        topic, group = unique("topic"), unique("group")
        await broker.declare(topic, group)
        await broker.publish(topic, [envelope(f"acked{n}") for n in range(20)])
        child = _ChildProcess(_SETTLE_AND_DIE_SCRIPT, url, topic, group, "20")
        _, errors = await child.finish(self.timeout + 40)  # it first imports callcast
        assert child.process.returncode == -signal.SIGKILL, f"not every ack was returned: {errors}"
        subscription = await broker.subscribe(topic, group)
        waiting = asyncio.create_task(_next(subscription))
        try:
            await self.assert_pending(waiting, "every envelope was acked", (self.lease or 0.0) * 1.5)
        finally:
            waiting.cancel()
        marker = await self.publish_marker(broker, topic)
        assert label_of(await self.next(subscription)) == marker

    async def test_what_a_killed_subscriber_was_counted_for_it_had_announced(self) -> None:
        """``subscribe(..., holding=H)``: a delivery is announced to ``H.fetched`` by the time it is
        counted for the subscriber (at the latest when handed out; when read ahead, as it lands in
        the adapter's buffer). So after a subscriber that read ahead is killed, every envelope
        redelivered with its attempt counted is one it had announced and not returned."""
        broker = await self.open()
        url = self.killable_process_url(broker)
        topic, group = unique("topic"), unique("group")
        await broker.declare(topic, group)
        sent = [envelope(f"read-ahead{n}") for n in range(4)]
        await broker.publish(topic, sent)
        child = _ChildProcess(_HOLDER_SCRIPT, url, topic, group, "2", str(len(sent)))
        try:
            announced, held = await child.read_until("holding", self.timeout + 25)
        finally:
            output, _ = await child.finish()
        fetched: set[str] = set()
        for line in [*announced, *output.splitlines()]:
            what, _, envelope_id = line.strip().partition(" ")
            if what == "fetched":
                fetched.add(envelope_id)
            elif what == "returned":
                fetched.discard(envelope_id)
        assert set(held.split()) <= fetched, "a delivery was handed out before it was announced"
        subscription = await broker.subscribe(topic, group)
        deadline = (self.lease or 0.0) + self.timeout
        redelivered = [await self.next(subscription, deadline) for _ in sent]
        for delivery in redelivered:
            await delivery.ack()
        assert sorted(d.envelope.id for d in redelivered) == sorted(e.id for e in sent)
        counted = {d.envelope.id for d in redelivered if d.attempt > 1}
        assert set(held.split()) <= counted
        assert counted <= fetched, f"counted for the killed subscriber, never announced: {counted - fetched}"

    # -- per-key order --------------------------------------------------------------------------

    async def test_one_key_waits_for_its_earlier_envelope_other_keys_do_not(self) -> None:
        """With ``ordered_per_key``, an envelope is not handed out while an earlier one of its
        partition key is unsettled, to no subscriber of the group, though both have free
        prefetch and wait in ``__anext__``; envelopes of other keys are handed out meanwhile. A
        ``nack`` keeps the key blocked until the envelope is redelivered and acked."""
        broker = await self.open()
        self.require(broker, "ordered_per_key", "per-key order is not guaranteed across subscribers")
        topic, group = unique("topic"), unique("group")
        subscriptions = [await broker.subscribe(topic, group, prefetch=4) for _ in range(2)]
        pulls = _Pulls(subscriptions)
        try:
            await broker.publish(
                topic, [envelope("a1", key="a"), envelope("a2", key="a"), envelope("b1", key="b")]
            )
            a1, b1 = sorted([await pulls.next(self.timeout), await pulls.next(self.timeout)], key=label_of)
            assert labels([a1, b1]) == ["a1", "b1"], "a2 was handed out before a1 was settled"
            await b1.ack()
            await pulls.assert_quiet(self.quiet, "a2 must wait while a1 is unsettled")
            await a1.nack()
            a1_again = await pulls.next(self.timeout)
            assert (label_of(a1_again), a1_again.attempt) == ("a1", 2)
            await pulls.assert_quiet(self.quiet, "a2 must wait while the redelivered a1 is unsettled")
            await a1_again.ack()
            a2 = await pulls.next(self.timeout)
            assert label_of(a2) == "a2"
            await a2.ack()
        finally:
            for subscription in subscriptions:
                await subscription.close()
            await pulls.end(self.timeout)

    async def test_per_key_order_holds_across_competing_subscribers(self) -> None:
        """With ``ordered_per_key``, two subscribers with prefetch > 1 handle the envelopes of
        each key one at a time, in publish order, including retries after a nack, while several
        keys are handled in parallel."""
        broker = await self.open()
        self.require(broker, "ordered_per_key", "per-key order is not guaranteed across subscribers")
        topic, group = unique("topic"), unique("group")
        subscriptions = [await broker.subscribe(topic, group, prefetch=4) for _ in range(2)]
        keys = ["k0", "k1", "k2", "k3"]
        per_key = 6
        sent = [envelope(f"{key}-{n}", key=key) for n in range(per_key) for key in keys]
        rng = random.Random(7)
        busy: set[str] = set()
        most_busy = 0
        handled: dict[str, list[str]] = {key: [] for key in keys}
        violations: list[str] = []
        all_handled = asyncio.Event()
        handlers: set[asyncio.Task[None]] = set()

        async def handle(delivery: Delivery, key: str) -> None:
            await asyncio.sleep(rng.uniform(0, 0.01))  # simulated work, so keys overlap
            busy.discard(key)
            if delivery.attempt == 1 and rng.random() < 0.3:
                await delivery.nack()
                return
            handled[key].append(label_of(delivery))
            await delivery.ack()
            if sum(map(len, handled.values())) == len(sent):
                all_handled.set()

        async def consume(subscription: Subscription) -> None:
            nonlocal most_busy
            async for delivery in subscription:
                key = delivery.envelope.partition_key or ""
                if key in busy:
                    violations.append(f"{label_of(delivery)} handed out while {key} was busy")
                busy.add(key)
                most_busy = max(most_busy, len(busy))
                task = asyncio.create_task(handle(delivery, key))
                handlers.add(task)
                task.add_done_callback(handlers.discard)

        consumers = [asyncio.create_task(consume(s)) for s in subscriptions]
        await broker.publish(topic, sent)
        try:
            await asyncio.wait_for(all_handled.wait(), self.timeout * 2)
        finally:
            for subscription in subscriptions:
                await subscription.close()
            await asyncio.wait_for(asyncio.gather(*consumers, *handlers), self.timeout)
        assert violations == []
        for key in keys:
            assert handled[key] == [f"{key}-{n}" for n in range(per_key)]
        assert most_busy >= 2, "keys were never handled in parallel"

    # -- native request/reply -------------------------------------------------------------------

    async def open_requests(self) -> RequestReply:
        """A broker with native request/reply; skips the test for one without."""
        broker = await self.open()
        self.require(broker, "request_reply", "RPC is built on topics above the seam")
        assert isinstance(broker, RequestReply), "capabilities.request_reply needs request() and serve()"
        return broker

    async def test_a_request_gets_the_reply_of_one_server(self) -> None:
        """``request`` reaches a server of the group with its envelope intact (attempt 1), and
        returns the envelope the server passed to ``reply()``, attributes and data intact."""
        requests = await self.open_requests()
        topic, group = unique("rpc"), unique("servers")
        server = await requests.serve(topic, group)
        sent = Envelope(
            type=EVENT_TYPE, source=SOURCE, data=b'{"n": 1}', extensions={"deadline": "9999999999.5"}
        )
        pending = asyncio.create_task(requests.request(topic, sent, timeout=self.timeout))
        delivery = await self.next(server)
        assert isinstance(delivery, ServedRequest)
        assert (delivery.envelope.id, delivery.envelope.data, delivery.attempt) == (sent.id, sent.data, 1)
        assert delivery.envelope.extensions["deadline"] == "9999999999.5"
        answer = Envelope(type="callcast.reply", source=SOURCE, data=b"ok", extensions={"status": "200"})
        await delivery.reply(answer)
        await delivery.reply(answer)  # idempotent: settled once
        got = await asyncio.wait_for(pending, self.timeout)
        assert (got.id, got.data, got.extensions["status"]) == (answer.id, b"ok", "200")

    async def test_each_request_goes_to_one_server_of_the_group(self) -> None:
        """Two servers of one group share the requests: every request is served exactly once."""
        requests = await self.open_requests()
        topic, group = unique("rpc"), unique("servers")
        servers = [await requests.serve(topic, group) for _ in range(2)]
        served: list[str] = []

        async def answer(server: Subscription) -> None:
            async for delivery in server:
                served.append(label_of(delivery))
                assert isinstance(delivery, ServedRequest)
                await delivery.reply(envelope("re:" + label_of(delivery)))

        answering = [asyncio.create_task(answer(server)) for server in servers]
        try:
            replies = await asyncio.gather(
                *(requests.request(topic, envelope(f"q{n}"), timeout=self.timeout) for n in range(20))
            )
        finally:
            for server in servers:
                await server.close()
            await asyncio.wait_for(asyncio.gather(*answering), self.timeout)
        assert [label_of_envelope(reply) for reply in replies] == [f"re:q{n}" for n in range(20)]
        assert sorted(served) == sorted(f"q{n}" for n in range(20))

    async def test_a_request_nobody_answers_fails_by_its_timeout(self) -> None:
        """A request its server drops (``nack``) is answered by no one: ``request`` raises
        ``TimeoutError`` at its timeout. With no server at all it fails too, at once where the
        broker can tell (``BrokerUnavailableError``), else by its timeout."""
        requests = await self.open_requests()
        topic, group = unique("rpc"), unique("servers")
        with pytest.raises((TimeoutError, BrokerUnavailableError)):
            await asyncio.wait_for(
                requests.request(topic, envelope("nobody"), timeout=self.quiet), self.timeout
            )
        server = await requests.serve(topic, group)
        pending = asyncio.create_task(requests.request(topic, envelope("dropped"), timeout=self.quiet))
        await (await self.next(server)).nack()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pending, self.timeout)

    async def test_closing_a_server_ends_its_iteration(self) -> None:
        """``close()`` on a served subscription ends a waiting ``__anext__``, like any
        subscription's."""
        requests = await self.open_requests()
        server = await requests.serve(unique("rpc"), unique("servers"))
        waiting = asyncio.create_task(_drain(server))
        await self.assert_pending(waiting, "no request was sent")  # type: ignore[arg-type]
        await server.close()
        assert await asyncio.wait_for(waiting, self.timeout) == []

    # -- prefetch -------------------------------------------------------------------------------

    async def test_prefetch_bounds_the_unsettled_deliveries(self) -> None:
        """A subscription hands out at most ``prefetch`` unsettled deliveries: the next
        ``__anext__`` waits, although more envelopes are due, until one is acked or nacked."""
        broker = await self.open()
        topic, group = unique("topic"), unique("group")
        prefetch = 3
        subscription = await broker.subscribe(topic, group, prefetch=prefetch)
        await broker.publish(topic, [envelope(f"p{n}") for n in range(prefetch + 2)])
        held = await self.take(subscription, prefetch)
        waiting = asyncio.create_task(_next(subscription))
        await self.assert_pending(waiting, f"{prefetch} deliveries are unsettled")
        await held[0].ack()
        fourth = await self.finish(waiting)
        waiting = asyncio.create_task(_next(subscription))
        await self.assert_pending(waiting, f"{prefetch} deliveries are unsettled again")
        await held[1].nack(delay=30)
        fifth = await self.finish(waiting)
        assert labels([*held, fourth, fifth]) == [f"p{n}" for n in range(prefetch + 2)]
        for delivery in (held[2], fourth, fifth):
            await delivery.ack()

    # -- close ----------------------------------------------------------------------------------

    async def test_close_ends_a_waiting_consumer(self) -> None:
        """``Subscription.close()`` ends iteration promptly: a consumer waiting in ``__anext__``
        gets ``StopAsyncIteration`` (its ``async for`` ends), and so does every later call.
        Closing twice is harmless."""
        broker = await self.open()
        topic, group = unique("topic"), unique("group")
        subscription = await broker.subscribe(topic, group)
        consumer = asyncio.create_task(_drain(subscription))
        done, _ = await asyncio.wait({consumer}, timeout=self.quiet)
        assert not done, "iteration ended before close"
        await subscription.close()
        assert await asyncio.wait_for(consumer, self.timeout) == []
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(_next(subscription), self.timeout)
        await subscription.close()

    async def test_broker_close_closes_everything(self) -> None:
        """``Broker.close()`` closes every subscription (their consumers stop) and then the
        connection: settling afterwards is ignored, while publish, declare and subscribe raise
        :class:`BrokerUnavailableError`. Closing twice is harmless. An envelope that was held
        unsettled goes back to its group (seen from another connection where there can be one)."""
        broker = await self.open()
        orders, users = unique("orders"), unique("users")
        group = unique("group")
        held_sub = await broker.subscribe(orders, group)
        await broker.publish(orders, [envelope("held")])
        held = await self.next(held_sub)
        consumers = [
            asyncio.create_task(_drain(held_sub)),
            asyncio.create_task(_drain(await broker.subscribe(users, group))),
        ]
        await broker.close()
        assert await asyncio.wait_for(asyncio.gather(*consumers), self.timeout) == [[], []]
        await held.ack()
        await held.nack()
        with pytest.raises(BrokerUnavailableError):
            await broker.publish(orders, [envelope("too late")])
        with pytest.raises(BrokerUnavailableError):
            await broker.declare(orders, group)
        with pytest.raises(BrokerUnavailableError):
            await broker.subscribe(orders, group)
        await broker.close()
        if broker.capabilities.shared or broker.capabilities.durable:
            other = await self.open()
            again = await self.next(await other.subscribe(orders, group))
            assert (label_of(again), again.attempt) == ("held", 2)
            await again.ack()

    async def test_a_close_cut_short_is_finished_by_the_next(self) -> None:
        """A ``close()`` whose caller is cancelled while it runs (a caller's timeout) still closes
        the broker: a later ``close()`` returns once it is closed, and publish then raises
        :class:`BrokerUnavailableError`; the subscriber's iteration ends."""
        broker = await self.open()
        orders, group = unique("orders"), unique("group")
        subscription = await broker.subscribe(orders, group)
        await broker.publish(orders, [envelope("held")])
        await self.next(subscription)  # held: the close has something to give back
        consumer = asyncio.create_task(_drain(subscription))
        closing = asyncio.ensure_future(broker.close())
        await asyncio.sleep(0)  # one turn of the loop: the close starts and is under way
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing
        await asyncio.wait_for(broker.close(), self.timeout)
        with pytest.raises(BrokerUnavailableError):
            await broker.publish(orders, [envelope("too late")])
        assert await asyncio.wait_for(consumer, self.timeout) == []

    async def test_a_waiting_subscriber_is_woken_whatever_the_others_do(self) -> None:
        """A subscriber with free prefetch that waits in ``__anext__`` is woken by a publish, even
        when, at that moment, a full subscriber of the same group also looks for work and a
        delayed retry is pending in the group: no wake-up is lost to a neighbour."""
        broker = await self.open()
        topic, group = unique("topic"), unique("group")
        roomy = await broker.subscribe(topic, group, prefetch=2)
        full = await broker.subscribe(topic, group, prefetch=1)
        await broker.publish(topic, [envelope("busy")])
        busy = await self.next(full)
        await broker.publish(topic, [envelope("retry")])
        retry = await self.next(roomy)
        await retry.nack(delay=60)
        # In this order, as concurrent consumers would: one waits, a publish lands, another looks.
        waiting = asyncio.create_task(_next(roomy))
        publishing = asyncio.create_task(broker.publish(topic, [envelope("fresh")]))
        looking = asyncio.create_task(_next(full))
        fresh = await self.finish(waiting)
        assert label_of(fresh) == "fresh"
        await publishing
        assert not looking.done(), "a subscriber at its prefetch got another delivery"
        await fresh.ack()
        await busy.ack()
        await roomy.close()
        await full.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(looking, self.timeout)

    async def test_a_cancelled_wait_loses_nothing(self) -> None:
        """A consumer that gives up waiting (its ``__anext__`` is cancelled, e.g. by a timeout)
        loses no delivery: whatever the broker was handing out when the wait was cancelled is
        handed out by a later ``__anext__``, so every envelope is delivered, once."""
        broker = await self.open()
        topic, group = unique("topic"), unique("group")
        subscription = await broker.subscribe(topic, group, prefetch=4)
        sent = [f"c{n}" for n in range(20)]
        await broker.publish(topic, [envelope(label) for label in sent])
        received: list[str] = []
        cancelled = 0
        for _ in range(3 * len(sent)):  # an impatient consumer: gives up on each wait at once
            waiting = asyncio.create_task(_next(subscription))
            await asyncio.sleep(0)  # it starts waiting (and the broker starts handing something out)
            waiting.cancel()
            await asyncio.wait({waiting})
            if waiting.cancelled():
                cancelled += 1
                continue
            received.append(label_of(waiting.result()))
            await waiting.result().ack()
        while len(received) < len(sent):
            delivery = await self.next(subscription)
            received.append(label_of(delivery))
            await delivery.ack()
        assert sorted(received) == sorted(sent), f"after {cancelled} cancelled waits"

    # -- ephemeral subscriptions ----------------------------------------------------------------

    async def test_an_ephemeral_subscription_keeps_nothing_after_close(self) -> None:
        """An ephemeral subscription receives while it is subscribed; once closed, nothing is kept
        for it: a new ephemeral subscription of the same name gets only what comes after it."""
        broker = await self.open()
        topic, group = unique("replies"), unique("replies")
        subscription = await broker.subscribe(topic, group, ephemeral=True)
        await broker.publish(topic, [envelope("while subscribed")])
        delivery = await self.next(subscription)
        assert label_of(delivery) == "while subscribed"
        await delivery.ack()
        await subscription.close()
        await broker.publish(topic, [envelope("nobody listens")])
        again = await broker.subscribe(topic, group, ephemeral=True)
        marker = await self.publish_marker(broker, topic)
        first = await self.next(again)
        assert label_of(first) == marker, "an envelope was kept for a closed ephemeral subscription"
        await first.ack()

    # -- durability and sharing -----------------------------------------------------------------

    async def test_what_was_published_survives_closing_the_broker(self) -> None:
        """With ``durable``, a publish that returned is kept when every connection closes: a new
        broker object on the same store delivers it; unsettled deliveries come back with their
        attempt counted, and acks are kept too."""
        broker = await self.open()
        self.require(broker, "durable", "nothing survives the broker")
        topic, group = unique("topic"), unique("group")
        await broker.declare(topic, group)
        await broker.publish(topic, [envelope("held1"), envelope("held2"), envelope("acked")])
        subscription = await broker.subscribe(topic, group, prefetch=3)
        *_, acked = await self.take(subscription, 3)
        await acked.ack()
        await broker.close()

        reopened = await self.open()
        subscription = await reopened.subscribe(topic, group)
        got = await self.take(subscription, 2)
        assert [(label_of(d), d.attempt) for d in got] == [("held1", 2), ("held2", 2)]
        for delivery in got:
            await delivery.ack()
        await reopened.close()

        third = await self.open()
        subscription = await third.subscribe(topic, group)
        marker = await self.publish_marker(third, topic)
        assert label_of(await self.next(subscription)) == marker

    async def test_two_connections_share_groups(self) -> None:
        """With ``shared``, two connections (as two processes would open) see one broker: a
        subscriber on one is woken by a publish on the other, the subscribers of a group compete
        across connections, and each group gets every envelope."""
        publisher = await self.open()
        self.require(publisher, "shared", "no second connection can reach this broker")
        consumer = await self.open()
        topic, group, audit = unique("topic"), unique("group"), unique("audit")
        there = await consumer.subscribe(topic, group, prefetch=1)
        audit_sub = await consumer.subscribe(topic, audit)
        waiting = asyncio.create_task(_next(there))
        await publisher.publish(topic, [envelope("one")])
        woken = await self.finish(waiting)
        assert label_of(woken) == "one"
        here = await publisher.subscribe(topic, group, prefetch=1)
        await publisher.publish(topic, [envelope("two")])
        other = await self.next(here)
        assert label_of(other) == "two", "the group did not hand work to the other connection"
        audited = await self.take(audit_sub, 2)
        assert labels(audited) == ["one", "two"]
        for delivery in (woken, other, *audited):
            await delivery.ack()
        await here.close()
        await publisher.publish(topic, [envelope("three")])
        last = await self.next(there)
        assert label_of(last) == "three"
        await last.ack()

    # -- a broker that restarts -----------------------------------------------------------------

    async def test_a_restarted_server_loses_nothing_that_was_accepted(self) -> None:
        """Reconnect: while the server is down, a publish either returns (and then its envelope is
        delivered once the server is back) or raises a ``TransportError`` — it never returns and
        vanishes. After the restart the same broker object publishes and delivers again, without
        the application reconnecting, and durable envelopes accepted before the outage are there."""
        if not self.can_restart:
            pytest.skip("this adapter's test module cannot restart its server")
        broker = await self.open()
        self.require(broker, "durable", "only a durable broker keeps envelopes across a restart")
        topic, group = unique("topic"), unique("group")
        await broker.declare(topic, group)
        accepted = [envelope("before")]
        await broker.publish(topic, accepted)
        await self.stop_server()
        restarting: asyncio.Task[None] | None = None
        try:
            for n in range(3):
                during = envelope(f"during{n}")
                try:
                    await asyncio.wait_for(broker.publish(topic, [during]), self.timeout)
                except (TransportError, TimeoutError):
                    continue  # refused loudly: allowed
                accepted.append(during)
                if restarting is None:
                    restarting = asyncio.create_task(self.start_server())
        finally:
            if restarting is None:
                await self.start_server()
            else:
                await restarting
        after = envelope("after")
        deadline = asyncio.get_running_loop().time() + 6 * self.timeout
        while True:  # the adapter reconnects by itself; publishes may fail until it has
            try:
                await asyncio.wait_for(broker.publish(topic, [after]), self.timeout)
                break
            except (TransportError, TimeoutError):
                if asyncio.get_running_loop().time() > deadline:
                    pytest.fail("the broker object did not publish again after the server restarted")
                await asyncio.sleep(0.2)
        accepted.append(after)
        subscription = await broker.subscribe(topic, group)
        wanted = {label_of_envelope(e) for e in accepted}
        received: set[str] = set()
        while not wanted <= received:
            delivery = await self.next(subscription, timeout=3 * self.timeout)
            received.add(label_of(delivery))
            await delivery.ack()
        assert wanted <= received
