"""The project's error classes: one root, one short table (docs/errors.md).

Every error that a user or the environment can cause derives from ``NezhaError`` through one of the
classes below; each class states what a CLI exits with (``exit_code``), what the server answers over
HTTP (``http_status``) and gRPC (``grpc_status``, a ``grpc.StatusCode`` name: the runtime does not import
grpc) and its metrics label (``kind``, from a fixed set). Every CLI prints one as a one-line
``error: ...`` message and exits with its code; anything else is a bug and keeps its traceback. Classes
also derive from the builtin (``ValueError``, ``RuntimeError``, ...) that callers written against it
catch. tests/test_errors.py checks that nothing else derives from ``NezhaError`` and that the docs list
exactly these classes."""

import reprlib

_SHORT = reprlib.Repr()          # Python 3.11's Repr takes its limits as attributes
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 3, 60, 40, 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 6
MAX_INT_BITS = 4000              # repr() of a larger int costs quadratic time (or raises past 4300 digits)


def clipped(value) -> str:
    """``repr(value)`` for an error message, at most a few hundred characters and built in time bounded by
    that, not by the value: ``{k!r}`` of a 524k-element list sent as ``k`` took ~60 ms of the GIL, which
    every other request of a server waited for (reprlib stops at the first elements)."""
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        return f"<an integer of {value.bit_length()} bits>"
    return _SHORT.repr(value)


class NezhaError(Exception):
    """The root; raised only through a class below. A server answers one it cannot place as an internal
    error (500, its message only in the log)."""

    exit_code, http_status, grpc_status, kind = 2, 500, "INTERNAL", "internal"
    headers: dict = {}


class InputError(NezhaError, ValueError):
    """What the caller gave is not allowed: an option, a request (k, beam, items, body), a data file, a
    SID layout, a baseline file; the message names it and what is allowed."""

    exit_code, http_status, grpc_status, kind = 2, 400, "INVALID_ARGUMENT", "bad_request"


class ArtifactError(NezhaError, ValueError):
    """An artifact, checkpoint or catalog that is missing, corrupt, unsafe or not what this code reads
    (manifest, files, item index, a TensorRT engine of another machine, a copy to a node that failed).
    A server answers one met while answering as an internal error: the request was fine."""

    exit_code, http_status, grpc_status, kind = 2, 500, "INTERNAL", "internal"


class StepError(NezhaError, RuntimeError):
    """A step of a build or measurement that ran and failed: torch export, parity or int8 validation,
    a graph pass, a TensorRT engine build, a callgrind worker. A validation's ``report`` holds every
    comparison (None for the others)."""

    exit_code, http_status, grpc_status, kind = 2, 500, "INTERNAL", "internal"

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


class GraphRunError(NezhaError, RuntimeError):
    """A graph that failed while running a feed its runner accepted: graphs that do not fit their manifest
    (an edited layout naming tokens beyond the embedding), or the device (out of memory). One line for the
    CLI; a server answers it 500 (the server's fault, not the request's), never 400."""

    exit_code, http_status, grpc_status, kind = 2, 500, "INTERNAL", "internal"


class Unavailable(NezhaError, RuntimeError):
    """Cannot be done here or now: a backend, device or library this machine lacks (CUDA provider,
    TensorRT, the C++ runtime's library), decode processes that did not start, a server starting or
    draining. Another machine, or a later try, may succeed: exit code 3."""

    exit_code, http_status, grpc_status, kind = 3, 503, "UNAVAILABLE", "unavailable"


class Overloaded(NezhaError, RuntimeError):
    """The bounded queue is full: answered at once so that latency stays bounded (clients retry)."""

    exit_code, http_status, grpc_status, kind = 3, 429, "RESOURCE_EXHAUSTED", "overloaded"


class DeadlineExceeded(NezhaError, TimeoutError):
    """No answer within the request's deadline (--timeout-ms, x-nezha-timeout-ms, the gRPC deadline)."""

    exit_code, http_status, grpc_status, kind = 3, 504, "DEADLINE_EXCEEDED", "deadline"


class PayloadTooLarge(NezhaError, ValueError):
    """A request body over --max-body-bytes."""

    exit_code, http_status, grpc_status, kind = 2, 413, "RESOURCE_EXHAUSTED", "too_large"


class NotFound(NezhaError, LookupError):
    """No such route, model or model version."""

    exit_code, http_status, grpc_status, kind = 2, 404, "NOT_FOUND", "not_found"


class _WithStatus:
    """Mixin of a table class whose instances carry one of its ``STATUSES``: ``Class(status, message)``."""

    STATUSES: dict = {}             # HTTP status -> (gRPC status name, kind, headers)

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.http_status = status
        self.grpc_status, self.kind, self.headers = self.STATUSES[status]


class AccessDenied(_WithStatus, NezhaError, PermissionError):
    """An admin request without a token (401) or refused (403: a wrong token, a browser page, an artifact
    outside --artifact-root)."""

    exit_code, http_status, grpc_status, kind = 2, 403, "PERMISSION_DENIED", "forbidden"
    STATUSES = {401: ("UNAUTHENTICATED", "unauthorized", {"WWW-Authenticate": 'Bearer realm="nezha-admin"'}),
                403: ("PERMISSION_DENIED", "forbidden", {})}                 # RFC 6750: a 401 names the scheme


class RequestRefused(_WithStatus, NezhaError):
    """An HTTP-only refusal: 405 (method), 408 (the body did not arrive within --body-timeout; the
    connection is closed), 409 (a reload already running), 415 (admin media type) or 499 (the client
    closed the connection: nginx's "client closed request", counted only)."""

    exit_code, http_status, grpc_status, kind = 2, 409, "ABORTED", "conflict"
    STATUSES = {405: ("UNIMPLEMENTED", "method", {}),
                408: ("DEADLINE_EXCEEDED", "request_timeout", {"Connection": "close"}),  # the body may still come
                409: ("ABORTED", "conflict", {}),
                415: ("INVALID_ARGUMENT", "media_type", {}),
                499: ("CANCELLED", "client_gone", {})}


class RegressionError(NezhaError):
    """A benchmark gate found a regression past its tolerance (the REGRESSED lines name each): exit code 1,
    so that a script tells "slower" (1) from "could not measure" (2, 3)."""

    exit_code, http_status, grpc_status, kind = 1, 500, "INTERNAL", "internal"


TABLE = (InputError, ArtifactError, StepError, GraphRunError, Unavailable, Overloaded, DeadlineExceeded,
         PayloadTooLarge, NotFound, AccessDenied, RequestRefused, RegressionError)
