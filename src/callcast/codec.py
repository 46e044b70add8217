"""Models on the wire: event type names, JSON encoding and validated decoding.

An event is any pydantic model. Its type (the CloudEvents ``type`` and the topic it travels on) is
the class attribute ``__event_type__`` when set, else the class name::

    class UserSignedUp(BaseModel):
        __event_type__: ClassVar[str] = "shop.user.signed_up"   # optional
        user_id: str

Encoding is pydantic's own JSON serializer; decoding is ``model_validate_json`` (parse and validate
in one pass, no intermediate dict). Nothing is ever unpickled or evaluated.
"""

from __future__ import annotations

import weakref
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from callcast.exceptions import DecodeError

M = TypeVar("M", bound=BaseModel)

MAX_MESSAGE_BYTES = 1024 * 1024
"""Default size limit of one message's data (and of one HTTP body): 1 MiB."""


def event_type(model: type[BaseModel]) -> str:
    """The CloudEvents type (and topic) of events of class ``model``."""
    try:
        return _event_types[model]
    except KeyError:
        explicit = model.__dict__.get("__event_type__")
        kind = explicit if isinstance(explicit, str) and explicit else model.__name__
        _event_types[model] = kind
        return kind


_event_types: weakref.WeakKeyDictionary[type[BaseModel], str] = weakref.WeakKeyDictionary()


def encode(model: BaseModel) -> bytes:
    """The JSON bytes of ``model``."""
    return model.__pydantic_serializer__.to_json(model)


def decode(model: type[M], data: bytes, *, limit: int = MAX_MESSAGE_BYTES) -> M:
    """Validate ``data`` as ``model``; :class:`DecodeError` (with the field errors) if it is not one."""
    if len(data) > limit:
        raise DecodeError(f"message of {len(data)} bytes exceeds the limit of {limit} bytes")
    try:
        return model.model_validate_json(data)
    except ValidationError as error:
        raise DecodeError(f"invalid {model.__name__}: {summarize(error)}") from None


def summarize(error: ValidationError, *, limit: int = 5) -> str:
    """A one-line account of validation errors, without echoing the input values."""
    parts = []
    for item in error.errors(include_url=False, include_input=False, include_context=False)[:limit]:
        location = ".".join(str(part) for part in item["loc"]) or "(root)"
        parts.append(f"{location}: {item['msg']}")
    more = error.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def field_errors(error: ValidationError) -> list[dict[str, Any]]:
    """JSON-safe field errors for an HTTP 422 body (location, message, type; no input echo)."""
    return [
        {"loc": list(item["loc"]), "msg": item["msg"], "type": item["type"]}
        for item in error.errors(include_url=False, include_input=False, include_context=False)
    ]
