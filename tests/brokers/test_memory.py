"""The in-process ``memory://`` broker against the shared conformance suite."""

from __future__ import annotations

from callcast.brokers import connect
from callcast.brokers.memory import MemoryBroker
from callcast.testing import BrokerConformance
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
