"""Publish coalescing (callcast.coalescing): concurrent single publishes become batches, in order,
and every caller learns its own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from callcast.brokers.memory import MemoryBroker
from callcast.coalescing import CoalescingBroker
from callcast.envelope import Envelope
from callcast.exceptions import PublishError


class Recording(MemoryBroker):
    """A memory broker that records each publish call's batch, can be held, and refuses a batch
    holding an envelope labelled ``bad…``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def publish(self, topic: str, envelopes: Sequence[Envelope], *, group: str | None = None) -> None:
        self.calls.append([e.data.decode() for e in envelopes])
        await self.gate.wait()
        if any(e.data.startswith(b"bad") for e in envelopes):
            raise PublishError("refused")
        await super().publish(topic, envelopes, group=group)

    def labels(self) -> list[str]:
        """The labels of every publish call, in call order."""
        return [label for batch in self.calls for label in batch]


async def held(**options: int) -> tuple[Recording, CoalescingBroker]:
    """A recording broker with group ``g`` on ``T`` whose publishes are held until the test sets its
    gate, and a coalescing broker (``options``: its settings) over it."""
    inner = Recording()
    await inner.declare("T", "g")
    inner.gate.clear()
    return inner, CoalescingBroker(inner, **options)


def event(label: str) -> Envelope:
    return Envelope(type="T", source="/test", data=label.encode())


async def received(broker: MemoryBroker, count: int) -> list[str]:
    subscription = await broker.subscribe("T", "g", prefetch=count + 1)
    labels = []
    async for delivery in subscription:
        labels.append(delivery.envelope.data.decode())
        await delivery.ack()
        if len(labels) == count:
            break
    await subscription.close()
    return labels


async def test_publishes_made_while_one_is_in_flight_go_out_together_in_call_order() -> None:
    inner, broker = await held(max_in_flight=1)  # the first publish stays in flight meanwhile
    first = asyncio.create_task(broker.publish("T", [event("e0")]))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(broker.publish("T", [event(f"e{n}")])) for n in range(1, 40)]
    await asyncio.sleep(0)
    inner.gate.set()
    await asyncio.gather(first, *rest)
    assert inner.calls[0] == ["e0"]
    assert inner.calls[1] == [f"e{n}" for n in range(1, 40)]  # one batch, in the order of the calls
    assert await received(inner, 40) == [f"e{n}" for n in range(40)]


async def test_up_to_max_in_flight_publishes_go_out_alone_then_the_rest_wait_and_batch() -> None:
    inner, broker = await held(max_in_flight=3)
    tasks = [asyncio.create_task(broker.publish("T", [event(f"e{n}")])) for n in range(20)]
    await asyncio.sleep(0)
    assert inner.calls == [["e0"], ["e1"], ["e2"]]  # three in flight, the others wait
    inner.gate.set()
    await asyncio.gather(*tasks)
    assert sorted(inner.labels()) == sorted(f"e{n}" for n in range(20))
    assert len(inner.calls) < 20  # the waiting ones went out in batches
    assert sorted(await received(inner, 20)) == sorted(f"e{n}" for n in range(20))


async def test_a_batch_never_exceeds_max_batch() -> None:
    inner, broker = await held(max_batch=8, max_in_flight=1)
    tasks = [asyncio.create_task(broker.publish("T", [event(f"e{n}")])) for n in range(30)]
    await asyncio.sleep(0)
    inner.gate.set()
    await asyncio.gather(*tasks)
    assert max(len(batch) for batch in inner.calls) <= 8
    assert inner.labels() == [f"e{n}" for n in range(30)]


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_goes_out() -> None:
    inner, broker = await held(max_in_flight=1)
    first = asyncio.create_task(broker.publish("T", [event("ok")]))
    await asyncio.sleep(0)
    doomed = [asyncio.create_task(broker.publish("T", [event(f"bad{n}")])) for n in range(3)]
    await asyncio.sleep(0)
    inner.gate.set()
    await first
    outcomes = await asyncio.gather(*doomed, return_exceptions=True)
    assert all(isinstance(outcome, PublishError) for outcome in outcomes), outcomes
    assert inner.calls[1] == ["bad0", "bad1", "bad2"]  # they went (and failed) as one batch
    await broker.publish("T", [event("after")])
    assert await received(inner, 2) == ["ok", "after"]


async def test_one_refused_envelope_fails_only_its_own_caller() -> None:
    """A batch the broker refuses for one envelope's sake is sent again one envelope at a time, so
    each caller gets its own outcome."""
    inner, broker = await held(max_in_flight=1)
    first = asyncio.create_task(broker.publish("T", [event("ok")]))
    await asyncio.sleep(0)
    mixed = [asyncio.create_task(broker.publish("T", [event(label)])) for label in ("good0", "bad1", "good2")]
    await asyncio.sleep(0)
    inner.gate.set()
    await first
    outcomes = await asyncio.gather(*mixed, return_exceptions=True)
    assert outcomes[0] is None
    assert isinstance(outcomes[1], PublishError)
    assert outcomes[2] is None
    assert inner.calls[1] == ["good0", "bad1", "good2"]
    assert await received(inner, 3) == ["ok", "good0", "good2"]


async def test_a_caller_cancelled_while_waiting_takes_its_envelope_out() -> None:
    inner, broker = await held(max_in_flight=1)
    first = asyncio.create_task(broker.publish("T", [event("e0")]))
    await asyncio.sleep(0)
    kept = asyncio.create_task(broker.publish("T", [event("kept")]))
    dropped = asyncio.create_task(broker.publish("T", [event("dropped")]))
    await asyncio.sleep(0)
    dropped.cancel()
    inner.gate.set()
    await asyncio.gather(first, kept)
    with pytest.raises(asyncio.CancelledError):
        await dropped
    assert "dropped" not in inner.labels()
    assert await received(inner, 2) == ["e0", "kept"]


async def test_batches_and_publishes_to_one_group_pass_straight_through() -> None:
    inner = Recording()
    broker = CoalescingBroker(inner, max_in_flight=1)
    await inner.declare("T", "g")
    await broker.publish("T", [event("a"), event("b")])
    await broker.publish("T", [event("c")], group="g")
    assert inner.calls == [["a", "b"], ["c"]]
    assert broker.capabilities == inner.capabilities
