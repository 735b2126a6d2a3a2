"""The server's refusals: each error class is one HTTP status (and gRPC code: serve.grpc_server.CODES) and
one ``kind``, the label of the ``nezha_errors`` metric. All derive from the library's ``NezhaError``."""

from __future__ import annotations

from nezha.runtime.errors import NezhaError


class ServeError(NezhaError):
    """A request the server refuses; ``status`` is its HTTP status, ``kind`` its metrics label and ``headers``
    what the answer must carry besides."""

    status, kind = 500, "internal"
    headers: dict = {}


class BadRequest(ServeError, ValueError):
    status, kind = 400, "bad_request"


class PayloadTooLarge(ServeError, ValueError):
    status, kind = 413, "too_large"


class NotFound(ServeError, LookupError):
    status, kind = 404, "not_found"


class Overloaded(ServeError, RuntimeError):
    """The bounded queue is full: answered at once so that latency stays bounded (clients retry)."""

    status, kind = 429, "overloaded"


class Unavailable(ServeError, RuntimeError):
    """Not ready: starting, draining for shutdown, or without a model."""

    status, kind = 503, "unavailable"


class DeadlineExceeded(ServeError, TimeoutError):
    status, kind = 504, "deadline"


class Conflict(ServeError, RuntimeError):
    status, kind = 409, "conflict"


class Unauthorized(ServeError, PermissionError):
    status, kind = 401, "unauthorized"
    headers = {"WWW-Authenticate": 'Bearer realm="nezha-admin"'}            # RFC 6750: names the scheme


class Forbidden(ServeError, PermissionError):
    status, kind = 403, "forbidden"


class RequestTimeout(ServeError, TimeoutError):
    """The body did not arrive in time (--body-timeout); the connection is closed after the answer."""

    status, kind = 408, "request_timeout"
    headers = {"Connection": "close"}                   # the rest of the body may still be on its way


class ClientGone(ServeError, ConnectionError):
    """Nobody reads this answer; counted under nginx's 499 ("client closed request")."""
    status, kind = 499, "client_gone"


class UnsupportedMediaType(ServeError, ValueError):
    status, kind = 415, "media_type"


class MethodNotAllowed(ServeError):
    status, kind = 405, "method"
