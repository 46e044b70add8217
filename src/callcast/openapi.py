"""The OpenAPI 3.1 document of an app's HTTP side: what ``GET /openapi.json`` serves and
``callcast openapi MODULE:APP`` prints.

It describes, from the same bindings the HTTP server uses (:mod:`callcast.binding`):

* every route: path and query parameters (with their schemas), the JSON request body, the answer
  (the return annotation; ``-> None``: 204; no annotation: any JSON, or 204), 422 (invalid input,
  ``detail`` lists the field errors or says why), 413 (body over the limit) and, for any other
  error status, ``Error``;
* routes that honour ``Idempotency-Key``: the header (required or not), 400 (bad key) and 409
  (a request with the key is in progress), and the ``Idempotent-Replayed`` answer header;
* every RPC endpoint as ``POST /rpc/<service>/<name>``, with its error body ``RpcError``;
* the optional ``X-Correlation-Id`` request header (echoed in every answer).

Schemas come from pydantic (``TypeAdapter.json_schemas``), shared under ``components/schemas``.
The deadline header that callcast's own RPC client sends is internal and not described.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import TypeAdapter

from callcast.app import App
from callcast.binding import UNTYPED
from callcast.codec import MAX_MESSAGE_BYTES
from callcast.idempotency import MAX_KEY_LENGTH
from callcast.service import Route, RpcEndpoint, Service

OPENAPI_VERSION = "3.1.0"
_REF = "#/components/schemas/{model}"
_JSON = "application/json"
_KEY = "^[ -~]+$"
"""Printable ASCII: what an ``Idempotency-Key`` may hold."""
_CONVERTER = re.compile(r"\{(\w+):[^}]*\}")

SchemaKey = tuple[str, ...]
Mode = Literal["validation", "serialization"]


def _error_schemas() -> dict[str, Any]:
    issue = {
        "type": "object",
        "properties": {
            "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
            "msg": {"type": "string"},
            "type": {"type": "string"},
        },
        "required": ["loc", "msg", "type"],
    }
    return {
        "callcast.FieldError": issue,
        "callcast.InvalidInput": {
            "type": "object",
            "description": "Invalid input: the field errors, or why the request cannot be processed.",
            "properties": {
                "detail": {
                    "anyOf": [
                        {"type": "array", "items": {"$ref": "#/components/schemas/callcast.FieldError"}},
                        {"type": "string"},
                    ]
                }
            },
            "required": ["detail"],
        },
        "callcast.Error": {
            "type": "object",
            "properties": {"detail": {"type": "string"}},
            "required": ["detail"],
        },
        "callcast.RpcError": {
            "type": "object",
            "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
            "required": ["error", "detail"],
        },
    }


def _content(schema: Any) -> dict[str, Any]:
    return {_JSON: {"schema": schema}}


def _error(description: str, name: str = "callcast.Error") -> dict[str, Any]:
    return {"description": description, "content": _content({"$ref": f"#/components/schemas/{name}"})}


_CORRELATION_PARAMETER = {
    "name": "X-Correlation-Id",
    "in": "header",
    "required": False,
    "description": "Ties this request to the calls and events it causes (echoed in the answer; "
    "an unacceptable value is replaced by a new id).",
    "schema": {"type": "string", "maxLength": 128},
}


class _Schemas:
    """Collects the type adapters a document needs, then renders them in one pass so that shared
    models become one component."""

    def __init__(self) -> None:
        self._inputs: list[tuple[SchemaKey, Mode, TypeAdapter[Any]]] = []
        self.rendered: dict[tuple[SchemaKey, Mode], Any] = {}

    def want(self, key: SchemaKey, mode: Mode, adapter: TypeAdapter[Any]) -> SchemaKey:
        self._inputs.append((key, mode, adapter))
        return key

    def render(self) -> dict[str, Any]:
        if not self._inputs:
            return {}
        schemas, definitions = TypeAdapter.json_schemas(self._inputs, ref_template=_REF)
        self.rendered = dict(schemas)
        return dict(definitions.get("$defs", {}))

    def __getitem__(self, item: tuple[SchemaKey, Mode]) -> Any:
        return self.rendered[item]


def _route_operation(route: Route, schemas: _Schemas, operation_id: str) -> dict[str, Any]:
    params, returns = route.binding
    operation: dict[str, Any] = {"tags": [route.service], "operationId": operation_id}
    doc = inspect.getdoc(route.fn)
    if doc:
        operation["summary"] = doc.splitlines()[0]
        operation["description"] = doc
    parameters: list[dict[str, Any]] = []
    for param in params:
        if param.kind in ("path", "query"):
            assert param.adapter is not None
            key = schemas.want((operation_id, param.kind, param.name), "validation", param.adapter)
            parameters.append(
                {
                    "name": param.name,
                    "in": param.kind,
                    "required": param.kind == "path" or param.default is inspect.Parameter.empty,
                    "schema": (key, "validation"),
                }
            )
        elif param.kind == "body":
            assert param.model is not None
            key = schemas.want((operation_id, "body"), "validation", TypeAdapter(param.model))
            operation["requestBody"] = {"required": True, "content": _content((key, "validation"))}
    if route.idempotency is not None:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": route.idempotency.required,
                "description": "Makes a retry of this request safe: the same key with the same request "
                "replays the first answer; with another request, 422.",
                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH, "pattern": _KEY},
            }
        )
    parameters.append({"$ref": "#/components/parameters/CorrelationId"})
    operation["parameters"] = parameters
    responses: dict[str, Any] = {}
    if returns is None:
        status = 204 if route.status_code == 200 else route.status_code
        responses[str(status)] = {"description": "Done."}
    elif returns is UNTYPED:  # no return annotation: whatever JSON the route returns, or nothing
        responses[str(route.status_code)] = {
            "description": "The answer: any JSON (the route declares no return type).",
            "content": _content({}),
        }
        if route.status_code == 200:
            responses["204"] = {"description": "Done: the route returned nothing."}
    else:
        key = schemas.want((operation_id, "answer"), "serialization", returns)
        answer = _content((key, "serialization"))
        responses[str(route.status_code)] = {"description": "The answer.", "content": answer}
    if route.idempotency is not None:
        success = next(iter(responses.values()))
        success["headers"] = {
            "Idempotent-Replayed": {
                "description": "``true`` when this is the stored answer of an earlier request with the key.",
                "schema": {"type": "string", "enum": ["true"]},
            }
        }
        responses["400"] = _error("The Idempotency-Key header is missing or not acceptable.")
        responses["409"] = _error("A request with this Idempotency-Key is in progress; retry later.")
    responses["422"] = _error("Invalid input.", "callcast.InvalidInput")
    if "requestBody" in operation:
        responses["413"] = _error(f"The request body exceeds {MAX_MESSAGE_BYTES} bytes.")
    responses["default"] = _error("Any other error, with its reason.")
    operation["responses"] = responses
    return operation


def _rpc_operation(endpoint: RpcEndpoint[Any, Any], schemas: _Schemas) -> dict[str, Any]:
    operation_id = f"rpc.{endpoint.service}.{endpoint.name}"
    request = schemas.want((operation_id, "body"), "validation", TypeAdapter(endpoint.request_model))
    answer = schemas.want((operation_id, "answer"), "serialization", endpoint.response_adapter)
    operation: dict[str, Any] = {
        "tags": [endpoint.service],
        "operationId": operation_id,
        "summary": f"RPC {endpoint.service}.{endpoint.name} over HTTP",
        "parameters": [{"$ref": "#/components/parameters/CorrelationId"}],
        "requestBody": {"required": True, "content": _content((request, "validation"))},
        "responses": {
            "200": {"description": "The answer.", "content": _content((answer, "serialization"))},
            "413": _error(f"The request body exceeds {MAX_MESSAGE_BYTES} bytes."),
            "422": _error("The request is not valid.", "callcast.RpcError"),
            "default": _error("The endpoint answered with an error.", "callcast.RpcError"),
        },
    }
    doc = inspect.getdoc(endpoint.fn)
    if doc:
        operation["description"] = doc
    return operation


def _resolve(node: Any, schemas: _Schemas) -> Any:
    """Replace the (key, mode) placeholders left in ``node`` by their rendered schemas."""
    if isinstance(node, dict):
        return {
            name: schemas[value] if isinstance(value, tuple) else _resolve(value, schemas)
            for name, value in node.items()
        }
    if isinstance(node, list):
        return [_resolve(value, schemas) for value in node]
    return node


def document(
    app: App, services: Iterable[Service] | None = None, *, version: str = "0.1.0"
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``services``' routes and RPC endpoints (default: all of ``app``)."""
    chosen = list(services) if services is not None else list(app.services.values())
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    used_ids: set[str] = set()
    for service in chosen:
        for route in service.routes:
            operation_id = f"{service.name}.{route.fn.__name__}"
            suffix = 2
            while operation_id in used_ids:
                operation_id, suffix = f"{service.name}.{route.fn.__name__}_{suffix}", suffix + 1
            used_ids.add(operation_id)
            path = _CONVERTER.sub(r"{\1}", route.path)
            paths.setdefault(path, {})[route.method.lower()] = _route_operation(route, schemas, operation_id)
        for endpoint in service.endpoints.values():
            paths.setdefault(endpoint.http_path, {})["post"] = _rpc_operation(endpoint, schemas)
    definitions = schemas.render()
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": app.name, "version": version},
        "paths": _resolve(paths, schemas),
        "components": {
            "schemas": {**definitions, **_error_schemas()},
            "parameters": {"CorrelationId": _CORRELATION_PARAMETER},
        },
    }
