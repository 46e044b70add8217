"""``redis://[[user]:password@]host[:port][/db]``: Redis Streams as a broker (redis-py's asyncio client).

``rediss://`` is the same over TLS. Needs Redis 6.2 or later, standalone or a primary (not Redis Cluster:
the scripts below touch several keys of one topic).

Keys (what other tools read)
----------------------------
Topic and group names go into key names with ``%`` written ``%25`` and ``:`` written ``%3A``, so ``:``
only ever separates the parts below (``<prefix>`` is the ``prefix`` option, default ``callcast``):

=================================== ========== ===========================================================
``<prefix>:<topic>``                stream     the topic: one entry per published envelope; every callcast
                                               group of the topic is a Redis consumer group of it, named as
                                               the callcast group
``<prefix>:<topic>:<group>:direct`` stream     envelopes published for that group only
                                               (``publish(..., group=...)``), with one consumer group
                                               ``<group>``; created by ``declare``
``<prefix>:<topic>:<group>:retry``  sorted set nacked deliveries waiting for their retry: member
                                               ``t:<entry id>`` (topic stream) or ``d:<entry id>`` (direct
                                               stream), score = when it is due (Redis server time, ms)
``<prefix>::ephemeral``             sorted set the live ephemeral groups: member ``<topic>:<group>``
                                               (escaped as above), score = last heartbeat (ms)
=================================== ========== ===========================================================

An entry has one field, ``event``: the envelope as a CloudEvents structured-mode JSON document (its
attributes by name, the data as ``data_base64``; read with e.g. ``jq``): redis-py packs and parses
fields one by one, and one field instead of one per attribute raised event throughput by ~13 %.
Entries whose fields are binary-mode headers (``ce-id``, ``ce-type``, ``content-type``…) and ``data``,
as older callcast versions and other tools write them, are read too; whatever is not a CloudEvent
becomes a ``callcast.undecodable`` envelope (:func:`~callcast.envelope.decode_or_quarantine`).
Consumer names are ``<host>:<pid>:<random>~<lease in ms>``, one per subscription (the lease in the name
tells the others how long to wait before they take its entries); ``callcast:retry`` is the consumer that
holds nacked deliveries while they wait for their retry.

How the contract is met
-----------------------
* **Fan-out, declare**: ``declare`` runs ``XGROUP CREATE <stream> <group> $ MKSTREAM`` on the topic stream
  and on the group's direct stream (``BUSYGROUP`` is ignored, so declaring twice is harmless): a group
  gets what is published after it, never older entries (``replays_history`` is False).
* **Publish**: one pipeline of ``XADD <stream> NOMKSTREAM * ...`` per call, so a batch is one round trip
  and keeps its order. ``NOMKSTREAM``: a topic no group was declared on stores nothing. ``group=G``
  writes to ``G``'s direct stream only, which only ``G`` reads (nothing if ``G`` was not declared).
* **Durability** is decided at ``connect()`` from the server's own configuration (``CONFIG GET``):
  ``durable`` is True only with ``appendonly yes``, ``appendfsync always`` (Redis writes and fsyncs the
  AOF before it replies, so an ``XADD`` that returned survives a crash of every process, Redis included,
  and a restart; a power cut too, unless ``no-appendfsync-on-rewrite yes`` skipped the fsync during an
  AOF rewrite) and a ``maxmemory-policy`` that never evicts keys without a TTL (``noeviction`` or
  ``volatile-*``). With ``appendfsync everysec`` (Redis may reply before it even wrote the AOF while an
  fsync is slow), RDB snapshots only, no persistence, or ``CONFIG`` disabled, it is False.
  Replication is not waited for: a failover to a replica that had not caught up can lose accepted writes.
  ``?durable=require`` makes ``connect()`` refuse a server that is not durable.
* **Taking deliveries** happens in one Lua script per batch (never more than the free prefetch): first
  the group's retries that are due (``XCLAIM`` from ``callcast:retry``), then the deliveries of
  subscribers that vanished (below), then new entries of the direct stream, then of the topic stream
  (``XREADGROUP ... COUNT <free prefetch> ... >``). When there is nothing, the subscriber blocks in
  ``XREADGROUP ... COUNT <free prefetch> BLOCK <ms> STREAMS <direct> <topic> > >`` on a connection of
  its own (so waiting never starves publishes and acks), at most ``poll`` seconds or until its group's
  next retry is due: an entry published meanwhile is claimed and delivered by that one reply. A nack
  or close on this connection ends the wait early with ``CLIENT UNBLOCK`` (which makes it return as if
  it had timed out, claiming nothing; where ACLs forbid it, the wait runs out). Entries are fetched only
  when ``__anext__`` asks and there is free prefetch, so nothing is fetched ahead of the prefetch bound,
  with one exception: the blocking read counts per stream, so when entries reach both streams at once
  it can claim more than the free prefetch; the surplus is given back at once (due now, its delivery
  count taken back). The take script runs again at the latest after ``poll`` seconds or when the
  group's next retry is due, at once after a nack or a failure here; in between, only new entries
  can have come, and a subscriber goes straight to its blocking read, which returns those at once.
* **Competing consumers** are the consumer group's: each ``XREADGROUP`` entry goes to one consumer.
* **Ack** is ``XACK``, **nack** moves the pending entry to the ``callcast:retry`` consumer with
  ``XCLAIM ... JUSTID`` (its delivery count unchanged) and adds it to the group's ``:retry`` sorted set,
  due after ``delay`` seconds by Redis's clock. Both only act on an entry this subscriber still owns (so a
  late ack of a delivery that was reclaimed meanwhile changes nothing, even once this subscriber holds a
  newer delivery of the entry). Acks and nacks of concurrent tasks are sent together: every settle
  waiting while one round trip is in flight goes in the next one.
  A **delayed retry** lives in Redis (the pending entry and the sorted set), survives the subscriber's
  process and a server restart (where durable), and comes back only to its group, to whichever subscriber
  takes next once it is due. Subscribers of this connection are woken at once by a nack; subscribers of
  other processes notice it within ``poll`` seconds.
* **Attempt** is Redis's delivery counter of the pending entry: 1 for ``XREADGROUP``, +1 for each
  ``XCLAIM`` that hands it out again (retry or reclaim). ``RETRYCOUNT`` is used only to take back a count
  for an entry that was fetched but never handed out (given back on close, or after a take whose reply
  was lost), so such entries are no attempt. An entry a *killed* subscriber had fetched but not yet
  handed out keeps its count (the buffer never exceeds the free prefetch; ``holding`` knew of it).
* **Leases, dead subscribers**: every ``lease``/3 seconds a subscriber resets the idle time of what it
  holds, deliveries whose settle is not yet written included (``XCLAIM <own consumer> 0 ... JUSTID`` on
  entries it still owns). Entries of another consumer that were idle for a lease are claimed
  (``XPENDING ... IDLE <lease>`` per consumer, then ``XCLAIM ... <lease>``) by a subscriber taking work,
  at most every ``lease``/2 seconds: a killed subscriber's deliveries go to the others after about
  ``lease`` seconds, counted as a new attempt. The lease waited is the longer of the claimer's and
  the holder's (from its consumer name), so processes configured with different leases never take
  each other's live deliveries.
* **Close** gives every pending entry of the subscriber back to the group at once (moved to
  ``callcast:retry``, due now; handed-out ones keep their count, fetched-ahead ones lose it), then
  deletes its consumer. Acks and nacks after close are ignored.
* **Per-key order** is not guaranteed (``ordered_per_key`` is False): competing consumers may hold
  several entries of one key at once; callcast's ordering gate keeps the order above the seam.
* **Ephemeral** subscriptions create their group with ``$`` like any other, register it in
  ``<prefix>::ephemeral`` and heartbeat it every ``lease``/3 seconds; ``close`` destroys the consumer
  group, the direct stream and the retry set (and the topic stream if no group is left). A group whose
  process died without closing is destroyed by any connection's housekeeping once its heartbeat is
  ``max(60, 6 × lease)`` seconds old.
* **Trimming**: every ``lease`` seconds each connection trims the streams its subscriptions read with
  ``XTRIM MINID`` up to the oldest entry some group still needs (its oldest pending entry, or the last one
  it was given), and deletes consumers with nothing pending that were idle for two leases. Entries no
  group needs are the only ones removed; a durable group that nobody reads keeps its entries.
* **Reconnect**: commands are not retried by the client (a retried script could run twice); each call
  takes a pooled connection that is reconnected if the server closed it. Subscriptions survive a server
  that goes away: they retry with a growing pause (up to 1 s), give back what a failed call may have
  claimed for them, and re-create their group if the server lost it (no persistence). Publishes while the
  server is down raise :class:`~callcast.exceptions.PublishError` (nothing returns unless stored).
* Every driver exception is translated into the :class:`~callcast.exceptions.TransportError` tree;
  messages carry the URL with its password redacted, never the password.

URL options (query string)
--------------------------
``prefix``           key prefix (default ``callcast``)
``lease``            seconds before a vanished subscriber's deliveries go to others (default 10)
``poll``             longest wait, in seconds, before a waiting subscriber looks for retries and
                     reclaimable deliveries made by other processes (default 1)
``durable``          ``auto`` (default: decided from the server's config) or ``require``
``connect_timeout``  seconds to open a connection (default 5)
``timeout``          seconds to wait for the reply of a command (default 10; a subscriber's wait for
                     new entries is bounded by ``poll`` instead)
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (``none|optional|required``)
                     TLS settings, ``rediss://`` only
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import socket
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from callcast import alarms
from callcast.brokers import port_of, redact, scrub, seconds_option
from callcast.brokers.closing import CloseOnce
from callcast.envelope import Envelope, decode_or_quarantine, structured_or_quarantine, to_structured
from callcast.exceptions import BrokerUnavailableError, ConfigurationError, PublishError, TransportError
from callcast.transport import Capabilities, Delivery, Holding
from callcast.waiting import wait_event

CAPABILITIES = Capabilities(
    durable=False,  # True per connection, when the server's config makes every accepted write durable
    shared=True,
    delayed_nack=True,
    delivery_count=True,
    ordered_per_key=False,
    request_reply=False,
    replays_history=False,
)
"""What every Redis connection guarantees; ``connect()`` sets ``durable`` from the server's config."""

