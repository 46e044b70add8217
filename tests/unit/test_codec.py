from __future__ import annotations

from typing import ClassVar

import pytest
from pydantic import BaseModel

from callcast.codec import MAX_MESSAGE_BYTES, decode, encode, event_type
from callcast.exceptions import DecodeError


class Plain(BaseModel):
    n: int


class Named(BaseModel):
    __event_type__: ClassVar[str] = "shop.named"
    n: int


class Child(Named):
    pass


def test_event_type_is_class_name_unless_declared_and_not_inherited() -> None:
    assert event_type(Plain) == "Plain"
    assert event_type(Named) == "shop.named"
    assert event_type(Child) == "Child"


def test_encode_decode_round_trip() -> None:
    assert decode(Plain, encode(Plain(n=3))) == Plain(n=3)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"not json", "invalid Plain"),
        (b'{"n": "x"}', "n: Input should be a valid integer"),
        (b"{}", "n: Field"),
    ],
)
def test_bad_payloads_are_decode_errors_without_echoing_input(data: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match) as caught:
        decode(Plain, data)
    assert "'x'" not in str(caught.value)


def test_oversized_payload_is_refused_before_parsing() -> None:
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decode(Plain, b" " * (MAX_MESSAGE_BYTES + 1))
