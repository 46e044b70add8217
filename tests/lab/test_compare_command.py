"""``callcast compare`` as a user runs it: a subprocess writing results.json, PNGs and report.html."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
