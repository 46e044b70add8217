"""The ``postgresql://`` broker against the shared conformance suite, plus what only this adapter
has: its URL and options, its tables (readable by other tools), its schema created by processes that
connect at once, driver errors translated at its boundary, and ``LISTEN`` wake-ups that survive a
server restart.

Everything runs against real PostgreSQL servers on 127.0.0.1: the machine's server on port 5432 (each
run in a schema of its own, dropped at teardown), and, for the restart tests, a private server this
module starts (``initdb`` into a temporary directory, a free port) and stops by its data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import pytest

from callcast.brokers import connect
from callcast.brokers import postgres as postgres_module
from callcast.brokers.postgres import PostgresBroker, parse_url
from callcast.envelope import UNDECODABLE_TYPE, Envelope
from callcast.exceptions import BrokerUnavailableError, ConfigurationError, PublishError, TransportError
from callcast.testing import BrokerConformance
from callcast.transport import Broker, Capabilities

from .conftest import next_delivery, require_server

pytestmark = pytest.mark.postgres

HOST = "127.0.0.1"
PORT = 5432
DATABASE = "test"
LEASE = 1.0
POLL = 0.5
PG_BIN = Path("/usr/lib/postgresql/15/bin")


# The servers trust 127.0.0.1, so any password does; one is given so that every test also checks it
# is redacted (the suite's URL check also expects ``:***@`` wherever a URL names a user).
PASSWORD = "not-a-secret"


def server_url(schema: str, *, port: int = PORT, **options: object) -> str:
    query = "&".join(f"{key}={value}" for key, value in {"schema": schema, **options}.items())
    database = DATABASE if port == PORT else "postgres"
    return f"postgresql://postgres:{PASSWORD}@{HOST}:{port}/{database}?{query}"


def new_schema() -> str:
    return f"cc_test_{uuid.uuid4().hex[:12]}"


async def _drop_schemas(port: int, database: str, schemas: list[str]) -> None:
    conn = await asyncpg.connect(host=HOST, port=port, user="postgres", database=database, timeout=10)
    try:
        for schema in schemas:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def schemas() -> Iterator[list[str]]:
    """Schemas created on the shared server by this module's run; all dropped at its end."""
    created: list[str] = []
    yield created
    if created:
        asyncio.run(_drop_schemas(PORT, DATABASE, created))


@pytest.fixture
def schema(schemas: list[str]) -> str:
    """A fresh schema on the shared server (skips, or fails in CI, when the server is down)."""
    require_server("postgresql", PORT)
    name = new_schema()
    schemas.append(name)
    return name


@pytest.fixture(scope="module")
def suite_schema(schemas: list[str]) -> str:
    """One schema for every conformance test of the shared server (the suite's names are unique)."""
    require_server("postgresql", PORT)
    name = new_schema()
    schemas.append(name)
    return name


@contextlib.asynccontextmanager
async def sql(port: int = PORT, database: str = DATABASE) -> AsyncIterator[Any]:
    """A plain connection, as another tool reading callcast's tables would open."""
    conn = await asyncpg.connect(host=HOST, port=port, user="postgres", database=database, timeout=10)
    try:
        yield conn
    finally:
        await conn.close()


