"""How an HTTP route's function is called: parameters bound by name and annotation, decided once.

* a pydantic model: the JSON body;
* ``Context``: the context of the request;
* a name that appears in the path (``/users/{user_id}``): that path segment, validated;
* any other name: the query parameter of that name, validated; required unless it has a default.

The return annotation decides the answer: a type is serialized as JSON by pydantic; without an
annotation, :data:`UNTYPED` serializes whatever the value is; with ``None`` or a Starlette
``Response`` subclass there is no serializer (no body, or the response as it is).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from pydantic import BaseModel, TypeAdapter
from starlette.responses import Response

from callcast.context import Context
from callcast.exceptions import ConfigurationError

UNTYPED: TypeAdapter[Any] = TypeAdapter(Any)
"""The serializer of a route without a return annotation: any value pydantic can serialize."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "body" | "context" | "path" | "query"
    model: type[BaseModel] | None = None
    adapter: TypeAdapter[Any] | None = None
    default: Any = inspect.Parameter.empty
    many: bool = False
    """A query parameter that takes every value given (``?tag=a&tag=b``): a list, tuple or set."""


_MANY = (list, tuple, set, frozenset, Sequence)

Binding = tuple[list[Param], TypeAdapter[Any] | None]
"""The parameters to bind, in order, and the adapter that serializes the answer (None: as is)."""


def _takes_many(annotation: Any) -> bool:
    """A list-like type, or an optional one (``list[str] | None``): the query parameter may repeat."""
    if get_origin(annotation) in (Union, UnionType):
        return any(_takes_many(arg) for arg in get_args(annotation) if arg is not type(None))
    return get_origin(annotation) in _MANY


def plan(fn: Callable[..., Awaitable[Any]], path: str) -> Binding:
    """How to bind ``fn``'s parameters and serialize its answer; ConfigurationError if impossible."""
    hints = get_type_hints(fn)
    path_names = {part[1:-1].split(":")[0] for part in path.split("/") if part.startswith("{")}
    params: list[Param] = []
    for name, parameter in inspect.signature(fn).parameters.items():
        annotation = hints.get(name, str)
        if annotation is Context:
            params.append(Param(name, "context"))
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and name not in path_names:
            if any(p.kind == "body" for p in params):
                raise ConfigurationError(f"{fn.__qualname__}: only one parameter can be the body")
            params.append(Param(name, "body", model=annotation))
        else:
            kind = "path" if name in path_names else "query"
            many = kind == "query" and _takes_many(annotation)
            adapter = TypeAdapter(annotation)
            params.append(Param(name, kind, adapter=adapter, default=parameter.default, many=many))
    missing = path_names - {p.name for p in params if p.kind == "path"}
    if missing:
        raise ConfigurationError(f"{fn.__qualname__}: no parameter for path part(s) {sorted(missing)}")
    returns = hints.get("return", inspect.Parameter.empty)
    if returns is inspect.Parameter.empty:
        return params, UNTYPED
    if returns is type(None) or returns is None:
        return params, None
    if isinstance(returns, type) and issubclass(returns, Response):
        return params, None
    return params, TypeAdapter(returns)
