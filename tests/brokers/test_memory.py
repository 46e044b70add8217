"""The in-process ``memory://`` broker against the shared conformance suite."""

from __future__ import annotations

from callcast.brokers import connect
from callcast.brokers.memory import MemoryBroker, _holes_allowed
from callcast.testing import BrokerConformance
from callcast.testing.conformance import envelope
from callcast.transport import Broker, Capabilities


class TestMemoryBroker(BrokerConformance):
    async def make_broker(self) -> Broker:
        return await connect("memory://")

    async def test_capabilities(self) -> None:
        """The memory broker honours the whole contract except durability and sharing."""
        broker = await self.open()
        assert isinstance(broker, MemoryBroker)
        assert broker.capabilities == Capabilities(
            durable=False,
            shared=False,
            delayed_nack=True,
            delivery_count=True,
            ordered_per_key=True,
            request_reply=False,
            replays_history=False,
        )

    async def test_draining_a_backlog_keeps_few_removed_slots(self) -> None:
        """Acknowledged entries leave slots in the group's dict that every take walks over; the dict
        is rebuilt before they pass the bound, so a long drain does not slow down as it goes."""
        broker = await self.open()
        count = 3 * 4096
        subscription = await broker.subscribe("Backlog", "drain", prefetch=8)
        await broker.publish("Backlog", [envelope(str(n)) for n in range(count)])
        assert isinstance(broker, MemoryBroker)
        state = broker._topics["Backlog"]["drain"]
        labels: list[int] = []
        most_holes = 0
        async for delivery in subscription:
            labels.append(int(delivery.envelope.data))
            await delivery.ack()
            most_holes = max(most_holes, state.holes)
            assert state.holes <= _holes_allowed(len(state.entries))
            if len(labels) == count:
                break
        assert labels == list(range(count))  # in order, each once
        assert state.entries == {}
        assert most_holes == _holes_allowed(count)  # it was reached, then the dict rebuilt
        await subscription.close()
