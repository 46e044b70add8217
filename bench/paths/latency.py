"""``latency``: p50 and p99 from the start of a publish to the start of the handler (the publish
time travels in the payload; one process), at a fixed open-loop rate of 1,000 events/s."""

from __future__ import annotations

from bench.harness import Config, Measurement, run_trial
from bench.paths import EVENT_SIDES

RATE = 1_000.0


def measurements(config: Config, brokers: list[str]) -> list[Measurement]:
    seconds, warmup = (1.5, 0.5) if config.quick else (3.0, 0.5)
    deadline = seconds + warmup + 10.0
    params = {"rate": RATE, "seconds": seconds, "warmup": warmup, "deadline": deadline}
    return [
        Measurement(
            "latency",
            broker,
            (("p50", "ms"), ("p99", "ms")),
            EVENT_SIDES[broker],
            lambda side, broker=broker: run_trial(config, "latency", side, broker, params, deadline + 45),
        )
        for broker in EVENT_SIDES
        if broker in brokers
    ]
