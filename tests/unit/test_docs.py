"""The README's example is code that runs: it is executed here, so the docs cannot rot."""

from __future__ import annotations

import re
import types
from pathlib import Path

from callcast import App
from tests.unit.conftest import StartApp, client

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> types.ModuleType:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has no python example"
    module = types.ModuleType("readme_example")
    exec(compile(blocks[0], str(README), "exec"), module.__dict__)  # our own docs, not input
    return module


async def test_readme_example_runs(start: StartApp) -> None:
    example = readme_example()
    assert isinstance(example.app, App)
    async with client(await start(example.app)) as http:
        created = await http.post("/users", json={"name": "Ann", "email": "ann@example.com"})
        approved = await http.post("/orders", json={"amount_cents": 500})
        refused = await http.post("/orders", json={"amount_cents": -1})
    assert created.status_code == 201
    assert approved.json() == {"approved": True}
    assert refused.status_code == 422  # the callee refused the input: its 4xx is passed on
    assert "negative amount" in refused.json()["detail"]
