"""``postgresql://user@host:5432/db``: PostgreSQL as a broker, for teams whose only infrastructure is
their database.

Every process that connects to the same database and schema shares the broker. Traffic is plain rows
in three tables of one schema (``?schema=``, default ``callcast``), created on connect if missing, so
other tools (psql, a BI tool, a migration script) can read it:

``messages`` -- one row per published envelope, until every group settled it::

    seq          bigint identity primary key   publish order
    topic        text                          the topic it was published on
    pkey         text                          the partition key (``ce-partitionkey``) or NULL
    headers      json                          CloudEvents binary-mode headers: ``ce-id``,
                                               ``ce-type``, ``ce-source``, ``ce-time``, ``content-type``,
                                               ``ce-<extension>`` (read with ``headers->>'ce-type'``)
    body         bytea                         the event data
    published_at timestamptz

``subscriptions`` -- the declared groups, primary key ``(topic, grp)``::

    topic, grp   text
    ephemeral    boolean                       exists only while its one subscriber lives
    heartbeat    timestamptz                   refreshed by the subscriber of an ephemeral group
    declared_at  timestamptz

``deliveries`` -- one row per (group, envelope) still to be settled, primary key
``(topic, grp, seq)``::

    topic, grp, seq                            which group, which ``messages.seq``
    pkey         text                          copied from the message, for per-key order
    head         boolean                       the key's earliest row in the group (always true
                                               without a key): only these may be handed out
    available_at timestamptz                   not handed out before (``-infinity``: at once)
    attempts     integer                       deliveries to this group so far
    owner        text                          the subscriber holding it, or NULL
    lease_until  timestamptz                   the owner's hold runs out at this time

Two functions of the schema, ``publish(...)`` and ``ack(...)``, do the writes that must see each
other's commits (each of their statements takes a fresh snapshot), in one round trip each.

How the transport contract is met:

* **publish** is one call, so one transaction and one round trip for the whole batch: it
  key-share-locks the topic's groups, takes a transaction-level advisory lock per (topic, key) of
  the batch (in a fixed order), inserts the messages (``unnest`` of arrays, in batch order), fans
  out one ``deliveries`` row per group (or only ``group=``), and sends ``NOTIFY`` on channel
  ``<schema>.wake`` with payload ``["topic", "group", sender]`` for each group. It returns after
  ``COMMIT``, which PostgreSQL makes durable (the publish turns ``synchronous_commit = off`` back on
  for its own transaction, whatever the session says; stronger settings, such as waiting for a
  standby, are kept).
  Envelopes of a topic nobody declared a group on are not stored. The key locks make a key's
  ``seq`` order its commit order, and a new row is ``head`` when no row of its key is left.
* **claiming** (``UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED)``): the earliest due rows of the
  group that are ``head`` and nobody holds (or whose lease ran out), skipping rows a competing
  claim has locked, so competing subscribers never block one another. A keyed row is claimable only
  while no earlier row of its key is in the table (handed out, or nacked and waiting): per-key
  order holds across processes (``ordered_per_key``). Rows waiting behind their key's head are not
  in the index claims scan, so a long backlog of one busy key costs nothing per claim.
  A claim sets ``owner``, ``lease_until`` and ``attempts + 1``. Claims and acks commit without
  waiting for the WAL flush: a PostgreSQL crash can lose one, which means a redelivery (the ack) or
  an attempt not counted (the claim), never a lost message; publishes stay durable.
* **wake-up**: a subscriber whose last claim came back short sleeps until a local publish, nack,
  ack of a keyed row (its key's next row is claimable) or ack that gives a full subscription
  room, a ``NOTIFY`` from
  another process (one dedicated ``LISTEN`` connection per broker object), the due time of one of
  this process's delayed nacks, or a low-rate fallback poll (``?poll=``, default 1 s) that finds
  retries delayed by other processes and leases that ran out.
* **leases**: each broker renews the leases of the rows its live subscribers hold every
  ``lease/3`` seconds (``?lease=``, default 10 s). A killed process stops renewing, and its rows
  go to the group's other subscribers once ``lease_until`` passed; that claim counts an attempt.
* **ack** deletes the row (and the message, once no group needs it: when another group's row is
  left, the settlers of the message take turns on its row and look again, so two groups acking it
  at the same moment do not both leave it to the sweep) and, under the key's lock, makes the key's
  next row its ``head``; **nack(delay)** clears the owner and sets ``available_at``, so delayed
  retries live in the table (``delayed_nack``) and survive restarts. Unkeyed acks of a durable
  group's subscriber made while one of its acks is in flight are sent together, as the next batch:
  one statement, one transaction, rows in ``seq`` order.
  Both only touch a row still owned by the settling subscriber, so a settle after close (or after
  the lease ran out and another subscriber took the row) is ignored.
* **prefetch** bounds the rows a subscription holds; rows claimed ahead but never handed out get
  their attempt taken back when the subscription closes (a killed subscriber's keep it; ``holding``
  knew of them).
* **ephemeral** groups are deleted with their rows on close; their subscriber refreshes
  ``heartbeat`` with the leases, and a group whose heartbeat is older than ``max(60, 6 * lease)``
  seconds (its process died) is collected.
* **locks**: a renewal waits for no lock: it renews the rows it can lock at once and skips those
  another transaction holds (being settled, handed back or claimed; a row still held at the next
  renewal is renewed then, and a lease spans three renewals), so it is never part of a circle of
  waits. A release at close locks the subscriber's rows first, in key order (``topic, grp, seq``),
  then changes them. An ack locks its row, then the message's row (if another group's row is
  left), then the key's advisory lock, then the key's next row (which nobody owns); a batch of
  unkeyed acks does this row after row in ``seq`` order, so batches lock message rows in one
  order. A publish key-share-locks the groups, then takes the keys' advisory locks in a fixed
  order; an ephemeral group's close deletes the group's row, then its rows, after any running
  renewal.
* **garbage**: besides the deletes of ``ack``, a sweep every 30 s (by one broker at a time:
  ``pg_try_advisory_xact_lock``) deletes messages no delivery refers to and dead ephemeral groups.
* **reconnect**: the connection pool replaces connections the server dropped; the ``LISTEN``
  connection is re-established (then every subscriber looks for work once, for notifications it
  missed); subscribers keep waiting through an outage, retrying at the poll rate, instead of
  ending. Leases that ran out during the outage are redelivered (at least once).
* **schema**: created on connect when missing, under ``pg_advisory_xact_lock`` so processes that
  connect at once do not collide; a user without ``CREATE`` rights can use tables made by another.
  Its comment names the layout of its functions (:data:`LAYOUT`): connecting to a schema of a
  lower one replaces them (a role that may not goes on with the old ones, with a warning).

A tool that writes rows itself should insert a ``messages`` row and its ``deliveries`` rows in one
transaction (``head`` defaults to true: claims still check for an earlier row of the key), and remove
a delivery with ``SELECT <schema>.ack(topic, grp, seq, owner, '<schema>.wake', '[null,null,null]')``
(after setting its ``owner``), so that the next row of its key is released and subscribers look.

Every driver error is translated at this boundary: a connection that cannot be made, or is lost,
is :class:`~callcast.exceptions.BrokerUnavailableError`; a publish whose statement failed is
:class:`~callcast.exceptions.PublishError` (it may or may not be stored); other failures are
:class:`~callcast.exceptions.TransportError`. Messages and ``url`` never contain the password.

URL: ``postgresql://user[:password]@host[:port]/database?option=value`` (also ``postgres://``); a
missing part takes libpq's defaults (``PGHOST`` ..., as asyncpg reads them). Options:

==================== ===============================================================================
``schema``           schema of the tables (default ``callcast``; letters, digits, ``_``; ≤ 58 chars)
``lease``            seconds a killed subscriber keeps its deliveries (default 10)
``poll``             seconds between fallback polls of a waiting subscriber (default 1)
``pool_size``        most connections in the pool, besides the ``LISTEN`` one (default 10)
``connect_timeout``  seconds to wait for a connection (default 5)
``sslmode``          ``disable``, ``allow``, ``prefer``, ``require``, ``verify-ca`` or ``verify-full``
``application_name`` shown in ``pg_stat_activity`` (default ``callcast``)
``host``             a Unix-socket directory (``postgresql:///db?host=/var/run/postgresql``)
==================== ===============================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from callcast.brokers import port_of, redact, seconds_option
from callcast.brokers.closing import CloseOnce
from callcast.envelope import Envelope, decode_or_quarantine
from callcast.exceptions import BrokerUnavailableError, ConfigurationError, PublishError, TransportError
from callcast.transport import Capabilities, Delivery, Holding
from callcast.waiting import wait_event, within

CAPABILITIES = Capabilities(
    durable=True,
    shared=True,
    delayed_nack=True,
    delivery_count=True,
    ordered_per_key=True,
    request_reply=False,
    replays_history=False,
)

DEFAULT_SCHEMA = "callcast"
SCHEMES = ("postgresql", "postgres")
OPTIONS = ("schema", "lease", "poll", "pool_size", "connect_timeout", "sslmode", "application_name", "host")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,57}")
_COMMAND_TIMEOUT = 30.0
_GC_INTERVAL = 30.0
_GC_BATCH = 10_000
_NOTIFY_LIMIT = 7900  # PostgreSQL refuses NOTIFY payloads of 8000 bytes and more

log = logging.getLogger("callcast.brokers.postgres")

# Errors asyncpg (and the sockets under it) raise; every one is translated at this module's boundary.
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    EOFError,
    TimeoutError,
)
# Of those, the ones that mean "the server cannot be reached or the connection is gone".
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, starting up, crash shutdown
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    asyncpg.InterfaceError,  # connection closed, pool closing
    OSError,
    EOFError,
    TimeoutError,
)


@dataclass(frozen=True)
class Settings:
    """A parsed ``postgresql://`` URL. ``connect_kwargs`` holds the password: never log it."""

    schema: str = DEFAULT_SCHEMA
    lease: float = 10.0
    poll: float = 1.0
    pool_size: int = 10
    connect_timeout: float = 5.0
    connect_kwargs: dict[str, Any] = field(default_factory=dict, repr=False)
    password: str | None = field(default=None, repr=False)


