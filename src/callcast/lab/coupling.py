"""Coupling, derived from what the services declare (:func:`callcast.topology.describe`).

* ``knows``: per service, how many other services it must know by name and call (``calls=``);
  a publisher knows no subscriber, a subscriber knows an event type, not its publisher.
* blast radius: the services whose failure fails the user's request — the entry service and every
  service it reaches by synchronous calls, transitively.
* what adding a consumer changes: the difference between the app before and after the consumer is
  added — services whose declarations changed (with the routes that must be redeployed) and
  services that are new.
"""

from __future__ import annotations

from typing import Any

from callcast.app import App
from callcast.topology import describe


def coupling(app: App, entry: str = "orders") -> dict[str, Any]:
    """Per-service ``knows``/``calls``/``publishes``/``consumes`` and the blast radius of ``entry``."""
    services = describe(app)["services"]
    reached = {entry}
    frontier = [entry]
    while frontier:
        for callee in services[frontier.pop()]["calls"]:
            if callee not in reached:
                reached.add(callee)
                frontier.append(callee)
    return {
        "services": {
            name: {
                "knows": len(info["calls"]),
                "calls": info["calls"],
                "publishes": info["publishes"],
                "consumes": info["consumes"],
            }
            for name, info in services.items()
        },
        "blast_radius": len(reached),
        "blast_radius_services": sorted(reached),
    }


def consumer_change(before: App, after: App) -> dict[str, Any]:
    """What had to change to go from ``before`` to ``after``: changed and added services, and the
    handlers of the changed services (as ``module.function``) that are redeployed with them."""
    old = describe(before)["services"]
    new = describe(after)["services"]
    changed = sorted(name for name in new if name in old and new[name] != old[name])
    handlers: list[str] = []
    for name in changed:
        service = after.service(name)
        diff = {key: sorted(set(new[name][key]) - set(old[name][key])) for key in new[name]}
        what = "; ".join(f"{key} += {', '.join(values)}" for key, values in diff.items() if values)
        for route in service.routes:
            handlers.append(
                f"{name}: {route.method} {route.path} ({route.fn.__module__}.{route.fn.__name__}; {what})"
            )
    return {
        "producer_changed": bool(changed),
        "changed_services": changed,
        "changed_handlers": handlers,
        "added_services": sorted(set(new) - set(old)),
    }
