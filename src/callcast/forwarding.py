"""A broker that hands every call to another: the base of wrappers that change one or two of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from callcast.envelope import Envelope
from callcast.transport import Broker, Capabilities, Holding, RequestReply, Subscription


class ForwardingBroker:
    """A :class:`~callcast.transport.Broker` that passes each call to ``broker`` unchanged (native
    request/reply too, which works only where ``broker`` has it: ``capabilities.request_reply``).
    Subclasses override what they add; closing the wrapper closes ``broker``."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.capabilities: Capabilities = broker.capabilities
        self.url: str = broker.url

    async def connect(self) -> None:
        await self.broker.connect()

    async def close(self) -> None:
        await self.broker.close()

    async def publish(self, topic: str, envelopes: Sequence[Envelope], *, group: str | None = None) -> None:
        await self.broker.publish(topic, envelopes, group=group)

    async def declare(self, topic: str, group: str) -> None:
        await self.broker.declare(topic, group)

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        prefetch: int = 32,
        ephemeral: bool = False,
        holding: Holding | None = None,
    ) -> Subscription:
        return await self.broker.subscribe(
            topic, group, prefetch=prefetch, ephemeral=ephemeral, holding=holding
        )

    async def request(self, topic: str, envelope: Envelope, *, timeout: float) -> Envelope:
        return await cast(RequestReply, self.broker).request(topic, envelope, timeout=timeout)

    async def serve(self, topic: str, group: str, *, prefetch: int = 32) -> Subscription:
        return await cast(RequestReply, self.broker).serve(topic, group, prefetch=prefetch)