async def wait_for_condition(check: Any, timeout: float = 5.0, what: str = "condition") -> None:
    """Wait until ``await check()`` is true, looking every 50 ms; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.05)


def event(data: bytes = b"{}", **extensions: str) -> Envelope:
    return Envelope(type="T", source="/test", data=data, extensions=extensions)


# -- the conformance suite on the shared server -------------------------------------------------------


class TestPostgresBroker(BrokerConformance):
    lease = LEASE

    @pytest.fixture(autouse=True)
    def _schema(self, suite_schema: str) -> None:
        self.url = server_url(suite_schema, lease=f"{LEASE:g}", poll=f"{POLL:g}")

    async def make_broker(self) -> Broker:
        return await connect(self.url)

    def process_url(self) -> str:
        return self.url

    async def test_capabilities(self) -> None:
        """PostgreSQL as a broker: durable, shared by every process that reaches the database, with
        retries delayed and attempts counted in the table, and per-key order across processes."""
        broker = await self.open()
        assert isinstance(broker, PostgresBroker)
        assert broker.capabilities == Capabilities(
            durable=True,
            shared=True,
            delayed_nack=True,
            delivery_count=True,
            ordered_per_key=True,
            request_reply=False,
            replays_history=False,
        )


# -- a private server, for the restart tests ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class PrivateServer:
    """A PostgreSQL server of this test module's own: a temporary data directory and a free port.
    PostgreSQL refuses to run as root, so as root it runs as the ``postgres`` user. Only this
    directory's server is ever stopped (``pg_ctl -D <dir>``)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="callcast-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.running = False
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as_postgres = ["runuser", "-u", "postgres", "--"]

    def _run(self, *command: str) -> None:
        result = subprocess.run(
            [*self._as_postgres, *command], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stdout}{result.stderr}")

    def init(self) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-N")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses={HOST}"
        log = str(self.root / "server.log")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")
        self.running = True

    def stop(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.running = False

    def destroy(self) -> None:
        try:
            if self.running:
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def private_server() -> Iterator[PrivateServer]:
    if not (PG_BIN / "initdb").exists() or (os.geteuid() == 0 and shutil.which("runuser") is None):
        pytest.skip(f"no PostgreSQL server binaries in {PG_BIN} to start a private server")
    server = PrivateServer()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.destroy()


class TestPostgresBrokerPrivateServer(BrokerConformance):
    """The suite's restart test (and this adapter's own) against the private server: the shared one
    is never stopped. The rest of the suite runs against the shared server above (see below)."""

    lease = LEASE
    can_restart = True

    @pytest.fixture(autouse=True)
    def _private(self, private_server: PrivateServer) -> None:
        self.server = private_server
        self.schema = new_schema()  # the whole server is dropped at the end: no cleanup needed
        self.url = server_url(self.schema, port=private_server.port, lease=f"{LEASE:g}", poll=f"{POLL:g}")

    async def make_broker(self) -> Broker:
        return await connect(self.url)

    def process_url(self) -> str:
        return self.url

    async def stop_server(self) -> None:
        await asyncio.to_thread(self.server.stop)

    async def start_server(self) -> None:
        await asyncio.to_thread(self.server.start)

    async def test_waiting_subscribers_and_listen_survive_a_restart(self) -> None:
        """Subscribers waiting in ``__anext__`` while the server restarts neither end nor raise (one
        retries at its poll rate through the outage); afterwards the broker's ``LISTEN`` connection is
        back, so a publish from another connection wakes a subscriber whose fallback poll is set to a
        minute (only a notification can wake it within the deadline)."""
        polling = await self.open()
        listening = await connect(self.url.replace(f"poll={POLL:g}", "poll=60"))
        self._brokers.append(listening)
        assert isinstance(listening, PostgresBroker)
        topic = f"t.{uuid.uuid4().hex}"
        waiting = {
            asyncio.create_task((await polling.subscribe(topic, "polling")).__anext__()),
            asyncio.create_task((await listening.subscribe(topic, "listening")).__anext__()),
        }
        await self.stop_server()
        try:
            done, _ = await asyncio.wait(waiting, timeout=3 * POLL)
            assert not done, "a subscriber ended (or got something) while the server was down"
        finally:
            await self.start_server()

        async def listen_is_back() -> bool:
            conn = listening._listener
            return conn is not None and not conn.is_closed()

        await wait_for_condition(listen_is_back, 10, "the LISTEN connection is re-established")
        publisher = await self.open()
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # the publisher's pool replaces its dropped connection
            try:
                await publisher.publish(topic, [event(b"after")])
                break
            except TransportError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.1)
        delivered = await asyncio.wait_for(asyncio.gather(*waiting), 5)
        assert [d.envelope.data for d in delivered] == [b"after", b"after"]
        for delivery in delivered:
            await delivery.ack()

    async def test_sessions_commit_durably_on_a_server_that_does_not(self) -> None:
        """On a database whose default is ``synchronous_commit = off`` (commits acknowledged before
        they are on disk), the broker's sessions turn it back on: ``durable`` stays true."""
        database = f"nosync_{uuid.uuid4().hex[:8]}"
        async with sql(self.server.port, "postgres") as conn:
            await conn.execute(f"CREATE DATABASE {database}")
            await conn.execute(f"ALTER DATABASE {database} SET synchronous_commit = off")
        url = self.url.replace("/postgres?", f"/{database}?")
        broker = await connect(url)
        self._brokers.append(broker)
        assert isinstance(broker, PostgresBroker)
        async with sql(self.server.port, database) as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == "off"  # what others get
        async with broker._pool.acquire() as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == "on"


# Each test of the suite runs once: the restart test against the private server (the only one this
# module may stop), the rest against the shared server. A ``None`` attribute is not collected.
_RUN_ON_THE_PRIVATE_SERVER = {"test_a_restarted_server_loses_nothing_that_was_accepted"}
for _name in dir(BrokerConformance):
    if _name.startswith("test_"):
        on_private = _name in _RUN_ON_THE_PRIVATE_SERVER
        setattr(TestPostgresBroker if on_private else TestPostgresBrokerPrivateServer, _name, None)


# -- the URL --------------------------------------------------------------------------------------------


def test_url_names_server_database_and_options() -> None:
    """Host, port, user, password and database go to the driver (percent-decoded); the query holds
    callcast's options; missing parts are left to libpq's defaults."""
    settings = parse_url(
        "postgresql://app:s%40cret@db.example:6543/orders?schema=bus&lease=2.5&poll=0.25"
        "&pool_size=4&connect_timeout=3&sslmode=require&application_name=shop"
    )
    assert (settings.schema, settings.lease, settings.poll) == ("bus", 2.5, 0.25)
    assert (settings.pool_size, settings.connect_timeout) == (4, 3.0)
    kwargs = settings.connect_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["user"]) == ("db.example", 6543, "app")
    assert (kwargs["password"], kwargs["database"], kwargs["ssl"]) == ("s@cret", "orders", "require")
    assert kwargs["server_settings"] == {"application_name": "shop"}
    defaults = parse_url("postgres://")
    assert (defaults.schema, defaults.lease, defaults.poll, defaults.pool_size) == ("callcast", 10.0, 1.0, 10)
    assert "host" not in defaults.connect_kwargs
    assert "password" not in defaults.connect_kwargs
    assert "s@cret" not in repr(settings)
    socket_dir = parse_url("postgresql://app@/orders?host=/var/run/postgresql")
    assert (socket_dir.connect_kwargs["host"], socket_dir.connect_kwargs["database"]) == (
        "/var/run/postgresql",
        "orders",
    )


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("mysql://u@h/db", "not a postgresql:// URL"),
        ("postgresql://u@h:port/db", "invalid port"),
        ("postgresql://u@h/db?lease=soon", "lease must be"),
        ("postgresql://u@h/db?lease=0", "lease must be"),
        ("postgresql://u@h/db?lease=nan", "lease must be"),
        ("postgresql://u@h/db?poll=-1", "poll must be"),
        ("postgresql://u@h/db?connect_timeout=inf", "connect_timeout must be"),
        ("postgresql://u@h/db?pool_size=0", "pool_size must be"),
        ("postgresql://u@h/db?schema=1abc", "schema must be"),
        ("postgresql://u@h/db?schema=a;drop", "schema must be"),
        ("postgresql://u@h/db?schema=" + "s" * 59, "schema must be"),
        ("postgresql://u@h/db?sslmode=sometimes", "sslmode must be"),
        ("postgresql://u:pw@h/db?leese=1", r"unknown option\(s\) leese"),
        ("postgresql://u:pw@h/db?host=/tmp", "a host in the URL and"),
    ],
)
def test_a_bad_url_or_option_is_a_configuration_error(url: str, complaint: str) -> None:
    """A URL the adapter cannot honour fails before anything is opened, naming the problem (and
    never the password); a misspelt option is not silently ignored."""
    with pytest.raises(ConfigurationError, match=complaint) as raised:
        PostgresBroker(url)
    assert "pw@" not in str(raised.value)


