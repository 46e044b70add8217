"""A keyed message whose handler raises and kills its process by turns is still dead-lettered after
a bounded number of runs, on the brokers where failed keyed messages are retried in their lane:
runs in a lane leave no account in the crash ledger, so after a crash near it a message goes back
to the broker, where each raise is counted (:meth:`callcast.consumer.Consumer._retries_in_lane`)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from callcast import Runtime
from tests.real_brokers import BROKERS, new_run

from .crash_turns_app import MAX_ATTEMPTS, Turn, app
from .procs import CallcastProcess

DEADLINE = 90.0


@pytest.mark.parametrize(
    "broker",
    [
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
        pytest.param("nats", marks=pytest.mark.nats),
        pytest.param("redis", marks=pytest.mark.redis),
    ],
)
async def test_a_message_that_raises_and_crashes_by_turns_is_dead_lettered(
    broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = BROKERS[broker]
    target.require()
    run = new_run()
    url = target.url(run) + (
        "&ack_wait=2" if broker == "nats" else ""
    )  # a killed process's message back soon
    monkeypatch.setenv("CRASH_TURNS_DIR", str(tmp_path))
    worker = CallcastProcess(
        "tests.e2e.crash_turns_app:app",
        name="victim",
        broker_url=url,
        data_dir=tmp_path / "data",
        log_dir=tmp_path / "logs",
        services=["victim"],
        http=False,
    )
    publisher: Runtime | None = None
    try:
        await asyncio.to_thread(worker.start)  # its group exists from here on
        publisher = await app.start(broker=url, data_dir=tmp_path / "publisher", services=["source"])
        await publisher.context("source").publish(Turn(n=1), key="k")
        deadline = time.monotonic() + DEADLINE
        exits: list[int | None] = []
        while "dead-lettering" not in worker.log_text():
            assert time.monotonic() < deadline, f"not dead-lettered within {DEADLINE:g}s"
            if not worker.running():  # its handler killed it: started again, as a supervisor would
                assert worker.popen is not None
                exits.append(worker.popen.returncode)
                await asyncio.to_thread(worker.start)
            await asyncio.sleep(0.05)  # polling the log, within the deadline
        runs = (tmp_path / "runs").read_text().splitlines()
        letter = next(line for line in worker.log_text().splitlines() if "dead-lettering" in line)
        assert "(error)" in letter, letter
        # Two runs per delivery at most (one raises, one crashes), and each delivery after the first
        # crash is counted: max_attempts raises that count, plus the crashes between them.
        assert len(runs) <= 2 * MAX_ATTEMPTS + 1, runs
        assert exits == [-9] * (len(runs) // 2)
    finally:
        worker.stop()
        if publisher is not None:
            await publisher.stop(grace=1)
        await target.cleanup(run)
