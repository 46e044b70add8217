"""The envelope: one CloudEvents 1.0 event, as every broker carries it.

callcast uses the CloudEvents *binary content mode*: the event's data (the JSON of a pydantic model)
is the message body, and its attributes travel as headers named ``ce-<attribute>``
(``ce-id``, ``ce-type``, ``ce-source``, ``ce-specversion``, ``ce-time``), with ``content-type``
for ``datacontenttype``. Adapters whose protocol binding prescribes another prefix (AMQP's
``cloudEvents:``) translate the names at their boundary; the envelope itself knows only ``ce-``.

Extensions used by callcast (all strings, CloudEvents-legal lower-case names):

============== ==========================================================================
correlationid  the id shared by everything caused by one user request
causationid    the id of the message (or request) that caused this one
partitionkey   the ordering key: messages of one key are handled one at a time, in order
sequence       optional per-key sequence number, for out-of-order detection
traceparent    W3C trace context
replyto        RPC only: the topic the reply goes to
deadline       RPC only: the caller gives up at this UNIX time (seconds, float)
attempt        the delivery attempt (1, 2, …) as the broker counted it, stamped by callcast on
               the envelope a handler sees (``ctx.envelope``) and on dead letters
============== ==========================================================================

The attempt is never *read* from the wire: it is always taken from what the broker counted
(:attr:`~callcast.transport.Delivery.attempt`), so a publisher cannot forge it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from callcast.exceptions import DecodeError

SPEC_VERSION = "1.0"
JSON = "application/json"
HEADER_PREFIX = "ce-"
UNDECODABLE_TYPE = "callcast.undecodable"
_REQUIRED = ("id", "source", "specversion", "type")
_CORE = frozenset(
    ("id", "source", "specversion", "type", "time", "subject", "dataschema", "datacontenttype", "data")
)
_EXTENSION_NAME = re.compile(r"[a-z0-9]{1,20}")


_VALID_NAMES: set[str] = set()
"""Extension names already checked (a handful in practice): the check runs once per name."""


def _is_extension_name(name: str) -> bool:
    """Whether ``name`` can name an extension: 1-20 lower-case letters or digits, not a core
    attribute. Remembered for names that can."""
    if name in _VALID_NAMES:
        return True
    if name in _CORE or not _EXTENSION_NAME.fullmatch(name):
        return False
    if len(_VALID_NAMES) < 1024:
        _VALID_NAMES.add(name)
    return True


_RANDOM_BATCH = 16 * 256
_random = b""
_random_at = 0


def _forget_random() -> None:
    """A forked child must not hand out its parent's remaining random bytes."""
    global _random, _random_at
    _random, _random_at = b"", 0


os.register_at_fork(after_in_child=_forget_random)


def new_id() -> str:
    """A fresh, globally unique message id: a random (version 4) UUID in its usual text form, drawn
    from ``os.urandom`` in batches (one system call per 256 ids)."""
    global _random, _random_at
    if _random_at >= len(_random):
        _random, _random_at = os.urandom(_RANDOM_BATCH), 0
    raw = _random[_random_at : _random_at + 16]
    _random_at += 16
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[raw[8] & 3]}{h[17:20]}-{h[20:]}"


_VARIANT = "89ab"


_second_text: tuple[int, str] = (-1, "")
"""The last whole second formatted by :func:`now_rfc3339`, and its text (one strftime a second)."""


def now_rfc3339() -> str:
    """The current UTC time in the RFC 3339 form CloudEvents uses for ``time``, to the
    microsecond: ``2026-11-27T14:50:10.628527Z``."""
    global _second_text
    microseconds = int(time.time() * 1_000_000)
    second, fraction = divmod(microseconds, 1_000_000)
    cached_second, text = _second_text
    if second != cached_second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second_text = (second, text)
    return f"{text}.{fraction:06d}Z"


