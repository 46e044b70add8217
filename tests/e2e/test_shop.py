"""The shop demo as a real server process, driven over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from examples.shop.contracts import UserSignedUp

from .backlog import wait_quiet
from .conftest import SHOP, Launcher
from .procs import REPO_ROOT, CallcastProcess, callcast_command, wait_until

ONE_MIB = 1024 * 1024
EVENT_TIMEOUT = 10.0
"""How long an event-driven outcome (email, order status) may take before the test fails."""


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.test"


def sign_up(client: httpx.Client, name: str = "Ada", email: str | None = None) -> dict[str, Any]:
    response = client.post("/users", json={"name": name, "email": email or unique_email()})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def wait_settled(client: httpx.Client, order_id: str) -> dict[str, Any]:
    """The order once it is no longer pending (AssertionError after EVENT_TIMEOUT)."""

    def settled() -> dict[str, Any] | None:
        order: dict[str, Any] = client.get(f"/orders/{order_id}").json()
        return order if order["status"] != "pending" else None

    return wait_until(settled, timeout=EVENT_TIMEOUT, interval=0.02, what=f"order {order_id} to settle")


def wait_for_status(client: httpx.Client, order_id: str, status: str) -> dict[str, Any]:
    order = wait_settled(client, order_id)
    assert order["status"] == status, order
    return order


def field_locations(response: httpx.Response) -> list[list[Any]]:
    detail = response.json()["detail"]
    assert isinstance(detail, list), detail
    assert all({"loc", "msg", "type"} <= error.keys() for error in detail), detail
    return [error["loc"] for error in detail]


# -- request-driven and event-driven paths ------------------------------------------------------------


def test_healthz_names_the_running_services(client: httpx.Client) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "services": ["users", "emails", "orders", "payments", "inventory"],
    }


def test_signup_sends_exactly_one_welcome_email(shop: CallcastProcess, client: httpx.Client) -> None:
    email = unique_email("welcome")

    user = sign_up(client, name="Grace", email=email)

    assert user["name"] == "Grace"
    assert user["email"] == email
    assert user["id"]
    wait_until(
        lambda: client.get("/emails", params={"to": email}).json(),
        timeout=EVENT_TIMEOUT,
        what=f"a welcome email to {email}",
    )
    # "exactly one" is final only once no copy of the event (a retry, a redelivery, a second
    # publish) is left in the users outbox or unacknowledged by a group that takes UserSignedUp
    wait_quiet(shop, UserSignedUp, timeout=EVENT_TIMEOUT)
    sent = client.get("/emails", params={"to": email}).json()
    assert len(sent) == 1, sent
    assert sent[0]["to"] == email
    assert sent[0]["subject"] == "Welcome to the shop"
    assert "Grace" in sent[0]["body"]
    assert sent[0]["cause"]  # the id of the UserSignedUp event


def test_emails_to_an_unknown_address_is_an_empty_list(client: httpx.Client) -> None:
    response = client.get("/emails", params={"to": unique_email("nobody")})

    assert response.status_code == 200
    assert response.json() == []


def test_emails_without_the_to_parameter_is_422(client: httpx.Client) -> None:
    response = client.get("/emails")

    assert response.status_code == 422
    assert field_locations(response) == [["query", "to"]]


def test_get_user_200_then_404(client: httpx.Client) -> None:
    user = sign_up(client, name="Linus")

    found = client.get(f"/users/{user['id']}")
    missing = client.get(f"/users/{uuid.uuid4().hex}")

    assert found.status_code == 200
    assert found.json() == user
    assert missing.status_code == 404
    assert "no user" in missing.json()["detail"]


def test_order_is_confirmed_and_stock_reserved(client: httpx.Client) -> None:
    user = sign_up(client)
    apples_before = {row["sku"]: row["available"] for row in client.get("/inventory").json()}["apple"]

    response = client.post(
        "/orders",
        json={"user_id": user["id"], "items": [{"sku": "apple", "qty": 2}, {"sku": "pear", "qty": 1}]},
    )

    assert response.status_code == 201, response.text
    order = response.json()
    assert order["status"] == "pending"
    assert order["user_id"] == user["id"]
    assert order["amount_cents"] == 2 * 120 + 150
    confirmed = wait_for_status(client, order["id"], "confirmed")
    assert confirmed["reason"] is None
    stock = {row["sku"]: row["available"] for row in client.get("/inventory").json()}
    assert stock["apple"] == apples_before - 2


def test_short_stock_order_is_rejected_with_a_reason(client: httpx.Client) -> None:
    user = sign_up(client)
    figs_before = {row["sku"]: row["available"] for row in client.get("/inventory").json()}["fig"]

    response = client.post("/orders", json={"user_id": user["id"], "items": [{"sku": "fig", "qty": 4}]})

    assert response.status_code == 201, response.text
    assert response.json()["status"] == "pending"
    rejected = wait_for_status(client, response.json()["id"], "rejected")
    assert "fig" in rejected["reason"]
    assert "wanted 4" in rejected["reason"]
    stock = {row["sku"]: row["available"] for row in client.get("/inventory").json()}
    assert stock["fig"] == figs_before  # all or nothing: nothing reserved


def test_order_over_the_payment_limit_is_rejected_at_once(client: httpx.Client) -> None:
    user = sign_up(client)

    response = client.post("/orders", json={"user_id": user["id"], "items": [{"sku": "pear", "qty": 1000}]})

    assert response.status_code == 201, response.text
    order = response.json()
    assert order["status"] == "rejected"
    assert "payment declined" in order["reason"]
    assert client.get(f"/orders/{order['id']}").json() == order


def test_concurrent_orders_never_oversell(client: httpx.Client) -> None:
    user = sign_up(client)
    figs = {row["sku"]: row["available"] for row in client.get("/inventory").json()}["fig"]
    body = {"user_id": user["id"], "items": [{"sku": "fig", "qty": 1}]}

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda _: client.post("/orders", json=body), range(figs + 3)))

    assert [r.status_code for r in responses] == [201] * (figs + 3)
    outcomes = Counter(wait_settled(client, r.json()["id"])["status"] for r in responses)
    assert outcomes == Counter({"confirmed": figs, "rejected": 3})
    assert {row["sku"]: row["available"] for row in client.get("/inventory").json()}["fig"] == 0


def test_order_for_an_unknown_user_is_404(client: httpx.Client) -> None:
    response = client.post("/orders", json={"user_id": "no-such-user", "items": [{"sku": "apple", "qty": 1}]})

    assert response.status_code == 404
    assert "unknown user" in response.json()["detail"]


def test_get_unknown_order_is_404(client: httpx.Client) -> None:
    response = client.get(f"/orders/{uuid.uuid4().hex}")

    assert response.status_code == 404


# -- bad input ----------------------------------------------------------------------------------------


def test_invalid_json_is_422_with_field_errors(client: httpx.Client) -> None:
    response = client.post(
        "/users", content=b'{"name": "Ada", "email": ', headers={"content-type": "application/json"}
    )

    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail[0]["loc"] == ["body"]
    assert detail[0]["type"] == "json_invalid"


def test_wrong_fields_are_422_with_each_field_error(client: httpx.Client) -> None:
    missing = client.post("/users", json={"name": "Ada"})
    extra = client.post("/users", json={"name": "Ada", "email": unique_email(), "admin": True})
    invalid = client.post("/users", json={"name": "", "email": "not-an-address"})
    wrong_type = client.post("/orders", json={"user_id": "u", "items": [{"sku": "apple", "qty": "many"}]})
    empty_order = client.post("/orders", json={"user_id": "u", "items": []})

    assert [r.status_code for r in (missing, extra, invalid, wrong_type, empty_order)] == [422] * 5
    assert field_locations(missing) == [["body", "email"]]
    assert field_locations(extra) == [["body", "admin"]]
    assert sorted(field_locations(invalid)) == [["body", "email"], ["body", "name"]]
    assert field_locations(wrong_type) == [["body", "items", 0, "qty"]]
    assert field_locations(empty_order) == [["body", "items"]]


def test_body_over_one_mib_is_413(client: httpx.Client) -> None:
    big = json.dumps({"name": "x" * (3 * 1024 * 1024 // 2), "email": unique_email()}).encode()
    assert len(big) > 1.5 * 1024 * 1024

    response = client.post("/users", content=big, headers={"content-type": "application/json"})

    assert response.status_code == 413


def test_body_limit_is_exactly_one_mib_declared_or_streamed(client: httpx.Client) -> None:
    def body_of(size: int) -> bytes:
        head = b'{"name": "'
        tail = b'", "email": "x@example.test"}'
        return head + b"n" * (size - len(head) - len(tail)) + tail

    json_type = {"content-type": "application/json"}
    at_limit = client.post("/users", content=body_of(ONE_MIB), headers=json_type)
    over_limit = client.post("/users", content=body_of(ONE_MIB + 1), headers=json_type)
    streamed = client.post("/users", content=iter([b"x" * 65536] * 24), headers=json_type)  # chunked

    assert at_limit.status_code == 422  # read and validated: the name is too long
    assert over_limit.status_code == 413
    assert streamed.status_code == 413


def test_unknown_route_is_404_and_wrong_method_is_405(client: httpx.Client) -> None:
    assert client.get("/no/such/route").status_code == 404
    assert client.post("/no/such/route", json={}).status_code == 404
    assert client.delete("/users").status_code == 405


def test_server_keeps_serving_after_bad_input(shop: CallcastProcess, client: httpx.Client) -> None:
    big = b'{"name": "' + b"y" * (3 * 1024 * 1024 // 2) + b'"}'
    json_type = {"content-type": "application/json"}
    for _ in range(3):
        assert client.post("/users", content=b"\xff\xfe not json", headers=json_type).status_code == 422
        assert client.post("/users", content=big, headers=json_type).status_code == 413
        assert client.post("/users", content=b"{}").status_code == 415  # a body must be declared JSON
        assert client.post("/orders", json={"user_id": 1, "items": "fig"}).status_code == 422
        assert client.get("/users/a/b").status_code == 404

    assert shop.running()
    assert client.get("/healthz").status_code == 200
    user = sign_up(client, name="After")
    assert client.get(f"/users/{user['id']}").status_code == 200


# -- the command line ---------------------------------------------------------------------------------


def declared_topology() -> dict[str, Any]:
    """What the shop declares, read from its Service objects in a separate interpreter."""
    code = """
