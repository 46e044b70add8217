"""``memory://``: a real broker adapter that lives in one process's memory.

It honours the whole transport contract (fan-out, competing subscribers, ack/nack with delay,
per-key order, prefetch, close) except durability and sharing across processes, so the tests of
user services run on it unchanged. It is not a mock: the conformance suite runs against it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from callcast.envelope import Envelope
from callcast.exceptions import BrokerUnavailableError
from callcast.transport import Capabilities, Delivery, Holding
from callcast.waiting import wait_event

CAPABILITIES = Capabilities(
    durable=False,
    shared=False,
    delayed_nack=True,
    delivery_count=True,
    ordered_per_key=True,
    request_reply=False,
    replays_history=False,
)


@dataclass(slots=True, eq=False)
class _Entry:
    seq: int
    envelope: Envelope
    available_at: float = 0.0
    deliveries: int = 0
    holder: _MemorySubscription | None = None


def _holes_allowed(entries: int) -> int:
    """Removed slots a group's dict may keep: a take skips up to this many (a C loop, ~1 ns each),
    and a rebuild copies ``entries`` (~10 ns each) once per this many removals."""
    return max(4096, entries // 32)


@dataclass(slots=True, eq=False)
class _Group:
    ephemeral: bool
    entries: dict[int, _Entry] = field(default_factory=dict)  # in publish (seq) order
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    holes: int = 0  # entries removed since ``entries`` was last rebuilt

    def wake(self) -> None:
        # Set the event the waiters hold and give later ones a fresh one: nobody clears an event
        # another subscriber is about to wait on, so no wake-up is lost between them.
        self.changed.set()
        self.changed = asyncio.Event()

    def remove(self, seq: int) -> None:
        """Drop an acknowledged entry. A dict keeps the slot of a removed entry until it is
        rebuilt, and :meth:`take` walks from the front, where acknowledged entries leave their
        slots: the dict is rebuilt once they pass :func:`_holes_allowed`, so a take skips at most
        that many, and draining a backlog does not slow down as it goes."""
        if self.entries.pop(seq, None) is None:
            return
        self.holes += 1
        if self.holes > _holes_allowed(len(self.entries)):
            self.entries = dict(self.entries)
            self.holes = 0

    def take(self, holder: _MemorySubscription, now: float) -> tuple[_Entry | None, float | None]:
        """The first entry that is free, due, and the head of its key; else when to look again."""
        seen_keys: set[str] = set()
        next_due: float | None = None
        for entry in self.entries.values():
            key = entry.envelope.partition_key
            blocked = key is not None and key in seen_keys
            if key is not None:
                seen_keys.add(key)
            if blocked or entry.holder is not None:
                continue
            if entry.available_at > now:
                next_due = entry.available_at if next_due is None else min(next_due, entry.available_at)
                continue
            entry.holder = holder
            entry.deliveries += 1
            return entry, None
        return None, next_due


class MemoryBroker:
    """In-process broker. Not durable, not shared across processes; otherwise the full contract."""

    capabilities = CAPABILITIES

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._topics: dict[str, dict[str, _Group]] = {}
        self._seq = itertools.count(1)
        self._subscriptions: set[_MemorySubscription] = set()
        self._closed = False

    async def connect(self) -> None:
        """Nothing to open: the broker lives in this object."""

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerUnavailableError("memory broker is closed")

    async def publish(self, topic: str, envelopes: Sequence[Envelope], *, group: str | None = None) -> None:
        self._check_open()
        groups = self._topics.get(topic, {})
        if group is not None:
            groups = {group: groups[group]} if group in groups else {}
        for envelope in envelopes:
            seq = next(self._seq)
            for state in groups.values():
                state.entries[seq] = _Entry(seq, envelope)
        for state in groups.values():
            state.wake()

    def _group(self, topic: str, group: str, *, ephemeral: bool) -> _Group:
        groups = self._topics.setdefault(topic, {})
        if group not in groups:
            groups[group] = _Group(ephemeral=ephemeral)
        return groups[group]

    async def declare(self, topic: str, group: str) -> None:
        self._check_open()
        self._group(topic, group, ephemeral=False)

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        prefetch: int = 32,
        ephemeral: bool = False,
        holding: Holding | None = None,
    ) -> _MemorySubscription:
        self._check_open()
        subscription = _MemorySubscription(
            self, topic, group, self._group(topic, group, ephemeral=ephemeral), prefetch, holding
        )
        self._subscriptions.add(subscription)
        return subscription

    def _forget(self, subscription: _MemorySubscription) -> None:
        self._subscriptions.discard(subscription)
        groups = self._topics.get(subscription.topic, {})
        if subscription.group_state.ephemeral and groups.get(subscription.group) is subscription.group_state:
            del groups[subscription.group]

    async def close(self) -> None:
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.close()


class _MemorySubscription:
    def __init__(
        self,
        broker: MemoryBroker,
        topic: str,
        group: str,
        state: _Group,
        prefetch: int,
        holding: Holding | None,
    ) -> None:
        self.broker = broker
        self.holding = holding
        self.topic = topic
        self.group = group
        self.group_state = state
        self.prefetch = max(1, prefetch)
        self.outstanding: set[_Entry] = set()
        self.closed = False

    def __aiter__(self) -> _MemorySubscription:
        return self

    async def __anext__(self) -> Delivery:
        loop = asyncio.get_running_loop()
        while not self.closed:
            state = self.group_state
            changed = state.changed  # taken before looking, so any change after this sets it
            timeout: float | None = None
            if len(self.outstanding) < self.prefetch:
                entry, next_due = state.take(self, loop.time())
                if entry is not None:
                    self.outstanding.add(entry)
                    if self.holding is not None:
                        self.holding.fetched(entry.envelope)
                    return _MemoryDelivery(self, entry)
                if next_due is not None:
                    timeout = max(0.0, next_due - loop.time())
            await wait_event(changed, timeout)
        raise StopAsyncIteration

    def settle(self, entry: _Entry, *, remove: bool, delay: float) -> None:
        if self.closed or entry not in self.outstanding:
            return
        self.outstanding.discard(entry)
        entry.holder = None
        if remove:
            self.group_state.remove(entry.seq)
        else:
            entry.available_at = asyncio.get_running_loop().time() + delay
        self.group_state.wake()
        if self.holding is not None:
            self.holding.returned(entry.envelope)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for entry in self.outstanding:
            entry.holder = None
        self.outstanding.clear()
        self.broker._forget(self)
        self.group_state.wake()


class _MemoryDelivery:
    __slots__ = ("_entry", "_subscription", "attempt", "envelope")

    def __init__(self, subscription: _MemorySubscription, entry: _Entry) -> None:
        self._subscription = subscription
        self._entry = entry
        self.envelope = entry.envelope
        self.attempt = entry.deliveries

    async def ack(self) -> None:
        self._subscription.settle(self._entry, remove=True, delay=0.0)

    async def nack(self, *, delay: float = 0.0) -> None:
        self._subscription.settle(self._entry, remove=False, delay=delay)
