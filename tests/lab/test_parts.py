"""The lab's pure parts: scenarios, arrival schedule, percentiles, coupling, metrics definitions."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from callcast import ConfigurationError
from callcast.exceptions import TransportError
from callcast.lab import workflow
from callcast.lab.coupling import consumer_change, coupling
from callcast.lab.faults import Faults
from callcast.lab.load import RequestRecord, Spike, arrival_offsets
from callcast.lab.metrics import percentile, summarize
from callcast.lab.run import Settings, run_once
from callcast.lab.scenarios import PRESETS, parse, parse_all


def test_scenarios_compose_and_unknown_names_are_refused() -> None:
    both = parse("slow-downstream+spike")
    flags = (both.slow, both.spike, both.down, both.flaky, both.add_consumer)
    assert flags == (True, True, False, False, False)
    assert [scenario.name for scenario in parse_all(None)] == list(PRESETS)
    assert [s.name for s in parse_all(["baseline,spike", "down-downstream+add-consumer"])] == [
        "baseline",
        "spike",
        "down-downstream+add-consumer",
    ]
    with pytest.raises(ConfigurationError, match="unknown scenario"):
        parse("slow+spike")


def test_arrivals_are_evenly_spaced_faster_in_the_spike_and_bounded() -> None:
    plain = arrival_offsets(2.0, 10.0)
    assert len(plain) == 20
    assert plain[1] - plain[0] == pytest.approx(0.1)
    spiked = arrival_offsets(2.0, 10.0, spike=Spike(0.5, 1.5, 4.0))
    inside = [offset for offset in spiked if 0.5 <= offset < 1.5]
    assert len(inside) == pytest.approx(40, abs=1)
    assert len(arrival_offsets(100.0, 100.0, max_requests=7)) == 7


def test_percentile_interpolates() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.99) == pytest.approx(9.9)


def test_coupling_is_derived_from_the_declarations() -> None:
    radius = {
        style: coupling(workflow.build(style, Faults(), "r"))["blast_radius"] for style in workflow.STYLES
    }
    assert radius == {"request": 5, "event": 1, "hybrid": 2}
    request = coupling(workflow.build("request", Faults(), "r"))["services"]["orders"]
    assert request["knows"] == 4
    for style, producer_changes in [("request", True), ("event", False), ("hybrid", False)]:
        before = workflow.build(style, Faults(), "r")
        after = workflow.build(style, Faults(), "r", extra=(workflow.NEW_CONSUMER,))
        change = consumer_change(before, after)
        assert change["producer_changed"] is producer_changes
        assert change["added_services"] == [workflow.NEW_CONSUMER]
        assert bool(change["changed_handlers"]) is producer_changes


def test_lost_duplicated_orphaned_and_consistency_are_counted_per_order() -> None:
    records = [
        RequestRecord("a", 10.0, 10.1, 202, 0.0),
        RequestRecord("b", 10.0, 10.1, 202, 0.0),
        RequestRecord("c", 10.0, 10.1, 503, 0.0),
    ]
    applied = {
        "payments": {"a": [10.2, 10.3], "b": [10.2], "c": [10.2]},
        "stock": {"a": [10.6]},
    }
    figures = summarize(records, applied, lambda record: ("payments", "stock"))
    assert figures["effects_duplicated"] == 1  # a's payment, twice
    assert figures["effects_lost"] == 1  # b's stock
    assert figures["effects_orphaned"] == 1  # c failed, yet was charged
    assert figures["availability"] == pytest.approx(2 / 3, abs=1e-3)
    assert figures["consistency_max_ms"] == pytest.approx(500.0)  # a: last effect 10.6, answered 10.1
    assert figures["orders_consistent"] == 1


@pytest.mark.parametrize(
    "bad", [{"duration": float("nan")}, {"duration": float("inf")}, {"rate": 0.0}, {"rate": -1.0}]
)
def test_settings_refuse_a_duration_or_rate_that_would_not_end_or_not_start(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="duration must be"):
        Settings(**bad)


def test_the_broker_is_shown_without_its_secret_a_nats_token_included() -> None:
    assert Settings(broker="nats://s3cr3t@127.0.0.1:4222").public()["broker"] == "nats://:***@127.0.0.1:4222"
    assert Settings(broker="amqp://u:pw@127.0.0.1/").public()["broker"] == "amqp://u:***@127.0.0.1/"


def test_a_run_whose_broker_cannot_be_reached_leaves_no_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(TransportError):
        asyncio.run(run_once("event", parse("baseline"), Settings(broker="sqlite:////proc/no/such/dir/b.db")))
    assert not list(tmp_path.glob("callcast-lab-*"))
