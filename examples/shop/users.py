"""users: sign-up (publishes ``UserSignedUp``) and look-up (HTTP and RPC)."""

from __future__ import annotations

import uuid

from callcast import Context, HTTPError, Service
from examples.shop.contracts import LookupUser, SignupRequest, User, UserSignedUp
from examples.shop.store import Database

users = Service("users", publishes=[UserSignedUp])

SCHEMA = "CREATE TABLE IF NOT EXISTS users (id TEXT PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL)"


@users.on_startup
async def open_store(ctx: Context) -> None:
    ctx.state.db = Database(ctx.data_dir / "users.db", SCHEMA)


@users.on_shutdown
async def close_store(ctx: Context) -> None:
    ctx.state.db.close()


async def find(ctx: Context, user_id: str) -> User | None:
    rows = await ctx.state.db.fetch("SELECT id, name, email FROM users WHERE id = ?", (user_id,))
    return User(id=rows[0][0], name=rows[0][1], email=rows[0][2]) if rows else None


@users.post("/users", status_code=201)
async def signup(body: SignupRequest, ctx: Context) -> User:
    """Store the user, then publish ``UserSignedUp``; 201 only once both are durable."""
    user = User(id=uuid.uuid4().hex, name=body.name, email=body.email)
    await ctx.state.db.transaction(
        lambda conn: conn.execute("INSERT INTO users VALUES (?, ?, ?)", (user.id, user.name, user.email))
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
