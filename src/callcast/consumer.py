"""The event side's consume loop: one consumer per event handler, many deliveries at once.

For each delivery: decode → validate → (order gate) → (inbox / sequence) → handler → settle.

* The message is acknowledged only after the handler returned (at least once) — and, for
  idempotent and sequenced handlers, after their transaction committed.
* A handler that raises gets the message back after the delay of its
  :class:`~callcast.retry.RetryPolicy`, until ``max_attempts`` runs of its own (deliveries lost to
  another message's crash do not count); then it is dead-lettered.
* Undecodable or invalid payloads, an event type the handler does not take, and
  :class:`~callcast.PermanentError` are dead-lettered at once.
* A message that keeps killing its process is dead-lettered before the handler runs again: crash
  loops are bounded. Redelivered messages that did not fail here run alone (no other event handler
  of the process running) once a process of their group died on this machine since they were
  published, so the one that crashes a process is known (:mod:`callcast.crashes`) and its innocent
  neighbours are not dead-lettered with it; without a data directory, or when its crash ledger
  cannot be used, the broker's delivery count alone decides (``max_attempts``).
* Up to ``concurrency`` deliveries are handled at once (the subscription's prefetch bounds them).
  Messages of one partition key run one at a time, in the order they arrived: the broker
  guarantees that across processes where ``capabilities.ordered_per_key``; otherwise the
  :class:`~callcast.ordering.KeyGate` does within this process. There a failed keyed message is
  retried in its lane: it keeps its delivery (its lease renewed by the adapter) and its turn, and
  runs again after its retry delay, so the later messages of its key, which wait in the prefetch,
  cannot run first, even if they fill it (other keys then wait too). It goes back to the broker
  with a hold on its key (:meth:`~callcast.ordering.KeyGate.hold`) instead once the delay would
  end more than :data:`LANE_TIME` after its first run, or if a process of its group died near it
  (see :meth:`Consumer._retries_in_lane`). A stop during the wait gives it back unsettled (its
  next run comes at once, in the next process) and keeps its key's later messages from running.
* ``stop`` stops taking deliveries, lets running handlers finish within a grace period, and gives
  the rest back to the broker, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from callcast import inbox, sequence
from callcast.codec import decode
from callcast.context import Context
from callcast.crashes import ABSOLUTE_FACTOR, COLLECT_EVERY, NO_EVIDENCE, CrashLedger, Evidence
from callcast.database import Database
from callcast.deadletter import dead_letter, dead_letter_envelope, store
from callcast.dispatch import Dispatcher
from callcast.envelope import UNDECODABLE_TYPE, Envelope, now_rfc3339
from callcast.exceptions import DecodeError, PermanentError, TransportError, UnknownEventError
from callcast.isolation import Isolation
from callcast.ordering import KeyGate
from callcast.service import EventHandler
from callcast.transport import Broker, Delivery
from callcast.waiting import wait_event

log = logging.getLogger("callcast.consumer")

FIRST_FAILURES_KEPT = 10_000
HOLD_MARGIN = 2.0
"""Seconds a key stays held past its retried message's delay, waiting for it to come back here."""
LANE_TIME = 300.0
"""Seconds after its first run within which a keyed message's retries may wait in its lane, holding
its delivery, on a broker without per-key order: well within RabbitMQ's default
``consumer_timeout`` (30 minutes), after which RabbitMQ takes back every delivery of the channel."""

ContextFactory = Callable[[str, Envelope, int], Context]
"""Builds the context of one delivery: (service, envelope, attempt) -> Context, whose ``envelope``
carries the extension ``attempt``."""


