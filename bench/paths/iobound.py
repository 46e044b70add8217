"""``io-bound``: a handler that awaits ``asyncio.sleep(0.010)``. callcast with its defaults next to
one-at-a-time handling: the ``raw`` column is callcast with ``concurrency=1``, the ``faststream``
column FastStream's default subscriber (one message at a time). The events are backlogged first
(handlers wait until the last publish returned), then throughput is counted from that moment to the
last handled, or to the deadline (one-at-a-time handling cannot finish: ~100 msg/s): what is
measured is handling, not the broker's publish rate (the event path measures that)."""

from __future__ import annotations

from bench.harness import Config, Measurement, run_trial

SLEEP = 0.010
IO_SIDES: dict[str, dict[str, str]] = {
    "memory": {"callcast": "callcast defaults", "raw": "callcast concurrency=1"},
    "sqlite": {"callcast": "callcast defaults", "raw": "callcast concurrency=1"},
    "rabbitmq": {
        "callcast": "callcast defaults",
        "raw": "callcast concurrency=1",
        "faststream": "FastStream default subscriber",
    },
}


def measurements(config: Config, brokers: list[str]) -> list[Measurement]:
    count, deadline = (2_000, 2.0) if config.quick else (4_000, 4.0)

    def trial(side: str, broker: str) -> dict[str, object]:
        params: dict[str, object] = {
            "count": count,
            "window": config.window,
            "deadline": deadline,
            "sleep": SLEEP,
            "backlogged": True,
        }
        if side == "raw":
            params["concurrency"] = 1
        workload_side = "callcast" if side == "raw" else side
        return run_trial(config, "throughput", workload_side, broker, params, deadline + 45)

    return [
        Measurement(
            "io-bound",
            broker,
            (("throughput", "msg/s"),),
            IO_SIDES[broker],
            lambda side, broker=broker: trial(side, broker),
        )
        for broker in IO_SIDES
        if broker in brokers
    ]
