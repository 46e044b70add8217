"""What the fault scenarios share: worker processes, the kill supervisor, figures, broker helpers.

Every process is started here (``python -m tests.faults.worker``, from the repo root) with its own
log file, and stopped through its own ``Popen`` handle: by PID, SIGTERM first, SIGKILL after a
timeout. Nothing here signals a process it did not start. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel

from callcast import dlq
from callcast.codec import encode
from callcast.envelope import Envelope
from callcast.testing.faults import ENV_LOG, ENV_PLAN, ENV_TOPICS
from callcast.transport import Broker

REPO_ROOT = Path(__file__).resolve().parents[2]
READY = "faults-worker: ready"
POLL = 0.02

M = TypeVar("M", bound=BaseModel)


def event_model(base: type[M], event_type: str) -> type[M]:
    """A subclass of ``base`` whose events travel as ``event_type`` (a fresh topic per run)."""
    return type(base.__name__, (base,), {"__event_type__": event_type, "__module__": base.__module__})


def callcast_command() -> list[str]:
    """The ``callcast`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "callcast"
    return [str(script)] if script.exists() else [sys.executable, "-m", "callcast.cli"]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without callcast's own variables (a stray ``CALLCAST_BROKER`` or database
    URL must not reach the children), plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CALLCAST_")}
    env.update(extra or {})
    return env


# -- figures ------------------------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    value: object
    expected: str = ""
    """What the value must be (empty: a figure reported, not checked)."""
    ok: bool | None = None


@dataclass
class Result:
    """The figures of one scenario on one broker."""

    scenario: str
    broker: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def report(self, name: str, value: object) -> None:
        self.figures.append(Figure(name, value))

    def expect(self, name: str, value: object, expected: object, *, ok: bool | None = None) -> None:
        """A checked figure: ``ok`` when ``value == expected`` (or as given)."""
        self.figures.append(Figure(name, value, str(expected), value == expected if ok is None else ok))

    @property
    def ok(self) -> bool:
        return all(figure.ok is not False for figure in self.figures)

    def failures(self) -> list[Figure]:
        return [figure for figure in self.figures if figure.ok is False]

    def __getitem__(self, name: str) -> object:
        for figure in self.figures:
            if figure.name == name:
                return figure.value
        raise KeyError(name)


def render(results: Sequence[Result]) -> str:
    """The figures as plain-text tables, one block per scenario: figure, ok, expected, value."""
    width = max((len(f.name) for result in results for f in result.figures), default=10)
    expected_width = max((len(f.expected) for result in results for f in result.figures), default=8)
    expected_width = max(expected_width, len("expected"))
    lines = []
    for result in results:
        lines.append(f"{result.scenario}  ({result.elapsed:.1f} s, {result.broker})")
        lines.append(f"  {'figure'.ljust(width)}  ok   {'expected'.ljust(expected_width)}  value")
        for figure in result.figures:
            ok = "" if figure.ok is None else ("yes" if figure.ok else "NO")
            row = f"  {figure.name.ljust(width)}  {ok.ljust(3)}  {figure.expected.ljust(expected_width)}  "
            lines.append((row + _text(figure.value)).rstrip())
        lines.append("")
    return "\n".join(lines).rstrip()


def fmt(counts: Mapping[str, int]) -> str:
    """``a=1, b=2`` (in the mapping's order)."""
    return ", ".join(f"{key}={value}" for key, value in counts.items()) or "-"


def _text(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key}={item}" for key, item in value.items()) or "-"
    return str(value)


# -- the scenario's environment -----------------------------------------------------------------------

DEFAULT_LEASES = {
    "sqlite": 10.0,
    "redis": 10.0,
    "rediss": 10.0,
    "postgresql": 10.0,
    "postgres": 10.0,
    "nats": 30.0,
}
"""Seconds after which each adapter hands a killed subscriber's deliveries to another one, unless its
URL says otherwise (``?lease=``, NATS ``?ack_wait=``); RabbitMQ does at once (the connection drops)."""


def redelivery_delay(url: str) -> float:
    """How long a killed consumer's deliveries wait before another consumer gets them, on ``url``."""
    parts = urlsplit(url)
    options = parse_qs(parts.query)
    for name in ("lease", "ack_wait"):
        if name in options:
            with contextlib.suppress(ValueError):
                return float(options[name][-1])
    return DEFAULT_LEASES.get(parts.scheme, 1.0)


@dataclass
class Env:
    """One scenario run: its broker URL, files, unique names, randomness and deadline."""

    broker_url: str
    workdir: Path
    run: str
    seed: int
    time_limit: float
    progress: Callable[[str], None] = field(default=lambda message: None)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.lease = redelivery_delay(self.broker_url)
        """Seconds before a killed consumer's deliveries go to another one on this broker."""
        self.stall = max(20.0, 2 * self.lease + 10.0)
        """Seconds without progress after which a scenario stops waiting (a stall, not a lease)."""
        self.redeliveries_settled = max(3.0, self.lease + 2.0)
        """Seconds without a new redelivery after which redeliveries are taken as done."""
        self.rng = random.Random(self.seed)
        self.data_dir = self.workdir / "data"
        self.log_dir = self.workdir / "logs"
        self.kill_log = self.workdir / "kills.log"
        for path in (self.data_dir, self.log_dir):
            path.mkdir(parents=True, exist_ok=True)

    @property
    def deadline(self) -> float:
        return self.started + self.time_limit

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, message: str) -> None:
        self.progress(f"[{time.monotonic() - self.started:6.1f}s] {message}")


async def settle(value: Callable[[], object], env: Env, *, quiet: float, limit: float) -> None:
    """Wait until ``value()`` has not changed for ``quiet`` seconds (at most ``limit`` seconds)."""
    end = min(time.monotonic() + limit, env.deadline)
    last, since = value(), time.monotonic()
    while time.monotonic() < end:
        await asyncio.sleep(0.25)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


# -- worker processes ---------------------------------------------------------------------------------


class Worker:
    """One ``python -m tests.faults.worker`` process; restartable, each start with its own log."""

    def __init__(
        self, env: Env, module: str, service: str, name: str, config: Mapping[str, Any], *, grace: float = 5.0
    ) -> None:
        self.env = env
        self.module = module
        self.service = service
        self.name = name
        self.config = dict(config)
        self.grace = grace
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exits: list[int] = []
        self.started_at = 0.0
        self.ready_at: float | None = None
        self.faults: dict[str, str] = {}

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def log_path(self) -> Path:
        return self.env.log_dir / f"{self.name}-{self.starts}.log"

    @property
    def stats_path(self) -> Path:
        return self.env.log_dir / f"{self.name}-{self.starts}.stats.json"

    def start(self, faults: Mapping[str, str] | None = None) -> None:
        """Start the process (returns at once; :meth:`is_ready` tells when it runs its services)."""
        assert not self.alive(), f"{self.name} is already running"
        self.starts += 1
        self.faults = dict(faults or {})
        env = child_env({ENV_LOG: str(self.env.kill_log), **self.faults})
        args = [
            sys.executable,
            "-m",
            "tests.faults.worker",
            "--module",
            self.module,
            "--run",
            self.env.run,
            "--service",
            self.service,
            "--broker",
            self.env.broker_url,
            "--data-dir",
            str(self.env.data_dir),
            "--stats",
            str(self.stats_path),
            "--grace",
            str(self.grace),
            "--config",
            json.dumps(self.config),
        ]
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                args, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.started_at = time.monotonic()
        self.ready_at = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def is_ready(self) -> bool:
        if self.ready_at is None and self.alive() and READY in self.log_text():
            self.ready_at = time.monotonic()
        return self.ready_at is not None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def reap(self) -> int | None:
        """The exit code if the process ended since the last call (recorded once), else ``None``."""
        if self.popen is None or self.popen.poll() is None:
            return None
        code = self.popen.returncode
        if len(self.exits) < self.starts:
            self.exits.append(code)
            return code
        return None

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if self.popen is not None and self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode} on start:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready within {timeout:.0f}s:\n{self.log_text()}")
            await asyncio.sleep(POLL)

    def kill9(self) -> None:
        """``kill -9`` by PID, and reap."""
        assert self.popen is not None
        assert self.popen.poll() is None
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    async def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM by PID and wait; SIGKILL after ``timeout`` (reported as ``-9``)."""
        if self.popen is None:
            return 0
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.popen.wait, timeout)
            if self.popen.poll() is None:
                self.popen.kill()
                self.popen.wait()
        self.reap()
        return self.popen.returncode

    def stats(self) -> Counter[str]:
        """The consumer stats the process wrote at its last graceful stop (empty if it was killed)."""
        total: Counter[str] = Counter()
        if self.stats_path.exists():
            for counts in json.loads(self.stats_path.read_text()).values():
                total.update(counts)
        return total

    def all_stats(self) -> Counter[str]:
        """The stats of every start of this worker that ended gracefully."""
        total: Counter[str] = Counter()
        for path in self.env.log_dir.glob(f"{self.name}-*.stats.json"):
            for counts in json.loads(path.read_text()).values():
                total.update(counts)
        return total


async def start_all(workers: Iterable[Worker], timeout: float = 30.0) -> None:
    workers = list(workers)
    for worker in workers:
        worker.start()
    await asyncio.gather(*(worker.wait_ready(timeout) for worker in workers))


async def stop_all(workers: Iterable[Worker], timeout: float = 20.0) -> list[int]:
    """SIGTERM every running worker (by PID); their exit codes."""
    return list(await asyncio.gather(*(worker.terminate(timeout) for worker in workers)))


# -- kills ---------------------------------------------------------------------------------------------


@dataclass
class Kill:
    """One planned ``kill -9``: the process kills itself at the injected point ``inject`` (the
    ``nth`` time it gets there), or — ``inject`` is ``None`` — the supervisor kills it from outside
    at a random moment. ``label`` is the point's name in the report."""

    label: str
    inject: str | None
    rank: int = 0
    """The label's place in the report."""
    nth: int = 0
    pid: int | None = None
    happened: bool = False


@dataclass
class KillLog:
    """The lines processes wrote just before killing themselves: ``time pid point detail``."""

    path: Path

    def lines(self) -> list[tuple[float, int, str, str]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            parts = line.split(" ", 3)
            if len(parts) >= 3:
                rows.append((float(parts[0]), int(parts[1]), parts[2], parts[3] if len(parts) > 3 else ""))
        return rows

    def of(self, pid: int) -> list[str]:
        return [point for _, line_pid, point, _ in self.lines() if line_pid == pid]

    def points(self) -> Counter[str]:
        return Counter(point for _, _, point, _ in self.lines())


Arm = Callable[[Kill, Worker, int], int]
"""The ``nth`` passage at which a worker's next start dies for ``kill``, given how many kills are
still queued for that worker (this one included)."""


class Supervisor:
    """Keeps a set of workers running: restarts every one that dies, and carries out each worker's
    queue of planned kills, one kill per start."""

    def __init__(
        self,
        env: Env,
        workers: Sequence[Worker],
        plan: Sequence[Kill] = (),
        arm: Arm | None = None,
        topics: Iterable[str] = (),
        victims: Sequence[Worker] | None = None,
        external_delay: tuple[float, float] = (0.3, 2.5),
    ) -> None:
        self.env = env
        self.external_delay = external_delay
        """Seconds after a worker is ready that a kill from outside comes: uniform in this range."""
        self.workers = list(workers)
        self.plan = list(plan)
        self.arm = arm
        self.topics = ",".join(topics)
        self.queues: dict[str, list[Kill]] = {worker.name: [] for worker in workers}
        targets = list(victims) if victims is not None else self.workers
        for index, kill in enumerate(self.plan):
            self.queues[targets[index % len(targets)].name].append(kill)
        self.armed: dict[str, Kill | None] = {worker.name: None for worker in workers}
        self.external_at: dict[str, float | None] = {worker.name: None for worker in workers}
        self.kill_log = KillLog(env.kill_log)
        self.restarts = 0
        self.unexpected: list[str] = []
        self.other_deaths: Counter[str] = Counter()
        """Deaths at points no kill was planned for (a crashing handler), by the logged point."""

    def _start(self, worker: Worker) -> None:
        queue = self.queues[worker.name]
        kill = queue.pop(0) if queue else None
        self.armed[worker.name] = kill
        self.external_at[worker.name] = None
        faults: dict[str, str] = {}
        if kill is not None and kill.inject is not None:
            kill.nth = self.arm(kill, worker, len(queue) + 1) if self.arm is not None else 1
            faults = {ENV_PLAN: f"{kill.inject}=#{max(1, kill.nth)}"}
            if self.topics:
                faults[ENV_TOPICS] = self.topics
        worker.start(faults)
        if kill is not None:
            kill.pid = worker.pid

    async def start(self, timeout: float = 30.0) -> None:
        """Start every worker; return once each runs its services (one killed by its planned kill
        before it said so is restarted like any other)."""
        for worker in self.workers:
            self._start(worker)
        deadline = time.monotonic() + timeout
        while not all(worker.is_ready() for worker in self.workers):
            for worker in self.workers:
                self._check(worker)
            if self.unexpected:
                raise RuntimeError(f"worker died on start: {self.unexpected[0]}")
            if time.monotonic() > deadline:
                late = [worker for worker in self.workers if not worker.is_ready()]
                raise RuntimeError(f"{late[0].name} not ready within {timeout:.0f}s:\n{late[0].log_text()}")
            await asyncio.sleep(POLL)

    def _kill_from_outside(self, worker: Worker, kill: Kill) -> None:
        if not worker.is_ready() or worker.ready_at is None:
            return
        at = self.external_at[worker.name]
        if at is None:
            low, high = self.external_delay
            self.external_at[worker.name] = worker.ready_at + self.env.rng.uniform(low, high)
        elif time.monotonic() >= at:
            worker.kill9()
            kill.happened = True
            self.env.say(f"kill -9 {worker.name} (pid {worker.pid}) from outside")

    def _check(self, worker: Worker) -> None:
        kill = self.armed[worker.name]
        if worker.alive():
            if kill is not None and kill.inject is None:
                self._kill_from_outside(worker, kill)
            if worker.alive():
                return
        code = worker.reap()
        if code is None:
            return
        points = self.kill_log.of(worker.pid)
        if kill is not None and kill.inject is None and kill.happened:
            pass
        elif kill is not None and kill.inject is not None and points and points[-1] == kill.inject:
            kill.happened = True
            self.env.say(f"{worker.name} (pid {worker.pid}) killed itself at {kill.inject} #{kill.nth}")
        elif points:
            self.other_deaths[points[-1]] += 1
        else:
            self.unexpected.append(f"{worker.name} pid {worker.pid} exited with {code}")
            self.env.say(f"{worker.name} (pid {worker.pid}) exited unexpectedly with {code}")
        if kill is not None and not kill.happened:
            self.queues[worker.name].insert(0, kill)  # it died of something else first: again
        self.restarts += 1
        self._start(worker)

    async def run(
        self,
        complete: Callable[[], bool | Awaitable[bool]],
        progress: Callable[[], object],
        *,
        quiet: float,
        check_every: float = 0.25,
    ) -> bool:
        """Supervise until ``complete()``; or until neither ``progress()`` nor the kills done changed
        for ``quiet`` seconds; or the deadline. True if complete."""
        last_check = 0.0
        last_value, last_change = (progress(), self.done()), time.monotonic()
        while time.monotonic() < self.env.deadline:
            for worker in self.workers:
                self._check(worker)
            now = time.monotonic()
            if now - last_check >= check_every:
                last_check = now
                done = complete()
                if not isinstance(done, bool):
                    done = await done
                if done:
                    return True
                value = (progress(), self.done())
                if value != last_value:
                    last_value, last_change = value, now
                elif now - last_change > quiet:
                    self.env.say(f"no progress for {quiet:.0f}s: stop waiting")
                    return False
            await asyncio.sleep(POLL)
        self.env.say("deadline reached")
        return False

    def done(self) -> int:
        """Planned kills carried out so far."""
        return sum(1 for kill in self.plan if kill.happened)

    def pending(self) -> bool:
        """A planned kill is queued, or armed and not done yet."""
        return any(self.queues.values()) or any(
            kill is not None and not kill.happened for kill in self.armed.values()
        )

    def planned(self) -> Counter[str]:
        return Counter(kill.label for kill in sorted(self.plan, key=lambda kill: kill.rank))

    def executed(self) -> Counter[str]:
        return Counter(kill.label for kill in sorted(self.plan, key=lambda kill: kill.rank) if kill.happened)


def schedule(rng: random.Random, points: Mapping[str, tuple[str | None, int]]) -> list[Kill]:
    """Kills per report label: ``{label: (injected point or None for outside, how many)}``, shuffled."""
    kills = [
        Kill(label, inject, rank)
        for rank, (label, (inject, count)) in enumerate(points.items())
        for _ in range(count)
    ]
    rng.shuffle(kills)
    return kills


def nth_for(rng: random.Random, remaining: int, sharers: int, queued: int, *, scale: float = 1.0) -> int:
    """A random passage number that spreads ``queued`` kills over this worker's share of the
    ``remaining`` work: uniform in [1, 2 × mean]."""
    mean = max(1.0, scale * remaining / max(1, sharers) / (queued + 1))
    return rng.randint(1, max(1, int(2 * mean)))


# -- broker and databases -----------------------------------------------------------------------------


def envelopes_of(
    topic: str,
    events: Iterable[BaseModel],
    *,
    source: str = "/faults/runner",
    keys: Iterable[str | None] | None = None,
    sequences: Iterable[int | None] | None = None,
) -> list[Envelope]:
    """The envelopes ``ctx.publish`` would send for ``events`` (with their partition keys and sequences)."""
    events = list(events)
    key_list = list(keys) if keys is not None else [None] * len(events)
    sequence_list = list(sequences) if sequences is not None else [None] * len(events)
    result = []
    for event, key, sequence in zip(events, key_list, sequence_list, strict=True):
        extensions = {"correlationid": "faults"}
        if key is not None:
            extensions["partitionkey"] = key
        if sequence is not None:
            extensions["sequence"] = str(sequence)
        result.append(Envelope(type=topic, source=source, data=encode(event), extensions=extensions))
    return result


async def publish_all(broker: Broker, topic: str, envelopes: Sequence[Envelope], batch: int = 500) -> None:
    for start in range(0, len(envelopes), batch):
        await broker.publish(topic, envelopes[start : start + batch])


def query(path: Path, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` on a SQLite service database (``[]`` while the file or table is missing)."""
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
        try:
            return conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return []
            raise


def scalar(path: Path, sql: str, params: Sequence[object] = ()) -> int:
    rows = query(path, sql, params)
    return int(rows[0][0] or 0) if rows else 0


async def dead_letters(broker: Broker, subscriber: str) -> list[dict[str, str]]:
    """The dead letters of ``subscriber``: id, type and every extension (browsed; all go back)."""
    async with dlq.browse(broker) as letters:
        return [
            {"id": letter.id, "type": letter.envelope.type, **dict(letter.envelope.extensions)}
            for letter in letters
            if letter.subscriber == subscriber
        ]


async def cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run the real ``callcast`` command (a child process, stopped by the timeout if it hangs)."""
    return await asyncio.to_thread(
        subprocess.run,
        [*callcast_command(), *args],
        cwd=REPO_ROOT,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
