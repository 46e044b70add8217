"""schemathesis against a real shop server, from the OpenAPI document it serves: every operation,
valid and invalid inputs, bounded in examples; no 5xx, answers match their documented schemas."""

from __future__ import annotations

import time
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import Launcher

EXAMPLES = {schemathesis.GenerationMode.POSITIVE: 20, schemathesis.GenerationMode.NEGATIVE: 10}
"""Examples per operation and mode: enough to reach every status, small enough to stay fast."""
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, status_code_conformance]


def test_the_shop_survives_schemathesis(launch: Launcher) -> None:
    shop = launch()
    schema = schemathesis.openapi.from_url(f"{shop.url}/openapi.json")
    validate(schema.raw_schema)
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 8  # 6 routes, 2 RPC endpoints
    calls: dict[str, int] = {}
    statuses: set[int] = set()
    for operation in operations:
        for mode, examples in EXAMPLES.items():

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                response = case.call_and_validate(base_url=shop.url, checks=CHECKS, timeout=10)
                calls[case.operation.label] = calls.get(case.operation.label, 0) + 1
                statuses.add(response.status_code)

            run()
    elapsed = time.monotonic() - started
    total = sum(calls.values())
    print(f"\nschemathesis: {total} calls over {len(calls)} operations in {elapsed:.1f}s, {statuses=}")
    assert len(calls) == len(operations)
    assert not [status for status in statuses if status >= 500]
    assert {200, 201, 422} <= statuses


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """schemathesis calls through requests, which reads proxy settings; the shop is on loopback."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
