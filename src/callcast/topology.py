"""The coupling map of an app: who serves which route and RPC, who publishes and who consumes what."""

from __future__ import annotations

from typing import Any

from callcast.app import App
from callcast.codec import event_type


def describe(app: App) -> dict[str, Any]:
    """The app's topology as plain data (``callcast topology --json`` prints it)."""
    services: dict[str, Any] = {}
    events: dict[str, dict[str, list[str]]] = {}
    for service in app.services.values():
        services[service.name] = {
            "routes": [f"{route.method} {route.path}" for route in service.routes],
            "rpc": [f"{endpoint.service}.{endpoint.name}" for endpoint in service.endpoints.values()],
            "publishes": sorted(service.published_types),
            "consumes": sorted({handler.topic for handler in service.handlers}),
            "calls": sorted(service.calls),
        }
        for model in service.publishes:
            events.setdefault(event_type(model), {"publishers": [], "subscribers": []})["publishers"].append(
                service.name
            )
        for handler in service.handlers:
            events.setdefault(handler.topic, {"publishers": [], "subscribers": []})["subscribers"].append(
                handler.group
            )
    return {"app": app.name, "services": services, "events": events}


def render(app: App) -> str:
    """The topology as text for a terminal."""
    data = describe(app)
    lines = [f"app {data['app']}", "", "services"]
    for name, info in data["services"].items():
        lines.append(f"  {name}")
        for route in info["routes"]:
            lines.append(f"    route      {route}")
        for rpc in info["rpc"]:
            lines.append(
                f"    rpc        {rpc}   (broker topic callcast.rpc.{rpc}, POST /rpc/{rpc.replace('.', '/')})"
            )
        for kind in ("publishes", "consumes", "calls"):
            if info[kind]:
                lines.append(f"    {kind:<10} {', '.join(info[kind])}")
    lines += ["", "events"]
    for kind, ends in sorted(data["events"].items()):
        publishers = ", ".join(ends["publishers"]) or "(nobody)"
        subscribers = ", ".join(ends["subscribers"]) or "(nobody)"
        lines.append(f"  {kind}: {publishers} -> {subscribers}")
    calls = [(name, target) for name, info in data["services"].items() for target in info["calls"]]
    if calls:
        lines += ["", "calls (request-driven: the caller waits)"]
        lines += [f"  {caller} -> {target}" for caller, target in calls]
    return "\n".join(lines)
