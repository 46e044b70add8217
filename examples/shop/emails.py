"""emails: sends the welcome email when a user signs up; lists what was sent.

Idempotent: an email is recorded under the id of the event that caused it, so a redelivered
``UserSignedUp`` does not send a second welcome email (the duplicate is counted, not sent).
"""

from __future__ import annotations

from datetime import UTC, datetime

from callcast import Context, Service
from examples.shop.contracts import SentEmail, UserSignedUp
from examples.shop.store import Database

emails = Service("emails")

SCHEMA = """
CREATE TABLE IF NOT EXISTS emails (
    cause TEXT PRIMARY KEY, recipient TEXT NOT NULL, subject TEXT NOT NULL, body TEXT NOT NULL,
    sent_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS emails_by_recipient ON emails (recipient);
CREATE TABLE IF NOT EXISTS duplicates (cause TEXT NOT NULL, seen_at TEXT NOT NULL);
"""


@emails.on_startup
async def open_store(ctx: Context) -> None:
    ctx.state.db = Database(ctx.data_dir / "emails.db", SCHEMA)


@emails.on_shutdown
async def close_store(ctx: Context) -> None:
    ctx.state.db.close()


@emails.on(UserSignedUp)
async def send_welcome(event: UserSignedUp, ctx: Context) -> None:
    assert ctx.envelope is not None
    cause = ctx.envelope.id
    now = datetime.now(UTC).isoformat()

    def send(conn):  # type: ignore[no-untyped-def]
        inserted = conn.execute(
            "INSERT OR IGNORE INTO emails VALUES (?, ?, ?, ?, ?)",
            (cause, event.email, "Welcome to the shop", f"Hello {event.name}, thanks for signing up!", now),
        ).rowcount
        if not inserted:
            conn.execute("INSERT INTO duplicates VALUES (?, ?)", (cause, now))

    await ctx.state.db.transaction(send)


@emails.get("/emails")
async def list_emails(to: str, ctx: Context) -> list[SentEmail]:
    rows = await ctx.state.db.fetch(
        "SELECT recipient, subject, body, sent_at, cause FROM emails WHERE recipient = ? ORDER BY sent_at",
        (to,),
    )
    return [SentEmail(to=r[0], subject=r[1], body=r[2], sent_at=r[3], cause=r[4]) for r in rows]
