"""``callcast dlq``: list (grouped by reason), show, replay to the one subscriber, purge."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from callcast import App, Context, PermanentError, RetryPolicy, Service
from callcast.brokers import connect
from callcast.cli import main
from callcast.deadletter import DEAD_LETTER_GROUP, DEAD_LETTER_TOPIC, dead_letter_envelope
from callcast.envelope import Envelope
from tests.unit.conftest import wait_until


class Order(BaseModel):
    n: int


fixed = {"yes": False}
shop = Service("shop", publishes=[Order])
billing = Service("billing")
handled: list[int] = []


@billing.on(Order, retry=RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02))
async def charge(event: Order, ctx: Context) -> None:
    if not fixed["yes"]:
        if event.n % 2:
            raise PermanentError(f"card {event.n} refused")
        raise ValueError(f"gateway down for {event.n}")
    handled.append(event.n)


app = App([shop, billing])


async def run_until_dead_lettered(url: str, data_dir: Path, count: int) -> None:
    runtime = await app.start(broker=url, data_dir=data_dir)
    try:
        for n in range(count):
            await runtime.context("shop").publish(Order(n=n))
        probe = await runtime.broker.subscribe(DEAD_LETTER_TOPIC, DEAD_LETTER_GROUP, prefetch=count + 1)
        seen = [await asyncio.wait_for(probe.__anext__(), 10) for _ in range(count)]
        assert {delivery.envelope.extensions["dlqreason"] for delivery in seen} == {"error", "permanent"}
        await probe.close()  # hands them back: still dead letters
    finally:
        await runtime.stop(grace=1)


async def wait_handled(url: str, data_dir: Path, count: int) -> None:
    runtime = await app.start(broker=url, data_dir=data_dir, services=["billing"])
    try:
        await wait_until(lambda: len(handled) >= count, timeout=10)
    finally:
        await runtime.stop(grace=1)


def test_list_show_replay_purge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/broker.db"
    fixed["yes"] = False
    handled.clear()
    asyncio.run(run_until_dead_lettered(url, tmp_path, 4))

    assert main(["dlq", "list", "--broker", url]) == 0
    listing = capsys.readouterr().out
    assert "4 dead letter(s)" in listing
    assert "billing.charge" in listing
    assert "PermanentError" in listing
    assert "ValueError" in listing

    assert main(["dlq", "list", "--broker", url, "--json"]) == 0
    letters = json.loads(capsys.readouterr().out)
    by_n = {json.loads(_data_of(url, letter["id"]))["n"]: letter for letter in letters}
    assert by_n[0]["dlqreason"] == "error"
    assert by_n[0]["dlqattempts"] == "2"
    assert by_n[1]["dlqreason"] == "permanent"

    assert main(["dlq", "show", by_n[0]["id"], "--broker", url]) == 0
    shown = capsys.readouterr().out
    assert "gateway down for 0" in shown
    assert "Traceback" in shown

    assert main(["dlq", "purge", by_n[3]["id"], "--broker", url]) == 0
    assert "purged 1" in capsys.readouterr().out
    assert main(["dlq", "replay", "--broker", url]) == 2  # neither ids nor --all
    capsys.readouterr()

    fixed["yes"] = True
    assert main(["dlq", "replay", "--all", "--service", "billing", "--broker", url]) == 0
    assert "replayed 3" in capsys.readouterr().out
    asyncio.run(wait_handled(url, tmp_path, 3))
    assert sorted(handled) == [0, 1, 2]
    assert main(["dlq", "list", "--broker", url]) == 0
    assert "0 dead letter(s)" in capsys.readouterr().out


def test_unknown_id_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/broker.db"
    assert main(["dlq", "show", "no-such-id", "--broker", url]) == 1
    assert "no dead letter with id no-such-id" in capsys.readouterr().err


def _data_of(url: str, message_id: str) -> bytes:
    async def find() -> bytes:
        broker = await connect(url)
        try:
            subscription = await broker.subscribe(DEAD_LETTER_TOPIC, DEAD_LETTER_GROUP, prefetch=100)
            while True:
                delivery = await asyncio.wait_for(subscription.__anext__(), 5)
                if delivery.envelope.id == message_id:
                    await subscription.close()
                    return delivery.envelope.data
        finally:
            await broker.close()

    return asyncio.run(find())


async def store_dead_letters(url: str, letters: list[Envelope]) -> None:
    broker = await connect(url)
    try:
        await broker.declare(DEAD_LETTER_TOPIC, DEAD_LETTER_GROUP)
        await broker.publish(DEAD_LETTER_TOPIC, letters)
    finally:
        await broker.close()


async def received(url: str, topic: str, group: str) -> list[Envelope]:
    """What ``group`` holds on ``topic`` now (taken, acked)."""
    broker = await connect(url)
    try:
        subscription = await broker.subscribe(topic, group, prefetch=100)
        taken: list[Envelope] = []
        with contextlib.suppress(TimeoutError):
            while True:
                delivery = await asyncio.wait_for(subscription.__anext__(), 0.5)
                taken.append(delivery.envelope)
                await delivery.ack()
        await subscription.close()
        return taken
    finally:
        await broker.close()


def test_dead_letters_of_one_key_are_all_seen_and_replayed_with_their_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The SQLite broker keeps per-key order: dead letters keeping the key would be handed out one
    at a time, and the listing would show the first only."""
    url = f"sqlite:///{tmp_path}/broker.db"
    originals = [
        Envelope(type="Order", source="/t", data=b'{"n": %d}' % n).with_extensions(partitionkey="k")
        for n in range(3)
    ]
    letters = [
        dead_letter_envelope(
            e, subscriber="billing.charge", topic="Order", reason="error", error=None, attempt=2
        )
        for e in originals
    ]
    asyncio.run(store_dead_letters(url, [letter.envelope for letter in letters]))
    assert main(["dlq", "list", "--broker", url]) == 0
    assert "3 dead letter(s)" in capsys.readouterr().out
    assert main(["dlq", "replay", "--all", "--broker", url]) == 0
    assert "replayed 3" in capsys.readouterr().out
    back = asyncio.run(received(url, "Order", "billing.charge"))
    assert [(e.id, e.partition_key) for e in back] == [(e.id, "k") for e in originals]