def parse_url(url: str) -> Settings:
    """Read ``postgresql://user[:pw]@host[:port]/db?options``; :class:`ConfigurationError` if bad."""
    safe = redact(url)
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ConfigurationError(f"not a postgresql:// URL: {safe!r}")
    port = port_of("postgres", url)
    options: dict[str, str] = {}
    for key, values in parse_qs(parts.query, keep_blank_values=True).items():
        options[key] = values[-1]
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigurationError(
            f"postgres broker: unknown option(s) {', '.join(unknown)} in {safe!r}; "
            f"the options are {', '.join(OPTIONS)}"
        )
    schema = options.get("schema", DEFAULT_SCHEMA)
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ConfigurationError(
            f"postgres broker: schema must be 1-58 letters, digits or underscores "
            f"(not starting with a digit), got {schema!r}"
        )
    pool_size_text = options.get("pool_size", "10")
    if not pool_size_text.isdigit() or not 1 <= int(pool_size_text) <= 1000:
        raise ConfigurationError(f"postgres broker: pool_size must be 1 to 1000, got {pool_size_text!r}")
    sslmode = options.get("sslmode")
    if sslmode is not None and sslmode not in SSL_MODES:
        raise ConfigurationError(f"postgres broker: sslmode must be one of {', '.join(SSL_MODES)}")
    host = parts.hostname or None
    if "host" in options:
        if host is not None:
            raise ConfigurationError(f"postgres broker: a host in the URL and ?host= in {safe!r}; give one")
        host = options["host"]
    password = unquote(parts.password) if parts.password is not None else None
    database = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    connect_timeout = seconds_option("postgres", options, "connect_timeout", 5.0)
    kwargs: dict[str, Any] = {
        "host": host,
        "port": port,
        "user": unquote(parts.username) if parts.username else None,
        "password": password,
        "database": database or None,
        "timeout": connect_timeout,
        "command_timeout": _COMMAND_TIMEOUT,
        "server_settings": {"application_name": options.get("application_name", "callcast")},
    }
    if sslmode is not None:
        kwargs["ssl"] = sslmode
    return Settings(
        schema=schema,
        lease=seconds_option("postgres", options, "lease", 10.0),
        poll=seconds_option("postgres", options, "poll", 1.0),
        pool_size=int(pool_size_text),
        connect_timeout=connect_timeout,
        connect_kwargs={key: value for key, value in kwargs.items() if value is not None},
        password=password,
    )


_NOT_FLUSHED = "set_config('synchronous_commit', 'off', true)"
"""In a claim or an ack: its commit returns without waiting for the WAL flush (``synchronous_commit``
off for that transaction). One is lost only if the PostgreSQL server itself crashes in the fraction
of a second before the flush, and then the row is delivered again (an ack) or its attempt is not
counted (a claim): at-least-once holds. Publishes (and nacks, which are rare) keep the durable
default. Halves the claim and the ack (0.8 -> 0.35 ms each at 1,000 msg/s on this machine)."""