PARKED = "callcast:retry"
"""The consumer that holds nacked deliveries while they wait for their retry."""

MIN_VERSION = (6, 2)
_DATA = b"data"
_EVENT = b"event"
_MAX_DELAY_MS = 10 * 365 * 24 * 3600 * 1000.0
_MAX_TAKE = 500  # entries per take script (Lua's unpack has a limit)
_UNBLOCK_TRIES = 5
_OPTIONS = ("prefix", "lease", "poll", "durable", "connect_timeout", "timeout")
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")

log = logging.getLogger("callcast.brokers.redis")


def _client_identity() -> dict[str, Any]:
    """The connection options that name the client to the server (``CLIENT SETINFO``), built once.

    Left to itself, redis-py 7.2 and later build that identity for every new connection, reading its own
    package metadata from disk (~0.6 ms): on the event loop, so a pool that grows under load stalls
    the loop, which makes the pool grow further (a publish burst went from 0.3 ms to 180 ms and ran
    out of connections). Built once here, and naming callcast as the upstream driver, it costs
    nothing per connection. Older redis-py versions compute their defaults once and need nothing.
    """
    try:
        from redis.driver_info import DriverInfo
    except ImportError:
        return {}
    from callcast import __version__

    return {"driver_info": DriverInfo().add_upstream_driver("callcast", __version__)}


COMMAND_CONNECTIONS = 32
"""Connections for commands (publish, settle, claim); each subscription's blocking reads have a
connection of their own."""
_CLIENT_IDENTITY = _client_identity()


# -- the URL ------------------------------------------------------------------------------------


_DEFAULT_PREFIX = "callcast"
_DEFAULT_LEASE = 10.0
_DEFAULT_POLL = 1.0
_DEFAULT_CONNECT_TIMEOUT = 5.0
_DEFAULT_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class RedisOptions:
    """The callcast options of a ``redis://`` URL (its query string)."""

    prefix: str = _DEFAULT_PREFIX
    lease: float = _DEFAULT_LEASE
    poll: float = _DEFAULT_POLL
    durable: str = "auto"
    connect_timeout: float = _DEFAULT_CONNECT_TIMEOUT
    timeout: float = _DEFAULT_TIMEOUT
    tls: tuple[tuple[str, str], ...] = ()


