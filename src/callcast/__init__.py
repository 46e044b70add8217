"""callcast: services that talk both ways, request-driven and event-driven, on any broker.

The public API is what ``__all__`` lists; everything else may change.
"""

from callcast.app import App
from callcast.codec import event_type
from callcast.context import Context
from callcast.envelope import Envelope
from callcast.exceptions import (
    BrokerUnavailableError,
    BulkheadFullError,
    CallcastError,
    CallError,
    CallTimeoutError,
    CircuitOpenError,
    ConfigurationError,
    DecodeError,
    HandlerError,
    HTTPError,
    MessageError,
    PermanentError,
    PublishError,
    RemoteError,
    ServiceUnavailableError,
    TransportError,
    UnknownEventError,
)
from callcast.idempotency import IdempotencyPolicy
from callcast.resilience import BreakerPolicy, BulkheadPolicy, CallPolicy, CallRetryPolicy, CallStats
from callcast.retry import RetryPolicy
from callcast.runtime import Runtime
from callcast.sequence import SequencePolicy
from callcast.service import EventHandler, Route, RpcEndpoint, Service
from callcast.transport import Broker, Capabilities, Delivery, Holding, Subscription

__all__ = [
    "App",
    "BreakerPolicy",
    "Broker",
    "BrokerUnavailableError",
    "BulkheadFullError",
    "BulkheadPolicy",
    "CallError",
    "CallPolicy",
    "CallRetryPolicy",
    "CallStats",
    "CallTimeoutError",
    "CallcastError",
    "Capabilities",
    "CircuitOpenError",
    "ConfigurationError",
    "Context",
    "DecodeError",
    "Delivery",
    "Envelope",
    "EventHandler",
    "HTTPError",
    "HandlerError",
    "Holding",
    "IdempotencyPolicy",
    "MessageError",
    "PermanentError",
    "PublishError",
    "RemoteError",
    "RetryPolicy",
    "Route",
    "RpcEndpoint",
    "Runtime",
    "SequencePolicy",
    "Service",
    "ServiceUnavailableError",
    "Subscription",
    "TransportError",
    "UnknownEventError",
    "event_type",
]
__version__ = "0.1.0"
