"""Fixtures for end-to-end tests: real ``callcast run`` processes on 127.0.0.1, temp files only."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.real_brokers import BROKERS, new_run

from .procs import CallcastProcess, sqlite_url

SHOP = "examples.shop:app"

Launcher = Callable[..., CallcastProcess]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    """Start ``callcast run`` processes for one test; every one still running is stopped after it.

    ``launch(app, name=..., broker_url=..., data_dir=..., services=..., http=...)``: defaults to the
    shop on a fresh broker file and data dir under ``tmp_path``.
    """
    started: list[CallcastProcess] = []

    def start(app: str = SHOP, **options: Any) -> CallcastProcess:
        options.setdefault("broker_url", sqlite_url(tmp_path / "broker.db"))
        options.setdefault("data_dir", tmp_path / "data")
        options.setdefault("log_dir", tmp_path / "logs")
        process = CallcastProcess(app, **options)
        started.append(process)
        return process.start()

    yield start
    for process in reversed(started):
        process.stop()


SHOP_BROKERS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.rabbitmq),
    pytest.param("nats", id="nats", marks=pytest.mark.nats),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(scope="module", params=SHOP_BROKERS)
def shop(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CallcastProcess]:
    """One shop server (all five services) shared by a module's functional tests, once per broker:
    the embedded one, and each real broker of this machine in a namespace of its own."""
    root = tmp_path_factory.mktemp(f"shop-{request.param}")
    run = new_run()
    if request.param == "sqlite":
        broker_url, target = sqlite_url(root / "broker.db"), None
    else:
        if request.param not in BROKERS:
            pytest.skip(f"no {request.param} adapter yet")
        target = BROKERS[request.param]
        target.require()
        broker_url = target.url(run)
    process = CallcastProcess(
        SHOP, name="shop", broker_url=broker_url, data_dir=root / "data", log_dir=root / "logs"
    )
    try:
        yield process.start()
    finally:
        process.stop()
        if target is not None:
            asyncio.run(target.cleanup(run))


@pytest.fixture(scope="module")
def client(shop: CallcastProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shop.url, timeout=10.0, trust_env=False) as http:
        yield http