def _stop_asked() -> bool:
    """Whether this task itself was asked to cancel (a stop), rather than handed a
    ``CancelledError`` by something it awaited."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


class Consumer:
    """Runs one :class:`~callcast.service.EventHandler` against its group's subscription.

    ``stats`` counts outcomes: ``handled``, ``duplicates`` (seen by the inbox, or a copy of a
    message already parked), ``stale`` and ``parked`` (sequenced), ``retried``, ``dead_lettered``.
    """

    def __init__(
        self,
        broker: Broker,
        handler: EventHandler,
        make_context: ContextFactory,
        database: Database | None = None,
        crash_dir: Path | None = None,
        isolation: Isolation | None = None,
    ) -> None:
        self.broker = broker
        self.handler = handler
        self.make_context = make_context
        self.database = database
        self._crashes = _open_ledger(crash_dir / _file_name(handler.group)) if crash_dir is not None else None
        self._isolation = isolation or Isolation()
        self.stats: Counter[str] = Counter()
        self._first_failures: dict[str, str] = {}  # message id -> first failure seen here (bounded)
        self._parked_failures: dict[
            tuple[str, int], Exception
        ] = {}  # (key, sequence) -> last error (bounded)
        self._gate = None if broker.capabilities.ordered_per_key else KeyGate()
        self._dispatcher: Dispatcher | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._sweeping = False  # a sweeper pass is under way
        self._sweep_again = True  # False once the consumer stops
        self._collector: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()  # ends the waits of retries in their lanes
        self._stop_grace = 0.0

    async def start(self) -> None:
        handler = self.handler
        try:
            subscription = await self.broker.subscribe(
                handler.topic, handler.group, prefetch=handler.concurrency, holding=self._crashes
            )
        except BaseException:  # not started, so never stopped: left open, its journal would later
            if self._crashes is not None:  # be taken for a dead process's
                self._crashes.close()
            raise
        self._dispatcher = Dispatcher(subscription, self._handle, handler.group)
        if handler.sequencing is not None:
            self._sweeper = asyncio.create_task(self._sweep_parked(), name=f"parked:{handler.group}")
        if self._crashes is not None:
            self._collector = asyncio.create_task(self._collect_deaths(), name=f"deaths:{handler.group}")

    async def _collect_deaths(self) -> None:
        """A death is dated when collected: collect often, also while no redelivery asks."""
        assert self._crashes is not None
        while True:
            await asyncio.sleep(COLLECT_EVERY)
            self._crashes.collect()

    async def stop(self, grace: float) -> None:
        self._stop_grace = grace
        self._stopping.set()
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        try:
            await asyncio.gather(
                self._stop_sweeper(grace),
                *([self._dispatcher.stop(grace)] if self._dispatcher is not None else []),
            )
        finally:  # left open, its journal would later be taken for a dead process's
            if self._crashes is not None:
                self._crashes.close()

    async def _stop_sweeper(self, grace: float) -> None:
        """Stop the parked-message sweeper: a pass under way (its handlers running) gets ``grace``
        seconds to end, so a stop does not cut short, and count against ``max_attempts``, the start
        of a parked message that would have completed; then the sweeper is cancelled."""
        sweeper = self._sweeper
        if sweeper is None:
            return
        self._sweep_again = False
        if self._sweeping:
            await asyncio.wait([sweeper], timeout=grace)
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper

    def _is_suspect(self, delivery: Delivery, evidence: Evidence) -> bool:
        """Redelivered, not because it failed here, and a process of the group died on this machine
        since it was published: maybe it crashed one. (Without a death here it came back because a
        lease ran out, or its process was stopped, or it crashed one elsewhere; running those alone
        would slow the consumer down when it is slow already, and a crasher among them is a
        suspect once it crashed a process here.) A first delivery has :data:`NO_EVIDENCE`."""
        return evidence.near_a_crash and delivery.envelope.id not in self._first_failures

    async def _handle(self, delivery: Delivery) -> None:
        """Handle one delivery. The subscription journals it as held (``holding=self._crashes``)
        from when it is received until its settle reaches the broker. A redelivery's evidence is
        read once, here: what is collected while it waits for its turn cannot explain its earlier
        deliveries."""
        try:
            evidence = NO_EVIDENCE
            if self._crashes is not None and delivery.attempt > 1:
                evidence = self._crashes.evidence(delivery.envelope)
            suspect = self._is_suspect(delivery, evidence)
            key = delivery.envelope.partition_key
            if self._gate is None or key is None:  # no order to keep here
                await self._isolated(delivery, evidence, suspect)
                return
            async with self._gate.turn(key, delivery.envelope.id):
                runs, lane_ends = 0, time.monotonic() + LANE_TIME
                while (
                    pause := await self._isolated(delivery, evidence, suspect, runs, lane_ends)
                ) is not None:
                    runs += 1
                    if await wait_event(self._stopping, pause):
                        # Unsettled, it goes back with the subscription; its key's later messages
                        # wait here until they are cut off too, so none runs before it.
                        self._gate.hold(key, delivery.envelope.id, self._stop_grace + HOLD_MARGIN)
                        return
                    suspect = self._is_suspect(delivery, evidence)
        except TransportError as error:  # could not settle: the lease runs out, it comes back
            log.warning(
                "%s: could not settle message %s: %s", self.handler.group, delivery.envelope.id, error
            )
        except Exception:
            log.exception("%s: unexpected failure handling %s", self.handler.group, delivery.envelope.id)
            with contextlib.suppress(TransportError):
                await delivery.nack(delay=self.handler.retry.delay(delivery.attempt))

    async def _isolated(
        self,
        delivery: Delivery,
        evidence: Evidence,
        suspect: bool,
        runs: int = 0,
        lane_ends: float | None = None,
    ) -> float | None:
        """A suspect runs alone, named in this process's crash marker; the others share. Returns
        what :meth:`_process` does."""
        if not suspect:
            await self._isolation.enter_shared()  # no async context manager: this is the hot path
            try:
                return await self._process(delivery, evidence, runs, lane_ends)
            finally:
                await self._isolation.leave_shared()
        assert self._crashes is not None
        async with self._isolation.alone():
            self._crashes.running_alone(delivery.envelope.id)
            try:
                return await self._process(delivery, evidence, runs, lane_ends)
            finally:
                self._crashes.finished_alone()

    def _crash_loop(self, delivery: Delivery, evidence: Evidence, own: int) -> str | None:
        """Why this delivery counts as a crash loop, or None. ``own``: its deliveries that were its
        own runs (:meth:`~callcast.crashes.Evidence.own`)."""
        limit = self.handler.retry.max_attempts
        confirmed = evidence.confirmed
        if self._crashes is None or evidence.unknown:
            if delivery.attempt > limit:
                return f"delivered {delivery.attempt} times without being settled"
            return None
        if own > ABSOLUTE_FACTOR * limit:
            return f"delivered {delivery.attempt} times without being settled"
        if confirmed and confirmed >= limit - 1:
            return f"crashed its process {confirmed} times running alone (delivered {delivery.attempt} times)"
        return None

    def _settled_for_good(self, delivery: Delivery) -> None:
        if self._crashes is not None and delivery.attempt > 1:
            self._crashes.forget(delivery.envelope.id)

    async def _process(
        self, delivery: Delivery, evidence: Evidence, runs: int = 0, lane_ends: float | None = None
    ) -> float | None:
        """Handle the delivery and settle it; or, for a retry in its lane, leave it unsettled and
        return the seconds to wait before running it again. ``runs``: the runs of this delivery
        so far (retries in the lane), which count against ``max_attempts`` like deliveries;
        ``lane_ends``: when its lane's time ends (``time.monotonic()``), or ``None`` outside a lane."""
        handler = self.handler
        envelope = delivery.envelope
        own = evidence.own(delivery.attempt) + runs
        if envelope.type == UNDECODABLE_TYPE:
            reason = envelope.extensions.get("decodeerror", "not a CloudEvent")
            await self._dead_letter(delivery, "undecodable", DecodeError(reason))
            return None
        if envelope.type != handler.topic:
            unknown = UnknownEventError(f"{handler.group} handles {handler.topic!r}, got {envelope.type!r}")
            await self._dead_letter(delivery, "unknown-type", unknown)
            return None
        crash_loop = self._crash_loop(delivery, evidence, own)
        if crash_loop is not None:
            if await self._already_applied(envelope.id):  # its effects committed before a crash
                await delivery.ack()
                self.stats["duplicates"] += 1
                self._settled_for_good(delivery)
                return None
            await self._dead_letter(delivery, "crashloop", PermanentError(crash_loop), own)
            return None
        try:
            event = decode(handler.model, envelope.data)
            if handler.sequencing is not None:
                handler.sequencing.sequence_of(envelope, event)
        except DecodeError as error:
            await self._dead_letter(delivery, "invalid", error, own)
            return None
        ctx = self.make_context(handler.service, envelope, delivery.attempt + runs)
        try:
            outcome = await self._apply(event, envelope, ctx)
        except PermanentError as error:
            await self._dead_letter(delivery, "permanent", error, own)
        except (Exception, asyncio.CancelledError) as error:
            if isinstance(error, asyncio.CancelledError) and _stop_asked():
                raise  # the consumer stops: the delivery goes back with the subscription
            # Otherwise a failure like any other, even a CancelledError of the handler's own making
            # (a task it awaited was cancelled): settled, or retried in its lane, never left
            # holding a prefetch slot for good.
            if own >= handler.retry.max_attempts:
                await self._dead_letter(delivery, "error", error, own)
            else:
                log.info("%s: attempt %d of %s failed: %r", handler.group, own, envelope.id, error)
                self.stats["retried"] += 1
                delay = handler.retry.delay(own)
                if len(self._first_failures) >= FIRST_FAILURES_KEPT:
                    self._first_failures.pop(next(iter(self._first_failures)))
                self._first_failures.setdefault(envelope.id, now_rfc3339())
                if self._retries_in_lane(evidence, delay, lane_ends):
                    return delay  # the delivery goes on: no account of its end for the ledger
                if self._crashes is not None:
                    self._crashes.failed(envelope.id)
                if self._gate is not None:  # before the nack: it may be back before the nack returns
                    self._gate.hold(envelope.partition_key, envelope.id, delay + HOLD_MARGIN)
                await delivery.nack(delay=delay)
        else:
            await delivery.ack()
            self.stats[outcome] += 1
            self._first_failures.pop(envelope.id, None)
            self._settled_for_good(delivery)
            if outcome == "handled" and handler.sequencing is not None:
                await self._apply_parked(envelope.partition_key or "")
        return None

    @staticmethod
    def _retries_in_lane(evidence: Evidence, delay: float, lane_ends: float | None) -> bool:
        """Whether a failed message waits out its retry ``delay`` in its key's lane: in a lane whose
        time (:data:`LANE_TIME`) the delay ends within, and with no death of a process of its group
        near it. Its runs in a lane leave no account in the crash ledger, so a message that raised
        and killed its process by turns would otherwise never reach ``max_attempts``; sent back to
        the broker, each raise is counted (:meth:`~callcast.crashes.CrashLedger.failed`)."""
        return lane_ends is not None and not evidence.near_a_crash and time.monotonic() + delay <= lane_ends

    async def _already_applied(self, message_id: str) -> bool:
        if not self.handler.idempotent or self.handler.sequencing is not None or self.database is None:
            return False
        async with self.database.transaction() as conn:
            return await inbox.recorded(conn, self.handler.group, message_id)

    async def _apply(self, event: BaseModel, envelope: Envelope, ctx: Context) -> str:
        """Run the handler as the handler's options say; the outcome's name."""
        handler = self.handler
        if not handler.idempotent:
            await handler.fn(event, ctx)
            return "handled"
        async with ctx.transaction() as conn:
            if handler.sequencing is None:
                if not await inbox.claim(conn, handler.group, envelope.id):
                    return "duplicates"
            else:
                key = envelope.partition_key or ""
                number = handler.sequencing.sequence_of(envelope, event)
                verdict = await sequence.admit(conn, handler.group, key, number, handler.sequencing.first)
                if verdict is sequence.Verdict.STALE:
                    return "stale"
                if verdict is sequence.Verdict.EARLY:
                    parked = await sequence.park(conn, handler.group, key, number, envelope)
                    return "parked" if parked else "duplicates"
                await sequence.advance(conn, handler.group, key, number)
            await handler.fn(event, ctx)
        return "handled"

    async def _apply_parked(self, key: str) -> None:
        """Apply the parked messages of ``key`` that are now next, each in its own transaction.

        Each start is counted, and committed, before the handler runs. One that fails stays parked
        (its transaction rolled back) and the sweeper tries it again; once it was started
        ``max_attempts`` times without completing (it failed, or killed its process), it is
        dead-lettered instead of started again. A :class:`~callcast.PermanentError` dead-letters it
        at once.
        """
        handler = self.handler
        assert handler.sequencing is not None
        assert self.database is not None
        while True:
            async with self.database.transaction() as conn:
                await sequence.lock_key(conn, handler.group, key, handler.sequencing.first)
                started = await sequence.start_parked(conn, handler.group, key)
            if started is None:
                return
            number, starts, envelope = started
            if starts >= handler.retry.max_attempts:
                await self._dead_letter_parked(key, number, envelope, starts)
                return
            ctx = self.make_context(
                handler.service, Envelope(type=handler.topic, source="", data=b""), starts + 1
            )
            taken: tuple[int, Envelope] | None = None
            try:
                async with ctx.transaction() as conn:
                    await sequence.lock_key(conn, handler.group, key, handler.sequencing.first)
                    taken = await sequence.take_parked(conn, handler.group, key)
                    if taken is None:
                        return
                    number, envelope = taken
                    event = decode(handler.model, envelope.data)
                    ctx.envelope = envelope
                    ctx.correlation_id = envelope.correlation_id or ctx.correlation_id
                    ctx.causation_id = envelope.id
                    await sequence.advance(conn, handler.group, key, number)
                    await handler.fn(event, ctx)
            except Exception as error:
                if taken is None:
                    log.warning("%s: parked message of key %r failed: %r", handler.group, key, error)
                    return
                if len(self._parked_failures) >= FIRST_FAILURES_KEPT:  # if it never succeeds, this is why
                    self._parked_failures.pop(next(iter(self._parked_failures)))
                self._parked_failures[(key, taken[0])] = error
                if isinstance(error, PermanentError):  # another start would fail the same way
                    await self._dead_letter_parked(key, taken[0], taken[1], starts + 1)
                else:
                    log.warning(
                        "%s: parked message of key %r failed, stays parked: %r", handler.group, key, error
                    )
                return
            self._parked_failures.pop((key, number), None)
            self.stats["handled"] += 1

    async def _dead_letter_parked(self, key: str, number: int, envelope: Envelope, starts: int) -> None:
        """Dead-letter parked message ``number`` of ``key``, started ``starts`` times without
        completing; the letter is stored before the row goes. The key waits for it (a replay).
        Judged under the key's lock first: another start of it (the sweeper's and a handler's at
        once, or another process's) may have applied it meanwhile."""
        handler = self.handler
        assert handler.sequencing is not None
        assert self.database is not None
        async with self.database.transaction() as conn:
            await sequence.lock_key(conn, handler.group, key, handler.sequencing.first)
            if not await sequence.is_next_parked(conn, handler.group, key, number):
                return
        failed = self._parked_failures.pop((key, number), None)
        error: Exception = failed or PermanentError(
            f"sequence {number} of key {key!r} was started {starts} times and never completed "
            "(its process died while it ran)"
        )
        reason = (
            "crashloop" if failed is None else "permanent" if isinstance(failed, PermanentError) else "error"
        )
        await self._send_parked_letter(envelope, reason, error, starts)
        async with self.database.transaction() as conn:
            await sequence.lock_key(conn, handler.group, key, handler.sequencing.first)
            dropped = await sequence.drop_parked(conn, handler.group, key, number)
        if dropped:
            log.warning("%s: dead-lettering parked %s (%s): %s", handler.group, envelope.id, reason, error)
        else:  # applied by another start as the letter was stored: replaying it is skipped as stale
            log.info("%s: parked %s was applied as it was dead-lettered", handler.group, envelope.id)

    async def _sweep_parked(self) -> None:
        """Retry parked messages that became next, and dead-letter those waiting past the gap timeout."""
        handler = self.handler
        assert handler.sequencing is not None
        assert self.database is not None
        interval = max(0.2, min(5.0, handler.sequencing.gap_timeout / 4))
        while self._sweep_again:
            await asyncio.sleep(interval)
            self._sweeping = True
            try:
                async with self.database.transaction() as conn:
                    keys = await sequence.parked_keys(conn, handler.group)
                async with self._isolation.shared():  # handlers run: not beside a suspect
                    for key in keys:
                        await self._apply_parked(key)
                await self._expire_parked()
            except Exception:
                log.exception("%s: sweeping parked messages failed", handler.group)
            finally:
                self._sweeping = False

    async def _expire_parked(self) -> None:
        """Dead-letter (reason ``gap``) the parked messages that waited past the gap timeout for a
        predecessor. Each is judged under its key's lock: one that became next meanwhile is left to
        be applied, one applied from another copy is dropped. The letter is published outside any
        transaction (a broker outage must not hold the database's write lock), and the row removed
        after it is stored; if the predecessor came in between, the message stays and is applied,
        and its letter, if replayed, is skipped as stale. A failing message is no gap: it is next,
        and its starts bound it (:meth:`_apply_parked`)."""
        handler = self.handler
        assert handler.sequencing is not None
        assert self.database is not None
        timeout = handler.sequencing.gap_timeout
        async with self.database.transaction() as conn:
            expired = await sequence.expired(conn, handler.group, timeout)
        for key, number, envelope in expired:
            if not await self._still_waiting(key, number, letter_stored=False):
                continue
            error = PermanentError(
                f"sequence {number} of key {key!r} waited {timeout:g}s for a missing predecessor"
            )
            await self._send_parked_letter(envelope, "gap", error, 1)
            if await self._still_waiting(key, number, letter_stored=True):
                log.warning("%s: dead-lettering parked %s (gap): %s", handler.group, envelope.id, error)
            else:
                log.info(
                    "%s: parked %s became next as it was dead-lettered: it stays, to be applied",
                    handler.group,
                    envelope.id,
                )

    async def _still_waiting(self, key: str, number: int, *, letter_stored: bool) -> bool:
        """Whether parked message ``number`` of ``key`` still waits for a predecessor (judged under
        the key's lock); it is removed if it was applied from another copy, or if it waits and its
        dead letter is stored."""
        handler = self.handler
        assert handler.sequencing is not None
        assert self.database is not None
        async with self.database.transaction() as conn:
            verdict = await sequence.admit(conn, handler.group, key, number, handler.sequencing.first)
            waiting = verdict is sequence.Verdict.EARLY
            if verdict is sequence.Verdict.STALE or (waiting and letter_stored):
                await sequence.drop_parked(conn, handler.group, key, number)
        return waiting

    async def _send_parked_letter(
        self, envelope: Envelope, reason: str, error: BaseException, attempt: int
    ) -> None:
        """Store the dead letter of a parked message (no delivery to settle: its row is the caller's)."""
        handler = self.handler
        letter = dead_letter_envelope(
            envelope,
            subscriber=handler.group,
            topic=handler.topic,
            reason=reason,
            error=error,
            attempt=attempt,
        )
        await store(self.broker, letter)
        self.stats["dead_lettered"] += 1

    async def _dead_letter(
        self, delivery: Delivery, reason: str, error: BaseException, attempts: int | None = None
    ) -> None:
        """Dead-letter ``delivery``; ``attempts``: its own runs, if known to differ from its deliveries."""
        log.warning("%s: dead-lettering %s (%s): %s", self.handler.group, delivery.envelope.id, reason, error)
        await dead_letter(
            self.broker,
            delivery,
            subscriber=self.handler.group,
            topic=self.handler.topic,
            reason=reason,
            error=error,
            first_failure=self._first_failures.pop(delivery.envelope.id, None),
            attempts=attempts,
        )
        self.stats["dead_lettered"] += 1
        self._settled_for_good(delivery)


def _open_ledger(directory: Path) -> CrashLedger | None:
    """The group's crash ledger, or None (with a warning) if it cannot be opened: the broker's
    delivery count then decides alone, as without a data directory."""
    try:
        return CrashLedger(directory)
    except (sqlite3.Error, OSError) as error:
        log.warning(
            "crash ledger %s cannot be opened (%s): crash loops are bounded by delivery counts",
            directory,
            error,
        )
        return None


def _file_name(group: str) -> str:
    """A group name as one safe file name."""
    return "".join(c if c.isalnum() or c in "-_." else f"%{ord(c):02x}" for c in group)