def parse_url(url: str) -> tuple[str, RedisOptions]:
    """The URL redis-py connects to (no query) and the callcast options; :class:`ConfigurationError`
    naming the problem (with the password redacted) if the URL cannot be honoured."""
    shown = redact(url)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigurationError(f"not a redis URL: {shown!r}")
    port_of("redis", url)
    database = parts.path.lstrip("/")
    if database and not database.isdigit():
        raise ConfigurationError(f"redis broker: the path names the database number (/0), got {shown!r}")
    raw = {key: values[-1] for key, values in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = sorted(set(raw) - set(_OPTIONS) - set(_TLS_OPTIONS))
    if unknown:
        raise ConfigurationError(
            f"redis broker: unknown option(s) {', '.join(unknown)} in {shown!r}; "
            f"the options are {', '.join(_OPTIONS + _TLS_OPTIONS)}"
        )
    tls = tuple((name, raw[name]) for name in _TLS_OPTIONS if name in raw)
    if tls and parts.scheme != "rediss":
        raise ConfigurationError(f"redis broker: TLS options need a rediss:// URL, got {shown!r}")
    if dict(tls).get("ssl_cert_reqs", "required") not in ("none", "optional", "required"):
        raise ConfigurationError("redis broker: ssl_cert_reqs must be none|optional|required")
    prefix = raw.get("prefix", _DEFAULT_PREFIX)
    if not prefix or any(ch.isspace() for ch in prefix):
        raise ConfigurationError("redis broker: prefix must be a non-empty name without spaces")
    durable = raw.get("durable", "auto")
    if durable not in ("auto", "require"):
        raise ConfigurationError(f"redis broker: durable must be auto|require, got {durable!r}")
    options = RedisOptions(
        prefix=prefix,
        lease=seconds_option("redis", raw, "lease", _DEFAULT_LEASE),
        poll=seconds_option("redis", raw, "poll", _DEFAULT_POLL),
        durable=durable,
        connect_timeout=seconds_option("redis", raw, "connect_timeout", _DEFAULT_CONNECT_TIMEOUT),
        timeout=seconds_option("redis", raw, "timeout", _DEFAULT_TIMEOUT),
        tls=tls,
    )
    return urlunsplit(parts._replace(query="", fragment="")), options


def _escape(name: str) -> str:
    return name.replace("%", "%25").replace(":", "%3A")


@dataclasses.dataclass(frozen=True, slots=True)
class _Keys:
    """The Redis keys of one group on one topic."""

    topic: str
    direct: str
    retry: str
    group: str
    member: str  # in the ephemeral registry

    @property
    def script_keys(self) -> list[str]:
        """The KEYS of the take, settle and release scripts."""
        return [self.topic, self.direct, self.retry]


# -- the Lua scripts ------------------------------------------------------------------------------

_LUA_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function id_parts(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local function id_less(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  if am ~= bm then return am < bm end
  return as < bs
end
local function as_map(flat)
  local map = {}
  for i = 1, #flat, 2 do map[flat[i]] = flat[i + 1] end
  return map
end
local function mine(key, group, consumer)
  local all, start = {}, '-'
  while true do
    local page = redis.call('XPENDING', key, group, start, '+', 1000, consumer)
    for _, p in ipairs(page) do all[#all + 1] = p end
    if #page < 1000 then return all end
    start = '(' .. page[#page][1]
  end
end
local function in_chunks(ids, f)
  for i = 1, #ids, 500 do f({unpack(ids, i, math.min(i + 499, #ids))}) end
end
local function drop(topic_key, direct_key, retry_key, group)
  if redis.call('EXISTS', topic_key) == 1 then
    redis.call('XGROUP', 'DESTROY', topic_key, group)
    if #redis.call('XINFO', 'GROUPS', topic_key) == 0 then redis.call('DEL', topic_key) end
  end
  redis.call('DEL', direct_key, retry_key)
end
"""

# KEYS: topic stream, direct stream, ephemeral registry. ARGV: group, registry member ('' if durable).
_DECLARE = """
for _, key in ipairs({KEYS[1], KEYS[2]}) do
  local created = redis.pcall('XGROUP', 'CREATE', key, ARGV[1], '$', 'MKSTREAM')
  if type(created) == 'table' and created.err and not string.find(created.err, 'BUSYGROUP', 1, true) then
    return redis.error_reply(created.err)
  end
end
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[3], now_ms(), ARGV[2]) end
return 1
"""

# KEYS: topic stream, direct stream, retry set.
# ARGV: group, consumer, room, lease (ms), reclaim ('1'/'0'), parked consumer.
# Returns 'missing', {entries} or {{}, ms until the next retry is due (-1: none)};
# an entry is {tag, id, delivery count, fields}.
_TAKE = """
local keys = {t = KEYS[1], d = KEYS[2]}
local group, me, room = ARGV[1], ARGV[2], tonumber(ARGV[3])
local lease, reclaim, parked = tonumber(ARGV[4]), ARGV[5] == '1', ARGV[6]
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[2]) == 0 then return 'missing' end
local now = now_ms()
local out = {}

local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'WITHSCORES', 'LIMIT', 0, room)
local tokens = {}
for i = 1, #due, 2 do tokens[#tokens + 1] = {due[i], tonumber(due[i + 1])} end
table.sort(tokens, function(a, b)
  if a[2] ~= b[2] then return a[2] < b[2] end
  return id_less(string.sub(a[1], 3), string.sub(b[1], 3))
end)
for _, item in ipairs(tokens) do
  local token = item[1]
  redis.call('ZREM', KEYS[3], token)
  local tag, id = string.sub(token, 1, 1), string.sub(token, 3)
  local key = keys[tag]
  if key then
    local p = redis.call('XPENDING', key, group, id, id, 1)[1]
    if p and p[2] == parked then
      local e = redis.call('XCLAIM', key, group, me, 0, id)[1]
      if e then out[#out + 1] = {tag, id, p[4] + 1, e[2]} end
    end
  end
end

if reclaim then
  for _, tag in ipairs({'d', 't'}) do
    local key = keys[tag]
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', key, group)) do
      if #out >= room then break end
      local info = as_map(c)
      local name = info['name']
      if tonumber(info['pending']) > 0 and name ~= me and name ~= parked then
        local idle = math.max(lease, tonumber(string.match(name, '~(%d+)$')) or 0)  -- the holder's lease too
        local stale = redis.call('XPENDING', key, group, 'IDLE', idle, '-', '+', room - #out, name)
        if #stale > 0 then
          local ids, counts = {}, {}
          for _, p in ipairs(stale) do
            ids[#ids + 1] = p[1]
            counts[p[1]] = p[4]
          end
          for _, e in ipairs(redis.call('XCLAIM', key, group, me, idle, unpack(ids))) do
            if e then out[#out + 1] = {tag, e[1], counts[e[1]] + 1, e[2]} end
          end
        end
      end
    end
  end
end

for _, tag in ipairs({'d', 't'}) do
  if #out < room then
    local got = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', room - #out, 'STREAMS', keys[tag], '>')
    if got then
      for _, e in ipairs(got[1][2]) do out[#out + 1] = {tag, e[1], 1, e[2]} end
    end
  end
end
if #out > 0 then return {out} end

local next_due = -1
local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if first[2] then next_due = math.max(0, math.ceil(tonumber(first[2]) - now)) + 1 end
return {out, next_due}
"""

# KEYS: topic stream, direct stream, retry set.
# ARGV: group, consumer, parked consumer, then (token, delay in ms) pairs; a negative delay is an ack.
_SETTLE = """
local keys = {t = KEYS[1], d = KEYS[2]}
local group, me, parked = ARGV[1], ARGV[2], ARGV[3]
local now = now_ms()
local acks = {t = {}, d = {}}
local exists = {t = redis.call('EXISTS', KEYS[1]) == 1, d = redis.call('EXISTS', KEYS[2]) == 1}
local nacked = 0
for i = 4, #ARGV, 2 do
  local token, delay = ARGV[i], tonumber(ARGV[i + 1])
  local tag, id = string.sub(token, 1, 1), string.sub(token, 3)
  if exists[tag] then
    local p = redis.call('XPENDING', keys[tag], group, id, id, 1)[1]
    if p and p[2] == me then
      if delay < 0 then
        acks[tag][#acks[tag] + 1] = id
      else
        redis.call('ZADD', KEYS[3], now + delay, token)
        redis.call('XCLAIM', keys[tag], group, parked, 0, id, 'JUSTID')
        nacked = nacked + 1
      end
    end
  end
end
for tag, ids in pairs(acks) do
  in_chunks(ids, function(chunk) redis.call('XACK', keys[tag], group, unpack(chunk)) end)
end
return nacked
"""

# KEYS: topic stream, direct stream, retry set.
# ARGV: group, consumer, parked consumer, close ('1': also delete the consumer), then (token, kind)
# pairs: kind 'k' = still held, leave it; 'h' = handed out, its count stays. Every other pending entry
# of the consumer was fetched but never handed out: its count is taken back. All go back, due now.
_RELEASE = """
local keys = {t = KEYS[1], d = KEYS[2]}
local group, me, parked, close = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1'
local kinds = {}
for i = 5, #ARGV, 2 do kinds[ARGV[i]] = ARGV[i + 1] end
local now = now_ms()
local released = 0
for _, tag in ipairs({'t', 'd'}) do
  local key = keys[tag]
  if redis.call('EXISTS', key) == 1 then
    for _, p in ipairs(mine(key, group, me)) do
      local token = tag .. ':' .. p[1]
      local kind = kinds[token]
      if kind ~= 'k' then
        local count = p[4]
        if kind ~= 'h' then count = math.max(0, count - 1) end
        redis.call('ZADD', KEYS[3], now, token)
        redis.call('XCLAIM', key, group, parked, 0, p[1], 'RETRYCOUNT', count, 'JUSTID')
        released = released + 1
      end
    end
    if close then redis.call('XGROUP', 'DELCONSUMER', key, group, me) end
  end
end
return released
"""

# KEYS: topic stream, direct stream, ephemeral registry.
# ARGV: group, consumer, registry member ('' if durable), then the tokens the subscriber holds.
_REFRESH = """
local keys = {t = KEYS[1], d = KEYS[2]}
local group, me = ARGV[1], ARGV[2]
local held = {}
for i = 4, #ARGV do held[ARGV[i]] = true end
if #ARGV >= 4 then
  for _, tag in ipairs({'t', 'd'}) do
    local key = keys[tag]
    if redis.call('EXISTS', key) == 1 then
      local ids = {}
      for _, p in ipairs(mine(key, group, me)) do
        if held[tag .. ':' .. p[1]] then ids[#ids + 1] = p[1] end
      end
      in_chunks(ids, function(chunk)
        local args = {'XCLAIM', key, group, me, 0}
        for _, id in ipairs(chunk) do args[#args + 1] = id end
        args[#args + 1] = 'JUSTID'
        redis.call(unpack(args))
      end)
    end
  end
end
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[3], 'XX', now_ms(), ARGV[3]) end
return 1
"""

# KEYS: a stream. ARGV: idle time (ms) after which a consumer with nothing pending is deleted.
_TRIM = """
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return 0 end
local groups = redis.call('XINFO', 'GROUPS', key)
if #groups == 0 then
  redis.call('DEL', key)
  return 0
end
local keep = nil
for _, g in ipairs(groups) do
  local info = as_map(g)
  local candidate
  if tonumber(info['pending']) > 0 then
    candidate = redis.call('XPENDING', key, info['name'])[2]  -- its oldest pending entry stays
  else  -- everything up to the last entry it was given is done with: the next id stays
    local last = info['last-delivered-id']
    local dash = string.find(last, '-', 1, true)
    candidate = string.sub(last, 1, dash) .. string.format('%d', tonumber(string.sub(last, dash + 1)) + 1)
  end
  if keep == nil or id_less(candidate, keep) then keep = candidate end
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', key, info['name'])) do
    local consumer = as_map(c)
    if tonumber(consumer['pending']) == 0 and tonumber(consumer['idle']) > tonumber(ARGV[1]) then
      redis.call('XGROUP', 'DELCONSUMER', key, info['name'], consumer['name'])
    end
  end
end
return redis.call('XTRIM', key, 'MINID', keep)
"""

# KEYS: topic stream, direct stream, retry set, ephemeral registry. ARGV: group, registry member.
_DROP = """
drop(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[2])
return 1
"""

# KEYS: ephemeral registry. ARGV: key prefix, heartbeat age (ms) after which a group is dead.
_COLLECT = """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms() - tonumber(ARGV[2]), 'LIMIT', 0, 100)
for _, member in ipairs(dead) do
  local sep = string.find(member, ':', 1, true)
  if sep then
    local topic_key = ARGV[1] .. ':' .. string.sub(member, 1, sep - 1)
    local escaped = string.sub(member, sep + 1)
    local group = string.gsub(escaped, '%%(%x%x)', function(h) return string.char(tonumber(h, 16)) end)
    drop(topic_key, topic_key .. ':' .. escaped .. ':direct', topic_key .. ':' .. escaped .. ':retry', group)
  end
  redis.call('ZREM', KEYS[1], member)
end
return #dead
"""


class _Script:
    def __init__(self, name: str, body: str) -> None:
        self.name = name
        self.source = _LUA_COMMON + body
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


_SCRIPTS = {
    script.name: script
    for script in (
        _Script("declare", _DECLARE),
        _Script("take", _TAKE),
        _Script("settle", _SETTLE),
        _Script("release", _RELEASE),
        _Script("refresh", _REFRESH),
        _Script("trim", _TRIM),
        _Script("drop", _DROP),
        _Script("collect", _COLLECT),
    )
}

_Call = tuple[_Script, Sequence[str], Sequence[str | int | float]]


_Entry = tuple[str, int, list[bytes]]  # token, delivery count, fields


@dataclasses.dataclass(slots=True)
class _Taken:
    entries: list[_Entry]
    next_due: float | None = None  # seconds until the group's next retry is due


# -- the broker -----------------------------------------------------------------------------------


class RedisBroker:
    """Redis Streams. Build with :func:`callcast.brokers.connect` (``redis://host:6379/0``)."""

    capabilities: Capabilities

    def __init__(self, url: str = "redis://127.0.0.1:6379/0") -> None:
        self._target, self.options = parse_url(url)
        self.url = redact(url)
        self.capabilities = CAPABILITIES
        self.lease = self.options.lease
        self.poll = self.options.poll
        self.registry = f"{self.options.prefix}::ephemeral"
        self._redis: aioredis.Redis | None = None
        # Never lends connections: it makes each subscription's own reading connection.
        self._reader_pool: aioredis.ConnectionPool | None = None
        self._pools: list[aioredis.ConnectionPool] = []
        self._unblocking: set[asyncio.Task[None]] = set()
        self._unblock_refused = False
        self._subscriptions: set[_RedisSubscription] = set()
        self._settles: list[tuple[_RedisSubscription, str, float, asyncio.Future[None]]] = []
        self._settling: asyncio.Task[None] | None = None
        self._housekeeping_task: asyncio.Task[None] | None = None
        self._closing = False  # close() began: subscribe refuses, or closes what it opened
        self._close_once = CloseOnce()
        self._closed = False

    # -- plumbing -------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection pools, check the server, load the scripts, decide ``durable``."""
        options = self.options
        common: dict[str, Any] = {
            "protocol": 2,
            "retry": Retry(NoBackoff(), 0),
            "socket_connect_timeout": options.connect_timeout,
            **_CLIENT_IDENTITY,
        }
        for name, value in options.tls:
            common[name] = value
        try:
            # Commands wait (up to the timeout) for a free connection rather than fail when many
            # handlers settle or publish at once.
            pool = aioredis.BlockingConnectionPool.from_url(
                self._target,
                socket_timeout=options.timeout,
                max_connections=COMMAND_CONNECTIONS,
                timeout=options.timeout,
                **common,
            )
            reader_pool = aioredis.ConnectionPool.from_url(self._target, socket_timeout=None, **common)
        except (ValueError, TypeError) as error:
            raise ConfigurationError(f"redis broker: cannot use {self.url!r}: {self._scrub(error)}") from None
        self._pools = [pool, reader_pool]
        self._redis = aioredis.Redis(connection_pool=pool)
        self._reader_pool = reader_pool
        try:
            with self._translate("connect"):
                try:
                    server = await self._redis.info("server")
                except NoPermissionError:  # ACLs forbid INFO: the version goes unchecked
                    server = {}
                version = tuple(int(part) for part in str(server.get("redis_version", "99.0")).split(".")[:2])
                if version < MIN_VERSION:
                    raise ConfigurationError(
                        f"redis broker at {self.url}: needs Redis {'.'.join(map(str, MIN_VERSION))} or "
                        f"later, the server is {server.get('redis_version')}"
                    )
                durable, why = await self._server_durability()
                for script in _SCRIPTS.values():
                    await self._redis.script_load(script.source)
            if options.durable == "require" and not durable:
                raise ConfigurationError(f"redis broker at {self.url}: durable=require, but {why}")
        except BaseException:
            await self._dispose()
            raise
        self.capabilities = dataclasses.replace(CAPABILITIES, durable=durable)
        self._housekeeping_task = asyncio.create_task(
            self._housekeeping(), name="callcast-redis-housekeeping"
        )

    async def _server_durability(self) -> tuple[bool, str]:
        """Whether an accepted write survives a crash of every process and a restart, and why not."""
        assert self._redis is not None
        try:
            config = await self._redis.config_get("appendonly", "appendfsync", "maxmemory-policy")
        except ResponseError:
            return False, "CONFIG GET is not allowed, so the server's persistence is unknown"
        appendonly = str(config.get("appendonly", "")).lower()
        appendfsync = str(config.get("appendfsync", "")).lower()
        policy = str(config.get("maxmemory-policy", "")).lower()
        if appendonly != "yes":
            return False, "the server runs without the append-only file (appendonly no)"
        if appendfsync != "always":
            return False, f"the server fsyncs its append-only file {appendfsync!r}, not 'always'"
        if policy != "noeviction" and not policy.startswith("volatile-"):
            return False, f"the server may evict keys (maxmemory-policy {policy})"
        return True, ""

    async def _dispose(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
        for pool in self._pools:
            with contextlib.suppress(Exception):
                await pool.aclose()

    def _scrub(self, error: BaseException) -> str:
        """``error`` as text, without the URL's password (:func:`~callcast.brokers.scrub`)."""
        return scrub(str(error) or type(error).__name__, self._target)

    @contextlib.contextmanager
    def _translate(
        self,
        action: str,
        failure: type[TransportError] = TransportError,
        lost: type[TransportError] | None = None,
    ) -> Iterator[None]:
        """Driver exceptions → :mod:`callcast.exceptions`: a lost connection is ``lost``
        (default :class:`BrokerUnavailableError`), any other failure ``failure``."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as error:
            raise (lost or BrokerUnavailableError)(
                f"redis broker {self.url}: {action}: {self._scrub(error)}"
            ) from None
        except RedisError as error:
            raise failure(f"redis broker {self.url}: {action}: {self._scrub(error)}") from None

    def _client(self) -> aioredis.Redis:
        if self._closed or self._redis is None:
            raise BrokerUnavailableError(f"redis broker {self.url} is closed")
        return self._redis

    def keys(self, topic: str, group: str) -> _Keys:
        """The keys of ``group`` on ``topic`` (see the module's documentation)."""
        topic_key = f"{self.options.prefix}:{_escape(topic)}"
        escaped = _escape(group)
        return _Keys(
            topic=topic_key,
            direct=f"{topic_key}:{escaped}:direct",
            retry=f"{topic_key}:{escaped}:retry",
            group=group,
            member=f"{_escape(topic)}:{escaped}",
        )

    async def _script(self, script: _Script, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        client = self._client()
        try:
            return await client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:  # the server restarted (or its scripts were flushed)
            await client.script_load(script.source)
            return await client.evalsha(script.sha, len(keys), *keys, *args)

    async def _scripts(self, calls: Sequence[_Call]) -> list[Any]:
        """Run ``calls`` in one round trip; each result is the script's reply or its error."""
        client = self._client()
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(2):
            pipe = client.pipeline(transaction=False)
            for index in todo:
                script, keys, args = calls[index]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies = await pipe.execute(raise_on_error=False)
            missing = []
            for index, reply in zip(todo, replies, strict=True):
                results[index] = reply
                if isinstance(reply, NoScriptError):
                    missing.append(index)
            if not missing:
                break
            for script in {calls[index][0].name: calls[index][0] for index in missing}.values():
                await client.script_load(script.source)
            todo = missing
        return results

    # -- the seam -------------------------------------------------------------------------------

    async def publish(self, topic: str, envelopes: Sequence[Envelope], *, group: str | None = None) -> None:
        client = self._client()
        if not envelopes:
            return
        key = self.keys(topic, group).direct if group is not None else self.keys(topic, "").topic
        with self._translate(f"publish to {topic!r} not confirmed", PublishError, PublishError):
            pipe = client.pipeline(transaction=False)
            for envelope in envelopes:
                pipe.xadd(key, {_EVENT: to_structured(envelope)}, nomkstream=True)
            await pipe.execute()

    async def declare(self, topic: str, group: str) -> None:
        self._client()
        await self._declare(self.keys(topic, group), ephemeral=False)

    async def _declare(self, keys: _Keys, *, ephemeral: bool) -> None:
        with self._translate(f"declare group {keys.group!r}"):
            await self._script(
                _SCRIPTS["declare"],
                [keys.topic, keys.direct, self.registry],
                [keys.group, keys.member if ephemeral else ""],
            )

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        prefetch: int = 32,
        ephemeral: bool = False,
        holding: Holding | None = None,
    ) -> _RedisSubscription:
        if self._closing:
            raise BrokerUnavailableError(f"redis broker {self.url} is closed")
        self._client()
        keys = self.keys(topic, group)
        await self._declare(keys, ephemeral=ephemeral)
        if self._closing:  # close() began meanwhile: it would not see this subscription
            if ephemeral:
                with contextlib.suppress(TransportError):
                    await self._drop(keys)
            raise BrokerUnavailableError(f"redis broker {self.url} is closed")
        subscription = _RedisSubscription(self, topic, keys, max(1, prefetch), ephemeral, holding)
        self._subscriptions.add(subscription)
        return subscription

    async def close(self) -> None:
        self._closing = True
        await self._close_once.run(self._shutdown)

    async def _shutdown(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.close()
        if self._settling is not None:
            with contextlib.suppress(Exception):
                await self._settling
        if self._unblocking:
            await asyncio.wait(self._unblocking)
        self._closed = True
        if self._housekeeping_task is not None:
            self._housekeeping_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping_task
        await self._dispose()

    # -- subscriber operations ------------------------------------------------------------------

    async def _take(self, subscription: _RedisSubscription, room: int, reclaim: bool) -> _Taken | None:
        """Up to ``room`` deliveries for ``subscription``; ``None`` if its group is gone from the server."""
        keys = subscription.keys
        with self._translate(f"take from {subscription.topic!r}/{keys.group!r}"):
            try:
                reply = await self._script(
                    _SCRIPTS["take"],
                    keys.script_keys,
                    [
                        keys.group,
                        subscription.consumer,
                        room,
                        max(1, round(self.lease * 1000)),
                        int(reclaim),
                        PARKED,
                    ],
                )
            except ResponseError as error:
                if "NOGROUP" in str(error) or "no such key" in str(error):
                    return None
                raise
        if reply == b"missing":
            return None
        taken = _Taken(
            [(f"{tag.decode()}:{id_.decode()}", int(count), fields) for tag, id_, count, fields in reply[0]]
        )
        if len(reply) > 1:
            taken.next_due = None if int(reply[1]) < 0 else int(reply[1]) / 1000
        return taken

    async def _read_new(self, subscription: _RedisSubscription, room: int, timeout: float) -> list[_Entry]:
        """Wait up to ``timeout`` seconds for entries published to the group after those it was given, and
        claim up to ``room`` of each stream (``XREADGROUP ... BLOCK``), on the subscription's own
        connection. Returns early, with nothing, when :meth:`_unblock` interrupts it. If this raises or
        is cancelled, entries may have been claimed that the caller never saw."""
        if self._closed or self._reader_pool is None:
            raise BrokerUnavailableError(f"redis broker {self.url} is closed")
        keys = subscription.keys
        connection = subscription.reader
        if connection is None:
            pool = self._reader_pool
            connection = subscription.reader = pool.connection_class(**pool.connection_kwargs)
        try:
            # The alarm keeps an outside cancellation a cancellation.
            with (
                self._translate(f"read from {subscription.topic!r}/{keys.group!r}"),
                alarms.timeout(timeout + self.options.timeout),
            ):
                if subscription.reader_id is None:
                    await connection.connect()  # type: ignore[no-untyped-call]
                    await connection.send_command("CLIENT", "ID")
                    try:
                        subscription.reader_id = int(await connection.read_response())
                    except ResponseError:  # ACLs forbid it: nothing will interrupt the reads
                        subscription.reader_id = 0
                if subscription.interrupted:
                    return []
                await connection.send_command(
                    "XREADGROUP", "GROUP", keys.group, subscription.consumer, "COUNT", room,
                    "BLOCK", max(1, round(timeout * 1000)), "STREAMS", keys.direct, keys.topic, ">", ">",
                )  # fmt: skip
                subscription.blocked = True
                if subscription.interrupted:  # woken while the command was written
                    self._unblock(subscription)
                reply = await connection.read_response()
        except BaseException:
            subscription.reader_id = None
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
            raise
        finally:
            subscription.blocked = False
        entries: list[_Entry] = []
        direct = keys.direct.encode()
        for stream, stream_entries in reply or ():
            tag = "d" if stream == direct else "t"
            entries += [(f"{tag}:{id_.decode()}", 1, fields) for id_, fields in stream_entries]
        return entries

    def _unblock(self, subscription: _RedisSubscription) -> None:
        """End the subscription's blocking read early, if one is under way (``CLIENT UNBLOCK``: the read
        returns as if it had timed out and claims nothing)."""
        reader_id = subscription.reader_id
        if not subscription.blocked or not reader_id or self._closed or self._redis is None:
            return
        client = self._redis

        async def unblock() -> None:
            try:
                with self._translate("interrupt a blocking read"):
                    # The server may not have seen the read yet: try again while it is under way.
                    for _ in range(_UNBLOCK_TRIES):
                        if await client.client_unblock(reader_id) or not subscription.blocked:
                            return
                        await asyncio.sleep(0.001)
            except TransportError as error:  # the read runs out after at most ``poll`` seconds
                log.debug("%s", error)
                if isinstance(error.__context__, NoPermissionError) and not self._unblock_refused:
                    self._unblock_refused = True
                    log.warning(
                        "redis broker %s: CLIENT UNBLOCK is not allowed (ACL): a nack or close here "
                        "reaches this connection's waiting subscribers within poll=%gs, not at once",
                        self.url,
                        self.poll,
                    )

        task = asyncio.create_task(unblock(), name="callcast-redis-unblock")
        self._unblocking.add(task)
        task.add_done_callback(self._unblocking.discard)

    def _queue_settle(
        self, subscription: _RedisSubscription, token: str, delay_ms: float
    ) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._settles.append((subscription, token, delay_ms, future))
        if self._settling is None or self._settling.done():
            self._settling = asyncio.create_task(self._flush_settles(), name="callcast-redis-settle")
        return future

    async def _flush_settles(self) -> None:
        """Send every queued ack and nack, one script per subscription, all in one round trip; what is
        queued meanwhile goes in the next."""
        while self._settles:
            batch, self._settles = self._settles, []
            by_subscription: dict[_RedisSubscription, list[tuple[str, float, asyncio.Future[None]]]] = {}
            for subscription, token, delay_ms, future in batch:
                by_subscription.setdefault(subscription, []).append((token, delay_ms, future))
            calls: list[_Call] = []
            for subscription, items in by_subscription.items():
                args: list[str | int | float] = [subscription.keys.group, subscription.consumer, PARKED]
                for token, delay_ms, _ in items:
                    args += [token, delay_ms]
                calls.append((_SCRIPTS["settle"], subscription.keys.script_keys, args))
            outcomes: list[Any]
            try:
                with self._translate("settle"):
                    outcomes = await self._scripts(calls)
            except TransportError as error:
                outcomes = [error] * len(calls)
            except Exception as error:  # never leave a settle waiting forever
                outcomes = [TransportError(f"redis broker {self.url}: settle: {self._scrub(error)}")] * len(
                    calls
                )
            nudged: set[_Keys] = set()
            for (subscription, items), outcome in zip(by_subscription.items(), outcomes, strict=True):
                subscription.written([token for token, _, _ in items])
                if isinstance(outcome, BaseException):
                    if isinstance(outcome, TransportError):
                        kind, message = type(outcome), str(outcome)
                    else:  # the script failed on the server
                        kind, message = (
                            TransportError,
                            f"redis broker {self.url}: settle: {self._scrub(outcome)}",
                        )
                    for token, _, future in items:
                        subscription.lost(token)  # read by close() too, which waits for this
                        if not future.done():
                            future.set_exception(kind(message))
                    continue
                for _, _, future in items:
                    if not future.done():
                        future.set_result(None)
                if any(delay_ms >= 0 for _, delay_ms, _ in items):
                    nudged.add(subscription.keys)
            for keys in nudged:
                self._nudge(keys)

    def _nudge(self, keys: _Keys) -> None:
        """Wake this connection's subscribers of a group: something was given back to it."""
        for subscription in self._subscriptions:
            if subscription.keys == keys:
                subscription.nudge()

    async def _release(self, subscription: _RedisSubscription, kinds: dict[str, str], *, close: bool) -> None:
        args: list[str | int | float] = [subscription.keys.group, subscription.consumer, PARKED, int(close)]
        for token, kind in kinds.items():
            args += [token, kind]
        with self._translate("give deliveries back"):
            released = await self._script(_SCRIPTS["release"], subscription.keys.script_keys, args)
        if released:
            self._nudge(subscription.keys)

    async def _drop(self, keys: _Keys) -> None:
        with self._translate(f"drop ephemeral group {keys.group!r}"):
            await self._script(
                _SCRIPTS["drop"], [*keys.script_keys, self.registry], [keys.group, keys.member]
            )

    async def _housekeeping(self) -> None:
        """Every lease/3 seconds: keep what the subscribers hold (and ephemeral groups) alive; every
        lease: trim the streams they read, and collect ephemeral groups of dead processes."""
        ticks = 0
        while True:
            await asyncio.sleep(self.lease / 3)
            ticks += 1
            try:
                await self.housekeeping(trim=ticks % 3 == 0)
            except TransportError as error:
                log.debug("redis broker %s: housekeeping failed: %s", self.url, error)
            except Exception:  # keep renewing leases whatever happened
                log.exception("redis broker %s: housekeeping failed", self.url)

    async def housekeeping(self, *, trim: bool = True) -> None:
        """One round of housekeeping (run by the broker on its own; public for tools and tests)."""
        subscriptions = [s for s in self._subscriptions if not s.closed]
        calls: list[_Call] = []
        for subscription in subscriptions:
            held = subscription.held()
            if held or subscription.ephemeral:
                keys = subscription.keys
                calls.append(
                    (
                        _SCRIPTS["refresh"],
                        [keys.topic, keys.direct, self.registry],
                        [
                            keys.group,
                            subscription.consumer,
                            keys.member if subscription.ephemeral else "",
                            *held,
                        ],
                    )
                )
        if trim:
            idle = max(1, round(2 * self.lease * 1000))
            streams = {s.keys.topic for s in subscriptions} | {s.keys.direct for s in subscriptions}
            calls += [(_SCRIPTS["trim"], [stream], [idle]) for stream in sorted(streams)]
            dead_after = max(60_000, round(6 * self.lease * 1000))
            calls.append((_SCRIPTS["collect"], [self.registry], [self.options.prefix, dead_after]))
        if calls:
            with self._translate("housekeeping"):
                for outcome in await self._scripts(calls):
                    if isinstance(outcome, BaseException):
                        log.debug("redis broker %s: housekeeping: %s", self.url, self._scrub(outcome))


class _RedisSubscription:
    def __init__(
        self,
        broker: RedisBroker,
        topic: str,
        keys: _Keys,
        prefetch: int,
        ephemeral: bool,
        holding: Holding | None,
    ) -> None:
        self.broker = broker
        self.holding = holding
        self.topic = topic
        self.keys = keys
        self.prefetch = prefetch
        self.ephemeral = ephemeral
        lease_ms = max(1, round(broker.lease * 1000))
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}~{lease_ms}"
        self.outstanding: dict[str, _RedisDelivery] = {}  # handed out, not settled
        self.buffer: deque[_RedisDelivery] = deque()  # taken, not yet handed out
        self.closed = False
        self._changed = asyncio.Event()  # replaced on every change: see _notify
        self._wake = asyncio.Event()  # interrupts the pump's wait
        self._nudged = False
        self._recover = False
        self._lost: set[str] = set()  # handed out, but their settle failed
        self._pump_task: asyncio.Task[None] | None = None
        self._unwritten: set[str] = set()  # settles queued and not yet written (or failed)
        self._surplus: list[Envelope] = []  # claimed beyond the free prefetch, not yet given back
        self._all_written = asyncio.Event()
        self._all_written.set()
        self._next_reclaim = 0.0
        self._reclaim_every = broker.lease / 2
        self._take_by = 0.0  # when the next take is due at the latest (loop time)
        # The connection of the blocking reads, its CLIENT ID (None: not connected; 0: not known, ACLs
        # forbid asking, so its reads cannot be interrupted), and whether a read is under way.
        self.reader: AbstractConnection | None = None
        self.reader_id: int | None = None
        self.blocked = False

    def __aiter__(self) -> _RedisSubscription:
        return self

    async def __anext__(self) -> Delivery:
        while not self.closed:
            if self.buffer and len(self.outstanding) < self.prefetch:
                delivery = self.buffer.popleft()
                self.outstanding[delivery.token] = delivery
                return delivery
            changed = self._changed
            pump = self._pump_task
            if pump is not None and pump.done():
                self._pump_task = None
                error = None if pump.cancelled() else pump.exception()
                if error is not None:
                    raise TransportError(
                        f"redis broker {self.broker.url}: {self.topic!r}: taking failed: {error}"
                    )
            if self._room() > 0 and self._pump_task is None:
                self._pump_task = asyncio.create_task(self._pump(), name="callcast-redis-take")
            await changed.wait()  # cancelling this wait loses nothing: the pump fills the buffer
        raise StopAsyncIteration

    def _room(self) -> int:
        return min(_MAX_TAKE, self.prefetch - len(self.outstanding) - len(self.buffer))

    def _notify(self) -> None:
        # Set the event the waiters hold and give later ones a fresh one, so no wake-up is lost.
        self._changed.set()
        self._changed = asyncio.Event()

    def nudge(self) -> None:
        self._nudged = True
        self._wake.set()
        self.broker._unblock(self)

    @property
    def interrupted(self) -> bool:
        """Whether a nack or close asked the current take or read to end."""
        return self._wake.is_set()

    def held(self) -> list[str]:
        """The tokens of the entries this subscriber keeps (renewed by housekeeping): handed out, fetched
        ahead, and those whose settle is queued but not yet written (until it is, the entry is ours)."""
        return [*self.outstanding, *(delivery.token for delivery in self.buffer), *self._unwritten]

    def lost(self, token: str) -> None:
        """A settle of ``token`` failed: the entry may still be ours on the server."""
        self._lost.add(token)
        self._recover = True

    async def _pump(self) -> None:
        """Take deliveries into the buffer, waiting for them as long as needed; ends once some were
        taken, the prefetch is used up, or the subscription closed.

        A take (the script) runs when a nack or close here asked for one, after a failure, when
        reclaiming is due, and at least every ``poll`` seconds or when the group's next retry is due;
        in between, only new entries can have come, and the blocking read fetches those by itself."""
        loop = asyncio.get_running_loop()
        failures = 0
        try:
            while not self.closed:
                room = self._room()
                if room <= 0:
                    return
                must_take = (
                    self._nudged or self._recover or loop.time() >= min(self._take_by, self._next_reclaim)
                )
                self._nudged = False
                self._wake.clear()
                try:
                    if must_take:
                        taken = await self._take(room)
                        if taken is None:  # the server lost the group (restarted without persistence)
                            failures += 1
                            self._recover = True
                            await self.broker._declare(self.keys, ephemeral=self.ephemeral)
                            if failures > 1:
                                await self._pause(failures)
                            continue
                        if taken.entries:
                            self._take_by = 0.0  # more may be due
                            self._fill(taken.entries)
                            return
                        if self._nudged:
                            continue
                        wait = self.broker.poll if taken.next_due is None else taken.next_due
                        self._take_by = loop.time() + min(self.broker.poll, wait)
                    timeout = max(0.001, min(self._take_by, self._next_reclaim) - loop.time())
                    entries = await self.broker._read_new(self, room, timeout)
                except TransportError as error:
                    self._recover = True  # the call may have claimed entries for us: give them back
                    failures += 1
                    if failures == 1:
                        log.warning("%s/%s: %s; retrying", self.topic, self.keys.group, error)
                    await self._pause(failures)
                    continue
                if failures:
                    log.info("%s/%s: taking works again", self.topic, self.keys.group)
                    failures = 0
                if entries:
                    self._fill(entries[:room])
                    if len(entries) > room:  # both streams had entries: the surplus goes back
                        self._hold_surplus(entries[room:])
                        self._recover = True
                        with contextlib.suppress(TransportError):  # if not now, at the next take
                            await self._give_back_unknown()
                    return
        finally:
            self._notify()

    async def _take(self, room: int) -> _Taken | None:
        """Give back what a failed call may have claimed, then run the take script."""
        if self._recover:
            await self._give_back_unknown()
        loop = asyncio.get_running_loop()
        reclaim = loop.time() >= self._next_reclaim
        taken = await self.broker._take(self, room, reclaim)
        if reclaim and taken is not None:
            self._next_reclaim = loop.time() + self._reclaim_every
        return taken

    def _fill(self, entries: list[_Entry]) -> None:
        for token, count, fields in entries:
            delivery = _RedisDelivery(self, token, count, _decode(fields))
            self.buffer.append(delivery)
            if self.holding is not None:
                self.holding.fetched(delivery.envelope)

    async def _give_back_unknown(self) -> None:
        """After a failed call: entries the server may have given us that we do not know go back to the
        group (those fetched, uncounted; those handed out whose settle failed, counted). Those held, and
        those whose settle is on its way, stay, even if a settle of an earlier delivery of the same entry
        failed (the entry was taken again since)."""
        kinds = {token: "k" for token in self.held()}
        kinds.update({token: "h" for token in self._lost if token not in kinds})
        await self.broker._release(self, kinds, close=False)
        self._lost.clear()
        self._recover = False
        self._surplus_returned()

    def _hold_surplus(self, entries: list[_Entry]) -> None:
        """Entries a blocking read claimed beyond the free prefetch: counted by the server until they
        are given back, so ``holding`` hears of them (and of their return)."""
        if self.holding is not None:
            for _, _, fields in entries:
                envelope = _decode(fields)
                self.holding.fetched(envelope)
                self._surplus.append(envelope)

    def _surplus_returned(self) -> None:
        surplus, self._surplus = self._surplus, []
        if self.holding is not None:
            for envelope in surplus:
                self.holding.returned(envelope)

    async def _pause(self, failures: int) -> None:
        await wait_event(self._wake, min(1.0, 0.05 * 2 ** min(failures, 5)))

    async def settle(self, delivery: _RedisDelivery, delay: float | None) -> None:
        """Settle ``delivery`` if it is the one this subscriber holds of its entry: a late settle of an
        older delivery of an entry taken again since (after its lease ran out) does nothing. ``holding``
        hears of the return whatever becomes of the settle: written, failed (the entry is no longer
        renewed and goes back), or its caller cancelled (it is written anyway)."""
        token = delivery.token
        if self.closed or self.outstanding.get(token) is not delivery:
            return
        del self.outstanding[token]
        self._notify()
        delay_ms = -1.0 if delay is None else min(_MAX_DELAY_MS, max(0.0, delay * 1000))
        self._unwritten.add(token)
        self._all_written.clear()
        try:
            # Awaited directly: a cancelled caller cancels only its own future; the settle is written
            # anyway, and close() waits until it is.
            await self.broker._queue_settle(self, token, delay_ms)
        finally:
            if self.holding is not None:
                self.holding.returned(delivery.envelope)

    def written(self, tokens: list[str]) -> None:
        """The queued settles of ``tokens`` were written, or failed."""
        self._unwritten.difference_update(tokens)
        if not self._unwritten:
            self._all_written.set()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.broker._subscriptions.discard(self)
        self._wake.set()
        self.broker._unblock(self)
        self._notify()
        pump = self._pump_task
        if pump is not None and not pump.done():
            # It ends at once unless a take is in flight; what that take returns is given back below.
            done, _ = await asyncio.wait({pump}, timeout=self.broker.options.timeout)
            if not done:
                pump.cancel()
                await asyncio.wait({pump})
        if self._unwritten:
            await wait_event(self._all_written, self.broker.options.timeout)
        # Handed out: unsettled, settle failed, or settle still unwritten after the wait (their count stays).
        kinds = {token: "h" for token in [*self.outstanding, *self._lost, *self._unwritten]}
        returned = [delivery.envelope for delivery in self.buffer]
        self.outstanding.clear()
        self.buffer.clear()
        if self.reader is not None:
            with contextlib.suppress(Exception):
                await self.reader.disconnect()
            self.reader = self.reader_id = None
        try:
            if self.ephemeral:
                await self.broker._drop(self.keys)
            else:
                await self.broker._release(self, kinds, close=True)
        except TransportError as error:
            log.warning(
                "%s/%s: could not give deliveries back on close (they return after the lease): %s",
                self.topic,
                self.keys.group,
                error,
            )
        if self.holding is not None:  # after the release: a kill before it counts them
            for envelope in returned:
                self.holding.returned(envelope)
        self._surplus_returned()


class _RedisDelivery:
    __slots__ = ("_subscription", "attempt", "envelope", "token")

    def __init__(
        self, subscription: _RedisSubscription, token: str, attempt: int, envelope: Envelope
    ) -> None:
        self._subscription = subscription
        self.token = token
        self.attempt = attempt
        self.envelope = envelope

    async def ack(self) -> None:
        await self._subscription.settle(self, None)

    async def nack(self, *, delay: float = 0.0) -> None:
        await self._subscription.settle(self, delay)


def _decode(fields: list[bytes]) -> Envelope:
    """A stream entry's fields as an envelope; anything else as a ``callcast.undecodable`` one."""
    if len(fields) == 2 and fields[0] == _EVENT:
        return structured_or_quarantine(fields[1])
    headers: dict[str, str] = {}
    data = b""
    for name, value in zip(fields[::2], fields[1::2], strict=True):
        if name == _DATA:
            data = value
        else:
            headers[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return decode_or_quarantine(headers, data)
