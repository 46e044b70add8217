"""``rpc``: calls/s and p50/p99 with 1 sequential caller and with 64 concurrent callers; server and
client in one process. Raw: NATS core request/reply, RabbitMQ direct reply-to."""

from __future__ import annotations

from bench.harness import Config, Measurement, run_trial

RPC_SIDES: dict[str, dict[str, str]] = {
    "rabbitmq": {
        "callcast": "callcast ctx.call",
        "raw": "aio-pika: direct reply-to",
        "faststream": "FastStream broker.request",
    },
    "nats": {
        "callcast": "callcast ctx.call",
        "raw": "nats-py: core request/reply",
        "faststream": "FastStream broker.request",
    },
    "redis": {"callcast": "callcast ctx.call", "faststream": "FastStream broker.request (pub/sub channel)"},
    "postgres": {"callcast": "callcast ctx.call"},
    "sqlite": {"callcast": "callcast ctx.call"},
}

METRICS = tuple(
    (f"{figure}_c{callers}", "calls/s" if figure == "throughput" else "ms")
    for callers in (1, 64)
    for figure in ("throughput", "p50", "p99")
)


def measurements(config: Config, brokers: list[str]) -> list[Measurement]:
    seconds, warmup = (1.0, 0.2) if config.quick else (2.0, 0.3)
    params = {"seconds": seconds, "warmup": warmup}
    timeout = 2 * (seconds + warmup) + 60
    return [
        Measurement(
            "rpc",
            broker,
            METRICS,
            RPC_SIDES[broker],
            lambda side, broker=broker: run_trial(config, "rpc", side, broker, params, timeout),
        )
        for broker in RPC_SIDES
        if broker in brokers
    ]
