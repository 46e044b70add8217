"""``callcast compare`` as a user runs it: results.json, PNGs and report.html, and its exit status."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from callcast.cli import main
from callcast.lab import run as lab_run

pytestmark = pytest.mark.slow

REQUIRED = {
    "style",
    "scenario",
    "latency_p50_ms",
    "latency_p99_ms",
    "availability",
    "consistency_p50_ms",
    "consistency_p99_ms",
    "effects_lost",
    "effects_duplicated",
    "requests_offered",
    "requests_ok",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_compare_writes_documented_results_images_and_an_offline_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    command = [sys.executable, "-m", "callcast.cli", "compare", "--quick", "--quiet", "--out", str(out)]
    command += ["--scenario", "baseline", "--scenario", "down-downstream", "--duration", "1.5"]
    command += ["--style", "request", "--style", "event"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "Latency:" in finished.stdout  # the verdict is printed

    results = json.loads((out / "results.json").read_text())
    assert results["format"] == 1
    assert results["settings"]["duration"] == 1.5
    assert results["versions"]["callcast"]
    runs = results["runs"]
    assert [(run["style"], run["scenario"]) for run in runs] == [
        ("request", "baseline"),
        ("event", "baseline"),
        ("request", "down-downstream"),
        ("event", "down-downstream"),
    ]
    for run in runs:
        assert run.keys() >= REQUIRED
        assert run["style"] in ("request", "event", "hybrid")
        assert 0.0 <= run["availability"] <= 1.0
        assert run["requests_offered"] >= run["requests_ok"] > 0
    assert results["verdict"]

    import matplotlib.image

    assert set(results["charts"]) == {"latency", "availability", "consistency", "timeline"}
    for name in results["charts"].values():
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 100
        assert image.shape[1] > 100

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page, re.IGNORECASE)
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", page)


def test_a_failed_run_is_reported_with_its_reason_the_others_kept_and_the_exit_status_is_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    drain = lab_run._drain

    async def failing_drain(live: Any, records: Any) -> Any:
        if live.style == "event" and live.scenario.name == "baseline":
            raise RuntimeError("injected: the drain broke")
        return await drain(live, records)

    monkeypatch.setattr(lab_run, "_drain", failing_drain)
    out = tmp_path / "report"
    argv = ["compare", "--quick", "--quiet", "--out", str(out), "--duration", "1", "--style", "request"]
    argv += ["--style", "event", "--scenario", "baseline", "--scenario", "slow-downstream"]

    logger = logging.getLogger("callcast")
    level = logger.level
    try:
        status = main(argv)  # in this process, so the failure can be injected
    finally:
        logger.setLevel(level)  # the command quiets callcast's log; the other tests need it

    assert status == 1
    printed = capsys.readouterr()
    assert "FAILED event / baseline: RuntimeError: injected: the drain broke" in printed.out
    assert "1 of 4 runs failed" in printed.out
    assert "event / baseline: FAILED: RuntimeError: injected: the drain broke" in printed.err
    results = json.loads((out / "results.json").read_text())
    assert results["styles"] == ["request", "event"]
    assert results["scenarios"] == ["baseline", "slow-downstream"]
    assert [(run["style"], run["scenario"]) for run in results["runs"]] == [
        ("request", "baseline"),
        ("request", "slow-downstream"),
        ("event", "slow-downstream"),
    ]
    for run in results["runs"]:
        assert run.keys() >= REQUIRED
        assert run["requests_ok"] > 0
        assert run["broker_cleanup"] is None  # the fresh embedded broker: nothing outlives the run
    assert results["failed_runs"] == [
        {
            "style": "event",
            "scenario": "baseline",
            "error": "RuntimeError: injected: the drain broke",
            "broker_cleanup": None,
        }
    ]
    assert results["verdict"]
    page = (out / "report.html").read_text()
    assert "failed: RuntimeError: injected: the drain broke" in page
    assert page.count("data:image/png;base64,") == 4