async def test_the_password_never_shows() -> None:
    """``url`` is redacted, and a connection failure names the server, never the password."""
    port = free_port()  # nothing listens there
    broker = PostgresBroker(f"postgresql://postgres:hunter2@{HOST}:{port}/test?connect_timeout=2")
    assert broker.url == f"postgresql://postgres:***@{HOST}:{port}/test?connect_timeout=2"
    assert "hunter2" not in repr(broker)
    with pytest.raises(BrokerUnavailableError) as raised:
        await broker.connect()
    assert "hunter2" not in str(raised.value)
    assert f"{HOST}:{port}" in str(raised.value)
    await broker.close()


# -- driver errors are callcast errors -------------------------------------------------------------------


async def test_a_missing_database_is_broker_unavailable() -> None:
    """A database that does not exist is :class:`BrokerUnavailableError` from ``connect``, not the
    driver's exception."""
    require_server("postgresql", PORT)
    missing = f"nodb_{uuid.uuid4().hex[:8]}"
    with pytest.raises(BrokerUnavailableError, match="cannot connect"):
        await connect(f"postgresql://postgres@{HOST}:{PORT}/{missing}")


async def test_statement_failures_are_transport_errors(schema: str) -> None:
    """What the server refuses surfaces as callcast's errors: a publish as :class:`PublishError`,
    declare and subscribe as :class:`TransportError`, and a subscription whose tables were dropped
    under it raises :class:`TransportError` from ``__anext__`` (so the dispatcher retries)."""
    broker = await connect(server_url(schema, lease=f"{LEASE:g}", poll=f"{POLL:g}"))
    try:
        await broker.declare("orders", "billing")
        with pytest.raises(PublishError, match="publish to"):
            await broker.publish("bad\x00topic", [event()])  # text cannot hold NUL
        subscription = await broker.subscribe("orders", "billing")
        async with sql() as conn:
            await conn.execute(
                f'DROP TABLE "{schema}".deliveries, "{schema}".messages, "{schema}".subscriptions'
            )
        with pytest.raises(PublishError) as raised:
            await broker.publish("orders", [event()])
        assert not isinstance(raised.value, asyncpg.PostgresError)
        with pytest.raises(TransportError):
            await broker.declare("orders", "shipping")
        with pytest.raises(TransportError) as taking:
            await next_delivery(subscription)
        assert type(taking.value) is TransportError
    finally:
        await broker.close()


