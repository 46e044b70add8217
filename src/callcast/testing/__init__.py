"""Test support shipped with callcast (needs pytest and pytest-asyncio: the ``dev`` extra).

:class:`~callcast.testing.conformance.BrokerConformance` is the transport seam's conformance suite:
every broker adapter's test module subclasses it, so all adapters are held to one contract::

    from callcast.brokers import connect
    from callcast.testing import BrokerConformance

    class TestMyBroker(BrokerConformance):
        async def make_broker(self):
            return await connect("mybroker://localhost/test")
"""

from __future__ import annotations

import pytest

# The suite's plain ``assert`` statements get pytest's introspection, as if they were in a test module.
pytest.register_assert_rewrite("callcast.testing.conformance")

from callcast.testing.conformance import BrokerConformance  # noqa: E402

__all__ = ["BrokerConformance"]
