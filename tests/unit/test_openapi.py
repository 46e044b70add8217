"""The OpenAPI 3.1 document: valid per openapi-spec-validator, true to the bindings, served and printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from examples.shop import app as shop
from openapi_spec_validator import validate
from pydantic import BaseModel

from callcast import App, Context, Service
from callcast.cli import main
from callcast.openapi import document

from .conftest import StartApp, client


class Note(BaseModel):
    text: str


class Saved(BaseModel):
    id: int
    note: Note


def notes_app() -> App:
    notes = Service("notes", database=True)

    @notes.post("/notes", status_code=201, idempotency="required")
    async def save(body: Note, ctx: Context) -> Saved:
        """Save a note.

        More words."""
        return Saved(id=1, note=body)

    @notes.get("/notes/{note_id:int}")
    async def read(note_id: int, ctx: Context, verbose: bool = False) -> Saved:
        return Saved(id=note_id, note=Note(text=""))

    @notes.delete("/notes/{note_id}")
    async def remove(note_id: int) -> None: ...

    @notes.rpc
    async def count(req: Note, ctx: Context) -> int:
        return 0

    other = Service("other")

    @other.get("/other")
    async def hello() -> str:
        return "hi"

    @other.get("/untyped")
    async def untyped():  # type: ignore[no-untyped-def]  # no return annotation, on purpose
        return {"any": "json"}

    return App([notes, other], name="notes")


def test_the_shop_document_is_valid_and_describes_idempotency() -> None:
    spec = document(shop)
    validate(spec)
    assert spec["openapi"] == "3.1.0"
    place = spec["paths"]["/orders"]["post"]
    key = next(p for p in place["parameters"] if p.get("name") == "Idempotency-Key")
    assert key["in"] == "header"
    assert key["required"] is False
    assert {"201", "400", "409", "413", "422", "default"} <= place["responses"].keys()
    assert place["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PlaceOrder"
    }
    assert "/rpc/payments/authorize" in spec["paths"]
    assert "OrderItem" in spec["components"]["schemas"]


def test_parameters_bodies_and_answers_follow_the_bindings() -> None:
    spec = document(notes_app())
    validate(spec)
    save = spec["paths"]["/notes"]["post"]
    assert save["summary"] == "Save a note."
    assert next(p for p in save["parameters"] if p.get("name") == "Idempotency-Key")["required"] is True
    assert save["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Saved"
    }
    read = spec["paths"]["/notes/{note_id}"]["get"]
    named = {p["name"]: p for p in read["parameters"] if "name" in p}
    assert named["note_id"] == {
        "name": "note_id",
        "in": "path",
        "required": True,
        "schema": {"type": "integer"},
    }
    assert named["verbose"]["required"] is False
    assert named["verbose"]["in"] == "query"
    assert "requestBody" not in read
    assert "413" not in read["responses"]
    remove = spec["paths"]["/notes/{note_id}"]["delete"]
    assert "content" not in remove["responses"]["204"]
    untyped = spec["paths"]["/untyped"]["get"]["responses"]
    assert untyped["200"]["content"]["application/json"]["schema"] == {}
    assert "content" not in untyped["204"]
    rpc = spec["paths"]["/rpc/notes/count"]["post"]
    assert rpc["responses"]["200"]["content"]["application/json"]["schema"] == {"type": "integer"}
    assert {"notes", "other"} == {op["tags"][0] for path in spec["paths"].values() for op in path.values()}


async def test_every_running_app_serves_its_own_services_document(start: StartApp) -> None:
    app = notes_app()
    runtime = await start(app, services=["notes"])
    async with client(runtime) as http:
        answer = await http.get("/openapi.json")
    assert answer.status_code == 200
    served: dict[str, Any] = answer.json()
    validate(served)
    assert served == json.loads(json.dumps(document(app, [app.service("notes")])))
    assert "/other" not in served["paths"]


def test_the_cli_prints_or_writes_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["openapi", "examples.shop:app"]) == 0
    printed = json.loads(capsys.readouterr().out)
    out = tmp_path / "shop.json"
    assert main(["openapi", "examples.shop:app", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == printed
    validate(printed)
