"""The consume pipeline: ack after the handler, retries with backoff, dead letters with reasons,
crash loops bounded, graceful stop that loses nothing."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from callcast import App, Context, Envelope, PermanentError, RetryPolicy, Service
from callcast.brokers.memory import MemoryBroker
from callcast.consumer import Consumer
from callcast.crashes import ABSOLUTE_FACTOR, NO_EVIDENCE, Evidence
from callcast.deadletter import DEAD_LETTER_GROUP, DEAD_LETTER_TOPIC
from callcast.exceptions import BrokerUnavailableError, PublishError
from callcast.isolation import Isolation
from tests.unit.conftest import StartApp, dead_pid, wait_until

FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02)


class Job(BaseModel):
    n: int
    fail_times: int = 0
    permanent: bool = False
    hold: float = 0.0
    cancelled_inside: bool = False


calls: Counter[int] = Counter()
done: list[int] = []
attempts_seen: dict[int, list[int]] = {}
running: Counter[str] = Counter()  # "now": handlers running; "peak": the most at once

producer = Service("producer", publishes=[Job])
worker = Service("worker")


@worker.on(Job, retry=FAST)
async def work(job: Job, ctx: Context) -> None:
    calls[job.n] += 1
    assert ctx.envelope is not None
    assert ctx.envelope.extensions["attempt"] == str(ctx.attempt)
    attempts_seen.setdefault(job.n, []).append(ctx.attempt)
    if job.permanent:
        raise PermanentError("cannot ever work")
    if job.cancelled_inside and calls[job.n] == 1:
        inner = asyncio.ensure_future(asyncio.sleep(10))
        inner.cancel()
        await asyncio.gather(inner)  # its CancelledError reaches the handler: no stop asked for
    if calls[job.n] <= job.fail_times:
        raise ValueError(f"transient failure {calls[job.n]}")
    await hold_counted(job.hold)
    done.append(job.n)


async def hold_counted(seconds: float) -> None:
    """Run for ``seconds``, counted in ``running``."""
    running["now"] += 1
    running["peak"] = max(running["peak"], running["now"])
    try:
        await asyncio.sleep(seconds)
    finally:
        running["now"] -= 1


app = App([producer, worker])


def reset() -> None:
    running.clear()
    calls.clear()
    done.clear()
    attempts_seen.clear()


async def dead_letters(broker: MemoryBroker, count: int) -> list[Envelope]:
    subscription = await broker.subscribe(DEAD_LETTER_TOPIC, DEAD_LETTER_GROUP, prefetch=count + 1)
    letters = [(await asyncio.wait_for(subscription.__anext__(), 5)).envelope for _ in range(count)]
    await subscription.close()
    return letters


async def publish(runtime_ctx: Context, *jobs: Job) -> None:
    for job in jobs:
        await runtime_ctx.publish(job, key=str(job.n))


async def test_handled_once_and_acked(start: StartApp, broker: MemoryBroker) -> None:
    reset()
    runtime = await start(app)
    await publish(runtime.context("producer"), Job(n=1), Job(n=2))
    await wait_until(lambda: sorted(done) == [1, 2])
    assert calls == Counter({1: 1, 2: 1})


async def test_failures_are_retried_with_the_broker_counting_attempts(start: StartApp) -> None:
    reset()
    runtime = await start(app)
    await publish(runtime.context("producer"), Job(n=1, fail_times=2))
    await wait_until(lambda: done == [1])
    assert attempts_seen[1] == [1, 2, 3]


async def test_a_cancellation_raised_inside_the_handler_is_a_failure_not_a_stuck_delivery(
    start: StartApp,
) -> None:
    reset()
    runtime = await start(app)
    await publish(runtime.context("producer"), Job(n=1, cancelled_inside=True), Job(n=2))
    await wait_until(lambda: sorted(done) == [1, 2])
    assert attempts_seen[1] == [1, 2]


async def test_exhausted_retries_dead_letter_with_diagnostics(start: StartApp, broker: MemoryBroker) -> None:
    reset()
    runtime = await start(app)
    await publish(runtime.context("producer"), Job(n=7, fail_times=99))
    [letter] = await dead_letters(broker, 1)
    assert calls[7] == FAST.max_attempts
    assert letter.type == "Job"
    assert letter.extensions["dlqreason"] == "error"
    assert letter.extensions["dlqsubscriber"] == "worker.work"
    assert letter.extensions["dlqtopic"] == "Job"
    assert letter.extensions["dlqattempts"] == "3"
    assert letter.extensions["dlqerror"] == "ValueError: transient failure 3"
    assert "Traceback" in letter.extensions["dlqtraceback"]
    assert letter.data == b'{"n":7,"fail_times":99,"permanent":false,"hold":0.0,"cancelled_inside":false}'


async def test_permanent_error_dead_letters_at_once(start: StartApp, broker: MemoryBroker) -> None:
    reset()
    runtime = await start(app)
    await publish(runtime.context("producer"), Job(n=3, permanent=True))
    [letter] = await dead_letters(broker, 1)
    assert letter.extensions["dlqreason"] == "permanent"
    assert calls[3] == 1


def refuse_dead_letters(
    broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch, refusal: Callable[[Envelope], Exception | None]
) -> None:
    """Make ``broker`` raise ``refusal(letter)`` at the publish of a dead letter, when it gives one."""
    publish_now = broker.publish

    async def publish(topic: str, envelopes: Sequence[Envelope], **options: Any) -> None:
        if topic == DEAD_LETTER_TOPIC and (error := refusal(envelopes[0])) is not None:
            raise error
        await publish_now(topic, envelopes, **options)

    monkeypatch.setattr(broker, "publish", publish)


async def test_a_message_whose_dead_letter_cannot_be_stored_comes_back_and_is_dead_lettered_then(
    start: StartApp, broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not held by its consumer forever (the broker cannot give it back while it is held)."""
    reset()
    monkeypatch.setattr("callcast.deadletter.RETRY_AFTER", 0.05)
    refused: list[str] = []

    def first_dead_letter_refused(letter: Envelope) -> Exception | None:
        if refused:
            return None
        refused.append(letter.id)
        return BrokerUnavailableError("broker away for a moment")

    refuse_dead_letters(broker, monkeypatch, first_dead_letter_refused)
    runtime = await start(app)
    await publish(runtime.context("producer"), Job(n=4, permanent=True))
    [letter] = await dead_letters(broker, 1)
    assert refused == [letter.id]
    assert letter.extensions["dlqreason"] == "permanent"


