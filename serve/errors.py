"""What a client is told when a request fails, over HTTP and gRPC alike: the error classes and their
statuses are the library's table (nezha.runtime.errors, docs/errors.md)."""

from __future__ import annotations

import logging

from nezha.runtime.errors import NezhaError

INTERNAL = "internal error; the server log has the details"
log = logging.getLogger("nezha.serve")


def refusal(e: Exception, where: str) -> NezhaError:
    """An exception raised while answering ``where`` -> the error the client is told: its ``http_status``,
    ``grpc_status``, ``kind``, ``headers`` and message. A NezhaError is told as it is, unless it is the
    server's fault (HTTP 500: a graph that failed, a bad artifact); that and any other exception (a bug)
    are logged and told as an internal error without details."""
    if isinstance(e, NezhaError) and e.http_status != 500:
        return e
    if isinstance(e, NezhaError):
        log.error("internal error on %s: %s", where, e)
    else:
        log.error("internal error on %s", where, exc_info=e)
    return NezhaError(INTERNAL)
