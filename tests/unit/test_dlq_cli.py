"""``callcast dlq``: list (grouped by reason), show, replay to the one subscriber, purge."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from callcast import App, Context, PermanentError, RetryPolicy, Service
from callcast.brokers import connect
from callcast.cli import main
from callcast.deadletter import DEAD_LETTER_GROUP, DEAD_LETTER_TOPIC
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
        assert len(seen) == count
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