async def test_a_dead_letter_the_broker_refuses_is_stored_without_its_error_texts(
    start: StartApp, broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too large with its traceback, say: stored without it, at once (the handler does not run again)."""
    reset()

    def refuses_tracebacks(letter: Envelope) -> Exception | None:
        if "dlqtraceback" in letter.extensions:
            return PublishError("message exceeds the broker's maximum payload")
        return None

    refuse_dead_letters(broker, monkeypatch, refuses_tracebacks)
    runtime = await start(app)
    await publish(runtime.context("producer"), Job(n=5, permanent=True))
    [letter] = await dead_letters(broker, 1)
    assert letter.extensions["dlqreason"] == "permanent"
    assert "dlqtraceback" not in letter.extensions
    assert calls[5] == 1


async def test_invalid_and_undecodable_payloads_are_dead_lettered_not_crashing(
    start: StartApp, broker: MemoryBroker
) -> None:
    reset()
    runtime = await start(app)
    await broker.publish("Job", [Envelope(type="Job", source="/test", data=b'{"n": "seven"}')])
    await broker.publish(
        "Job",
        [
            Envelope(
                type="callcast.undecodable",
                source="/x",
                data=b"\x00",
                extensions={"decodeerror": "not a CloudEvent: missing id"},
            )
        ],
    )
    letters = await dead_letters(broker, 2)
    assert sorted(letter.extensions["dlqreason"] for letter in letters) == ["invalid", "undecodable"]
    await publish(runtime.context("producer"), Job(n=4))
    await wait_until(lambda: done == [4])


async def crash(broker: MemoryBroker, times: int) -> str:
    """Publish a Job and take it ``times`` times without settling it: what a handler whose process
    dies each time amounts to (the broker counts each delivery). Its message id."""
    await broker.declare("Job", "worker.work")
    sent = Envelope(type="Job", source="/test", data=b'{"n": 9}')
    await broker.publish("Job", [sent])
    crashing = await broker.subscribe("Job", "worker.work")
    for _ in range(times):
        delivery = await asyncio.wait_for(crashing.__anext__(), 5)
        await delivery.nack()
    await crashing.close()
    return sent.id


async def test_confirmed_crashes_dead_letter_a_crash_loop_without_running_the_handler(
    broker: MemoryBroker, start: StartApp, tmp_path: Path
) -> None:
    """A suspect that crashed its process while running alone max_attempts - 1 times (markers left
    by dead processes name it) is dead-lettered as a crash loop before its handler runs again."""
    reset()
    message_id = await crash(broker, FAST.max_attempts)
    markers = tmp_path / "crashes" / "worker.work"
    markers.mkdir(parents=True)
    for _ in range(FAST.max_attempts - 1):  # what a process killed while running it alone leaves
        pid = dead_pid()
        (markers / f"{pid}.inflight").write_text(f"+{message_id}\n+someone-else\n-someone-else\n")
        (markers / f"{pid}.alone").write_text(message_id)
    await start(app, services=["worker"])
    [letter] = await dead_letters(broker, 1)
    assert letter.extensions["dlqreason"] == "crashloop"
    assert "crashed its process 2 times running alone" in letter.extensions["dlqerror"]
    assert calls[9] == 0


@pytest.mark.parametrize(
    ("cut_short", "journaled"),
    [(2, True), (ABSOLUTE_FACTOR * FAST.max_attempts, True), (1, False), (3, False)],
)
async def test_deliveries_cut_short_by_another_crash_are_not_the_messages_own_runs(
    broker: MemoryBroker, start: StartApp, tmp_path: Path, cut_short: int, journaled: bool
) -> None:
    """Held by processes that another message crashed (``journaled``: their journals say so), or
    still on their way into them (nothing journaled them; one death of the group since the message
    was published explains one such delivery), however often, a poison message still gets
    max_attempts runs of its own before it is dead-lettered (as a failure, not as a crash loop:
    those deliveries are explained, so the bound on unexplained ones does not apply)."""
    reset()
    await broker.declare("Job", "worker.work")
    sent = Envelope(type="Job", source="/test", data=b'{"n": 8, "fail_times": 99}')
    await broker.publish("Job", [sent])
    crashing = await broker.subscribe("Job", "worker.work")
    for _ in range(cut_short):
        await (await asyncio.wait_for(crashing.__anext__(), 5)).nack()
    await crashing.close()
    journals = tmp_path / "crashes" / "worker.work"
    journals.mkdir(parents=True)
    for _ in range(cut_short):
        pid = dead_pid()
        held = f"+{sent.id}\n" if journaled else ""
        (journals / f"{pid}.inflight").write_text(f"{held}+the-crasher\n")
        (journals / f"{pid}.alone").write_text("the-crasher")
    await start(app, services=["worker"])
    [letter] = await dead_letters(broker, 1)
    assert letter.extensions["dlqreason"] == "error"
    assert calls[8] == FAST.max_attempts
    assert letter.extensions["dlqattempts"] == str(FAST.max_attempts)
    assert letter.extensions["dlqdeliveries"] == str(FAST.max_attempts + cut_short)


async def test_a_redelivered_neighbour_without_crash_evidence_runs(
    broker: MemoryBroker, start: StartApp
) -> None:
    """Deliveries counted because a crasher took their process down are not crash loops: without
    evidence against them they run and succeed."""
    reset()
    await crash(broker, FAST.max_attempts)
    await start(app, services=["worker"])
    await wait_until(lambda: done == [9])


@pytest.mark.parametrize("died_here", [True, False])
async def test_a_redelivery_runs_alone_once_a_process_of_its_group_died_here(
    broker: MemoryBroker, start: StartApp, tmp_path: Path, died_here: bool
) -> None:
    """A redelivered message is a crash suspect, run with no other handler of the consumer, only if
    a process of its group died on this machine since it was published. Otherwise (a lease ran out,
    a process was stopped) it runs beside the others: running those alone would slow a consumer down
    when it is slow already."""
    reset()
    await broker.declare("Job", "worker.work")
    redelivered = Envelope(type="Job", source="/test", data=b'{"n": 1, "hold": 0.3}')
    await broker.publish("Job", [redelivered])
    taken = await broker.subscribe("Job", "worker.work")
    await (await asyncio.wait_for(taken.__anext__(), 5)).nack()
    await taken.close()
    await broker.publish("Job", [Envelope(type="Job", source="/test", data=b'{"n": 2, "hold": 0.3}')])
    if died_here:
        journals = tmp_path / "crashes" / "worker.work"
        journals.mkdir(parents=True)
        (journals / f"{dead_pid()}.inflight").write_text("+someone-else\n")
    await start(app, services=["worker"])
    await wait_until(lambda: sorted(done) == [1, 2])
    assert attempts_seen[1] == [2]
    assert running["peak"] == (1 if died_here else 2)


auditor = Service("auditor")
audited: list[int] = []


@auditor.on(Job)
async def audit(job: Job, ctx: Context) -> None:
    await hold_counted(job.hold)
    audited.append(job.n)


async def test_a_suspect_runs_with_no_event_handler_of_the_process_running(
    broker: MemoryBroker, start: StartApp, tmp_path: Path
) -> None:
    """Not only none of its own group: a crash of the process while another group's handler ran
    beside it would be blamed on the suspect."""
    reset()
    audited.clear()
    await broker.declare("Job", "worker.work")
    await broker.declare("Job", "auditor.audit")
    await broker.publish("Job", [Envelope(type="Job", source="/test", data=b'{"n": 1, "hold": 0.3}')])
    taken = await broker.subscribe("Job", "worker.work")
    await (await asyncio.wait_for(taken.__anext__(), 5)).nack()  # redelivered to worker.work
    await taken.close()
    journals = tmp_path / "crashes" / "worker.work"
    journals.mkdir(parents=True)
    (journals / f"{dead_pid()}.inflight").write_text("+someone-else\n")
    await start(App([producer, worker, auditor]), services=["worker", "auditor"])
    await wait_until(lambda: done == [1] and audited == [1])
    assert attempts_seen[1] == [2]
    assert running["peak"] == 1


def locked(self: object, envelope: Envelope) -> None:
    """A ledger's read of evidence, failing as a locked database does."""
    raise sqlite3.OperationalError("database is locked")


async def test_a_ledger_that_cannot_be_read_leaves_the_broker_count_to_judge(
    broker: MemoryBroker, start: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A locked, corrupt or full ledger never leaves a delivery unsettled."""

    monkeypatch.setattr("callcast.crashes.CrashLedger._evidence", locked)
    reset()
    await crash(broker, 1)
    await start(app, services=["worker"])
    await wait_until(lambda: done == [9])
    assert attempts_seen[9] == [2]


async def test_a_ledger_that_cannot_be_read_bounds_a_crash_loop_by_max_attempts(
    broker: MemoryBroker, start: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not by 3 x max_attempts: without evidence, none of the deliveries can be excused."""

    monkeypatch.setattr("callcast.crashes.CrashLedger._evidence", locked)
    reset()
    await crash(broker, FAST.max_attempts)
    await start(app, services=["worker"])
    [letter] = await dead_letters(broker, 1)
    assert letter.extensions["dlqreason"] == "crashloop"
    assert letter.extensions["dlqattempts"] == str(FAST.max_attempts + 1)
    assert calls[9] == 0


async def test_a_consumer_that_fails_to_start_leaves_no_journal(
    broker: MemoryBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Left behind, a live journal would later be collected as a death."""
    from callcast.exceptions import TransportError

    async def refused(*args: object, **kwargs: object) -> None:
        raise TransportError("refused")

    monkeypatch.setattr(broker, "subscribe", refused)
    [handler] = worker.handlers
    consumer = Consumer(broker, handler, lambda *args: None, crash_dir=tmp_path)  # type: ignore[arg-type,return-value]
    with pytest.raises(TransportError):
        await consumer.start()
    assert not journals_under(tmp_path)


def journals_under(directory: Path) -> list[Path]:
    return list(directory.rglob("*.inflight*"))


async def test_dead_processes_are_collected_while_no_redelivery_asks(
    broker: MemoryBroker, start: StartApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A death is dated when collected: an idle consumer collects too."""
    monkeypatch.setattr("callcast.consumer.COLLECT_EVERY", 0.05)
    journals = tmp_path / "crashes" / "worker.work"
    journals.mkdir(parents=True)
    dead = journals / f"{dead_pid()}.inflight"
    dead.write_text("+someone\n")
    await start(app, services=["worker"])
    await wait_until(lambda: not dead.exists())


async def test_runtime_stop_stops_every_consumer_whatever_one_of_them_does(
    broker: MemoryBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    pair = Service("pair")

    @pair.on(Job)
    async def first(job: Job) -> None:
        pass

    @pair.on(Job)
    async def second(job: Job) -> None:
        pass

    stop = Consumer.stop
    asked: list[str] = []

    async def first_one_fails(consumer: Consumer, grace: float) -> None:
        asked.append(consumer.handler.group)
        await stop(consumer, grace)
        if len(asked) == 1:
            raise RuntimeError("cannot stop")

    runtime = await App([pair]).start(broker=broker, data_dir=tmp_path)
    monkeypatch.setattr(Consumer, "stop", first_one_fails)
    await runtime.stop(grace=1)
    assert sorted(asked) == ["pair.first", "pair.second"]
    assert not journals_under(tmp_path / "crashes" / asked[1])


async def test_without_any_evidence_the_broker_count_still_bounds_a_crash_loop(
    broker: MemoryBroker, start: StartApp
) -> None:
    """Crashes elsewhere leave no marker here: past 3 x max_attempts deliveries it is dead-lettered."""
    reset()
    await crash(broker, ABSOLUTE_FACTOR * FAST.max_attempts)
    await start(app, services=["worker"])
    [letter] = await dead_letters(broker, 1)
    assert letter.extensions["dlqreason"] == "crashloop"
    assert letter.extensions["dlqattempts"] == str(ABSOLUTE_FACTOR * FAST.max_attempts + 1)
    assert calls[9] == 0


async def test_suspects_run_alone() -> None:
    isolation = Isolation()
    log: list[str] = []

    async def run(name: str, alone: bool) -> None:
        async with isolation.alone() if alone else isolation.shared():
            log.append(f"{name}+")
            await asyncio.sleep(0.01)
            log.append(f"{name}-")

    await asyncio.gather(run("a", False), run("b", False), run("s", True), run("c", False))
    start_s, end_s = log.index("s+"), log.index("s-")
    assert end_s == start_s + 1  # nothing else started or ended while the suspect ran


async def test_a_suspect_cancelled_while_waiting_lets_the_others_go_on() -> None:
    isolation = Isolation()
    await isolation.enter_shared()
    suspect = asyncio.create_task(isolation.alone().__aenter__())
    await asyncio.sleep(0)  # the suspect starts waiting for the shared run to end
    other = asyncio.create_task(isolation.enter_shared())
    await wait_until(lambda: isolation.held_up == 1)  # it waits behind the suspect
    suspect.cancel()
    await asyncio.wait_for(other, 5)
    await isolation.leave_shared()
    await isolation.leave_shared()


async def test_stop_lets_running_handlers_finish_and_loses_nothing(
    start: StartApp, broker: MemoryBroker
) -> None:
    reset()
    producer_runtime = await start(app, services=["producer"])
    first = await start(app, services=["worker"])
    await publish(producer_runtime.context("producer"), Job(n=1, hold=0.3))
    await wait_until(lambda: calls[1] == 1)
    await first.stop(grace=5)
    assert done == [1]


async def test_stop_past_grace_gives_the_message_back(start: StartApp, broker: MemoryBroker) -> None:
    reset()
    producer_runtime = await start(app, services=["producer"])
    first = await start(app, services=["worker"])
    await publish(producer_runtime.context("producer"), Job(n=5, hold=0.5))
    await wait_until(lambda: calls[5] == 1)
    await first.stop(grace=0.05)
    assert done == []
    await start(app, services=["worker"])
    await wait_until(lambda: done == [5])
    assert attempts_seen[5] == [1, 2]


async def test_competing_runtimes_share_and_each_group_gets_a_copy(start: StartApp) -> None:
    """Two processes of one service share its messages; every event is handled once by the group."""
    reset()
    producer_runtime = await start(app, services=["producer"])
    workers = [await start(app, services=["worker"]), await start(app, services=["worker"])]
    await publish(producer_runtime.context("producer"), *(Job(n=n) for n in range(200)))
    await wait_until(lambda: len(done) == 200)
    assert sorted(done) == list(range(200))
    assert max(calls.values()) == 1
    handled = [sum(c.stats["handled"] for c in w._consumers if isinstance(c, Consumer)) for w in workers]
    assert min(handled) > 0, handled  # both took a share


def test_a_retry_waits_in_its_lane_only_within_the_lane_time_and_far_from_crashes() -> None:
    """In a lane (a keyed message on a broker without per-key order), a retry waits there while its
    delay ends within the lane's time. Not near a death of a process of its group: runs in a lane
    leave no account in the crash ledger, so a message that raises and kills its process by turns
    must go back to the broker, where each raise is counted."""
    now = time.monotonic()
    in_time = now + 100.0
    assert Consumer._retries_in_lane(NO_EVIDENCE, 1.0, in_time)
    assert not Consumer._retries_in_lane(NO_EVIDENCE, 1.0, None)  # no lane: unkeyed, or ordered broker
    assert not Consumer._retries_in_lane(NO_EVIDENCE, 200.0, in_time)  # past the lane's time
    assert not Consumer._retries_in_lane(Evidence(deaths=1), 1.0, in_time)
    assert not Consumer._retries_in_lane(Evidence(witnessed=1), 1.0, in_time)
