"""Fault injection around the transport seam: ``kill -9`` this process at chosen points.

A :class:`FaultyBroker` wraps any connected :class:`~callcast.transport.Broker`. Its publishes and
its subscriptions' deliveries pass through named *points*; a :class:`FaultPlan` says at which
points, and when, the process is killed with ``SIGKILL`` — exactly what a ``kill -9`` from outside
does: no cleanup, no ack, no flush, no ``finally``. The points of the wrapper:

================ ===============================================================================
before_publish   ``publish()`` was called; nothing handed to the broker yet (the outbox relay:
                 rows claimed, not published)
after_publish    ``publish()`` returned: the broker stored the batch, the caller has not gone on
                 (the outbox relay: published, rows not yet deleted)
on_delivery      a delivery was handed out by the subscription, before the consumer sees it
before_ack       ``ack()`` was called and not passed on yet (an idempotent handler's transaction
                 has committed: "between effect commit and ack")
after_ack        ``ack()`` returned
before_nack      ``nack()`` was called and not passed on yet
after_nack       ``nack()`` returned
================ ===============================================================================

Apps under test add their own points by calling :meth:`FaultPlan.reached` (for instance
``active_plan().reached("before_effect", topic)`` at the top of a handler), or die on purpose with
:func:`kill_this_process`.

A plan comes from the environment, so a test starts a child process with one::

    CALLCAST_FAULTS="before_ack=#40"              # the 40th time this process reaches before_ack
    CALLCAST_FAULTS="after_ack=0.01,on_delivery=0.002"    # each time, with this probability
    CALLCAST_FAULTS_TOPICS="Tick,Tock"            # count only points of these topics (default: all)
    CALLCAST_FAULTS_SEED=7                        # seed of the probabilities (default: random)
    CALLCAST_FAULTS_LOG=/tmp/kills.log            # a line per kill, appended just before dying

and the child wraps its broker before starting the app::

    from callcast.brokers import connect
    from callcast.testing.faults import FaultyBroker, active_plan

    broker = await connect(url)
    plan = active_plan()
    runtime = await app.start(broker=FaultyBroker(broker, plan) if plan else broker)

The log line is ``<unix time> <pid> <point> <detail>``, so the parent can tell which kill happened
where. In-process tests can pass ``action=`` to record or raise instead of killing.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from callcast.envelope import Envelope
from callcast.forwarding import ForwardingBroker
from callcast.transport import Broker, Delivery, Holding, Subscription

ENV_PLAN = "CALLCAST_FAULTS"
ENV_TOPICS = "CALLCAST_FAULTS_TOPICS"
ENV_SEED = "CALLCAST_FAULTS_SEED"
ENV_LOG = "CALLCAST_FAULTS_LOG"

SEAM_POINTS = (
    "before_publish",
    "after_publish",
    "on_delivery",
    "before_ack",
    "after_ack",
    "before_nack",
    "after_nack",
)
"""The points :class:`FaultyBroker` passes through."""

Action = Callable[[str, str], None]
"""What a plan does when a trigger fires: ``action(point, detail)``; the default kills the process."""


def kill_this_process(point: str, detail: str = "", log_path: str | Path | None = None) -> NoReturn:
    """Append ``<time> <pid> <point> <detail>`` to ``log_path`` (default ``$CALLCAST_FAULTS_LOG``),
    then ``SIGKILL`` this process."""
    target = log_path if log_path is not None else os.environ.get(ENV_LOG)
    if target:
        line = f"{time.time():.6f} {os.getpid()} {point} {detail}".rstrip() + "\n"
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one write with O_APPEND: lines of processes never interleave
        finally:
            os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)  # not reached: SIGKILL cannot be caught


@dataclass(frozen=True, slots=True)
class Trigger:
    """When a point fires: on its ``nth`` passage (1 = the first), and/or with ``probability`` each time."""

    probability: float = 0.0
    nth: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        if self.nth is not None and self.nth < 1:
            raise ValueError(f"nth must be at least 1, got {self.nth}")

    @classmethod
    def parse(cls, text: str) -> Trigger:
        """``#40`` (the 40th passage) or ``0.01`` (a probability)."""
        text = text.strip()
        if text.startswith("#"):
            return cls(nth=int(text[1:]))
        return cls(probability=float(text))

    def __str__(self) -> str:
        return f"#{self.nth}" if self.nth is not None else f"{self.probability:g}"


