"""Running the matrix: each style × scenario as real services on a real broker, under open-loop load.

One run, in this process:

1. a fresh temporary directory (the services' SQLite databases, and the broker
   ``sqlite:///<dir>/broker.db`` unless ``--broker`` names another; there, every name the run
   creates lives in a namespace of its own, :mod:`callcast.lab.namespace`);
2. one :class:`~callcast.Runtime` per service, all on one broker connection, so a service can be
   stopped and started again on its own; ``orders`` serves HTTP on ``127.0.0.1`` (a free port);
3. the scenario's faults: ``slow``/``flaky`` for the whole run inside the target service; ``down``
   stops the target's runtime for the fault window (its RPC endpoint stops answering, its consumers
   stop taking events) and starts it again; ``add-consumer`` starts the new consumer at the window's
   start and, where the style needs it, a changed ``orders`` (blue-green: the new one serves first,
   then the load moves to it, then the old one stops);
4. the open-loop load over HTTP; then the drain: until every accepted order has every expected
   effect, no progress for a while, or ``drain_timeout``;
5. the effects are read back from the services' databases and the figures computed
   (:mod:`callcast.lab.metrics`); everything is stopped, the directory removed, and on a user's
   broker the run's namespace removed too (also when the run failed or was cancelled).

Runs go one after the other, so they do not compete for the CPU. A run that fails does not end
the matrix: it is reported as failed, with its reason, and the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from callcast import dlq
from callcast.app import App
from callcast.brokers import connect, redact
from callcast.exceptions import ConfigurationError
from callcast.lab import effects, metrics, namespace, workflow
from callcast.lab.coupling import consumer_change, coupling
from callcast.lab.faults import Faults
from callcast.lab.load import (
    RequestRecord,
    Spike,
    Target,
    arrival_offsets,
    honour_cancellation,
    run_open_loop,
)
from callcast.lab.namespace import Cleanup
from callcast.lab.scenarios import Scenario
from callcast.runtime import Runtime
from callcast.transport import Broker

STALL_SECONDS = 3.0
"""The drain gives up after this long without a single new effect."""


MAX_DURATION = 3600.0
"""The longest load of one run, in seconds."""
MAX_RATE = 10_000.0
"""The highest offered rate, in requests per second (``max_requests`` caps a run's count anyway)."""


@dataclass(frozen=True)
class Settings:
    """How the matrix runs. ``quick()`` is the short profile of ``--quick``."""

    duration: float = 20.0
    """Seconds of load per run."""
    rate: float = 30.0
    """Requests per second offered (open loop)."""
    spike_factor: float = 4.0
    target: str = "payments"
    """The downstream service the faults hit."""
    slow_seconds: float = 0.2
    flaky_share: float = 0.2
    window: tuple[float, float] = (0.3, 0.6)
    """The fault window, as shares of ``duration``."""
    call_timeout: float = 1.0
    """Seconds ``orders`` gives each synchronous call."""
    client_timeout: float = 5.0
    """Seconds the user waits for an answer."""
    drain_timeout: float = 20.0
    max_requests: int = 20_000
    broker: str | None = None
    """A callcast broker URL; default a fresh embedded SQLite broker per run."""
    seed: int = 7

    @classmethod
    def quick(cls, **overrides: Any) -> Settings:
        options: dict[str, Any] = {"duration": 4.0, "rate": 20.0, "window": (0.25, 0.75)}
        options["drain_timeout"] = 8.0
        return cls(**{**options, **overrides})

    def __post_init__(self) -> None:
        if not (0 < self.duration <= MAX_DURATION and 0 < self.rate <= MAX_RATE):
            raise ValueError(
                f"duration must be in (0, {MAX_DURATION:g}] seconds and rate in (0, {MAX_RATE:g}] per second"
            )
        if self.target not in workflow.DOWNSTREAM:
            raise ValueError(f"target must be one of {', '.join(workflow.DOWNSTREAM)}")
        if not 0 <= self.window[0] < self.window[1] <= 1:
            raise ValueError("window must be two shares 0 <= start < end <= 1")

    def public(self) -> dict[str, Any]:
        """The settings as JSON-able data (the broker URL without its password)."""
        data = asdict(self)
        data["window"] = list(self.window)
        data["broker"] = redact(self.broker) if self.broker else "sqlite:///<temporary dir>/broker.db"
        return data


@dataclass
class _Live:
    """The moving parts of one run."""

    style: str
    scenario: Scenario
    settings: Settings
    broker: Broker
    data_dir: Path
    faults: Faults
    run_tag: str
    app: App
    runtimes: dict[str, Runtime] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    extra_since: float = float("inf")
    """Wall time from which orders are expected to reach the added consumer."""
    marks: dict[str, float] = field(default_factory=dict)

    async def start(self, app: App, name: str) -> Runtime:
        runtime = await app.start(broker=self.broker, services=[name], data_dir=self.data_dir)
        self.runtimes[name] = runtime
        return runtime

    def expected(self, record: RequestRecord) -> tuple[str, ...]:
        extra = self.extra if record.sent_at >= self.extra_since else ()
        return workflow.expected_effects(extra)


async def run_matrix(
    styles: Sequence[str],
    scenarios: Sequence[Scenario],
    settings: Settings,
    *,
    console: Console,
    progress_bars: bool = True,
) -> list[dict[str, Any]]:
    """Every style under every scenario, one after the other: their entries, in that order (a
    failed run's is :func:`failed_entry`). Each entry's ``broker_cleanup`` says what its run
    removed from a user's broker (``None`` where nothing outlives the run: the fresh embedded broker
    of the default, ``memory://``). ``console`` shows a progress bar per run (unless
    ``progress_bars`` is false), each failure and each cleanup.

    A run that raises an :class:`Exception` is a failed run and the next one starts; a
    :class:`~callcast.exceptions.ConfigurationError` (the broker URL is refused: every run would
    fail alike) and a cancellation end the matrix, after the run in progress cleaned up."""
    entries: list[dict[str, Any]] = []
    with Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress_bars,
    ) as progress:
        for scenario in scenarios:
            for style in styles:
                entries.append(await _entry(style, scenario, settings, progress))
    return entries