@dataclass(frozen=True, slots=True)
class Envelope:
    """An immutable CloudEvent: attributes plus ``data`` (bytes, JSON unless said otherwise)."""

    type: str
    source: str
    data: bytes
    id: str = field(default_factory=new_id)
    time: str = field(default_factory=now_rfc3339)
    datacontenttype: str = JSON
    extensions: Mapping[str, str] = field(default_factory=dict)
    subject: str | None = None
    dataschema: str | None = None

    def __post_init__(self) -> None:
        for name in self.extensions:
            if not _is_extension_name(name):
                raise ValueError(
                    f"invalid CloudEvents extension name {name!r}: 1-20 lower-case letters or digits, "
                    "not a core attribute"
                )

    @property
    def correlation_id(self) -> str | None:
        return self.extensions.get("correlationid")

    @property
    def causation_id(self) -> str | None:
        return self.extensions.get("causationid")

    @property
    def partition_key(self) -> str | None:
        return self.extensions.get("partitionkey")

    def with_extensions(self, **values: str | None) -> Envelope:
        """A copy with extensions added (or removed where the value is ``None``)."""
        merged = dict(self.extensions)
        for name, value in values.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = value
        return Envelope(
            self.type,
            self.source,
            self.data,
            self.id,
            self.time,
            self.datacontenttype,
            merged,
            self.subject,
            self.dataschema,
        )

    def attributes(self) -> dict[str, str]:
        """Every attribute that is set, by its CloudEvents name (``datacontenttype`` included),
        extensions last; the data aside."""
        attributes = {
            "specversion": SPEC_VERSION,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": self.time,
            "datacontenttype": self.datacontenttype,
        }
        if self.subject is not None:
            attributes["subject"] = self.subject
        if self.dataschema is not None:
            attributes["dataschema"] = self.dataschema
        attributes.update(self.extensions)
        return attributes

    def headers(self) -> dict[str, str]:
        """The binary-mode headers: ``ce-*`` attributes and extensions, plus ``content-type``."""
        return {
            ("content-type" if name == "datacontenttype" else HEADER_PREFIX + name): value
            for name, value in self.attributes().items()
        }

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], data: bytes) -> Envelope:
        """Rebuild an envelope from binary-mode headers; :class:`DecodeError` if it is not one."""
        attributes: dict[str, str] = {}
        extensions: dict[str, str] = {}
        content_type = JSON
        for raw_name, value in headers.items():
            kind = _HEADER_KINDS.get(raw_name) or _header_kind(raw_name)
            if kind[0] == _CORE_ATTRIBUTE:
                attributes[kind[1]] = value if isinstance(value, str) else str(value)
            elif kind[0] == _EXTENSION:
                extensions[kind[1]] = value if isinstance(value, str) else str(value)
            elif kind[0] == _CONTENT_TYPE:
                content_type = str(value)
            elif kind[0] == _INVALID:
                raise DecodeError(f"invalid CloudEvents extension name {kind[1]!r}")
        return cls._from_parts(attributes, extensions, content_type, data)

    @classmethod
    def _from_parts(
        cls, attributes: dict[str, str], extensions: dict[str, str], content_type: str, data: bytes
    ) -> Envelope:
        missing = [name for name in _REQUIRED if not attributes.get(name)]
        if missing:
            raise DecodeError(f"not a CloudEvent: missing attribute(s) {', '.join(missing)}")
        if attributes["specversion"] != SPEC_VERSION:
            raise DecodeError(f"unsupported CloudEvents specversion {attributes['specversion']!r}")
        return cls(
            attributes["type"],
            attributes["source"],
            data,
            attributes["id"],
            attributes.get("time", ""),
            content_type,
            extensions,
            attributes.get("subject"),
            attributes.get("dataschema"),
        )


_CORE_ATTRIBUTE, _EXTENSION, _CONTENT_TYPE, _INVALID, _OTHER = range(5)
_HEADER_KINDS: dict[str, tuple[int, str]] = {}
"""What a header name means, remembered per name (there are a handful): one lookup per header."""


def _header_kind(raw_name: str) -> tuple[int, str]:
    name = raw_name.lower()
    kind: tuple[int, str]
    if name == "content-type":
        kind = (_CONTENT_TYPE, name)
    elif name.startswith(HEADER_PREFIX):
        attribute = name[len(HEADER_PREFIX) :]
        if attribute in _CORE:
            kind = (_CORE_ATTRIBUTE, attribute)
        elif _is_extension_name(attribute):
            kind = (_EXTENSION, attribute)
        else:
            kind = (_INVALID, attribute)
    else:
        kind = (_OTHER, name)
    if len(_HEADER_KINDS) < 4096 and kind[0] != _INVALID:
        _HEADER_KINDS[raw_name] = kind
    return kind