_FLUSHED = (
    "CASE current_setting('synchronous_commit') "
    "WHEN 'off' THEN set_config('synchronous_commit', 'on', true) END"
)
"""In a publish: its commit waits for the WAL flush even where the session says ``synchronous_commit =
off`` (a server's default, or a session a transaction-pooling proxy hands out without callcast's own
``SET``), for that transaction only; stronger settings (waiting for a standby) are kept. Evaluated
for each group row the publish returns: a publish that stored nothing has nothing to flush."""


LAYOUT = 2
"""The version of the schema's functions, named in its comment. Bumped whenever they change; a broker
connecting to a schema of a lower layout replaces them (:meth:`PostgresBroker._ensure_schema`). The
tables and indexes are those of layout 1. Layout 2: ``ack`` takes a turn on the message row when
another group's row of it is left, so the last group's ack deletes the message."""
_LAYOUT_COMMENT = f"callcast broker: messages, subscriptions, deliveries (layout {LAYOUT})"


def _layout_of(comment: str | None) -> int:
    """The layout a schema's comment names; 0 if none (a schema made before layouts were named)."""
    found = re.search(r"\(layout (\d+)\)", comment or "")
    return int(found.group(1)) if found else 0


def _lock_id(*parts: str) -> int:
    """A stable signed 32-bit id for an advisory lock (a collision only serializes needlessly)."""
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


