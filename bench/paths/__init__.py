"""The paths of issue 5, one module each; each turns a run's settings into measurements.

``PATHS`` maps a path name (``--only``) to ``measurements(config, brokers)``, which returns the
:class:`~bench.harness.Measurement` objects for the brokers given (those selected and up) that
the path covers. ``EVENT_SIDES`` says which implementation each side has on each broker.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.harness import Config, Measurement

EVENT_SIDES: dict[str, dict[str, str]] = {
    "rabbitmq": {
        "callcast": "callcast",
        "raw": "aio-pika: quorum queue, confirms, prefetch 256",
        "faststream": "FastStream RabbitBroker",
    },
    "nats": {
        "callcast": "callcast",
        "raw": "nats-py JetStream: pull consumer, batches of 256",
        "faststream": "FastStream NatsBroker (JStream, PullSub)",
    },
    "redis": {
        "callcast": "callcast",
        "raw": "redis-py: XADD pipelines, XREADGROUP COUNT 256, batched XACK",
        "faststream": "FastStream RedisBroker (StreamSub)",
    },
    "postgres": {"callcast": "callcast", "raw": "asyncpg: SKIP LOCKED queue table, NOTIFY"},
    "sqlite": {"callcast": "callcast (embedded broker)"},
}


def _registry() -> dict[str, Callable[[Config, list[str]], list[Measurement]]]:
    from bench.paths import event, http, iobound, latency, rpc, sqlite

    return {
        "event": event.measurements,
        "latency": latency.measurements,
        "rpc": rpc.measurements,
        "http": http.measurements,
        "io-bound": iobound.measurements,
        "sqlite": sqlite.measurements,
    }


PATH_NAMES = ("event", "latency", "rpc", "http", "io-bound", "sqlite")


def measurements_for(path: str, config: Config, brokers: list[str]) -> list[Measurement]:
    return _registry()[path](config, brokers)
