"""The fault-injection wrapper (:mod:`callcast.testing.faults`): it keeps the seam's contract, and its
points fire when the plan says — recorded here by an ``action`` instead of a kill."""

from __future__ import annotations

import asyncio

import pytest

from callcast.brokers import connect
from callcast.envelope import Envelope
from callcast.testing import BrokerConformance
from callcast.testing.faults import ENV_LOG, ENV_PLAN, ENV_SEED, ENV_TOPICS, FaultPlan, FaultyBroker, Trigger
from callcast.transport import Broker


class TestFaultyBrokerWithoutFaults(BrokerConformance):
    """Wrapping a broker in a plan that never fires changes nothing the seam promises."""

    async def make_broker(self) -> Broker:
        return FaultyBroker(await connect("memory://"), FaultPlan({"after_ack": Trigger(probability=0.0)}))


def test_plans_parse_and_come_from_the_environment() -> None:
    plan = FaultPlan.from_env(
        {ENV_PLAN: "before_ack=#40, after_ack=0.25", ENV_TOPICS: "A,B", ENV_SEED: "7", ENV_LOG: "/tmp/k.log"}
    )
    assert plan is not None
    assert plan.triggers == {"before_ack": Trigger(nth=40), "after_ack": Trigger(probability=0.25)}
    assert plan.topics == frozenset({"A", "B"})
    assert plan.env() == {ENV_PLAN: "before_ack=#40,after_ack=0.25", ENV_TOPICS: "A,B", ENV_LOG: "/tmp/k.log"}
    assert FaultPlan.from_env({}) is None
    with pytest.raises(ValueError, match="point=trigger"):
        FaultPlan.parse("before_ack")
    with pytest.raises(ValueError, match="probability"):
        FaultPlan.parse("before_ack=2")


def test_nth_fires_once_on_its_passage_and_topics_filter() -> None:
    fired: list[tuple[str, str]] = []
    plan = FaultPlan.parse("x=#3", topics=["T"], action=lambda point, detail: fired.append((point, detail)))
    for n in range(5):
        plan.reached("x", "T", str(n))
        plan.reached("x", "other", "ignored")
        plan.reached("y", "T", "no trigger")
    assert fired == [("x", "T 2")]
    assert plan.passages["x"] == 5


def test_probabilities_are_seeded() -> None:
    def run() -> list[int]:
        hits: list[int] = []
        plan = FaultPlan.parse(
            "x=0.3", seed=5, action=lambda point, detail: hits.append(int(detail.split()[-1]))
        )
        for n in range(50):
            plan.reached("x", None, str(n))
        return hits

    assert run() == run()
    assert 5 < len(run()) < 30


async def test_the_seam_points_fire_in_order() -> None:
    seen: list[str] = []

    class Recording(FaultPlan):
        def reached(self, point: str, topic: str | None = None, detail: str = "") -> None:
            seen.append(point)

    broker = FaultyBroker(await connect("memory://"), Recording({}))
    try:
        subscription = await broker.subscribe("T", "g")
        await broker.publish("T", [Envelope(type="T", source="/test", data=b"{}")] * 2)
        first = await asyncio.wait_for(subscription.__anext__(), 5)
        await first.ack()
        second = await asyncio.wait_for(subscription.__anext__(), 5)
        await second.nack(delay=0.0)
        assert first.attempt == 1
        assert first.envelope.type == "T"
    finally:
        await broker.close()
    assert seen == [
        "before_publish",
        "after_publish",
        "on_delivery",
        "before_ack",
        "after_ack",
        "on_delivery",
        "before_nack",
        "after_nack",
    ]
