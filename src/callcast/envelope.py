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

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

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


def _check_extension_name(name: str) -> None:
    if name in _CORE or not _EXTENSION_NAME.fullmatch(name):
        raise ValueError(
            f"invalid CloudEvents extension name {name!r}: 1-20 lower-case letters or digits, "
            "not a core attribute"
        )
    if len(_VALID_NAMES) < 1024:
        _VALID_NAMES.add(name)


def new_id() -> str:
    """A fresh, globally unique message id."""
    return str(uuid.uuid4())


def now_rfc3339() -> str:
    """The current UTC time in the RFC 3339 form CloudEvents uses for ``time``."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


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
            if name not in _VALID_NAMES:
                _check_extension_name(name)

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

    def headers(self) -> dict[str, str]:
        """The binary-mode headers: ``ce-*`` attributes and extensions, plus ``content-type``."""
        headers = {
            "ce-specversion": SPEC_VERSION,
            "ce-id": self.id,
            "ce-type": self.type,
            "ce-source": self.source,
            "ce-time": self.time,
            "content-type": self.datacontenttype,
        }
        if self.subject is not None:
            headers["ce-subject"] = self.subject
        if self.dataschema is not None:
            headers["ce-dataschema"] = self.dataschema
        for name, value in self.extensions.items():
            headers[HEADER_PREFIX + name] = value
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], data: bytes) -> Envelope:
        """Rebuild an envelope from binary-mode headers; :class:`DecodeError` if it is not one."""
        attributes: dict[str, str] = {}
        extensions: dict[str, str] = {}
        content_type = JSON
        for raw_name, value in headers.items():
            name = raw_name.lower()
            if name == "content-type":
                content_type = str(value)
            elif name.startswith(HEADER_PREFIX):
                attribute = name[len(HEADER_PREFIX) :]
                if attribute in _CORE:
                    attributes[attribute] = str(value)
                elif _EXTENSION_NAME.fullmatch(attribute):
                    extensions[attribute] = str(value)
                else:
                    raise DecodeError(f"invalid CloudEvents extension name {attribute!r}")
        missing = [name for name in _REQUIRED if not attributes.get(name)]
        if missing:
            raise DecodeError(f"not a CloudEvent: missing attribute(s) {', '.join(missing)}")
        if attributes["specversion"] != SPEC_VERSION:
            raise DecodeError(f"unsupported CloudEvents specversion {attributes['specversion']!r}")
        return cls(
            type=attributes["type"],
            source=attributes["source"],
            data=data,
            id=attributes["id"],
            time=attributes.get("time", ""),
            datacontenttype=content_type,
            extensions=extensions,
            subject=attributes.get("subject"),
            dataschema=attributes.get("dataschema"),
        )


def decode_or_quarantine(headers: Mapping[str, str], data: bytes) -> Envelope:
    """Like :meth:`Envelope.from_headers`, but never raises: a message that is not a CloudEvent
    becomes an envelope of type ``callcast.undecodable`` that keeps the raw data and the reason
    (extension ``decodeerror``), so the consumer can dead-letter it instead of crashing."""
    try:
        return Envelope.from_headers(headers, data)
    except DecodeError as error:
        original_id = str(headers.get("ce-id") or "")
        return Envelope(
            type=UNDECODABLE_TYPE,
            source="callcast",
            data=data,
            id=original_id or new_id(),
            extensions={"decodeerror": str(error)},
        )
