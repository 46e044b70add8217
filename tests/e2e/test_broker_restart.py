"""The broker restarts while the shop takes sign-ups: afterwards every 201 has exactly one email.

RabbitMQ: the node's app is stopped and started (``rabbitmqctl stop_app`` / ``start_app``: every
connection drops, quorum queues survive). NATS: a nats-server of this test's own, on a free port,
is killed (SIGKILL, by its PID) and started again on the same store. Sign-ups keep coming during
the outage: users answers 201 once the user row and its event are committed to its outbox, and the
relay sends the event when the broker is back.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from examples.shop.contracts import UserSignedUp

from tests.brokers.conftest import server_is_up
from tests.real_brokers import BROKERS, HOST, new_run

from .backlog import until_quiet
from .procs import CallcastProcess

SIGNUPS = 300
CONCURRENCY = 20
RESTART_AFTER = 100


async def signups_across(
    url: str, restart: Callable[[], Awaitable[None]]
) -> tuple[list[str], Counter[str], float]:
    """SIGNUPS sign-ups from CONCURRENCY clients; ``restart()`` runs after RESTART_AFTER answers.
    Returns the addresses that got a 201, the failures by kind (and, under its own name, how many
    201s were answered while the broker was down), and how long the restart took."""
    created: list[str] = []
    failures: Counter[str] = Counter()
    answered = asyncio.Event()
    restarting = asyncio.Event()
    todo = list(range(SIGNUPS))

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=15.0, trust_env=False) as http:
            while todo:
                i = todo.pop()
                email = f"restart-{i}@example.test"
                try:
                    response = await http.post("/users", json={"name": f"r{i}", "email": email})
                except httpx.HTTPError as error:
                    failures[type(error).__name__] += 1
                    continue
                if response.status_code == 201:
                    created.append(email)
                    if restarting.is_set():
                        failures["(201 during the outage)"] += 1
                    if len(created) >= RESTART_AFTER:
                        answered.set()
                else:
                    failures[f"HTTP {response.status_code}"] += 1

    clients = [asyncio.create_task(client()) for _ in range(CONCURRENCY)]
    async with asyncio.timeout(60):
        await answered.wait()
        began = time.monotonic()
        restarting.set()
        await restart()
        restarting.clear()
        took = time.monotonic() - began
        await asyncio.gather(*clients)
    return created, failures, took


async def emails_per_address(url: str, addresses: list[str]) -> dict[str, int]:
    async with httpx.AsyncClient(base_url=url, timeout=15.0, trust_env=False) as http:
        counts = {}
        for address in addresses:
            response = await http.get("/emails", params={"to": address})
            counts[address] = len(response.json())
        return counts


async def check(server: CallcastProcess, restart: Callable[[], Awaitable[None]], label: str) -> None:
    created, failures, took = await signups_across(server.url, restart)
    during = failures.pop("(201 during the outage)", 0)
    # the counts are final only once no UserSignedUp is left in the users outbox or unacknowledged
    # by the emails group: a late redelivery or re-publish would otherwise go unseen
    await until_quiet(server, UserSignedUp, timeout=60)
    counts = await emails_per_address(server.url, created)
    missing = [a for a, n in counts.items() if n == 0]
    twice = [a for a, n in counts.items() if n > 1]
    print(
        f"\n{label} restart during {SIGNUPS} sign-ups ({CONCURRENCY} clients; restart took {took:.1f}s): "
        f"201 {len(created)} ({during} while the broker was down), failed {sum(failures.values())} "
        f"{dict(failures)}, "
        f"without email {len(missing)}, emailed twice {len(twice)}"
    )
    assert len(created) >= RESTART_AFTER
    assert missing == [], f"{len(missing)} sign-ups with a 201 got no welcome email"
    assert twice == [], f"{len(twice)} addresses got two welcome emails"


@pytest.mark.slow
@pytest.mark.rabbitmq
async def test_rabbitmq_restart_loses_and_repeats_no_email(tmp_path: Path) -> None:
    target = BROKERS["rabbitmq"]
    target.require()
    run = new_run()
    server = CallcastProcess(
        "examples.shop:app",
        name="shop",
        broker_url=target.url(run),
        data_dir=tmp_path / "data",
        log_dir=tmp_path / "logs",
    )

    async def restart() -> None:
        await asyncio.to_thread(_rabbitmqctl, "stop_app")
        try:
            await asyncio.sleep(1.0)  # an outage of a second while sign-ups keep coming
        finally:
            await asyncio.to_thread(_rabbitmqctl, "start_app")
            await asyncio.to_thread(_rabbitmqctl, "await_startup")

    try:
        server.start()
        await check(server, restart, "RabbitMQ")
    finally:
        server.stop()
        if not server_is_up(HOST, 5672):
            _rabbitmqctl("start_app")
        await target.cleanup(run)


@pytest.mark.slow
@pytest.mark.nats
async def test_nats_restart_loses_and_repeats_no_email(tmp_path: Path) -> None:
    from tests.brokers.test_nats import PrivateNatsServer

    nats_server = PrivateNatsServer(tmp_path / "jetstream")
    nats_server.start()
    run = new_run()
    server = CallcastProcess(
        "examples.shop:app",
        name="shop",
        broker_url=f"nats://{HOST}:{nats_server.port}?stream={run.upper()}&prefix={run}",
        data_dir=tmp_path / "data",
        log_dir=tmp_path / "logs",
    )

    async def restart() -> None:
        nats_server.stop()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(nats_server.start)

    try:
        server.start()
        await check(server, restart, "NATS")
    finally:
        server.stop()
        nats_server.stop()


def _rabbitmqctl(command: str) -> None:
    subprocess.run(["rabbitmqctl", command], capture_output=True, timeout=120, check=True)
