"""An app whose keyed handler fails by turns: one run raises, the next kills its own process
(``SIGKILL`` to itself), and so on. Its runs are counted, one line each, in the file ``runs`` of the
directory ``CRASH_TURNS_DIR`` names (written and synced before the run raises or dies).

Run: ``CRASH_TURNS_DIR=... callcast run tests.e2e.crash_turns_app:app --service victim --no-http``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from pydantic import BaseModel

from callcast import App, Context, RetryPolicy, Service

MAX_ATTEMPTS = 3


class Turn(BaseModel):
    n: int


source = Service("source", publishes=[Turn])
victim = Service("victim")


def runs_file() -> Path:
    return Path(os.environ["CRASH_TURNS_DIR"]) / "runs"


@victim.on(
    Turn,
    concurrency=1,
    retry=RetryPolicy(max_attempts=MAX_ATTEMPTS, base_delay=0.05, max_delay=0.1),
)
async def by_turns(event: Turn, ctx: Context) -> None:
    path = runs_file()
    with path.open("a") as runs:
        runs.write(f"{os.getpid()} attempt {ctx.attempt}\n")
        runs.flush()
        os.fsync(runs.fileno())
    count = len(path.read_text().splitlines())
    if count % 2 == 0:
        os.kill(os.getpid(), signal.SIGKILL)  # this process only: the crash under test
    raise RuntimeError(f"run {count} fails; the next one kills its process")


app = App([source, victim], name="crashturns")