def test_a_replay_to_a_group_that_is_gone_keeps_the_message(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/broker.db"
    lost = Envelope(type="Order", source="/t", data=b'{"n": 1}')
    letter = dead_letter_envelope(
        lost, subscriber="renamed.handler", topic="Order", reason="error", error=None, attempt=2
    )
    asyncio.run(store_dead_letters(url, [letter.envelope]))
    assert main(["dlq", "replay", lost.id, "--broker", url]) == 0
    assert [e.id for e in asyncio.run(received(url, "Order", "renamed.handler"))] == [lost.id]


def test_two_copies_of_a_dead_letter_are_replayed_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crash between storing a dead letter and acking its message leaves two copies."""
    url = f"sqlite:///{tmp_path}/broker.db"
    twice = Envelope(type="Order", source="/t", data=b'{"n": 2}')
    letter = dead_letter_envelope(
        twice, subscriber="billing.charge", topic="Order", reason="error", error=None, attempt=2
    )
    asyncio.run(store_dead_letters(url, [letter.envelope, letter.envelope]))
    assert main(["dlq", "replay", "--all", "--broker", url]) == 0
    assert "replayed 1 dead letter(s); 1 duplicate copies purged" in capsys.readouterr().out
    assert [e.id for e in asyncio.run(received(url, "Order", "billing.charge"))] == [twice.id]
    assert main(["dlq", "list", "--broker", url]) == 0
    assert "0 dead letter(s)" in capsys.readouterr().out
