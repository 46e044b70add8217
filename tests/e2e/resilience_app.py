"""The downstream of the call-resilience test: an idempotent RPC that is sometimes slow.

    flaky.work   answers at once, or after SLOW_SECONDS on SLOW_SHARE of the calls (at random)

It counts the requests it receives and, when the process stops, writes the count to
``<data dir>/attempts-<pid>.txt``, so a test can add up what every process of it received.

Run: ``callcast run tests.e2e.resilience_app:app --service flaky`` from the repo root.
"""

from __future__ import annotations

import asyncio
import os
import random

from pydantic import BaseModel

from callcast import App, Context, Service

SLOW_SHARE = 0.3
SLOW_SECONDS = 2.0


class Job(BaseModel):
    n: int


class Result(BaseModel):
    n: int


flaky = Service("flaky")
caller = Service("caller", calls=["flaky"])


@flaky.on_startup
async def start_counting(ctx: Context) -> None:
    ctx.state.received = 0


@flaky.rpc(idempotent=True)
async def work(job: Job, ctx: Context) -> Result:
    ctx.state.received += 1
    if random.random() < SLOW_SHARE:
        await asyncio.sleep(SLOW_SECONDS)
    return Result(n=job.n)


@flaky.on_shutdown
async def write_count(ctx: Context) -> None:
    (ctx.data_dir / f"attempts-{os.getpid()}.txt").write_text(str(ctx.state.received))


app = App([flaky, caller], name="resilience")