def to_structured(envelope: Envelope) -> bytes:
    """The event in the CloudEvents JSON format (structured mode), its data as ``data_base64``
    (byte for byte, whatever its content type). For transports where headers are costly."""
    document = envelope.attributes()
    document["data_base64"] = base64.b64encode(envelope.data).decode("ascii")
    return orjson.dumps(document)


def structured_or_quarantine(body: bytes) -> Envelope:
    """The envelope of a structured-mode message (see :func:`to_structured`); anything else
    becomes a ``callcast.undecodable`` envelope, as with :func:`decode_or_quarantine`."""
    try:
        document = orjson.loads(body)
        if type(document) is dict and (envelope := _as_written(document)) is not None:
            return envelope
        if not isinstance(document, dict):
            raise DecodeError("not a CloudEvent: the JSON document is not an object")
        data = _structured_data(document)
    except orjson.JSONDecodeError as error:
        return decode_or_quarantine({}, body, reason=f"not a CloudEvent: not a JSON event document ({error})")
    except (ValueError, DecodeError) as error:  # binascii.Error and non-ASCII base64 are ValueErrors
        return decode_or_quarantine({}, body, reason=str(error))
    attributes: dict[str, str] = {}
    extensions: dict[str, str] = {}
    for name, value in document.items():
        text = value if isinstance(value, str) else str(value)
        if name in _CORE:
            attributes[name] = text
        elif _is_extension_name(name):
            extensions[name] = text
        else:
            return decode_or_quarantine({}, body, reason=f"invalid CloudEvents extension name {name!r}")
    try:
        return Envelope._from_parts(attributes, extensions, attributes.get("datacontenttype", JSON), data)
    except DecodeError as error:
        return decode_or_quarantine({"ce-id": attributes.get("id", "")}, data, reason=str(error))


def _as_written(document: dict[str, Any]) -> Envelope | None:
    """The envelope of a structured event in the shape :func:`to_structured` writes (every value a
    string, ``data_base64``, specversion 1.0, extensions of names seen before), or ``None`` for
    anything else, which :func:`structured_or_quarantine` then looks at attribute by attribute."""
    encoded = document.get("data_base64")
    if type(encoded) is not str or document.get("specversion") != SPEC_VERSION:
        return None
    extensions: dict[str, str] = {}
    for name, value in document.items():
        if type(value) is not str:
            return None
        if name not in _CORE and name != "data_base64":
            if name not in _VALID_NAMES:
                return None
            extensions[name] = value
    id_, source, type_ = document.get("id"), document.get("source"), document.get("type")
    if not (id_ and source and type_):
        return None
    try:
        data = binascii.a2b_base64(encoded, strict_mode=True)
    except ValueError:  # binascii.Error, or characters that are not ASCII
        return None
    return Envelope(
        type_,
        source,
        data,
        id_,
        document.get("time", ""),
        document.get("datacontenttype", JSON),
        extensions,
        document.get("subject"),
        document.get("dataschema"),
    )


def _structured_data(document: dict[str, object]) -> bytes:
    """Take the data out of a structured event: ``data_base64``, or ``data`` (a JSON value, or
    text for a non-JSON content type)."""
    if "data_base64" in document:
        encoded = document.pop("data_base64")
        if not isinstance(encoded, str):
            raise DecodeError("data_base64 is not a string")
        return binascii.a2b_base64(encoded, strict_mode=True)
    if "data" not in document:
        return b""
    value = document.pop("data")
    content_type = str(document.get("datacontenttype", JSON))
    if isinstance(value, str) and not content_type.endswith("json"):
        return value.encode()
    return orjson.dumps(value)


def decode_or_quarantine(headers: Mapping[str, str], data: bytes, *, reason: str | None = None) -> Envelope:
    """Like :meth:`Envelope.from_headers`, but never raises: a message that is not a CloudEvent
    becomes an envelope of type ``callcast.undecodable`` that keeps the raw data and the reason
    (extension ``decodeerror``), so the consumer can dead-letter it instead of crashing."""
    if reason is None:
        try:
            return Envelope.from_headers(headers, data)
        except DecodeError as error:
            reason = str(error)
    original_id = str(headers.get("ce-id") or "")
    return Envelope(
        type=UNDECODABLE_TYPE,
        source="callcast",
        data=data,
        id=original_id or new_id(),
        extensions={"decodeerror": reason},
    )
