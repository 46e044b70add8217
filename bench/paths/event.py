"""``event``: end-to-end throughput. ``count`` ~200-byte events published (``config.window``
in flight, default 64, or pipelined in batches of that size by raw Redis) to a running durable
consumer that validates each and acks after its handler; messages/s from the first publish to the
last handled."""

from __future__ import annotations

from bench.harness import Config, Measurement, run_trial
from bench.paths import EVENT_SIDES


def measurements(config: Config, brokers: list[str]) -> list[Measurement]:
    count, deadline = (2_000, 15.0) if config.quick else (8_000, 30.0)
    params = {"count": count, "window": config.window, "deadline": deadline}
    return [
        Measurement(
            "event",
            broker,
            (("throughput", "msg/s"),),
            EVENT_SIDES[broker],
            lambda side, broker=broker: run_trial(config, "throughput", side, broker, params, deadline + 45),
        )
        for broker in EVENT_SIDES
        if broker in brokers
    ]
