"""Driving wrk: install it if missing, run it against a POST route, parse its report."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.http.models import BODY

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def ensure_wrk(log: Any = print) -> str | None:
    """The path of wrk; installs it with apt-get (saying so) when it is missing. ``None`` if that failed."""
    found = shutil.which("wrk")
    if found:
        return found
    log("wrk is missing: installing it with apt-get (package wrk)")
    command = ["apt-get", "install", "-y", "-q", "wrk"]
    if os.geteuid() != 0 and shutil.which("sudo"):
        command = ["sudo", "-n", *command]
    try:
        subprocess.run(command, check=False, timeout=300, capture_output=True)
    except (OSError, subprocess.TimeoutExpired) as error:
        log(f"could not install wrk: {error}")
        return None
    found = shutil.which("wrk")
    if not found:
        log("could not install wrk: the http path is skipped")
    return found


def post_script(directory: Path) -> Path:
    """A wrk Lua script that POSTs the JSON body."""
    script = directory / "post.lua"
    body = BODY.replace("\\", "\\\\").replace('"', '\\"')
    script.write_text(
        f'wrk.method = "POST"\nwrk.body = "{body}"\nwrk.headers["Content-Type"] = "application/json"\n'
    )
    return script


def run_wrk(
    wrk: str, url: str, script: Path, *, seconds: float, connections: int = 64, threads: int = 1
) -> dict[str, Any]:
    """Run wrk for ``seconds`` (whole seconds, at least 1: wrk takes no fractions); req/s, p50 and
    p99 (ms), plus notes on errors and non-2xx answers."""
    duration = max(1, round(seconds))
    completed = subprocess.run(
        [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    if completed.returncode != 0:
        output = (completed.stderr.strip() or completed.stdout.strip())[:300]
        raise RuntimeError(f"wrk failed ({completed.returncode}): {output}")
    return parse(completed.stdout)


def parse(report: str) -> dict[str, Any]:
    """Figures from wrk's ``--latency`` report."""
    figures: dict[str, Any] = {"notes": []}
    rate = re.search(r"Requests/sec:\s+([\d.]+)", report)
    figures["throughput"] = float(rate.group(1)) if rate else None
    for percent, name in (("50", "p50"), ("99", "p99")):
        found = re.search(rf"^\s+{percent}(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", report, re.MULTILINE)
        figures[name] = float(found.group(1)) * UNITS[found.group(2)] if found else None
    for pattern in (r"Non-2xx or 3xx responses: \d+", r"Socket errors: [^\n]+"):
        found = re.search(pattern, report)
        if found:
            figures["notes"].append(found.group(0))
    return figures
