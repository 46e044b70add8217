"""HTTP routes: parameters bound from annotations, bad input answered with 4xx and the reason."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field
from starlette.responses import PlainTextResponse, Response

from callcast import App, Context, HTTPError, Service
from callcast.codec import MAX_MESSAGE_BYTES
from tests.unit.conftest import StartApp, client

JSON_HEADERS = {"content-type": "application/json"}


class Greeting(BaseModel):
    name: str = Field(min_length=1)
    times: int = 1


class Answer(BaseModel):
    text: str
    item: int | None = None
    correlation_id: str


svc = Service("web")


@svc.post("/greet/{item}", status_code=201)
async def greet(item: int, body: Greeting, ctx: Context, loud: bool = False) -> Answer:
    text = f"hello {body.name}" * body.times
    return Answer(text=text.upper() if loud else text, item=item, correlation_id=ctx.correlation_id)


@svc.get("/search")
async def search(q: str, limit: int = 10) -> list[str]:
    return [f"{q}-{n}" for n in range(limit)]


@svc.delete("/things/{thing}")
async def remove(thing: str) -> None:
    if thing == "missing":
        raise HTTPError(404, "no such thing")


@svc.get("/boom")
async def boom() -> Answer:
    raise RuntimeError("secret internals")


@svc.get("/raw")
async def raw() -> Response:
    return PlainTextResponse("as is", status_code=203)


@svc.get("/untyped")
async def untyped(ok: bool = True, nothing: bool = False):  # type: ignore[no-untyped-def]  # on purpose
    if nothing:
        return None
    return {"answer": 42} if ok else object()


SHARED = Response(status_code=204)


@svc.get("/shared")
async def shared() -> Response:
    return SHARED  # the same object for every request


@svc.get("/labelled")
async def labelled(labels: list[str] | None = None) -> list[str]:
    return labels or []


@svc.get("/none")
async def says_none() -> None:
    return {"dropped": True}  # type: ignore[return-value]  # against its annotation: not answered


app = App([svc])


async def test_path_body_query_and_context_are_bound(start: StartApp) -> None:
    async with client(await start(app)) as http:
        response = await http.post(
            "/greet/7?loud=true", json={"name": "ann", "times": 2}, headers={"x-correlation-id": "c-1"}
        )
    assert response.status_code == 201
    assert response.json() == {"text": "HELLO ANNHELLO ANN", "item": 7, "correlation_id": "c-1"}


async def test_query_defaults_and_list_answers(start: StartApp) -> None:
    async with client(await start(app)) as http:
        response = await http.get("/search", params={"q": "x", "limit": 2})
        default = await http.get("/search", params={"q": "y"})
    assert response.json() == ["x-0", "x-1"]
    assert len(default.json()) == 10


async def test_invalid_fields_give_422_with_locations(start: StartApp) -> None:
    async with client(await start(app)) as http:
        response = await http.post("/greet/notanint", json={"name": "", "times": "many"})
        missing = await http.get("/search")
    assert response.status_code == 422
    locations = {tuple(error["loc"]) for error in response.json()["detail"]}
    assert ("path", "item") in locations
    assert ("body", "name") in locations
    assert ("body", "times") in locations
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"] == ["query", "q"]


async def test_invalid_json_gives_422(start: StartApp) -> None:
    async with client(await start(app)) as http:
        response = await http.post(
            "/greet/1", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


async def test_body_over_limit_gives_413_declared_or_streamed(start: StartApp) -> None:
    big = b"x" * (MAX_MESSAGE_BYTES + 1)

    async def chunks():  # type: ignore[no-untyped-def]
        for start_at in range(0, len(big), 65536):
            yield big[start_at : start_at + 65536]

    async with client(await start(app)) as http:
        declared = await http.post("/greet/1", content=big, headers=JSON_HEADERS)
        streamed = await http.post("/greet/1", content=chunks(), headers=JSON_HEADERS)
        after = await http.get("/search", params={"q": "still"})
    assert declared.status_code == 413
    assert streamed.status_code == 413
    assert after.status_code == 200


async def test_none_is_204_and_http_error_is_its_status(start: StartApp) -> None:
    async with client(await start(app)) as http:
        done = await http.delete("/things/a")
        missing = await http.delete("/things/missing")
    assert done.status_code == 204
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no such thing"}


async def test_a_route_that_reads_no_body_still_refuses_a_form_or_text(start: StartApp) -> None:
    """What a page on another site may send without asking (a form, text) does not drive a route
    that changes things, body or not; the plain request does."""
    async with client(await start(app)) as http:
        form = await http.request(
            "DELETE",
            "/things/a",
            content=b"confirm=true",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        text = await http.request("DELETE", "/things/a", content=b"x", headers={"content-type": "text/plain"})
        untyped = await http.request("DELETE", "/things/a", content=b"{}")
        plain = await http.delete("/things/a")
    answers = [form.status_code, text.status_code, untyped.status_code, plain.status_code]
    assert answers == [415, 415, 415, 204]


async def test_unexpected_exception_is_500_without_internals(start: StartApp) -> None:
    async with client(await start(app)) as http:
        response = await http.get("/boom")
    assert response.status_code == 500
    assert "secret" not in response.text


async def test_a_route_without_return_annotation_answers_what_it_returns(start: StartApp) -> None:
    """No annotation: the value as pydantic serializes it (not dropped); one it cannot serialize is
    a 500 without internals, like any other bug in the route."""
    async with client(await start(app)) as http:
        answered = await http.get("/untyped")
        unserializable = await http.get("/untyped", params={"ok": "false"})
        nothing = await http.get("/untyped", params={"nothing": "true"})
        annotated_none = await http.get("/none")
    assert (answered.status_code, answered.json()) == (200, {"answer": 42})
    assert unserializable.status_code == 500
    assert unserializable.json() == {"detail": "internal error"}
    assert (nothing.status_code, nothing.content) == (204, b"")
    assert (annotated_none.status_code, annotated_none.content) == (204, b"")


async def test_a_response_object_returned_to_every_request_is_left_as_it_is(start: StartApp) -> None:
    async with client(await start(app)) as http:
        answers = [
            await http.get("/shared", headers={"X-Correlation-Id": name}) for name in ("alice", "bob", "eve")
        ]
    assert [answer.headers.get_list("x-correlation-id") for answer in answers] == [
        ["alice"],
        ["bob"],
        ["eve"],
    ]
    assert not any(name == b"x-correlation-id" for name, _ in SHARED.raw_headers)


async def test_an_optional_list_query_parameter_takes_every_value_given(start: StartApp) -> None:
    async with client(await start(app)) as http:
        given = await http.get("/labelled", params=[("labels", "x"), ("labels", "y")])
        none = await http.get("/labelled")
    assert (given.status_code, given.json()) == (200, ["x", "y"])
    assert (none.status_code, none.json()) == (200, [])


async def test_response_objects_pass_through_and_unknown_paths_are_json_404(start: StartApp) -> None:
    async with client(await start(app)) as http:
        raw_response = await http.get("/raw")
        unknown = await http.get("/nowhere")
        wrong_method = await http.put("/search")
    assert (raw_response.status_code, raw_response.text) == (203, "as is")
    assert unknown.status_code == 404
    assert unknown.json() == {"detail": "Not Found"}
    assert wrong_method.status_code == 405


async def test_health_lists_running_services(start: StartApp) -> None:
    async with client(await start(app)) as http:
        response = await http.get("/healthz")
    assert response.json() == {"status": "ok", "services": ["web"]}


async def test_a_body_declared_as_anything_but_json_is_415(start: StartApp) -> None:
    """Also what a web page may send to another site unasked (text/plain, forms, an untyped body)."""
    body = b'{"name": "ann"}'
    async with client(await start(app)) as http:
        answers = {
            media_type: (
                await http.post(
                    "/greet/1",
                    content=body,
                    headers={} if media_type is None else {"content-type": media_type},
                )
            ).status_code
            for media_type in (
                None,
                "application/json",
                "Application/JSON; charset=utf-8",
                "application/cloudevents+json",
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
            )
        }
    assert answers == {
        None: 415,
        "application/json": 201,
        "Application/JSON; charset=utf-8": 201,
        "application/cloudevents+json": 201,
        "text/plain": 415,
        "application/x-www-form-urlencoded": 415,
        "multipart/form-data; boundary=x": 415,
    }


async def test_a_content_length_of_thousands_of_digits_is_413() -> None:
    from callcast.http import BodyTooLarge, receive_body

    async def never() -> dict[str, object]:
        raise AssertionError("the body must not be read")

    with pytest.raises(BodyTooLarge):
        await receive_body(never, b"9" * 5000)  # type: ignore[arg-type]


@svc.get("/tagged")
async def tagged(tag: list[str], page: int = 1) -> dict[str, object]:
    return {"tag": tag, "page": page}


async def test_a_list_query_parameter_takes_every_value_given(start: StartApp) -> None:
    async with client(await start(app)) as http:
        many = await http.get("/tagged?tag=a&tag=b&page=2")
        one = await http.get("/tagged?tag=a")
        none = await http.get("/tagged")
    assert many.json() == {"tag": ["a", "b"], "page": 2}
    assert one.json() == {"tag": ["a"], "page": 1}
    assert none.status_code == 422