class FaultPlan:
    """Which points fire, when; counts every passage of a point it has a trigger for."""

    def __init__(
        self,
        triggers: Mapping[str, Trigger],
        *,
        topics: Iterable[str] | None = None,
        seed: int | None = None,
        log_path: str | Path | None = None,
        action: Action | None = None,
    ) -> None:
        self.triggers = dict(triggers)
        self.topics = frozenset(topics) if topics is not None else None
        self.log_path = log_path
        self.passages: Counter[str] = Counter()
        """How often each point with a trigger was reached (by a matching topic)."""
        self.fired: list[tuple[str, str]] = []
        """(point, detail) of every trigger that fired (seen only with a non-killing ``action``)."""
        self._random = random.Random(seed)
        self._action = action

    @classmethod
    def parse(
        cls,
        spec: str,
        *,
        topics: Iterable[str] | None = None,
        seed: int | None = None,
        log_path: str | Path | None = None,
        action: Action | None = None,
    ) -> FaultPlan:
        """A plan from ``"point=trigger,point=trigger"`` (see the module docstring)."""
        triggers: dict[str, Trigger] = {}
        for item in spec.split(","):
            if not item.strip():
                continue
            point, sep, value = item.partition("=")
            if not sep or not point.strip():
                raise ValueError(f"fault plan item must be point=trigger, got {item!r}")
            triggers[point.strip()] = Trigger.parse(value)
        return cls(triggers, topics=topics, seed=seed, log_path=log_path, action=action)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FaultPlan | None:
        """The plan of ``$CALLCAST_FAULTS`` (with its ``_TOPICS``, ``_SEED``, ``_LOG``), or ``None``."""
        env = os.environ if environ is None else environ
        spec = env.get(ENV_PLAN, "").strip()
        if not spec:
            return None
        topics = env.get(ENV_TOPICS, "").strip()
        seed = env.get(ENV_SEED, "").strip()
        return cls.parse(
            spec,
            topics=[topic for topic in topics.split(",") if topic] if topics else None,
            seed=int(seed) if seed else None,
            log_path=env.get(ENV_LOG) or None,
        )

    def env(self) -> dict[str, str]:
        """The environment variables that rebuild this plan in a child process (seed excepted)."""
        values = {ENV_PLAN: ",".join(f"{point}={trigger}" for point, trigger in self.triggers.items())}
        if self.topics is not None:
            values[ENV_TOPICS] = ",".join(sorted(self.topics))
        if self.log_path is not None:
            values[ENV_LOG] = str(self.log_path)
        return values

    def reached(self, point: str, topic: str | None = None, detail: str = "") -> None:
        """This process is at ``point`` (for ``topic``): fire the point's trigger if it is due."""
        trigger = self.triggers.get(point)
        if trigger is None:
            return
        if self.topics is not None and topic is not None and topic not in self.topics:
            return
        self.passages[point] += 1
        due = trigger.nth == self.passages[point]
        if not due and trigger.probability > 0.0:
            due = self._random.random() < trigger.probability
        if due:
            self.fire(point, f"{topic or '-'} {detail}".strip())

    def fire(self, point: str, detail: str = "") -> None:
        self.fired.append((point, detail))
        if self._action is not None:
            self._action(point, detail)
        else:
            kill_this_process(point, detail, self.log_path)

    def __repr__(self) -> str:
        triggers = ", ".join(f"{point}={trigger}" for point, trigger in self.triggers.items())
        return f"<FaultPlan {triggers}>"


_ACTIVE: list[FaultPlan | None] = []


def active_plan() -> FaultPlan | None:
    """This process's plan from the environment (built once, shared by the wrapper and the app)."""
    if not _ACTIVE:
        _ACTIVE.append(FaultPlan.from_env())
    return _ACTIVE[0]


def _detail(envelopes: Sequence[Envelope]) -> str:
    if not envelopes:
        return "0"
    return f"{envelopes[0].id}+{len(envelopes) - 1}" if len(envelopes) > 1 else envelopes[0].id


class FaultyBroker(ForwardingBroker):
    """A :class:`~callcast.transport.Broker` that passes every call to ``inner``, through the points
    of ``plan`` (publishes and the deliveries of subscriptions; the rest is forwarded unchanged).
    Wrap a connected broker; closing the wrapper closes ``inner``."""

    def __init__(self, inner: Broker, plan: FaultPlan) -> None:
        super().__init__(inner)
        self.plan = plan

    async def publish(self, topic: str, envelopes: Sequence[Envelope], *, group: str | None = None) -> None:
        self.plan.reached("before_publish", topic, _detail(envelopes))
        await self.broker.publish(topic, envelopes, group=group)
        self.plan.reached("after_publish", topic, _detail(envelopes))

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        prefetch: int = 32,
        ephemeral: bool = False,
        holding: Holding | None = None,
    ) -> FaultySubscription:
        subscription = await self.broker.subscribe(
            topic, group, prefetch=prefetch, ephemeral=ephemeral, holding=holding
        )
        return FaultySubscription(subscription, topic, self.plan)


class FaultySubscription:
    """The deliveries of ``inner``, each wrapped in a :class:`FaultyDelivery`."""

    def __init__(self, inner: Subscription, topic: str, plan: FaultPlan) -> None:
        self.inner = inner
        self.topic = topic
        self.plan = plan

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self

    async def __anext__(self) -> Delivery:
        delivery = await self.inner.__anext__()
        self.plan.reached("on_delivery", self.topic, f"{delivery.envelope.id} attempt={delivery.attempt}")
        return FaultyDelivery(delivery, self.topic, self.plan)

    async def close(self) -> None:
        await self.inner.close()


class FaultyDelivery:
    """One delivery of ``inner``, with the ack and nack points around its settling."""

    __slots__ = ("inner", "plan", "topic")

    def __init__(self, inner: Delivery, topic: str, plan: FaultPlan) -> None:
        self.inner = inner
        self.topic = topic
        self.plan = plan

    @property
    def envelope(self) -> Envelope:
        return self.inner.envelope

    @property
    def attempt(self) -> int:
        return self.inner.attempt

    def _detail(self) -> str:
        return f"{self.inner.envelope.id} attempt={self.inner.attempt}"

    async def ack(self) -> None:
        self.plan.reached("before_ack", self.topic, self._detail())
        await self.inner.ack()
        self.plan.reached("after_ack", self.topic, self._detail())

    async def nack(self, *, delay: float = 0.0) -> None:
        self.plan.reached("before_nack", self.topic, self._detail())
        await self.inner.nack(delay=delay)
        self.plan.reached("after_nack", self.topic, self._detail())
