"""The app: the set of services that make up a system, and how to run some or all of them.

An :class:`App` is a static description. ``callcast run MODULE:APP`` runs it;
:meth:`App.start` returns a started :class:`~callcast.runtime.Runtime` for tests and embedding.
Every process of an app declares the consumer groups of *all* its services on the broker at start,
so events published before a subscribing service's first process starts are kept for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from callcast.exceptions import ConfigurationError
from callcast.resilience import CallPolicy
from callcast.service import Service

if TYPE_CHECKING:
    from callcast.runtime import Runtime
    from callcast.transport import Broker


class App:
    """Services that form one system. Names of services are unique; so are (method, path) routes.

    ``call_policies`` maps a service to the :class:`~callcast.CallPolicy` of calls to it from the
    app's processes (``"*"``: every other service; default ``CallPolicy()``); ``start`` may override
    entries. Being part of the app, they apply under ``callcast run`` too.
    """

    def __init__(
        self,
        services: Iterable[Service],
        *,
        name: str = "app",
        call_policies: Mapping[str, CallPolicy] | None = None,
    ) -> None:
        self.name = name
        self.services: dict[str, Service] = {}
        seen_routes: dict[tuple[str, str], str] = {}
        spelled: dict[str, str] = {}
        for service in services:
            if service.name in self.services:
                raise ConfigurationError(f"two services named {service.name!r}")
            # Names that differ only in case or in '-' against '_' share a database: one
            # CALLCAST_DATABASE_<NAME> variable, and one file where file names ignore case.
            same = spelled.setdefault(service.name.upper().replace("-", "_"), service.name)
            if same != service.name:
                raise ConfigurationError(
                    f"services {same!r} and {service.name!r} differ only in case or in '-' and '_': "
                    "they would share a database"
                )
            self.services[service.name] = service
            for route in service.routes:
                key = (route.method, route.path)
                if key in seen_routes:
                    raise ConfigurationError(
                        f"{route.method} {route.path} is served by both {seen_routes[key]} and {service.name}"
                    )
                seen_routes[key] = service.name
        self.call_policies = self._checked_policies(call_policies)

    def _checked_policies(self, policies: Mapping[str, CallPolicy] | None) -> dict[str, CallPolicy]:
        """``policies`` as a dict, refusing a key that names no service (a typo would go unnoticed)."""
        checked = dict(policies or {})
        for target, policy in checked.items():
            if target != "*" and target not in self.services:
                raise ConfigurationError(
                    f"call_policies names {target!r}, which is no service of app {self.name!r}"
                )
            if not isinstance(policy, CallPolicy):
                raise ConfigurationError(f"call_policies[{target!r}] must be a CallPolicy")
        return checked

    def service(self, name: str) -> Service:
        try:
            return self.services[name]
        except KeyError:
            raise ConfigurationError(
                f"app {self.name!r} has no service {name!r}; it has {', '.join(self.services)}"
            ) from None

    async def start(
        self,
        *,
        broker: str | Broker | None = None,
        services: Sequence[str] | None = None,
        data_dir: str | Path | None = None,
        service_urls: dict[str, str] | None = None,
        databases: dict[str, str] | None = None,
        call_policies: Mapping[str, CallPolicy] | None = None,
    ) -> Runtime:
        """Start ``services`` (default: all) in this process; stop with ``await runtime.stop()``.

        ``service_urls`` maps a service to the base URL ``ctx.call`` reaches it at over HTTP (default:
        over the broker); ``databases`` maps a service to its database URL (see
        :mod:`callcast.database`); ``call_policies`` maps a service to the
        :class:`~callcast.CallPolicy` of this process's calls to it, over the app's own.
        """
        from callcast.runtime import Runtime

        runtime = Runtime(
            self,
            services=services,
            data_dir=data_dir,
            service_urls=service_urls or {},
            databases=databases,
            call_policies=self._checked_policies(call_policies),
        )
        await runtime.start(broker)
        return runtime
