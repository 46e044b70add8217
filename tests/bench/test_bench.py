"""The benchmark harness does not rot: its pure parts, the shape of latest.json, and one tiny real
trial (callcast on the memory broker, in a subprocess like every trial)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bench.goals import verdicts
from bench.harness import Config, Measurement, build_row, measure, run_trial
from bench.http.wrk import parse
from bench.stats import median, percentile, ratio, spread

from bench import report

LATEST = Path(__file__).resolve().parents[2] / "bench" / "results" / "latest.json"


def quiet_config(tmp_path: Path) -> Config:
    return Config(workdir=tmp_path, prefix="ccbtest", repeats=2, quick=True, log=lambda line: None)


def test_statistics() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert median([]) is None
    assert percentile([float(n) for n in range(1, 101)], 0.99) == 99.0
    assert percentile([5.0], 0.5) == 5.0
    assert spread([2.0, 9.0, 4.0]) == (2.0, 9.0)
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None


def row(path: str, metric: str, broker: str = "nats", **medians: float | None) -> dict[str, Any]:
    samples = {side: ([] if medians.get(side) is None else [medians[side]]) for side in report.SIDES}
    built = build_row(path, broker, metric, "u", {s: {metric: v} for s, v in samples.items()}, [], {})
    return built


def test_ratios_and_goals() -> None:
    event = row("event", "throughput", callcast=900.0, raw=1000.0, faststream=300.0)
    assert event["ratio_raw"] == pytest.approx(0.9)
    assert event["ratio_faststream"] == pytest.approx(3.0)
    assert verdicts(event) == [{"goal": "≥0.8×raw", "met": True}, {"goal": "≥2.5×faststream", "met": True}]
    slow = row("latency", "p99", callcast=4.0, raw=2.0)
    assert verdicts(slow) == [{"goal": "≤1.5×raw", "met": False}]
    # no raw client on sqlite: the ratio goal does not apply; the absolute one does
    sqlite = row("event", "throughput", broker="sqlite", callcast=16_000.0)
    assert verdicts(sqlite) == [{"goal": "≥15,000", "met": True}]
    # callcast's trials failed while the baseline ran: missed, not skipped
    failed = row("rpc", "throughput_c64", raw=100.0)
    assert [verdict["met"] for verdict in verdicts(failed)] == [False]


def test_measure_alternates_sides_and_builds_rows(tmp_path: Path) -> None:
    order: list[str] = []

    def trial(side: str) -> dict[str, Any]:
        order.append(side)
        return {
            "throughput": {"callcast": 10.0, "raw": 20.0, "faststream": 5.0}[side] + len(order),
            "notes": [],
        }

    sides = {"callcast": "c", "raw": "r", "faststream": "f"}
    rows = measure(
        Measurement("event", "nats", (("throughput", "msg/s"),), sides, trial), quiet_config(tmp_path)
    )
    assert order == ["callcast", "raw", "faststream", "callcast", "raw", "faststream"]
    (only,) = rows
    assert only["samples"]["callcast"] == [11.0, 14.0]
    assert only["callcast"] == 12.5
    assert only["min_max"]["raw"] == (22.0, 25.0)


def test_report_writes_documented_json(tmp_path: Path) -> None:
    rows = [row("event", "throughput", callcast=900.0, raw=1000.0), row("http", "p99", callcast=3.0)]
    document = {"meta": report.meta({"quick": True, "repeats": 1}, *_when()), "rows": rows}
    json_path, md_path = report.write(document, tmp_path)
    loaded = json.loads(json_path.read_text())
    report.check(loaded)
    assert "| event | nats | throughput | u | 900 | 1,000 | — | 0.90 |" in md_path.read_text()
    broken = {"meta": loaded["meta"], "rows": [{**loaded["rows"][0], "raw": "fast"}]}
    with pytest.raises(ValueError, match="'raw' must be a number or null"):
        report.check(broken)


def _when() -> tuple[Any, float]:
    import datetime

    return datetime.datetime.now(datetime.UTC), 1.0


@pytest.mark.skipif(not LATEST.exists(), reason="no committed bench/results/latest.json yet")
def test_committed_results_have_the_documented_shape() -> None:
    report.check(json.loads(LATEST.read_text()))


def test_wrk_report_is_parsed() -> None:
    figures = parse(
        "  Latency Distribution\n     50%  812.00us\n     75%    1.10ms\n     90%    1.50ms\n"
        "     99%    2.25ms\n  1000 requests in 1.00s\n  Non-2xx or 3xx responses: 3\n"
        "Requests/sec:   15234.12\n"
    )
    assert figures["throughput"] == pytest.approx(15234.12)
    assert figures["p50"] == pytest.approx(0.812)
    assert figures["p99"] == pytest.approx(2.25)
    assert figures["notes"] == ["Non-2xx or 3xx responses: 3"]


def test_one_real_trial_on_the_memory_broker(tmp_path: Path) -> None:
    params = {"count": 300, "window": 16, "deadline": 10.0}
    figures = run_trial(quiet_config(tmp_path), "throughput", "callcast", "memory", params, timeout=60)
    assert figures["handled"] == 300
    assert figures["throughput"] > 0
    assert figures["notes"] == []