import json
from callcast import event_type
from examples.shop import app
print(json.dumps({
    "routes": [f"{r.method} {r.path}" for s in app.services.values() for r in s.routes],
    "rpc": [f"{s.name}.{n}" for s in app.services.values() for n in s.endpoints],
    "publishers": [[event_type(m), s.name] for s in app.services.values() for m in s.publishes],
    "subscribers": [[h.topic, h.group] for s in app.services.values() for h in s.handlers],
}))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True
    )
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_topology_names_every_route_rpc_publisher_and_subscriber() -> None:
    result = subprocess.run(
        [*callcast_command(), "topology", SHOP], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
    )

    assert result.returncode == 0, result.stderr
    text = result.stdout
    declared = declared_topology()
    # what the shop is documented to have, so a service that silently vanishes is noticed too
    assert set(declared["routes"]) == {
        "POST /users",
        "GET /users/{user_id}",
        "GET /emails",
        "POST /orders",
        "GET /orders/{order_id}",
        "GET /inventory",
    }
    assert set(declared["rpc"]) == {"users.lookup", "payments.authorize"}
    assert len(declared["publishers"]) == 4
    assert len(declared["subscribers"]) == 4
    lines = [line.split() for line in text.splitlines()]
    for route in declared["routes"]:
        assert ["route", *route.split()] in lines, route
    for rpc in declared["rpc"]:
        assert any(words[:2] == ["rpc", rpc] for words in lines), rpc
    event_lines = {line.strip().split(":")[0]: line for line in text.splitlines() if " -> " in line}
    for topic, publisher in declared["publishers"]:
        assert topic in event_lines, topic
        assert publisher in event_lines[topic].split("->")[0], (topic, publisher)
    for topic, group in declared["subscribers"]:
        assert topic in event_lines, topic
        assert group in event_lines[topic].split("->")[1], (topic, group)
    assert "orders -> payments" in text
    assert "orders -> users" in text