async def test_a_connect_cancelled_during_listen_leaves_no_connection_open(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``connect`` cancelled while it sets up ``LISTEN`` (a caller's timeout, a shutdown) closes the
    connection it opened for it, as it does on a driver error: nothing stays open on the server."""
    application = f"cc_cancel_{uuid.uuid4().hex[:8]}"
    opened: list[Any] = []
    listening = asyncio.Event()
    real_connect = asyncpg.connect
    real_add_listener = asyncpg.Connection.add_listener

    async def recording_connect(*args: Any, **kwargs: Any) -> Any:
        conn = await real_connect(*args, **kwargs)
        opened.append(conn)
        return conn

    async def stalling_add_listener(self: Any, channel: str, callback: Any) -> None:
        await real_add_listener(self, channel, callback)
        listening.set()
        await asyncio.Event().wait()  # a server slow to answer: the caller gives up meanwhile

    monkeypatch.setattr(asyncpg, "connect", recording_connect)
    monkeypatch.setattr(asyncpg.Connection, "add_listener", stalling_add_listener)
    broker = PostgresBroker(server_url(schema, application_name=application))
    try:
        connecting = asyncio.create_task(broker.connect())
        await asyncio.wait_for(listening.wait(), 10)
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        assert len(opened) == 1
        assert opened[0].is_closed(), "the LISTEN connection was left open"
        async with sql() as conn:

            async def all_gone() -> bool:
                count: int = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", application
                )
                return count == 0

            await wait_for_condition(all_gone, 5, "no session of the cancelled broker is left")
    finally:
        for conn in opened:
            conn.terminate()
        await broker.close()


# -- the schema ---------------------------------------------------------------------------------------------


_CONNECT_SCRIPT = """
import asyncio, sys
from callcast.brokers import connect

async def main(url):
    print("ready", flush=True)
    sys.stdin.readline()  # all connect at once
    broker = await connect(url)
    await broker.close()
    print("connected", flush=True)

asyncio.run(main(sys.argv[1]))
"""


async def test_processes_connecting_at_once_create_the_schema_once(schema: str) -> None:
    """The tables are created on connect when missing: two processes and four brokers of this one
    (each with its own connections) connecting at the same moment to a new schema do not trip over
    each other's DDL; a later connect finds the tables and changes nothing."""
    url = server_url(schema, lease=f"{LEASE:g}")
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CONNECT_SCRIPT,
            url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    brokers: list[Any] = []
    try:
        for child in children:
            assert child.stdout is not None
            line = await asyncio.wait_for(child.stdout.readline(), 30)
            assert line == b"ready\n", "a child process did not start"
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            await child.stdin.drain()
        brokers = await asyncio.gather(*(connect(url) for _ in range(4)), return_exceptions=True)
        outputs = [await asyncio.wait_for(child.communicate(), 30) for child in children]
        assert [child.returncode for child in children] == [0, 0], [err for _, err in outputs]
        assert [out for out, _ in outputs] == [b"connected\n", b"connected\n"]
        assert [b for b in brokers if isinstance(b, BaseException)] == []
        async with sql() as conn:
            tables = await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1", schema
            )
            assert [row["table_name"] for row in tables] == ["deliveries", "messages", "subscriptions"]
            function_version = f"SELECT xmin::text FROM pg_proc WHERE oid = '\"{schema}\".publish'::regproc"
            before = await conn.fetchval(function_version)
            later = await connect(url)
            brokers.append(later)
            assert await conn.fetchval(function_version) == before, "a later connect ran the DDL again"
        subscription = await brokers[0].subscribe("orders", "billing")
        await later.publish("orders", [event(b"shared")])
        delivery = await next_delivery(subscription)
        assert delivery.envelope.data == b"shared"
        await delivery.ack()
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
        for broker in brokers:
            if isinstance(broker, PostgresBroker):
                await broker.close()


async def _made_by_another_version(schema: str, ack: str, comment: str | None) -> None:
    """Make the schema look as another version left it: another ``ack`` body (the same signature),
    and ``comment`` (None: none, as before layouts were named)."""
    async with sql() as conn:
        await conn.execute(f"UPDATE pg_proc SET prosrc = prosrc || ' -- other' WHERE oid = {ack}")
        text = "NULL" if comment is None else f"'{comment}'"
        await conn.execute(f'COMMENT ON SCHEMA "{schema}" IS {text}')


@pytest.mark.parametrize(
    ("comment", "replaced"),
    [
        ("callcast broker: messages, subscriptions, deliveries (layout 1)", True),
        (None, True),
        ("callcast broker: messages, subscriptions, deliveries (layout 99)", False),
    ],
    ids=["older", "unnamed", "newer"],
)
async def test_the_functions_of_a_schema_of_a_lower_layout_are_replaced_on_connect(
    schema: str, comment: str | None, replaced: bool
) -> None:
    """A schema an older version made gets this version's functions when a broker connects, and keeps
    its rows; one of this layout, or of a newer version's, is left alone (two versions sharing a
    schema do not undo each other's functions)."""
    url = server_url(schema, lease=f"{LEASE:g}")
    first = await connect(url)
    try:
        await first.declare("orders", "billing")
        await first.publish("orders", [event(b"kept")])
    finally:
        await first.close()
    ack = f"'\"{schema}\".ack'::regproc"
    body = f"SELECT prosrc FROM pg_proc WHERE oid = {ack}"
    async with sql() as conn:
        current = await conn.fetchval(body)
    await _made_by_another_version(schema, ack, comment)
    layout = f"SELECT obj_description('\"{schema}\"'::regnamespace, 'pg_namespace')"
    broker = await connect(url)
    try:
        async with sql() as conn:
            assert (await conn.fetchval(body) == current) is replaced
            if replaced:
                assert await conn.fetchval(layout) == postgres_module._LAYOUT_COMMENT
                function_version = f"SELECT xmin::text FROM pg_proc WHERE oid = {ack}"
                before = await conn.fetchval(function_version)
                again = await connect(url)
                await again.close()
                assert await conn.fetchval(function_version) == before, "a current schema was changed"
            else:
                assert await conn.fetchval(layout) == comment
        subscription = await broker.subscribe("orders", "billing")
        delivery = await next_delivery(subscription)
        assert delivery.envelope.data == b"kept"
        await delivery.ack()
    finally:
        await broker.close()


async def test_a_role_that_cannot_replace_old_functions_goes_on_with_them(
    schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A role with rights on the rows but not owning the schema cannot replace an older layout's
    functions: it connects, works with them, and says how to bring them up to date."""
    url = server_url(schema, lease=f"{LEASE:g}")
    first = await connect(url)
    await first.close()
    ack = f"'\"{schema}\".ack'::regproc"
    await _made_by_another_version(schema, ack, None)
    role = f"cc_role_{uuid.uuid4().hex[:10]}"
    async with sql() as conn:
        await conn.execute(f'CREATE ROLE "{role}" LOGIN')
        await conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        await conn.execute(
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"'
        )
        await conn.execute(f'GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA "{schema}" TO "{role}"')
    try:
        limited_url = url.replace("postgresql://postgres:", f"postgresql://{role}:", 1)
        assert limited_url != url
        with caplog.at_level(logging.WARNING, logger="callcast.brokers.postgres"):
            broker = await connect(limited_url)
        try:
            assert "Connect once as the schema's owner" in caplog.text
            subscription = await broker.subscribe("orders", "billing")
            await broker.publish("orders", [event(b"old functions")])
            delivery = await next_delivery(subscription)
            assert delivery.envelope.data == b"old functions"
            await delivery.ack()
            await subscription.close()
        finally:
            await broker.close()
    finally:
        async with sql() as conn:
            await conn.execute(f'DROP OWNED BY "{role}"')
            await conn.execute(f'DROP ROLE "{role}"')


# -- what lives in the tables --------------------------------------------------------------------------------


async def test_the_tables_are_readable_by_other_tools(schema: str) -> None:
    """A published envelope is a ``messages`` row (headers as JSON, data as bytea) with one
    ``deliveries`` row per group; a claim marks the owner and counts the attempt; an ack deletes
    the delivery, and the message is collected once no group needs it."""
    broker = await connect(server_url(schema, lease=f"{LEASE:g}", poll=f"{POLL:g}"))
    try:
        await broker.declare("orders", "billing")
        await broker.declare("orders", "shipping")
        sent = event(b"\x00\x01binary", partitionkey="order-7")
        await broker.publish("orders", [sent])
        async with sql() as conn:
            message = await conn.fetchrow(
                f"SELECT seq, topic, pkey, headers->>'ce-type' AS type, headers->>'ce-id' AS id, body "
                f'FROM "{schema}".messages'
            )
            assert (message["topic"], message["pkey"], message["type"]) == ("orders", "order-7", "T")
            assert (message["id"], message["body"]) == (sent.id, b"\x00\x01binary")
            rows = await conn.fetch(
                f'SELECT grp, seq, pkey, attempts, owner FROM "{schema}".deliveries ORDER BY grp'
            )
            assert [tuple(row) for row in rows] == [
                ("billing", message["seq"], "order-7", 0, None),
                ("shipping", message["seq"], "order-7", 0, None),
            ]
            billing = await broker.subscribe("orders", "billing")
            delivery = await next_delivery(billing)
            claimed = await conn.fetchrow(
                f'SELECT attempts, owner, lease_until > now() AS leased FROM "{schema}".deliveries '
                "WHERE grp = 'billing'"
            )
            assert (claimed["attempts"], claimed["leased"]) == (1, True)
            assert claimed["owner"] is not None
            await delivery.ack()
            shipping = await broker.subscribe("orders", "shipping")
            shipped = await next_delivery(shipping)
            await shipped.ack()

            async def collected() -> bool:
                count: int = await conn.fetchval(f'SELECT count(*) FROM "{schema}".messages')
                return count == 0

            assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".deliveries') == 0
            await wait_for_condition(collected, 10, "the settled message is collected")
    finally:
        await broker.close()


async def test_an_undecodable_row_is_delivered_quarantined(schema: str) -> None:
    """A row written by another tool whose headers are not a CloudEvent does not crash the
    subscription: it is delivered as ``callcast.undecodable`` with its body and the reason, and the
    next message follows normally."""
    broker = await connect(server_url(schema, lease=f"{LEASE:g}", poll=f"{POLL:g}"))
    try:
        subscription = await broker.subscribe("orders", "billing")
        no_type = {"ce-id": "bad-1", "ce-source": "/x", "ce-specversion": "1.0"}
        async with sql() as conn:
            for headers, body in ((json.dumps(no_type), b"body-1"), (json.dumps(["a", "list"]), b"body-2")):
                seq = await conn.fetchval(
                    f'INSERT INTO "{schema}".messages (topic, headers, body) '
                    "VALUES ($1, $2, $3) RETURNING seq",
                    "orders",
                    headers,
                    body,
                )
                await conn.execute(
                    f'INSERT INTO "{schema}".deliveries (topic, grp, seq) VALUES ($1, $2, $3)',
                    "orders",
                    "billing",
                    seq,
                )
        good = event(b"good")
        await broker.publish("orders", [good])
        received = [await next_delivery(subscription) for _ in range(3)]
        assert [d.envelope.type for d in received[:2]] == [UNDECODABLE_TYPE] * 2
        assert [d.envelope.data for d in received[:2]] == [b"body-1", b"body-2"]
        assert received[0].envelope.id == "bad-1"
        assert "type" in received[0].envelope.extensions["decodeerror"]
        assert received[2].envelope == good
        for delivery in received:
            await delivery.ack()
    finally:
        await broker.close()


# -- waking across connections ------------------------------------------------------------------------


async def test_a_publish_elsewhere_wakes_a_waiter_by_notify(schema: str) -> None:
    """A subscriber waiting on one broker object is woken by ``NOTIFY`` when another (as another
    process would) publishes or hands back work: with the fallback poll set to a minute, only a
    notification can wake it within the deadline."""
    waiter = await connect(server_url(schema, lease=f"{LEASE:g}", poll="60"))
    other = await connect(server_url(schema, lease=f"{LEASE:g}", poll="60"))
    try:
        subscription = await waiter.subscribe("orders", "billing", prefetch=1)
        waiting = asyncio.create_task(subscription.__anext__())
        await asyncio.sleep(0)
        await other.publish("orders", [event(b"one")])
        first = await asyncio.wait_for(waiting, 3)
        assert first.envelope.data == b"one"
        await first.ack()

        held_by_other = await other.subscribe("orders", "billing", prefetch=1)
        await other.publish("orders", [event(b"two")])
        two = await next_delivery(held_by_other, 3)
        waiting = asyncio.create_task(subscription.__anext__())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await two.nack()  # handed back elsewhere: the waiter hears of it
        again = await asyncio.wait_for(waiting, 3)
        assert (again.envelope.data, again.attempt) == (b"two", 2)
        await again.ack()
    finally:
        await waiter.close()
        await other.close()


async def test_the_fallback_poll_claims_again_within_one_interval(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row only the fallback poll can find (here a lease that another tool runs out: no
    ``NOTIFY``, no local wake-up) is claimed by a waiting subscriber one ``poll`` interval after its
    last empty claim, not two."""
    poll = 2.0  # one interval (2 s) and two (4 s, the bug) stay apart on a loaded machine
    broker = await connect(server_url(schema, lease="30", poll=f"{poll:g}"))
    try:
        assert isinstance(broker, PostgresBroker)
        await broker.declare("orders", "billing")
        await broker.publish("orders", [event(b"leased")])
        found_nothing = asyncio.Event()
        real_claim = broker._claim

        async def watched_claim(subscription: Any, limit: int) -> Any:
            claimed = await real_claim(subscription, limit)
            if not claimed:
                found_nothing.set()
            return claimed

        monkeypatch.setattr(broker, "_claim", watched_claim)
        async with sql() as conn:
            await conn.execute(
                f"UPDATE \"{schema}\".deliveries SET owner = $1, lease_until = now() + interval '1 hour'",
                "a-dead-process",
            )
            subscription = await broker.subscribe("orders", "billing")
            waiting = asyncio.create_task(subscription.__anext__())
            await asyncio.wait_for(found_nothing.wait(), 5)  # the row is leased: the claim is empty
            loop = asyncio.get_running_loop()
            expired_at = loop.time()
            await conn.execute(
                f"UPDATE \"{schema}\".deliveries SET lease_until = now() - interval '1 second'"
            )
            delivery = await asyncio.wait_for(waiting, 10)
            waited = loop.time() - expired_at
        assert (delivery.envelope.data, delivery.attempt) == (b"leased", 1)
        assert waited < 1.5 * poll, f"claimed {waited:.2f}s after the lease ran out (poll={poll}s)"
        await delivery.ack()
    finally:
        await broker.close()


# -- per-key order, kept by the tables -----------------------------------------------------------------


async def test_per_key_order_holds_while_publishes_and_acks_race(schema: str) -> None:
    """Which row of a key may be claimed is kept in the table (``head``), updated by publishes and
    acks under a per-key lock. Three connections publishing the same keys while two others consume
    and ack: a key is handed out one envelope at a time, each publisher's envelopes of a key in
    its order, and no key is left stuck (the fallback poll is set to a minute, so nothing but
    publishes, acks and their notifications moves the envelopes)."""
    url = server_url(schema, lease="5", poll="60")
    publishers = [await connect(url) for _ in range(3)]
    consumers = [await connect(url) for _ in range(2)]
    try:
        topic, group = "orders", "billing"
        subscriptions = [await consumer.subscribe(topic, group, prefetch=8) for consumer in consumers]
        keys = [f"k{n}" for n in range(5)]
        per_publisher = 60
        expected = len(publishers) * per_publisher
        handled: dict[str, list[tuple[int, int]]] = {key: [] for key in keys}
        busy: set[str] = set()
        violations: list[str] = []
        all_handled = asyncio.Event()
        count = 0

        async def consume(subscription: Any) -> None:
            nonlocal count
            async for delivery in subscription:
                key = delivery.envelope.partition_key
                if key in busy:
                    violations.append(f"{delivery.envelope.data!r} handed out while {key} was busy")
                busy.add(key)
                await asyncio.sleep(0)
                publisher, n = map(int, delivery.envelope.data.split(b"-"))
                handled[key].append((publisher, n))
                busy.discard(key)
                await delivery.ack()
                count += 1
                if count == expected:
                    all_handled.set()

        async def publish(index: int, broker: Broker) -> None:
            n = 0
            while n < per_publisher:
                size = 1 + (n + index) % 3
                batch = [
                    event(f"{index}-{m}".encode(), partitionkey=keys[(m * 7 + index) % len(keys)])
                    for m in range(n, min(n + size, per_publisher))
                ]
                await broker.publish(topic, batch)
                n += len(batch)

        consuming = [asyncio.create_task(consume(s)) for s in subscriptions]
        await asyncio.gather(*(publish(i, b) for i, b in enumerate(publishers)))
        try:
            await asyncio.wait_for(all_handled.wait(), 15)
        finally:
            for subscription in subscriptions:
                await subscription.close()
            await asyncio.gather(*consuming)
        assert violations == []
        for key, seen in handled.items():
            for index in range(len(publishers)):
                mine = [n for publisher, n in seen if publisher == index]
                assert mine == sorted(mine), f"{key}: publisher {index}'s envelopes out of order"
        assert sum(map(len, handled.values())) == expected
    finally:
        for broker in (*publishers, *consumers):
            await broker.close()


async def test_the_sweep_collects_dead_ephemeral_groups_and_orphaned_messages(schema: str) -> None:
    """What acks do not delete is swept (every 30 s, by one broker at a time): an ephemeral group
    whose subscriber stopped beating (its process died) with its rows, and messages no delivery
    refers to; live groups and their messages stay."""
    broker = await connect(server_url(schema, lease=f"{LEASE:g}", poll=f"{POLL:g}"))
    try:
        assert isinstance(broker, PostgresBroker)
        await broker.declare("orders", "billing")
        live = await broker.subscribe("replies", "live", ephemeral=True)
        async with sql() as conn:
            await conn.execute(
                f'INSERT INTO "{schema}".subscriptions (topic, grp, ephemeral, heartbeat) '
                "VALUES ('replies', 'dead', true, now() - interval '1 hour')"
            )
            await broker.publish("replies", [event(b"for both")])
            await broker.publish("orders", [event(b"kept")])
            await conn.execute(
                f'INSERT INTO "{schema}".messages (topic, headers, body) VALUES ($1, $2, $3)',
                "orders",
                "{}",
                b"orphan",
            )
            await broker._collect_garbage()
            groups = await conn.fetch(f'SELECT grp FROM "{schema}".subscriptions ORDER BY grp')
            assert [row["grp"] for row in groups] == ["billing", "live"]
            rows = await conn.fetch(f'SELECT grp FROM "{schema}".deliveries ORDER BY grp')
            assert [row["grp"] for row in rows] == ["billing", "live"]
            bodies = await conn.fetch(f'SELECT body FROM "{schema}".messages ORDER BY seq')
            assert [row["body"] for row in bodies] == [b"for both", b"kept"]
        delivery = await next_delivery(live)
        assert delivery.envelope.data == b"for both"
        await delivery.ack()
    finally:
        await broker.close()


async def test_a_slow_garbage_collection_does_not_hold_up_lease_renewal(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leases are renewed on their own schedule: while a sweep hangs (another session holds a lock
    its ``DELETE`` waits for), the live holder of a delivery keeps renewing its lease, so the group's
    other subscriber does not get the delivery."""
    monkeypatch.setattr(postgres_module, "_GC_INTERVAL", 0.05)  # sweep at every chance
    lease = 0.6
    broker = await connect(server_url(schema, lease=f"{lease:g}", poll="0.1"))
    stolen: asyncio.Task[Any] | None = None
    try:
        assert isinstance(broker, PostgresBroker)
        await broker.declare("orders", "billing")
        await broker.publish("orders", [event(b"held")])
        holder = await broker.subscribe("orders", "billing")
        held = await next_delivery(holder)
        async with sql() as blocker, sql() as observer:
            locking = blocker.transaction()
            await locking.start()
            try:
                # Claims still read the table; the sweep's DELETE waits until the rollback below.
                await blocker.execute(f'LOCK TABLE "{schema}".messages IN SHARE MODE')

                async def sweep_waits() -> bool:
                    waiting: int = await observer.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE relation = $1::regclass AND NOT granted",
                        f'"{schema}".messages',
                    )
                    return waiting > 0

                await wait_for_condition(sweep_waits, 5, "a sweep waits for the lock")
                other = await broker.subscribe("orders", "billing")
                stolen = asyncio.create_task(other.__anext__())
                done, _ = await asyncio.wait({stolen}, timeout=3 * lease)
                assert not done, "the held delivery went to another subscriber: its lease ran out"
                row = await observer.fetchrow(
                    f'SELECT owner, lease_until > now() AS leased FROM "{schema}".deliveries'
                )
                assert (row["owner"], row["leased"]) == (holder.owner, True)
            finally:
                await locking.rollback()
        await held.ack()
    finally:
        if stolen is not None:
            stolen.cancel()
        await broker.close()


async def test_a_publish_is_flushed_even_in_a_session_that_turned_synchronous_commit_off(schema: str) -> None:
    """The publish statement itself turns ``synchronous_commit = off`` back on for its transaction
    (a proxy may hand out sessions without callcast's own ``SET``), and leaves ``remote_apply``,
    a stronger setting, as it is."""
    broker = await connect(server_url(schema))
    try:
        assert isinstance(broker, PostgresBroker)
        await broker.declare("orders", "billing")
        headers = [json.dumps(event(b"{}").headers())]
        async with sql() as conn:
            for session, committed_with in (("off", "on"), ("remote_apply", "remote_apply")):
                await conn.execute(f"SET synchronous_commit = {session}")
                async with conn.transaction():
                    rows = await conn.fetch(
                        broker._sql.publish, "orders", None, headers, [b"{}"], [None], broker.channel, "t"
                    )
                    assert [row["grp"] for row in rows] == ["billing"]
                    assert await conn.fetchval("SHOW synchronous_commit") == committed_with
    finally:
        await broker.close()


# -- statements that meet on the same rows ------------------------------------------------------------------


async def _waiting_for_a_lock(observer: Any, application: str) -> int:
    """How many sessions of the broker named ``application`` wait for a lock right now."""
    count: int = await observer.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
        application,
    )
    return count


async def test_a_lease_renewal_waits_for_no_lock(schema: str) -> None:
    """A renewal renews the rows it can lock at once and skips a row another transaction holds
    (being settled, handed back or claimed), so it is never part of a circle of waits (before, it
    waited for each row in turn, and met closes and batches of acks in deadlocks that PostgreSQL
    broke by aborting one side, the leases then running out)."""
    broker = await connect(server_url(schema, lease="30", poll=f"{POLL:g}"))
    try:
        assert isinstance(broker, PostgresBroker)
        await broker.declare("orders", "billing")
        await broker.publish("orders", [event(b"%d" % n) for n in range(3)])
        holder = await broker.subscribe("orders", "billing", prefetch=3)
        for _ in range(3):
            await next_delivery(holder)
        deliveries = f'"{schema}".deliveries'
        async with sql() as blocker, sql() as observer:
            await observer.execute(f"UPDATE {deliveries} SET lease_until = now() + interval '1 second'")
            locking = blocker.transaction()
            await locking.start()
            try:
                await blocker.execute(f"SELECT 1 FROM {deliveries} WHERE seq = 2 FOR UPDATE")
                await asyncio.wait_for(broker._renew(), 5)
            finally:
                await locking.rollback()
            renewed = "lease_until > now() + interval '10 seconds'"
            rows = await observer.fetch(f"SELECT seq, {renewed} AS renewed FROM {deliveries} ORDER BY seq")
            assert [(row["seq"], row["renewed"]) for row in rows] == [(1, True), (2, False), (3, True)]
        await holder.close()
    finally:
        await broker.close()


async def test_two_groups_settling_one_message_at_once_delete_it(schema: str) -> None:
    """The last group to settle a message deletes it, even when two groups ack it at the same
    moment (each deletes its row while the other's delete is not committed yet): the settlers of
    one message take turns on its row and look again. Here both acks are held, after deleting
    their rows, by another session holding the message's key lock; once it lets go, the message
    is gone without waiting for the sweep (before, each saw the other's row and both left it)."""
    application = f"cc_settle_{uuid.uuid4().hex[:8]}"
    broker = await connect(server_url(schema, lease="30", poll=f"{POLL:g}", application_name=application))
    try:
        assert isinstance(broker, PostgresBroker)
        await broker.declare("orders", "billing")
        await broker.declare("orders", "shipping")
        await broker.publish("orders", [event(b"both", partitionkey="order-7")])
        billing = await broker.subscribe("orders", "billing")
        shipping = await broker.subscribe("orders", "shipping")
        billed = await next_delivery(billing)
        shipped = await next_delivery(shipping)
        key_lock_class = postgres_module._lock_id("callcast-keys", schema)
        async with sql() as blocker, sql() as observer:
            locking = blocker.transaction()
            await locking.start()
            try:
                await blocker.execute(
                    "SELECT pg_advisory_xact_lock($1, hashtext($2 || chr(10) || $3))",
                    key_lock_class,
                    "orders",
                    "order-7",
                )
                acks = [asyncio.create_task(billed.ack()), asyncio.create_task(shipped.ack())]

                async def both_wait() -> bool:
                    return await _waiting_for_a_lock(observer, application) >= 2

                await wait_for_condition(both_wait, 5, "both acks wait, their rows deleted")
            finally:
                await locking.rollback()
            await asyncio.wait_for(asyncio.gather(*acks), 10)
            assert await observer.fetchval(f'SELECT count(*) FROM "{schema}".deliveries') == 0
            left = await observer.fetch(f'SELECT body FROM "{schema}".messages')
            assert [row["body"] for row in left] == [], "the settled message was left for the sweep"
    finally:
        await broker.close()


async def test_unkeyed_acks_sent_together_go_in_batches_and_settle_every_row(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acks made while a batch is in flight gather into the next: fewer statements, the same end
    (every row and message gone). Keyed acks still go one at a time."""
    broker = await connect(server_url(schema, lease="30", poll=f"{POLL:g}"))
    try:
        assert isinstance(broker, PostgresBroker)
        await broker.declare("orders", "billing")
        await broker.publish("orders", [event(str(n).encode()) for n in range(60)])
        await broker.publish("orders", [event(b"keyed", partitionkey="order-1")])
        subscription = await broker.subscribe("orders", "billing", prefetch=100)
        deliveries = [await next_delivery(subscription) for _ in range(61)]
        batches: list[list[int]] = []
        ack_unkeyed = broker._ack_unkeyed

        async def recording(subscription: Any, seqs: list[int]) -> None:
            batches.append(seqs)
            await ack_unkeyed(subscription, seqs)

        monkeypatch.setattr(broker, "_ack_unkeyed", recording)
        await asyncio.wait_for(asyncio.gather(*(delivery.ack() for delivery in deliveries)), 10)
        assert sorted(seq for batch in batches for seq in batch) == sorted(
            d._seq
            for d in deliveries
            if d.envelope.partition_key is None  # type: ignore[attr-defined]
        )
        assert len(batches) < 60
        assert all(batch == sorted(batch) for batch in batches)
        async with sql() as observer:
            assert await observer.fetchval(f'SELECT count(*) FROM "{schema}".deliveries') == 0
            assert await observer.fetchval(f'SELECT count(*) FROM "{schema}".messages') == 0
        await subscription.close()
    finally:
        await broker.close()


async def test_a_failed_ack_batch_acks_each_of_its_rows_alone(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = await connect(server_url(schema, lease="30", poll=f"{POLL:g}"))
    try:
        assert isinstance(broker, PostgresBroker)
        await broker.declare("orders", "billing")
        await broker.publish("orders", [event(str(n).encode()) for n in range(5)])
        subscription = await broker.subscribe("orders", "billing", prefetch=10)
        deliveries = [await next_delivery(subscription) for _ in range(5)]
        monkeypatch.setattr(broker._sql, "ack_many", "SELECT no_such_function()")  # type: ignore[attr-defined]
        await asyncio.wait_for(asyncio.gather(*(delivery.ack() for delivery in deliveries)), 10)
        async with sql() as observer:
            assert await observer.fetchval(f'SELECT count(*) FROM "{schema}".deliveries') == 0
        await subscription.close()
    finally:
        await broker.close()


async def test_acks_made_before_a_close_are_sent_before_it_hands_rows_back(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ack gathering for the next batch when the subscription closes (its handler was cut off
    at a stop, say) still goes, before the close hands the rest back: else the row went back to
    the group and the handled message came again. The first batch is held until the release is
    called (as the old close did at once) or for 1 s (the close waits for the batches)."""
    broker = await connect(server_url(schema, lease="30", poll=f"{POLL:g}"))
    try:
        assert isinstance(broker, PostgresBroker)
        await broker.declare("orders", "billing")
        await broker.publish("orders", [event(b"first"), event(b"second")])
        subscription = await broker.subscribe("orders", "billing", prefetch=2)
        assert isinstance(subscription, postgres_module._PostgresSubscription)
        first, second = [await next_delivery(subscription) for _ in range(2)]
        released, batches, acks_pending_at_release = asyncio.Event(), [], []
        release, ack_unkeyed = broker._release, broker._ack_unkeyed

        async def recording_release(subscription: Any, never_handed_out: list[int]) -> None:
            sent = subscription.acks_sent
            acks_pending_at_release.append(subscription.acks is not None or not (sent is None or sent.done()))
            released.set()
            await release(subscription, never_handed_out)

        async def held_up(subscription: Any, seqs: list[int]) -> None:
            batches.append(seqs)
            if len(batches) == 1:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(released.wait(), 1.0)
            await ack_unkeyed(subscription, seqs)

        monkeypatch.setattr(broker, "_release", recording_release)
        monkeypatch.setattr(broker, "_ack_unkeyed", held_up)
        first_ack = asyncio.create_task(first.ack())
        await wait_for_condition(_async(lambda: len(batches) == 1), 5, "the first batch is in flight")
        second_ack = asyncio.create_task(second.ack())
        await wait_for_condition(_async(lambda: subscription.acks == [2]), 5, "the second ack gathers")
        second_ack.cancel()  # its handler cut off
        await asyncio.wait_for(asyncio.gather(first_ack, subscription.close()), 10)
        assert acks_pending_at_release == [False]
        async with sql() as observer:
            assert await observer.fetchval(f'SELECT count(*) FROM "{schema}".deliveries') == 0
    finally:
        await broker.close()


def _async(check: Any) -> Any:
    async def checked() -> bool:
        return bool(check())

    return checked
