"""users: sign-up (publishes ``UserSignedUp``) and look-up (HTTP and RPC).

The user row and its ``UserSignedUp`` event commit in one transaction (the outbox): a crash at any
point leaves either both or neither.
"""

from __future__ import annotations

import uuid

from sqlalchemy import text

from callcast import Context, HTTPError, Service
from examples.shop.contracts import LookupUser, SignupRequest, User, UserSignedUp

users = Service("users", publishes=[UserSignedUp], database=True)


@users.on_startup
async def create_tables(ctx: Context) -> None:
    async with ctx.transaction() as db:
        await db.execute(
            text(
                "CREATE TABLE IF NOT EXISTS users "
                "(id TEXT PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL)"
            )
        )


async def find(ctx: Context, user_id: str) -> User | None:
    async with ctx.transaction() as db:
        row = (
            await db.execute(text("SELECT id, name, email FROM users WHERE id = :id"), {"id": user_id})
        ).first()
    return User(id=row[0], name=row[1], email=row[2]) if row else None


@users.post("/users", status_code=201)
async def signup(body: SignupRequest, ctx: Context) -> User:
    """Store the user and publish ``UserSignedUp`` atomically; 201 once both are committed."""
    user = User(id=uuid.uuid4().hex, name=body.name, email=body.email)
    async with ctx.transaction() as db:
        await db.execute(
            text("INSERT INTO users VALUES (:id, :name, :email)"),
            {"id": user.id, "name": user.name, "email": user.email},
        )
        await ctx.publish(UserSignedUp(user_id=user.id, name=user.name, email=user.email), key=user.id)
    return user


@users.get("/users/{user_id}")
async def get_user(user_id: str, ctx: Context) -> User:
    user = await find(ctx, user_id)
    if user is None:
        raise HTTPError(404, f"no user {user_id!r}")
    return user


@users.rpc
async def lookup(req: LookupUser, ctx: Context) -> User:
    """The user, or a 404 error the caller sees as ``RemoteError(status=404)``."""
    user = await find(ctx, req.user_id)
    if user is None:
        raise HTTPError(404, f"no user {req.user_id!r}")
    return user