class _Sql:
    """The statements of one schema (names quoted once, here)."""

    def __init__(self, schema: str, key_lock_class: int) -> None:
        s = f'"{schema}"'
        self.schema = s
        self.marker = f"{s}.deliveries_by_seq"  # created last: when it exists, the whole DDL ran
        key_lock_id = "hashtext(p_topic || chr(10) || {key})"
        key_lock = f"pg_advisory_xact_lock({key_lock_class}, {key_lock_id})"
        tables = f"""
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.messages (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic text NOT NULL,
    pkey text,
    headers json NOT NULL,
    body bytea NOT NULL,
    published_at timestamptz NOT NULL DEFAULT statement_timestamp()
);
CREATE TABLE IF NOT EXISTS {s}.subscriptions (
    topic text NOT NULL,
    grp text NOT NULL,
    ephemeral boolean NOT NULL DEFAULT false,
    heartbeat timestamptz NOT NULL DEFAULT statement_timestamp(),
    declared_at timestamptz NOT NULL DEFAULT statement_timestamp(),
    PRIMARY KEY (topic, grp)
);
CREATE TABLE IF NOT EXISTS {s}.deliveries (
    topic text NOT NULL,
    grp text NOT NULL,
    seq bigint NOT NULL,
    pkey text,
    head boolean NOT NULL DEFAULT true,
    available_at timestamptz NOT NULL DEFAULT '-infinity',
    attempts integer NOT NULL DEFAULT 0,
    owner text,
    lease_until timestamptz,
    PRIMARY KEY (topic, grp, seq)
);
CREATE INDEX IF NOT EXISTS deliveries_ready ON {s}.deliveries (topic, grp, seq)
    WHERE pkey IS NULL OR head;
CREATE INDEX IF NOT EXISTS deliveries_by_key ON {s}.deliveries (topic, grp, pkey, seq)
    WHERE pkey IS NOT NULL;
CREATE INDEX IF NOT EXISTS deliveries_by_owner ON {s}.deliveries (owner) WHERE owner IS NOT NULL;

"""
        self.functions = f"""
CREATE OR REPLACE FUNCTION {s}.publish(
    p_topic text, p_group text, p_headers json[], p_bodies bytea[], p_keys text[],
    p_channel text, p_sender text
) RETURNS SETOF text LANGUAGE plpgsql AS $fn$
DECLARE
    groups text[];
BEGIN
    -- Key-share lock the groups: an ephemeral group's close (which deletes its row, then its
    -- deliveries) waits for this publish, and then sees its rows.
    SELECT array_agg(g.grp) INTO groups FROM (
        SELECT grp FROM {s}.subscriptions
        WHERE topic = p_topic AND (p_group IS NULL OR grp = p_group)
        FOR KEY SHARE) AS g;
    IF groups IS NULL THEN
        RETURN;  -- nobody declared a group: nothing is kept
    END IF;
    -- One lock per key, in a fixed order: publishes and acks of a key take turns, so a key's seq
    -- order is its commit order, and the next statement (a fresh snapshot) sees all its rows.
    PERFORM pg_advisory_xact_lock({key_lock_class}, l.id) FROM (
        SELECT DISTINCT {key_lock_id.format(key="k")} AS id
        FROM unnest(p_keys) AS k WHERE k IS NOT NULL ORDER BY 1) AS l;
    WITH msgs AS (
        INSERT INTO {s}.messages (topic, pkey, headers, body)
        SELECT p_topic, u.pkey, u.headers, u.body
        FROM unnest(p_headers, p_bodies, p_keys) WITH ORDINALITY AS u(headers, body, pkey, n)
        ORDER BY u.n
        RETURNING seq, pkey
    )
    INSERT INTO {s}.deliveries (topic, grp, seq, pkey, head)
    SELECT p_topic, g.grp, m.seq, m.pkey,
        m.pkey IS NULL OR (
            m.seq = min(m.seq) OVER (PARTITION BY g.grp, m.pkey)
            -- OFFSET 0 keeps this a probe per key (an index lookup), never a hash of the topic's rows
            AND NOT EXISTS (SELECT 1 FROM {s}.deliveries AS e
                            WHERE e.topic = p_topic AND e.grp = g.grp AND e.pkey = m.pkey OFFSET 0))
    FROM msgs AS m CROSS JOIN unnest(groups) AS g(grp);
    PERFORM pg_notify(p_channel, CASE WHEN octet_length(n.payload) < {_NOTIFY_LIMIT} THEN n.payload
        ELSE json_build_array(NULL, NULL, p_sender)::text END)
    FROM (SELECT json_build_array(p_topic, g, p_sender)::text AS payload FROM unnest(groups) AS g) AS n;
    RETURN QUERY SELECT unnest(groups);
END
$fn$;

CREATE OR REPLACE FUNCTION {s}.ack(
    p_topic text, p_group text, p_seq bigint, p_owner text, p_channel text, p_payload text
) RETURNS boolean LANGUAGE plpgsql AS $fn$
DECLARE
    k text;
BEGIN
    DELETE FROM {s}.deliveries
    WHERE topic = p_topic AND grp = p_group AND seq = p_seq AND owner = p_owner
    RETURNING pkey INTO k;
    IF NOT FOUND THEN
        RETURN false;  -- not (or no longer) this subscriber's: ignored
    END IF;
    -- The last group to settle a message deletes it. Another group's row left: it may be settled
    -- at this very moment (its delete not committed, ours not seen by it either), so the settlers
    -- of the message take turns on its row, and look again: the last of them sees the others gone.
    -- The row is locked after the delivery's and before the key's, as every settle does.
    DELETE FROM {s}.messages AS m WHERE m.seq = p_seq
        AND NOT EXISTS (SELECT 1 FROM {s}.deliveries AS d WHERE d.seq = p_seq);
    IF NOT FOUND THEN
        PERFORM 1 FROM {s}.messages AS m WHERE m.seq = p_seq FOR UPDATE;
        DELETE FROM {s}.messages AS m WHERE m.seq = p_seq
            AND NOT EXISTS (SELECT 1 FROM {s}.deliveries AS d WHERE d.seq = p_seq);
    END IF;
    IF k IS NOT NULL THEN
        -- The key's next row becomes its head. Under the key's lock, so a concurrent publish of
        -- the key either saw this delete or is seen by the update below.
        PERFORM {key_lock.format(key="k")};
        UPDATE {s}.deliveries SET head = true
        WHERE topic = p_topic AND grp = p_group
          AND seq = (SELECT min(e.seq) FROM {s}.deliveries AS e
                     WHERE e.topic = p_topic AND e.grp = p_group AND e.pkey = k)
          AND pkey = k AND NOT head;
        PERFORM pg_notify(p_channel, p_payload);
    END IF;
    RETURN true;
END
$fn$;

COMMENT ON SCHEMA {s} IS '{_LAYOUT_COMMENT}';
"""
        """The functions and the layout comment: all an upgrade from an older layout replaces."""
        marker = f"CREATE INDEX IF NOT EXISTS deliveries_by_seq ON {s}.deliveries (seq);\n"
        self.ddl = tables + self.functions + marker
        # $1 topic, $2 group or NULL, $3 headers, $4 bodies, $5 keys, $6 channel, $7 sender.
        self.publish = f"SELECT grp, {_FLUSHED} FROM {s}.publish($1, $2, $3, $4, $5, $6, $7) AS grp"
        self.declare = f"""
INSERT INTO {s}.subscriptions (topic, grp) VALUES ($1, $2) ON CONFLICT (topic, grp) DO NOTHING
"""
        self.declare_ephemeral = f"""
INSERT INTO {s}.subscriptions (topic, grp, ephemeral) VALUES ($1, $2, true)
ON CONFLICT (topic, grp) DO UPDATE SET heartbeat = statement_timestamp()
"""
        # $1 topic, $2 group, $3 limit, $4 owner, $5 lease seconds.
        self.claim = f"""
WITH picked AS (
    SELECT d.ctid FROM {s}.deliveries AS d
    WHERE d.topic = $1 AND d.grp = $2
      AND (d.pkey IS NULL OR d.head)
      AND d.available_at <= statement_timestamp()
      AND (d.owner IS NULL OR d.lease_until < statement_timestamp())
      AND (d.pkey IS NULL OR NOT EXISTS (
            SELECT 1 FROM {s}.deliveries AS e
            WHERE e.topic = d.topic AND e.grp = d.grp AND e.pkey = d.pkey AND e.seq < d.seq))
    ORDER BY d.seq
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE {s}.deliveries AS d
    SET owner = $4, lease_until = statement_timestamp() + make_interval(secs => $5::float8),
        attempts = d.attempts + 1
    -- By the locked rows' ctid (a TID scan): whatever the planner thinks of the table's size.
    WHERE d.ctid = ANY(ARRAY(SELECT ctid FROM picked))
    RETURNING d.seq, d.attempts, d.pkey IS NOT NULL AS keyed
)
SELECT c.seq, c.attempts, c.keyed, m.headers::text AS headers, m.body
FROM claimed AS c LEFT JOIN {s}.messages AS m ON m.seq = c.seq
CROSS JOIN (SELECT {_NOT_FLUSHED}) AS relaxed
ORDER BY c.seq
"""
        # $1 topic, $2 group, $3 seq, $4 owner, $5 channel, $6 payload.
        self.ack = f"SELECT {s}.ack($1, $2, $3, $4, $5, $6), {_NOT_FLUSHED}"
        # Unkeyed rows of one subscriber: $3 their seqs, ascending (the order releases lock rows in,
        # and every batch message rows), acked one after the other in one transaction.
        self.ack_many = (
            f"SELECT {s}.ack($1, $2, seq, $4, $5, $6), {_NOT_FLUSHED} FROM unnest($3::int8[]) AS seq"
        )
        # $1 topic, $2 group, $3 seq, $4 owner, $5 delay seconds, $6 channel, $7 payload.
        self.nack = f"""
WITH back AS (
    UPDATE {s}.deliveries
    SET owner = NULL, lease_until = NULL, available_at = CASE WHEN $5::float8 > 0
        THEN statement_timestamp() + make_interval(secs => $5::float8) ELSE '-infinity' END
    WHERE topic = $1 AND grp = $2 AND seq = $3 AND owner = $4
    RETURNING 1
)
SELECT pg_notify($6, $7) FROM back WHERE $5::float8 <= 0
"""
        # $1 owner, $2 seqs never handed out, $3 channel, $4 payload. The owner is unique to one
        # subscription (of one topic and group): its index finds the rows. All locked first, in key
        # order (the module's **locks**), by the ARRAY's InitPlan.
        self.release = f"""
WITH back AS (
    UPDATE {s}.deliveries
    SET owner = NULL, lease_until = NULL,
        attempts = greatest(attempts - (seq = ANY($2::int8[]))::int, 0)
    WHERE owner = $1 AND seq = ANY(ARRAY(
        SELECT seq FROM {s}.deliveries WHERE owner = $1 ORDER BY topic, grp, seq FOR NO KEY UPDATE))
    RETURNING 1
)
SELECT pg_notify($3, $4) WHERE EXISTS (SELECT 1 FROM back)
"""
        self.drop_group = f"DELETE FROM {s}.subscriptions WHERE topic = $1 AND grp = $2"
        self.drop_group_rows = f"DELETE FROM {s}.deliveries WHERE topic = $1 AND grp = $2"
        # $1 lease seconds, $2..$5 topic/group/seq/owner of every held row, $6/$7 ephemeral groups.
        # Waits for no lock (the module's **locks**): rows another transaction holds are skipped;
        # the update changes only rows ``held`` locked.
        self.renew = f"""
WITH held AS (
    SELECT k.topic, k.grp, k.seq, k.owner
    FROM unnest($2::text[], $3::text[], $4::int8[], $5::text[]) AS k(topic, grp, seq, owner)
    JOIN {s}.deliveries AS d
        ON d.topic = k.topic AND d.grp = k.grp AND d.seq = k.seq AND d.owner = k.owner
    FOR NO KEY UPDATE OF d SKIP LOCKED
), renewed AS (
    UPDATE {s}.deliveries AS d
    SET lease_until = statement_timestamp() + make_interval(secs => $1::float8)
    FROM held AS k
    WHERE d.topic = k.topic AND d.grp = k.grp AND d.seq = k.seq AND d.owner = k.owner
    RETURNING 1
), beats AS (
    INSERT INTO {s}.subscriptions (topic, grp, ephemeral)
    SELECT t, g, true FROM unnest($6::text[], $7::text[]) AS e(t, g)
    ON CONFLICT (topic, grp) DO UPDATE SET heartbeat = statement_timestamp()
    RETURNING 1
)
SELECT (SELECT count(*) FROM renewed) AS renewed, (SELECT count(*) FROM beats) AS beats
"""
        self.stale_groups = f"""
DELETE FROM {s}.subscriptions
WHERE ephemeral AND heartbeat < statement_timestamp() - make_interval(secs => $1::float8)
RETURNING topic, grp
"""
        self.drop_rows_of = f"""
DELETE FROM {s}.deliveries AS d USING unnest($1::text[], $2::text[]) AS g(topic, grp)
WHERE d.topic = g.topic AND d.grp = g.grp
"""
        self.collect = f"""
DELETE FROM {s}.messages WHERE seq IN (
    SELECT m.seq FROM {s}.messages AS m
    WHERE NOT EXISTS (SELECT 1 FROM {s}.deliveries AS d WHERE d.seq = m.seq)
    LIMIT {_GC_BATCH})
"""


