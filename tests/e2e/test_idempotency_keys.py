"""Idempotency keys against a real shop server on the embedded broker: 50 concurrent
``POST /orders`` with one ``Idempotency-Key``, for 200 keys (10,000 requests)."""

from __future__ import annotations

import asyncio
import collections
import sqlite3
import time

import orjson
import pytest

from callcast.waiting import within

from .conftest import Launcher
from .procs import HOST

KEYS = 200
PER_KEY = 50
KEYS_AT_ONCE = 4
"""Keys whose 50 requests are in flight together (200 connections)."""


class Connection:
    """One keep-alive HTTP/1.1 connection, just enough for JSON POSTs (httpx spends more CPU per
    request than the server it measures, on this 2-core machine)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def post(
        self, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        lines = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", "content-type: application/json"]
        lines += [f"content-length: {len(body)}", *(f"{name}: {value}" for name, value in headers.items())]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ")[1])
        answer_headers = {}
        for line in head[1:]:
            if line:
                name, _, value = line.partition(":")
                answer_headers[name.strip().lower()] = value.strip()
        content = await self.reader.readexactly(int(answer_headers.get("content-length", "0")))
        return status, answer_headers, content

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.mark.slow
def test_each_key_places_exactly_one_order_and_nothing_fails(launch: Launcher) -> None:
    shop = launch()
    run = f"{time.time_ns():x}"
    statuses: collections.Counter[int] = collections.Counter()
    orders_by_key: dict[str, set[str]] = collections.defaultdict(set)
    replayed = 0

    async def place(connection: Connection, key: str, body: bytes) -> None:
        nonlocal replayed
        status, headers, content = await connection.post("/orders", body, {"Idempotency-Key": key})
        statuses[status] += 1
        if status == 201:
            orders_by_key[key].add(orjson.loads(content)["id"])
            replayed += headers.get("idempotent-replayed") == "true"

    async def all_keys() -> None:
        connections = [await Connection.open(HOST, shop.port) for _ in range(KEYS_AT_ONCE * PER_KEY)]
        try:
            signup = orjson.dumps({"name": "Ann", "email": "ann@example.com"})
            status, _, content = await connections[0].post("/users", signup, {})
            assert status == 201
            body = orjson.dumps(
                {"user_id": orjson.loads(content)["id"], "items": [{"sku": "apple", "qty": 1}]}
            )
            keys = [f"{run}-{n}" for n in range(KEYS)]
            for first in range(0, KEYS, KEYS_AT_ONCE):
                wave = [key for key in keys[first : first + KEYS_AT_ONCE] for _ in range(PER_KEY)]
                await asyncio.gather(
                    *(place(connection, key, body) for connection, key in zip(connections, wave, strict=True))
                )
        finally:
            for connection in connections:
                await connection.close()

    started = time.monotonic()
    asyncio.run(within(all_keys(), 240.0))
    elapsed = time.monotonic() - started
    conn = sqlite3.connect(shop.data_dir / "orders.db", timeout=10)
    try:
        stored = int(conn.execute("SELECT count(*) FROM orders").fetchone()[0])
    finally:
        conn.close()
    print(
        f"\n{KEYS * PER_KEY} requests in {elapsed:.1f}s ({KEYS * PER_KEY / elapsed:.0f}/s): "
        f"statuses {dict(statuses)}, replayed {replayed}, orders stored {stored}"
    )
    assert not [status for status in statuses if status >= 500]
    assert statuses[201] == KEYS * PER_KEY
    assert len(orders_by_key) == KEYS
    assert all(len(ids) == 1 for ids in orders_by_key.values())
    assert replayed == KEYS * (PER_KEY - 1)
    assert stored == KEYS
