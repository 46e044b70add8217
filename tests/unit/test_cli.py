from __future__ import annotations

import json

import pytest

from callcast import App, ConfigurationError
from callcast.brokers import redact
from callcast.cli import main


def test_topology_of_the_shop_lists_every_part(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topology", "examples.shop:app"]) == 0
    text = capsys.readouterr().out
    for expected in [
        "POST /users",
        "GET /users/{user_id}",
        "GET /emails",
        "POST /orders",
        "GET /orders/{order_id}",
        "GET /inventory",
        "users.lookup",
        "payments.authorize",
        "UserSignedUp: users -> emails.send_welcome",
        "OrderPlaced: orders -> inventory.reserve",
        "StockReserved: inventory -> orders.confirm",
        "StockShort: inventory -> orders.reject",
        "orders -> payments",
        "orders -> users",
    ]:
        assert expected in text


def test_topology_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topology", "examples.shop:app", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["services"]) == {"users", "emails", "orders", "payments", "inventory"}


def test_bad_app_spec_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="not a callcast App"):
        main(["topology", "callcast:__version__"])


def test_unknown_broker_scheme_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "examples.shop:app", "--broker", "kafka://u:hunter2@host/x", "--no-http"]) == 2
    err = capsys.readouterr().err
    assert "unknown broker URL scheme" in err
    assert "hunter2" not in err


def test_help_never_shows_the_broker_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALLCAST_BROKER", "amqp://app:hunter2@broker.internal:5672/")
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    shown = capsys.readouterr().out
    assert "--broker" in shown
    assert "hunter2" not in shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:secret@127.0.0.1:5672/vh", "amqp://guest:***@127.0.0.1:5672/vh"),
        ("redis://:pw@localhost/0", "redis://:***@localhost/0"),
        ("sqlite:///.callcast/broker.db", "sqlite:///.callcast/broker.db"),
        # characters a URL parser takes for the path, query or fragment, as SQLAlchemy does not
        ("postgresql://app:pa/ss@db/x", "postgresql://app:***@db/x"),
        ("postgresql://app:pa#ss@db/x", "postgresql://app:***@db/x"),
        ("postgresql://app:pa?ss@db/x", "postgresql://app:***@db/x"),
        (
            "postgresql://app@db/x?password=s3cret&sslmode=require",
            "postgresql://app@db/x?password=***&sslmode=require",
        ),
    ],
)
def test_redact_hides_passwords(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_run_passes_service_urls_and_databases_to_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    given: dict[str, object] = {}

    async def start(self: App, **options: object) -> None:
        given.update(options)
        raise ConfigurationError("stop here")

    monkeypatch.setattr(App, "start", start)
    code = main(
        [
            "run",
            "examples.shop:app",
            "--broker",
            "memory://",
            "--service-url",
            "payments=http://127.0.0.1:8001",
            "--database",
            "orders=sqlite:///orders.db",
        ]
    )
    assert code == 2
    assert given["service_urls"] == {"payments": "http://127.0.0.1:8001"}
    assert given["databases"] == {"orders": "sqlite:///orders.db"}


def test_a_service_url_without_a_name_is_a_clear_error_without_the_password() -> None:
    with pytest.raises(SystemExit, match="--service-url takes SERVICE=URL") as refused:
        main(["run", "examples.shop:app", "--service-url", "http://u:hunter2@127.0.0.1:8001"])
    assert "hunter2" not in str(refused.value)


def test_a_service_url_or_database_for_no_such_service_is_refused() -> None:
    with pytest.raises(SystemExit, match=r"name no service of examples\.shop:app: paymnets"):
        main(["run", "examples.shop:app", "--service-url", "paymnets=http://127.0.0.1:8001"])