async def _entry(style: str, scenario: Scenario, settings: Settings, progress: Progress) -> dict[str, Any]:
    """One run of the matrix, as :func:`run_matrix` describes it."""
    name = f"{style} / {scenario.name}"
    task = progress.add_task(name, total=len(_offsets(settings, scenario)))
    cleanups: list[Cleanup] = []

    def cleaned(cleanup: Cleanup) -> None:
        cleanups.append(cleanup)
        progress.console.print(f"{name}: {cleanup.summary()}", markup=False, highlight=False)

    try:
        entry = await run_once(
            style, scenario, settings, functools.partial(progress.advance, task), cleaned=cleaned
        )
    except ConfigurationError:
        raise
    except Exception as error:
        entry = failed_entry(style, scenario, error)
        progress.update(task, description=f"{name} (failed)")
        progress.console.print(f"{name}: FAILED: {entry['error']}", markup=False, highlight=False)
    entry["broker_cleanup"] = cleanups[0].public() if cleanups else None
    return entry


def failed_entry(style: str, scenario: Scenario, error: Exception) -> dict[str, Any]:
    """The entry of a run that raised ``error``: ``{"style", "scenario", "error"}``, the error as
    ``"<type>: <message>"``."""
    reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return {"style": style, "scenario": scenario.name, "error": reason}


async def run_once(
    style: str,
    scenario: Scenario,
    settings: Settings,
    answered: Callable[[], None] | None = None,
    *,
    cleaned: Callable[[Cleanup], None] | None = None,
) -> dict[str, Any]:
    """Run ``style`` under ``scenario``; its entry of ``results.json`` (see :mod:`callcast.lab.report`).

    On a user's broker (``settings.broker``, but for ``memory://``) every name the run creates is
    under a namespace of its own (:func:`~callcast.lab.namespace.scoped`), removed when the run
    ends, whether it returned, raised or was cancelled; ``cleaned`` is then told what was removed
    and what could not be."""
    data_dir = Path(tempfile.mkdtemp(prefix="callcast-lab-"))
    run_tag = f"r{secrets.token_hex(6)}"
    space = namespace.PREFIX + run_tag
    url = (
        namespace.scoped(settings.broker, space) if settings.broker else f"sqlite:///{data_dir / 'broker.db'}"
    )
    groups: set[tuple[str, str]] = set()
    try:
        return await _run(style, scenario, settings, url, data_dir, run_tag, groups, answered)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        if settings.broker and namespace.applies(settings.broker):
            cleanup = await namespace.remove(url, space, groups)
            if cleaned is not None:
                cleaned(cleanup)