def test_sigint_then_sigterm_at_once_is_one_request_to_stop(launch: Launcher) -> None:
    """A terminal's Ctrl-C and a process manager's SIGTERM right after it: a clean stop (0), not
    the forced exit (130) a later second signal asks for."""
    server = launch(name="shop-two-signals")
    server.popen.send_signal(signal.SIGINT)  # type: ignore[union-attr]
    server.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    returncode = server.popen.wait(timeout=30)  # type: ignore[union-attr]
    assert returncode == 0, server.log_text()
    assert server.log_text().rstrip().endswith("callcast: stopped"), server.log_text()


def test_sigterm_stops_the_server_promptly_with_exit_code_0(launch: Launcher) -> None:
    server = launch(name="shop-sigterm")
    with httpx.Client(base_url=server.url, timeout=10.0, trust_env=False) as http:
        user = sign_up(http)
        wait_until(
            lambda: http.get("/emails", params={"to": user["email"]}).json(),
            timeout=EVENT_TIMEOUT,
            what="the welcome email",
        )

    started = time.monotonic()
    server.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    returncode = server.popen.wait(timeout=10)  # type: ignore[union-attr]
    elapsed = time.monotonic() - started

    assert returncode == 0, server.log_text()
    assert elapsed < 5.0, f"took {elapsed:.2f}s to stop"
    log = server.log_text()
    assert "callcast: stopping" in log
    assert log.rstrip().endswith("callcast: stopped"), log
    assert "Traceback" not in log, log

    # what was accepted before the stop is still there after a restart on the same files
    server.start()
    wait_quiet(server, UserSignedUp, timeout=EVENT_TIMEOUT)  # a redelivery after the restart lands first
    with httpx.Client(base_url=server.url, timeout=10.0, trust_env=False) as http:
        assert http.get(f"/users/{user['id']}").json() == user
        assert len(http.get("/emails", params={"to": user["email"]}).json()) == 1
