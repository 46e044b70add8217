"""Raw PostgreSQL (asyncpg) as a queue, as a competent engineer writes it: one table, a publish is
one committed ``INSERT`` (through a pool, many in flight), a statement trigger ``NOTIFY``s a waiting
consumer, which claims up to 256 rows with ``FOR UPDATE SKIP LOCKED``, runs the handler on each and
deletes them in the same transaction (the commit is the ack)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import asyncpg

from bench.brokers import POSTGRES_DSN
from bench.payload import Event, to_json
from bench.sides import Handler, cancel, windowed

BATCH = 256
POOL_SIZE = 16


class PostgresPipe:
    def __init__(self, namespace: str) -> None:
        self.schema = namespace
        self.table = f'"{namespace}".queue'
        self.pool: Any = None
        self.consumer: Any = None
        self.listener: Any = None
        self.consuming: asyncio.Task[None] | None = None

    async def open(self, handler: Handler) -> None:
        self.pool = await asyncpg.create_pool(POSTGRES_DSN, min_size=POOL_SIZE, max_size=POOL_SIZE)
        schema = f'"{self.schema}"'
        async with self.pool.acquire() as conn:
            await conn.execute(
                f"""
                CREATE SCHEMA {schema};
                CREATE TABLE {self.table} (
                  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body bytea NOT NULL
                );
                CREATE FUNCTION {schema}.wake() RETURNS trigger LANGUAGE plpgsql AS
                  $$ BEGIN PERFORM pg_notify('{self.schema}', ''); RETURN NULL; END $$;
                CREATE TRIGGER wake AFTER INSERT ON {self.table}
                  FOR EACH STATEMENT EXECUTE FUNCTION {schema}.wake();
                """
            )
        wake = asyncio.Event()
        self.listener = await asyncpg.connect(POSTGRES_DSN)
        await self.listener.add_listener(self.schema, lambda *_: wake.set())
        self.consumer = await asyncpg.connect(POSTGRES_DSN)
        claim = await self.consumer.prepare(
            f"SELECT id, body FROM {self.table} ORDER BY id LIMIT {BATCH} FOR UPDATE SKIP LOCKED"
        )
        delete = await self.consumer.prepare(f"DELETE FROM {self.table} WHERE id = ANY($1::bigint[])")

        async def consume() -> None:
            while True:
                wake.clear()
                async with self.consumer.transaction():
                    rows = await claim.fetch()
                    for row in rows:
                        await handler(Event.model_validate_json(row["body"]))
                    if rows:
                        await delete.fetch([row["id"] for row in rows])
                if not rows:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await wake.wait()

        self.consuming = asyncio.create_task(consume())

    async def publish(self, event: Event) -> None:
        await self.pool.execute(f"INSERT INTO {self.table} (body) VALUES ($1)", to_json(event))

    async def publish_all(self, events: Sequence[Event], window: int) -> None:
        await windowed(self.publish, events, window)

    async def close(self) -> None:
        await cancel(self.consuming)
        for conn in (self.consumer, self.listener):
            if conn is not None:
                await conn.close()
        if self.pool is not None:
            await self.pool.close()
        self.consumer = self.listener = self.pool = None