async def _run(
    style: str,
    scenario: Scenario,
    settings: Settings,
    url: str,
    data_dir: Path,
    run_tag: str,
    groups: set[tuple[str, str]],
    answered: Callable[[], None] | None,
) -> dict[str, Any]:
    """One run on the broker at ``url``, whose groups are noted in ``groups``; everything it
    started is stopped, and the broker closed, when it returns or raises."""
    broker = namespace.GroupRecorder(await connect(url), groups)
    faults = Faults(seed=settings.seed)
    if scenario.slow:
        faults.slow[settings.target] = settings.slow_seconds
    if scenario.flaky:
        faults.flaky[settings.target] = settings.flaky_share
    app = workflow.build(style, faults, run_tag, call_timeout=settings.call_timeout)
    live = _Live(style, scenario, settings, broker, data_dir, faults, run_tag, app)
    try:
        for name in [*workflow.DOWNSTREAM, "orders"]:
            await live.start(app, name)
        await live.runtimes["orders"].serve_http("127.0.0.1", 0)
        return await _measure(live, answered)
    finally:
        try:
            for runtime in [live.runtimes.pop("orders", None), *live.runtimes.values()]:
                if runtime is not None:
                    await runtime.stop(grace=1.0)
        finally:
            await broker.close()


async def _measure(live: _Live, answered: Callable[[], None] | None) -> dict[str, Any]:
    settings = live.settings
    target = Target(f"http://127.0.0.1:{live.runtimes['orders'].http_port}")
    window = (settings.duration * settings.window[0], settings.duration * settings.window[1])
    offsets = _offsets(settings, live.scenario)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    started = time.time()
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:  # no proxy: 127.0.0.1 only
        injector = asyncio.create_task(_inject(live, target, window, started))
        try:
            records = await run_open_loop(
                client,
                target,
                offsets,
                lambda index: f"{live.run_tag}-{index:06d}",
                timeout=settings.client_timeout,
                answered=answered,
            )
            await injector
        finally:
            injector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await injector
    load_end = time.time()
    applied = await _drain(live, records)
    figures = metrics.summarize(records, applied, live.expected)
    missing = metrics.missing_effects(records, applied, live.expected)
    dead_lettered = await _dead_lettered(live, missing)
    step = max(0.1, settings.duration / 40)
    return {
        "style": live.style,
        "scenario": live.scenario.name,
        **figures,
        "backlog_left": figures["effects_lost"] - dead_lettered,
        "effects_dead_lettered": dead_lettered,
        "drain_seconds": round(time.time() - load_end, 3),
        "injected_failures": live.faults.injected_failures,
        "fault_target": settings.target,
        "fault_window_s": _window(live, started),
        "coupling": coupling(live.app),
        "add_consumer": _change_record(live) if "change" in live.marks else None,
        "timeline": metrics.timeline(records, applied, live.expected, start=started, step=step),
    }


def _offsets(settings: Settings, scenario: Scenario) -> list[float]:
    """The send times of a run's requests, in seconds from the start of the load."""
    window = (settings.duration * settings.window[0], settings.duration * settings.window[1])
    spike = Spike(window[0], window[1], settings.spike_factor) if scenario.spike else None
    return arrival_offsets(settings.duration, settings.rate, spike=spike, max_requests=settings.max_requests)


