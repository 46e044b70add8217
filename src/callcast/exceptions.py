"""callcast's exceptions: every failure a user can see is one of these.

    CallcastError
    ├── ConfigurationError          bad broker URL, unknown service, handler signature callcast cannot serve
    ├── TransportError              the broker failed; driver errors are translated into these at the
    │   │                           adapter boundary, never leaked
    │   ├── BrokerUnavailableError  cannot reach the broker (connection refused, lost, closed)
    │   └── PublishError            the broker did not confirm a publish: it may or may not be stored
    ├── MessageError                an envelope or payload that cannot be handled (dead-lettered at once
    │   │                           when callcast's decoding raises it; from a handler, retried like
    │   │                           any exception: raise PermanentError to stop the retries)
    │   ├── DecodeError             not a CloudEvent, missing attribute, not JSON, too large
    │   └── UnknownEventError       an event type no handler is registered for
    ├── HandlerError                raised by user code to steer delivery
    │   └── PermanentError          do not retry this message: a retry cannot succeed
    └── CallError                   an outgoing call (ctx.call) failed
        ├── CallTimeoutError        no answer within the deadline
        ├── ServiceUnavailableError the target could not be reached
        │   ├── CircuitOpenError    not tried: the target's circuit breaker is open (it keeps failing)
        │   └── BulkheadFullError   not tried: too many calls to the target are in flight already
        └── RemoteError             the target answered with an error (status and message kept)

HTTP routes raise :class:`HTTPError` (not a CallcastError: it is a response, not a failure) to
answer with a status code and a reason.
"""

from __future__ import annotations


class CallcastError(Exception):
    """Root of every exception callcast raises."""


class ConfigurationError(CallcastError):
    """The app, a service or a URL is set up in a way callcast cannot run."""


class TransportError(CallcastError):
    """The broker failed. Adapters translate their driver's exceptions into this tree."""


class BrokerUnavailableError(TransportError):
    """The broker cannot be reached, or the connection is closed."""


class PublishError(TransportError):
    """A publish was not confirmed by the broker: the caller must assume it may not be stored."""


class MessageError(CallcastError):
    """A message that can never be handled as it is. Raised by callcast's decoding of a delivery, it
    dead-letters the message at once; raised by a handler, it is retried like any other exception
    (a handler raises :class:`PermanentError` to stop the retries)."""


class DecodeError(MessageError):
    """The envelope or its data is malformed: not a CloudEvent, not JSON, too large, invalid."""


class UnknownEventError(MessageError):
    """No handler is registered for the message's event type."""


class HandlerError(CallcastError):
    """Base of exceptions that handlers raise on purpose to steer delivery."""


class PermanentError(HandlerError):
    """Raised by a handler when retrying the message cannot succeed (it is dead-lettered)."""


class CallError(CallcastError):
    """An outgoing call made with ``ctx.call`` failed."""

    def __init__(self, message: str, *, target: str) -> None:
        super().__init__(message)
        self.target = target


class CallTimeoutError(CallError):
    """No answer arrived before the call's deadline."""


class ServiceUnavailableError(CallError):
    """The target service could not be reached at all."""


class CircuitOpenError(ServiceUnavailableError):
    """The call was not made: the target's circuit breaker is open because its recent calls from
    this process failed too often (see :class:`~callcast.BreakerPolicy`). It fails fast, without a
    request, until the cool-down ends and a few probe calls show the target healthy again.
    ``retry_after`` is the number of seconds until the next probe may go (0 when probes are
    already in flight). An HTTP route that lets it through answers 503."""

    def __init__(self, message: str, *, target: str, retry_after: float) -> None:
        super().__init__(message, target=target)
        self.retry_after = retry_after


class BulkheadFullError(ServiceUnavailableError):
    """The call was not made: ``limit`` calls to the target were already in flight from this
    process and no slot freed up within the bulkhead's wait (see :class:`~callcast.BulkheadPolicy`).
    An HTTP route that lets it through answers 503."""

    def __init__(self, message: str, *, target: str, limit: int) -> None:
        super().__init__(message, target=target)
        self.limit = limit


class RemoteError(CallError):
    """The target answered with an error; ``status`` follows HTTP conventions (4xx: caller's fault).
    ``detail`` is the target's own reason, as it answered it."""

    def __init__(
        self, message: str, *, target: str, status: int, error_type: str = "", detail: str = ""
    ) -> None:
        super().__init__(message, target=target)
        self.status = status
        self.error_type = error_type
        self.detail = detail


class HTTPError(Exception):
    """Raise from an HTTP route or RPC handler to answer with ``status`` and ``detail``.

    >>> raise HTTPError(404, "user 42 not found")
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
