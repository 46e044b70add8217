"""The envelope is a CloudEvent in binary content mode: attributes as ce-* headers, data as body."""

from __future__ import annotations

import orjson
import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_binary_event

from callcast.envelope import (
    UNDECODABLE_TYPE,
    Envelope,
    decode_or_quarantine,
    structured_or_quarantine,
    to_structured,
)
from callcast.exceptions import DecodeError


def make() -> Envelope:
    return Envelope(
        type="UserSignedUp",
        source="/shop/users",
        data=b'{"user_id":"u1"}',
        extensions={"correlationid": "c1", "partitionkey": "u1"},
    )


def test_headers_round_trip_keeps_every_attribute() -> None:
    envelope = make()
    again = Envelope.from_headers(envelope.headers(), envelope.data)
    assert again == envelope
    assert again.correlation_id == "c1"
    assert again.partition_key == "u1"


def test_headers_are_binary_mode_cloudevents_readable_by_the_official_sdk() -> None:
    envelope = make()
    event = from_binary_event(HTTPMessage(headers=envelope.headers(), body=envelope.data))
    assert event.get_id() == envelope.id
    assert event.get_type() == "UserSignedUp"
    assert event.get_source() == "/shop/users"
    assert event.get_specversion() == "1.0"
    assert event.get_extension("correlationid") == "c1"
    assert event.get_data() == {"user_id": "u1"}


def test_ids_are_unique_and_time_is_rfc3339_utc() -> None:
    first, second = make(), make()
    assert first.id != second.id
    assert first.time.endswith("Z")
    assert "T" in first.time


@pytest.mark.parametrize("missing", ["ce-id", "ce-type", "ce-source", "ce-specversion"])
def test_missing_required_attribute_is_a_decode_error(missing: str) -> None:
    headers = make().headers()
    del headers[missing]
    with pytest.raises(DecodeError, match=missing.removeprefix("ce-")):
        Envelope.from_headers(headers, b"{}")


def test_wrong_specversion_is_refused() -> None:
    headers = make().headers() | {"ce-specversion": "0.3"}
    with pytest.raises(DecodeError, match="specversion"):
        Envelope.from_headers(headers, b"{}")


def test_header_names_are_case_insensitive() -> None:
    headers = {name.upper(): value for name, value in make().headers().items()}
    assert Envelope.from_headers(headers, b"{}").type == "UserSignedUp"


def test_quarantine_keeps_raw_data_and_reason_instead_of_raising() -> None:
    envelope = decode_or_quarantine({"ce-id": "x1"}, b"\x00not json")
    assert envelope.type == UNDECODABLE_TYPE
    assert envelope.id == "x1"
    assert envelope.data == b"\x00not json"
    assert "missing attribute" in envelope.extensions["decodeerror"]


def test_with_extensions_adds_and_removes_without_touching_the_original() -> None:
    envelope = make()
    changed = envelope.with_extensions(extra="1", partitionkey=None)
    assert changed.extensions == {"correlationid": "c1", "extra": "1"}
    assert envelope.partition_key == "u1"


@pytest.mark.parametrize("name", ["id", "type", "subject", "Region", "has-dash", "x" * 21, ""])
def test_extension_names_must_be_cloudevents_legal_and_not_core(name: str) -> None:
    with pytest.raises(ValueError, match="extension name"):
        Envelope(type="T", source="/s", data=b"{}", extensions={name: "v"})


def test_subject_and_dataschema_survive_the_round_trip() -> None:
    envelope = Envelope(type="T", source="/s", data=b"{}", subject="order-1", dataschema="https://x/s.json")
    again = Envelope.from_headers(envelope.headers(), envelope.data)
    assert (again.subject, again.dataschema) == ("order-1", "https://x/s.json")
    assert again.extensions == {}


def test_structured_mode_round_trips_every_attribute_and_the_bytes() -> None:
    sent = Envelope(
        type="shop.OrderPlaced",
        source="/shop/orders",
        data=bytes(range(256)),
        datacontenttype="application/octet-stream",
        extensions={"correlationid": "c-1", "deadline": "12.5"},
        subject="o-1",
        dataschema="https://example.com/s",
    )
    assert structured_or_quarantine(to_structured(sent)) == sent


def test_structured_mode_reads_json_data_written_by_other_tools() -> None:
    body = b'{"specversion":"1.0","id":"1","source":"/x","type":"T","data":{"a":1}}'
    got = structured_or_quarantine(body)
    assert (got.type, got.data) == ("T", b'{"a":1}')


def test_a_structured_message_that_is_no_cloudevent_is_quarantined() -> None:
    for body in (b"not json", b"[1]", b'{"id":"1"}', b'{"specversion":"1.0","data_base64":"!!"}'):
        got = structured_or_quarantine(body)
        assert got.type == UNDECODABLE_TYPE
        assert got.extensions["decodeerror"]


def test_structured_attributes_other_tools_write_differently_are_read_the_careful_way() -> None:
    """Values that are not strings, extensions not seen before and broken base64 miss the fast
    path for documents callcast writes; each still gets its answer."""
    numbers = b'{"specversion":"1.0","id":7,"source":"/x","type":"T","sequence":3,"data_base64":"e30="}'
    got = structured_or_quarantine(numbers)
    assert (got.id, got.extensions, got.data) == ("7", {"sequence": "3"}, b"{}")
    fresh = b'{"specversion":"1.0","id":"1","source":"/x","type":"T","neverseen42":"y","data_base64":""}'
    assert structured_or_quarantine(fresh).extensions == {"neverseen42": "y"}
    for bad in (
        b'{"specversion":"1.0","id":"1","source":"/x","type":"T","data_base64":"e30"}',
        b'{"specversion":"1.0","id":"1","source":"/x","type":"T","Bad-Name":"y","data_base64":""}',
        b'{"specversion":"0.3","id":"1","source":"/x","type":"T","data_base64":""}',
        b'{"specversion":"1.0","id":"","source":"/x","type":"T","data_base64":""}',
    ):
        assert structured_or_quarantine(bad).type == UNDECODABLE_TYPE, bad


def test_structured_data_base64_with_characters_that_are_not_ascii_is_quarantined() -> None:
    """``binascii`` raises a plain ValueError for them, not binascii.Error: it must not escape."""
    for document in (
        {"specversion": "1.0", "id": "1", "source": "/s", "type": "T", "data_base64": "é"},
        {"specversion": "1.0", "id": "1", "source": "/s", "type": "T", "data_base64": "é", "n": 1},
    ):
        envelope = structured_or_quarantine(orjson.dumps(document))
        assert envelope.type == UNDECODABLE_TYPE
        assert "ASCII" in envelope.extensions["decodeerror"]