def _window(live: _Live, started: float) -> list[float] | None:
    """The fault window as it really happened, in seconds from the start of the load."""
    if "down_start" in live.marks:
        return [round(live.marks["down_start"] - started, 3), round(live.marks["down_end"] - started, 3)]
    if live.scenario.spike:
        window = live.settings.window
        return [live.settings.duration * window[0], live.settings.duration * window[1]]
    if "change" in live.marks:
        return [round(live.marks["change"] - started, 3), round(live.marks["change"] - started, 3)]
    return None


def _change_record(live: _Live) -> dict[str, Any]:
    after = workflow.build(live.style, live.faults, live.run_tag, extra=live.extra)
    return {**consumer_change(live.app, after), "consumer": workflow.NEW_CONSUMER}


async def _inject(live: _Live, target: Target, window: tuple[float, float], started: float) -> None:
    """Switch the windowed faults on and off at their times."""
    scenario = live.scenario
    if not (scenario.down or scenario.add_consumer):
        return
    await asyncio.sleep(max(0.0, started + window[0] - time.time()))
    if scenario.down:
        live.marks["down_start"] = time.time()
        await live.runtimes[live.settings.target].stop(grace=1.0)  # kept listed until stopped:
        del live.runtimes[live.settings.target]  # run_once's cleanup stops whatever is listed
    if scenario.add_consumer:
        await _add_consumer(live, target)
    if scenario.down:
        await asyncio.sleep(max(0.0, started + window[1] - time.time()))
        await live.start(live.app, live.settings.target)
        live.marks["down_end"] = time.time()


async def _add_consumer(live: _Live, target: Target) -> None:
    """Start the new consumer; where the producer must call it, deploy the changed producer first."""
    extra = (workflow.NEW_CONSUMER,)
    after = workflow.build(
        live.style, live.faults, live.run_tag, call_timeout=live.settings.call_timeout, extra=extra
    )
    await live.start(after, workflow.NEW_CONSUMER)
    if consumer_change(live.app, after)["producer_changed"]:
        # Both stay listed until the switch is done, so run_once's cleanup stops them whatever fails.
        old = live.runtimes["orders (before)"] = live.runtimes["orders"]
        new = live.runtimes["orders (after)"] = await after.start(
            broker=live.broker, services=["orders"], data_dir=live.data_dir
        )
        await new.serve_http("127.0.0.1", 0)
        live.runtimes["orders"] = new
        del live.runtimes["orders (after)"]
        target.base_url = f"http://127.0.0.1:{new.http_port}"
        await old.stop(grace=live.settings.client_timeout)  # its in-flight requests finish
        del live.runtimes["orders (before)"]
    live.extra = extra
    live.extra_since = time.time()
    live.marks["change"] = live.extra_since


async def _read_all(live: _Live) -> metrics.Applied:
    names = [*workflow.DOWNSTREAM, *live.extra]
    return {name: await effects.read(live.runtimes[name], name) for name in names if name in live.runtimes}


async def _drain(live: _Live, records: list[RequestRecord]) -> metrics.Applied:
    """Wait until every accepted order has every expected effect, nothing moved for
    :data:`STALL_SECONDS`, or ``drain_timeout`` passed; the effects read at that moment."""
    deadline = time.monotonic() + live.settings.drain_timeout
    last_count, last_change = -1, time.monotonic()
    while True:
        honour_cancellation()
        applied = await _read_all(live)
        missing = len(metrics.missing_effects(records, applied, live.expected))
        now = time.monotonic()
        if missing != last_count:
            last_count, last_change = missing, now
        if missing == 0 or now > deadline or now - last_change > STALL_SECONDS:
            return applied
        await asyncio.sleep(0.05)


async def _dead_lettered(live: _Live, missing: list[tuple[str, str]]) -> int:
    """How many of the ``missing`` effects have their event in the dead letters."""
    if not missing:
        return 0
    wanted = set(missing)
    found: set[tuple[str, str]] = set()
    async with dlq.browse(live.broker) as letters:
        for letter in letters:
            service = letter.subscriber.split(".", 1)[0]
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                order_id = str(orjson.loads(letter.envelope.data).get("order_id"))
                if (service, order_id) in wanted:
                    found.add((service, order_id))
    return len(found)
