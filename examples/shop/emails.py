"""emails: sends the welcome email when a user signs up; lists what was sent.

Idempotent through callcast's inbox: the email row and the record of the ``UserSignedUp`` message
commit together, so a redelivered or re-published event does not send a second email.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import text

from callcast import Context, Service
from examples.shop.contracts import SentEmail, UserSignedUp

emails = Service("emails", database=True)


@emails.on_startup
async def create_tables(ctx: Context) -> None:
    async with ctx.transaction() as db:
        await db.execute(
            text(
                "CREATE TABLE IF NOT EXISTS emails (cause TEXT PRIMARY KEY, recipient TEXT NOT NULL, "
                "subject TEXT NOT NULL, body TEXT NOT NULL, sent_at TEXT NOT NULL)"
            )
        )
        await db.execute(text("CREATE INDEX IF NOT EXISTS emails_by_recipient ON emails (recipient)"))


@emails.on(UserSignedUp, idempotent=True)
async def send_welcome(event: UserSignedUp, ctx: Context) -> None:
    assert ctx.envelope is not None
    await ctx.db.execute(
        text("INSERT INTO emails VALUES (:cause, :to, :subject, :body, :at)"),
        {
            "cause": ctx.envelope.id,
            "to": event.email,
            "subject": "Welcome to the shop",
            "body": f"Hello {event.name}, thanks for signing up!",
            "at": datetime.now(UTC).isoformat(),
        },
    )


@emails.get("/emails")
async def list_emails(to: str, ctx: Context) -> list[SentEmail]:
    async with ctx.transaction() as db:
        rows = await db.execute(
            text(
                "SELECT recipient, subject, body, sent_at, cause FROM emails "
                "WHERE recipient = :to ORDER BY sent_at"
            ),
            {"to": to},
        )
        return [SentEmail(to=r[0], subject=r[1], body=r[2], sent_at=r[3], cause=r[4]) for r in rows]
