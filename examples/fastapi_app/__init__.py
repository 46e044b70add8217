"""A FastAPI app that hosts callcast services and uses them from its own routes.

    greeter     rpc greet                                   (callcast, also POST /rpc/greeter/greet)
    guestbook   GET /guestbook; on Greeted: sign the book   (callcast route, served by FastAPI)
    frontdesk   the callcast identity of FastAPI's own routes: calls greeter, publishes Greeted
    FastAPI     GET / and POST /hello (ctx through Depends), /docs and /openapi.json (both sides)

Run it: ``uvicorn examples.fastapi_app:api`` (the broker is ``$CALLCAST_BROKER`` or the embedded one).
"""

from examples.fastapi_app.app import api, create_api, services

__all__ = ["api", "create_api", "services"]
