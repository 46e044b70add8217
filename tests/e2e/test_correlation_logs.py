"""``callcast run``'s log lines carry the correlation id of the request or event they belong to."""

from __future__ import annotations

import httpx

from .conftest import Launcher
from .procs import wait_until


def test_log_lines_of_a_request_and_its_event_show_its_correlation_id(launch: Launcher) -> None:
    process = launch("tests.e2e.correlation_app:app", name="correlation")
    with httpx.Client(base_url=process.url, timeout=10.0, trust_env=False) as http:
        answer = http.post("/say", json={"words": "hello"}, headers={"X-Correlation-Id": "corr-e2e-1"})
    assert answer.status_code == 202
    assert answer.headers["x-correlation-id"] == "corr-e2e-1"

    def tagged() -> list[str] | None:
        lines = [line for line in process.log_text().splitlines() if "[corr-e2e-1]" in line]
        return lines if len(lines) >= 2 else None

    lines = wait_until(tagged, timeout=10.0, what="the route's and the handler's log lines")
    assert any("saying hello" in line for line in lines)
    assert any("heard hello" in line for line in lines)