class PostgresBroker:
    """PostgreSQL as a broker. Build with :func:`callcast.brokers.connect` (``postgresql://...``)."""

    capabilities = CAPABILITIES

    def __init__(self, url: str = "postgresql://localhost/postgres") -> None:
        self.url = redact(url)
        self.settings = parse_url(url)
        self.schema = self.settings.schema
        self.lease = self.settings.lease
        self.poll = self.settings.poll
        self.channel = f"{self.schema}.wake"
        self._sql = _Sql(self.schema, _lock_id("callcast-keys", self.schema))
        self._id = uuid.uuid4().hex  # the sender of this object's notifications, ignored on receipt
        self._admin_lock = _lock_id("callcast-admin", self.schema)
        self._pool: Any = None
        self._listener: Any = None
        self._listener_lost = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscriptions: set[_PostgresSubscription] = set()
        # Held while leases and heartbeats are renewed: an ephemeral group's close waits for it, so a
        # heartbeat (which re-creates a group collected during a long outage) never revives a closed one.
        self._renewing = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._pool_closed = False
        self._close_once = CloseOnce()

    def __repr__(self) -> str:
        return f"PostgresBroker({self.url!r})"

    # -- errors ---------------------------------------------------------------------------------

    def _describe(self, error: BaseException) -> str:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        password = self.settings.password
        if password:
            text = text.replace(password, "***")
        return text

    def _translate(self, error: BaseException, what: str, *, publish: bool = False) -> TransportError:
        message = f"postgres broker {self.url}: {what}: {self._describe(error)}"
        if publish:
            return PublishError(message)
        if isinstance(error, _CONNECTION_ERRORS):
            return BrokerUnavailableError(message)
        return TransportError(message)

    def _check_open(self, *, public: bool = True) -> Any:
        """The pool. Once ``close()`` began, only the closing subscriptions may still use it."""
        if self._pool is None or self._pool_closed or (public and self._closing):
            raise BrokerUnavailableError(f"postgres broker {self.url} is closed")
        return self._pool

    async def _call(
        self, method: str, sql: str, *args: Any, what: str, publish: bool = False, public: bool = False
    ) -> Any:
        """Run one statement on a pooled connection (``execute``, ``fetch`` or ``fetchval``)."""
        pool = self._check_open(public=public)
        try:
            conn = await pool.acquire()
        except _DRIVER_ERRORS as error:
            raise self._translate(error, f"{what}: cannot get a connection") from None
        try:
            return await getattr(conn, method)(sql, *args)
        except _DRIVER_ERRORS as error:
            raise self._translate(error, what, publish=publish) from None
        finally:
            with contextlib.suppress(*_DRIVER_ERRORS):
                await pool.release(conn)

    # -- plumbing -------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the pool and the ``LISTEN`` connection, creating the tables if missing."""
        self._loop = asyncio.get_running_loop()
        kwargs = self.settings.connect_kwargs
        try:
            self._pool = await asyncpg.create_pool(
                min_size=1,
                max_size=self.settings.pool_size,
                init=_init_connection,
                reset=_keep_session,
                **kwargs,
            )
        except Exception as error:  # asyncpg raises many kinds while connecting; all mean the same
            raise BrokerUnavailableError(
                f"postgres broker {self.url}: cannot connect: {self._describe(error)}"
            ) from None
        try:
            await self._ensure_schema()
            await self._open_listener()
        except BaseException:
            await self._close_pool()
            raise
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="callcast-postgres-listen"),
            asyncio.create_task(self._renew_forever(), name="callcast-postgres-renew"),
            asyncio.create_task(self._collect_forever(), name="callcast-postgres-gc"),
        ]

    async def _ensure_schema(self) -> None:
        """Create the schema when missing; replace the functions of one made by an older version."""
        try:
            async with self._pool.acquire() as conn:
                if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", self._sql.marker):
                    if await self._layout(conn) < LAYOUT:
                        await self._upgrade(conn)
                    return
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1, 0)", self._admin_lock)
                    await conn.execute(self._sql.ddl)
        except _DRIVER_ERRORS as error:
            raise self._translate(error, f"cannot create the tables in schema {self.schema}") from None

    async def _layout(self, conn: Any) -> int:
        comment = "SELECT obj_description(to_regnamespace($1), 'pg_namespace')"
        return _layout_of(await conn.fetchval(comment, self._sql.schema))

    async def _upgrade(self, conn: Any) -> None:
        """Replace the functions of a schema of a lower :data:`LAYOUT` (the tables are the same), under
        the schema's advisory lock. ``CREATE OR REPLACE FUNCTION`` takes no lock on the tables, and
        processes of the older version go on with the new functions (same signatures). A schema of a
        higher layout is left alone: a newer version made it. A role that does not own the schema
        cannot replace them: it goes on with the old ones, and says so."""
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1, 0)", self._admin_lock)
                found = await self._layout(conn)
                if found < LAYOUT:  # not done meanwhile
                    await conn.execute(self._sql.functions)
                    log.info(
                        "%s: schema %s brought from layout %d to %d", self.url, self.schema, found, LAYOUT
                    )
        except asyncpg.InsufficientPrivilegeError as error:
            log.warning(
                "%s: schema %s has functions of an older layout, and this role cannot replace them "
                "(%s); it goes on with them. Connect once as the schema's owner to bring them to "
                "layout %d",
                self.url,
                self.schema,
                error,
                LAYOUT,
            )

    async def _open_listener(self) -> None:
        try:
            conn = await asyncpg.connect(**self.settings.connect_kwargs)
        except Exception as error:
            raise BrokerUnavailableError(
                f"postgres broker {self.url}: cannot connect: {self._describe(error)}"
            ) from None
        try:
            await conn.add_listener(self.channel, self._on_notify)
        except _DRIVER_ERRORS as error:
            conn.terminate()
            raise self._translate(error, f"cannot LISTEN on {self.channel}") from None
        except BaseException:  # cancelled (a caller's timeout, close()): the new connection must not leak
            conn.terminate()
            raise
        self._listener_lost.clear()
        self._listener = conn
        conn.add_termination_listener(self._on_listener_lost)

    def _on_listener_lost(self, conn: Any) -> None:
        if conn is self._listener:
            self._listener_lost.set()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            topic, group, sender = json.loads(payload)
        except (ValueError, TypeError):
            self._wake_all()
            return
        if sender == self._id:
            return  # woken locally already
        if topic is None:
            self._wake_all()
            return
        self._wake_group(str(topic), str(group))

    async def _listen_forever(self) -> None:
        """Keep the ``LISTEN`` connection up: re-open it when it drops, check it when quiet."""
        backoff = 0.1
        while True:
            try:
                backoff = await self._keep_listening(backoff)
            except Exception:  # a bug here must not end the wake-ups for good: subscribers poll meanwhile
                log.exception("%s: the LISTEN supervisor failed; retrying", self.url)
                await asyncio.sleep(1.0)

    async def _keep_listening(self, backoff: float) -> float:
        """One step of :meth:`_listen_forever`; returns the next reconnect delay."""
        conn = self._listener
        if conn is None or conn.is_closed():
            self._listener = None
            try:
                await self._open_listener()
            except TransportError as error:
                log.debug("%s: LISTEN connection not back yet: %s", self.url, error)
                await asyncio.sleep(backoff)
                return min(backoff * 2, 1.0)
            log.info("%s: LISTEN connection re-established", self.url)
            self._wake_all()  # notifications sent while it was down are lost: look once
            return 0.1
        try:
            await within(self._listener_lost.wait(), max(self.poll, 5.0))
        except TimeoutError:
            try:  # a connection that died silently (no FIN) is found by using it
                await within(conn.execute("SELECT 1"), self.settings.connect_timeout)
            except _DRIVER_ERRORS:
                conn.terminate()
            return backoff
        conn.terminate()  # lost: make sure it is closed, then open a new one
        return backoff

    async def _renew_forever(self) -> None:
        """Every lease/3 seconds: renew leases and heartbeats. A task of its own, so nothing else (a
        long garbage collection) delays a renewal past the lease of a live holder."""
        interval = self.lease / 3
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                await self._renew()
            except TransportError as error:
                if not failing:  # once per outage: held deliveries may go to others after the lease
                    log.warning("%s: cannot renew leases: %s", self.url, error)
                failing = True
            except Exception:
                log.exception("%s: renewing leases failed", self.url)
            else:
                failing = False

    async def _collect_forever(self) -> None:
        """Every 30 s (or lease/3, if longer): collect garbage. A task of its own, beside the renewals."""
        while True:
            await asyncio.sleep(max(_GC_INTERVAL, self.lease / 3))
            try:
                await self._collect_garbage()
            except TransportError as error:
                log.debug("%s: garbage collection failed: %s", self.url, error)
            except Exception:
                log.exception("%s: garbage collection failed", self.url)

    async def _renew(self) -> None:
        async with self._renewing:
            await self._renew_held()

    async def _renew_held(self) -> None:
        topics: list[str] = []
        groups: list[str] = []
        seqs: list[int] = []
        owners: list[str] = []
        ephemeral_topics: list[str] = []
        ephemeral_groups: list[str] = []
        for subscription in list(self._subscriptions):
            if subscription.closed:
                continue
            if subscription.ephemeral:
                ephemeral_topics.append(subscription.topic)
                ephemeral_groups.append(subscription.group)
            for seq in subscription.outstanding:
                topics.append(subscription.topic)
                groups.append(subscription.group)
                seqs.append(seq)
                owners.append(subscription.owner)
        if seqs or ephemeral_topics:
            await self._call(
                "execute",
                self._sql.renew,
                self.lease,
                topics,
                groups,
                seqs,
                owners,
                ephemeral_topics,
                ephemeral_groups,
                what="renewing leases",
            )

    async def _collect_garbage(self) -> None:
        """Drop ephemeral groups whose subscriber died, then messages nobody refers to."""
        pool = self._check_open(public=False)
        stale_after = max(60.0, 6 * self.lease)
        try:
            async with pool.acquire() as conn, conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1, 1)", self._admin_lock):
                    return  # another broker object is collecting
                stale = await conn.fetch(self._sql.stale_groups, stale_after)
                if stale:
                    await conn.execute(
                        self._sql.drop_rows_of, [r["topic"] for r in stale], [r["grp"] for r in stale]
                    )
                await conn.execute(self._sql.collect)
        except _DRIVER_ERRORS as error:
            raise self._translate(error, "collecting garbage") from None

    def _wake_all(self) -> None:
        for subscription in self._subscriptions:
            subscription.wake.set()

    def _wake_group(self, topic: str, group: str) -> None:
        for subscription in self._subscriptions:
            if subscription.group == group and subscription.topic == topic:
                subscription.wake.set()

    def _payload(self, topic: str, group: str) -> str:
        payload = json.dumps([topic, group, self._id])
        if len(payload.encode()) >= _NOTIFY_LIMIT:
            payload = json.dumps([None, None, self._id])
        return payload

    # -- the seam -------------------------------------------------------------------------------

    async def publish(self, topic: str, envelopes: Sequence[Envelope], *, group: str | None = None) -> None:
        self._check_open()
        if not envelopes:
            return
        headers = [json.dumps(e.headers(), separators=(",", ":"), ensure_ascii=False) for e in envelopes]
        bodies = [e.data for e in envelopes]
        keys = [e.partition_key for e in envelopes]
        rows = await self._call(
            "fetch",
            self._sql.publish,
            topic,
            group,
            headers,
            bodies,
            keys,
            self.channel,
            self._id,
            what=f"publish to {topic!r}",
            publish=True,
            public=True,
        )
        for row in rows:
            self._wake_group(topic, row["grp"])

    async def declare(self, topic: str, group: str) -> None:
        await self._declare(topic, group, ephemeral=False)

    async def _declare(self, topic: str, group: str, *, ephemeral: bool) -> None:
        sql = self._sql.declare_ephemeral if ephemeral else self._sql.declare
        await self._call("execute", sql, topic, group, what=f"declare {group!r}", public=True)

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        prefetch: int = 32,
        ephemeral: bool = False,
        holding: Holding | None = None,
    ) -> _PostgresSubscription:
        await self._declare(topic, group, ephemeral=ephemeral)
        self._check_open()
        subscription = _PostgresSubscription(self, topic, group, max(1, prefetch), ephemeral, holding)
        self._subscriptions.add(subscription)
        return subscription

    async def close(self) -> None:
        self._closing = True
        await self._close_once.run(self._shutdown)

    async def _shutdown(self) -> None:
        await asyncio.gather(*(s.close() for s in list(self._subscriptions)), return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                await within(listener.close(), self.settings.connect_timeout)
            except _DRIVER_ERRORS:
                listener.terminate()
        await self._close_pool()

    async def _close_pool(self) -> None:
        pool = self._pool
        if pool is None or self._pool_closed:
            return
        self._pool_closed = True
        try:
            await within(pool.close(), self.settings.connect_timeout)
        except _DRIVER_ERRORS:
            pool.terminate()

    # -- subscriber operations ------------------------------------------------------------------

    async def _claim(
        self, subscription: _PostgresSubscription, limit: int
    ) -> list[tuple[int, int, bool, Envelope]]:
        rows = await self._call(
            "fetch",
            self._sql.claim,
            subscription.topic,
            subscription.group,
            limit,
            subscription.owner,
            self.lease,
            what=f"claim for {subscription.group!r}",
        )
        return [
            (
                row["seq"],
                row["attempts"],
                row["keyed"],
                decode_or_quarantine(_load_headers(row["headers"]), row["body"] or b""),
            )
            for row in rows
        ]

    async def _settle(
        self, subscription: _PostgresSubscription, seq: int, delay: float | None, *, wake: bool
    ) -> None:
        """Ack (``delay`` None) or nack one row; ``wake``: this process's subscribers of the group
        look for work afterwards (a nack, a key's next row, room in a full subscription)."""
        topic, group = subscription.topic, subscription.group
        payload = self._payload(topic, group)
        if delay is None:
            await self._call(
                "execute",
                self._sql.ack,
                topic,
                group,
                seq,
                subscription.owner,
                self.channel,
                payload,
                what="ack",
            )
        else:
            await self._call(
                "execute",
                self._sql.nack,
                topic,
                group,
                seq,
                subscription.owner,
                delay,
                self.channel,
                payload,
                what="nack",
            )
            if delay > 0 and self._loop is not None:
                # Our own subscribers look again when it is due; others find it by their fallback poll.
                self._loop.call_later(delay + 0.002, self._wake_group, topic, group)
        if wake:
            self._wake_group(topic, group)

    async def _ack_unkeyed(self, subscription: _PostgresSubscription, seqs: list[int]) -> None:
        """Ack unkeyed rows of ``subscription`` (``seqs`` ascending) in one statement."""
        await self._call(
            "execute",
            self._sql.ack_many,
            subscription.topic,
            subscription.group,
            seqs,
            subscription.owner,
            self.channel,
            self._payload(subscription.topic, subscription.group),
            what="ack",
        )

    async def _release(self, subscription: _PostgresSubscription, never_handed_out: list[int]) -> None:
        topic, group = subscription.topic, subscription.group
        if subscription.ephemeral:
            pool = self._check_open(public=False)
            try:
                async with self._renewing, pool.acquire() as conn, conn.transaction():
                    # The group's row first: publishes that still fan out to it hold a key-share lock
                    # on it, so this waits for them, and the next statement sees their rows.
                    await conn.execute(self._sql.drop_group, topic, group)
                    await conn.execute(self._sql.drop_group_rows, topic, group)
            except _DRIVER_ERRORS as error:
                raise self._translate(error, f"dropping ephemeral group {group!r}") from None
            return
        await self._call(
            "execute",
            self._sql.release,
            subscription.owner,
            never_handed_out,
            self.channel,
            self._payload(topic, group),
            what=f"hand back the deliveries of {group!r}",
        )
        self._wake_group(topic, group)


class _PostgresSubscription:
    def __init__(
        self,
        broker: PostgresBroker,
        topic: str,
        group: str,
        prefetch: int,
        ephemeral: bool,
        holding: Holding | None,
    ) -> None:
        self.broker = broker
        self.holding = holding
        self.topic = topic
        self.group = group
        self.prefetch = prefetch
        self.ephemeral = ephemeral
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.outstanding: set[int] = set()  # claimed and not settled: handed out or in the buffer
        self.buffer: deque[_PostgresDelivery] = deque()
        self.wake = asyncio.Event()
        self.claiming: asyncio.Task[None] | None = None
        self.claim_error: TransportError | None = None
        self.drained = False
        """The last claim found fewer rows than it asked for."""
        self.failing = False
        self.closed = False
        self.acks: list[int] | None = None  # unkeyed acks gathering while a batch is sent
        self.acks_sent: asyncio.Task[None] | None = None  # their batch, once it is started
        self.ack_turn = asyncio.Lock()  # one batch in flight at a time

    def __aiter__(self) -> _PostgresSubscription:
        return self

    async def __anext__(self) -> Delivery:
        while not self.closed:
            if self.buffer:
                return self.buffer.popleft()
            if self.drained and not self.wake.is_set():
                # The last claim found fewer rows than it asked for and nothing woke us since: a
                # claim now would come back empty. Wait for a wake-up (or the fallback poll).
                self.drained = False
                await wait_event(self.wake, self.broker.poll)
                continue
            self.wake.clear()  # before looking: whatever changes from here on sets it again
            room = self.prefetch - len(self.outstanding)
            if room > 0:
                if self.claiming is None:
                    self.claiming = asyncio.create_task(self._claim(room), name="callcast-postgres-claim")
                claiming = self.claiming
                try:
                    # Shielded: if our caller is cancelled (a timeout), the claim still lands in the
                    # buffer for the next call, instead of leaving rows owned but never handed out.
                    await asyncio.shield(claiming)
                finally:
                    if claiming.done() and self.claiming is claiming:
                        self.claiming = None
                if self.buffer:
                    continue
                self._check_claim_error()
            await wait_event(self.wake, self.broker.poll)
            self.drained = False  # a poll interval passed (or a wake-up came): the next pass claims
        raise StopAsyncIteration

    def _check_claim_error(self) -> None:
        error, self.claim_error = self.claim_error, None
        if error is None or self.closed:
            return
        if isinstance(error, BrokerUnavailableError):
            # The server is away (restarting, network): keep waiting and retry at the poll rate, so
            # consumers carry on when it is back instead of ending.
            if not self.failing:
                log.warning("%s: %s; retrying every %gs", self.broker.url, error, self.broker.poll)
            self.failing = True
            return
        raise error

    async def _claim(self, limit: int) -> None:
        if self.closed:
            return
        try:
            claimed = await self.broker._claim(self, limit)
        except TransportError as error:
            self.claim_error = error
            return
        if self.failing:
            self.failing = False
            log.info("%s: %r takes deliveries again", self.broker.url, self.group)
        # Kept even if the subscription closed meanwhile: close() waits for this claim and hands
        # these rows back as never handed out.
        self.drained = len(claimed) < limit
        for seq, attempt, keyed, envelope in claimed:
            self.outstanding.add(seq)
            self.buffer.append(_PostgresDelivery(self, seq, attempt, keyed, envelope))
            if self.holding is not None:
                self.holding.fetched(envelope)

    async def settle(self, delivery: _PostgresDelivery, delay: float | None) -> None:
        seq, keyed = delivery._seq, delivery._keyed
        if self.closed or seq not in self.outstanding:
            return
        # Wake-ups after an ack only where it may have made work: the key's next row is its head
        # now, or a full subscription has room again. An unkeyed ack frees nothing to claim, and
        # waking for it would cost an empty claim per message.
        wake = keyed or delay is not None or len(self.outstanding) >= self.prefetch
        # Forgotten first: if settling fails, the row is no longer renewed, so it returns to the
        # group when its lease runs out.
        self.outstanding.discard(seq)
        if delay is None and not keyed and not self.ephemeral:
            await self._ack_unkeyed(seq)
            if wake:
                self.broker._wake_group(self.topic, self.group)
        else:
            await self.broker._settle(self, seq, delay, wake=wake)
        if self.holding is not None:
            self.holding.returned(delivery.envelope)

    async def _ack_unkeyed(self, seq: int) -> None:
        """Ack an unkeyed row together with the others acked while a batch is in flight: those
        gather and go as the next batch, one statement and one transaction, rows in ascending
        ``seq`` (the module's **locks**). Without a batch in flight, an ack goes at once. Should a
        batch fail while the server is there, each of its rows is acked alone."""
        gathering = self.acks
        if gathering is None:
            gathering = self.acks = []
            self.acks_sent = sent = asyncio.ensure_future(self._send_acks(gathering))
        else:
            assert self.acks_sent is not None
            sent = self.acks_sent
        gathering.append(seq)
        await asyncio.shield(sent)

    async def _send_acks(self, seqs: list[int]) -> None:
        async with self.ack_turn:
            if self.acks is seqs:  # acks from now on gather for the next batch
                self.acks = None
            ordered = sorted(seqs)
            try:
                await self.broker._ack_unkeyed(self, ordered)
            except BrokerUnavailableError:
                raise
            except TransportError:  # each alone, so that one row's failure fails no other
                failure: TransportError | None = None
                for seq in ordered:
                    try:
                        await self.broker._settle(self, seq, None, wake=False)
                    except TransportError as error:
                        failure = error
                if failure is not None:
                    raise failure from None

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.wake.set()
        claiming = self.claiming
        if claiming is not None:
            await asyncio.wait({claiming})
        sent = self.acks_sent  # the last batch (it runs after the ones before it): acks made
        if sent is not None:  # before the close go before the release
            await asyncio.wait({sent})
            if not sent.cancelled():
                sent.exception()  # seen here if by no ack: a failed batch's rows return after the lease
        self.broker._subscriptions.discard(self)
        never_handed_out = [delivery._seq for delivery in self.buffer]
        returned = [delivery.envelope for delivery in self.buffer]
        self.buffer.clear()
        self.outstanding.clear()
        try:
            await self.broker._release(self, never_handed_out)
        except TransportError as error:
            log.warning(
                "%s: %r could not hand back its deliveries (they return after the lease): %s",
                self.broker.url,
                self.group,
                error,
            )
        if self.holding is not None:  # after the release: a kill before it counts them
            for envelope in returned:
                self.holding.returned(envelope)


class _PostgresDelivery:
    __slots__ = ("_keyed", "_seq", "_subscription", "attempt", "envelope")

    def __init__(
        self, subscription: _PostgresSubscription, seq: int, attempt: int, keyed: bool, envelope: Envelope
    ) -> None:
        self._subscription = subscription
        self._seq = seq
        self._keyed = keyed
        self.attempt = attempt
        self.envelope = envelope

    async def ack(self) -> None:
        await self._subscription.settle(self, None)

    async def nack(self, *, delay: float = 0.0) -> None:
        await self._subscription.settle(self, max(0.0, delay))


async def _init_connection(conn: Any) -> None:
    """A server configured with ``synchronous_commit = off`` would acknowledge commits it may still
    lose in a crash: callcast's sessions ask for the durable default there."""
    if await conn.fetchval("SHOW synchronous_commit") == "off":
        await conn.execute("SET synchronous_commit = on")


async def _keep_session(_conn: Any) -> None:
    """Released connections keep their session: callcast leaves no state in it (no ``SET`` but the
    one above, no ``LISTEN``, no cursors, only transaction-level locks), so the pool's default reset
    (a round trip on every release) is skipped. An open transaction is still rolled back by asyncpg."""


def _load_headers(text: str | None) -> dict[str, str]:
    if text is None:
        return {}
    try:
        headers = json.loads(text)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {}
