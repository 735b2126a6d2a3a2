"""gRPC through gRPC's C++ library (libnezha_grpc, runtime/cpp/src/grpc_transport.cpp): the transport of
``nezha serve --grpc-port`` and the client of ``nezha loadtest --protocol grpc`` when the library is built.

Why: grpc.aio costs ~240 us of server CPU per call (its Cython layer in the event loop, and a hop through
its poller thread for each of a call's events) against ~50 to 85 us for uvicorn, and grpcio's client ~160 us
against ~20 us for the HTTP client (docs/protocols.md, "Measured"). Here one C++ thread of libnezha_grpc
polls gRPC's completion queue, reads each call and queues its method and bytes; the event loop takes them
when the queue's descriptor (an eventfd) is readable, a batch per wake-up, and runs the same servicer,
metrics and errors as grpc.aio's (serve/grpc_server.py); its answer goes back through one C call. The C++
side never calls into Python.

What differs from grpc.aio: a client that cancels a call does not cancel its decode (the answer is
dropped; the client's deadline still bounds the wait, as --timeout-ms does)."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time

from nezha.runtime.errors import Unavailable

log = logging.getLogger("nezha.serve")

LIBRARY = "libnezha_grpc.so"
VARIABLE = "NEZHA_GRPC_LIBRARY"         # a libnezha_grpc.so built elsewhere
_TAKE_AT_ONCE = 64                      # calls taken per wake-up before the loop runs other work
_INTERNAL, _UNIMPLEMENTED = 13, 12

_lib = None


def library():
    """libnezha_grpc (ctypes), or None when it is not built (grpcio then serves and loads)."""
    global _lib
    if _lib is None:
        from nezha.runtime.backends.cpp import bind, library_path, open_library

        path = library_path(LIBRARY, VARIABLE)
        if not path.is_file():
            if os.environ.get(VARIABLE):
                raise Unavailable(f"${VARIABLE} names {str(path)!r}, which is not a file")
            return None
        c = ctypes
        u8p, out = c.c_char_p, c.POINTER
        signatures = {
            "nezha_grpc_start": (c.c_void_p, [c.c_char_p, c.c_int32, c.c_int32, c.c_double, c.c_char_p, c.c_size_t]),
            "nezha_grpc_fd": (c.c_int, [c.c_void_p]),
            "nezha_grpc_next": (c.c_int, [c.c_void_p, out(c.c_uint64), out(c.c_void_p), out(c.c_size_t), out(c.c_void_p),
                                          out(c.c_size_t), out(c.c_double)]),
            "nezha_grpc_finish": (c.c_int, [c.c_void_p, c.c_uint64, c.c_int, c.c_char_p, u8p, c.c_size_t]),
            "nezha_grpc_stop": (None, [c.c_void_p, c.c_double]),
            "nezha_grpc_free": (None, [c.c_void_p]),
            "nezha_grpc_load": (c.c_int, [c.c_char_p, c.c_char_p, c.c_void_p, c.c_void_p, c.c_size_t, c.c_int, c.c_double,
                                          c.c_size_t, c.c_double, c.c_void_p, c.c_size_t, out(c.c_size_t), c.c_void_p,
                                          out(c.c_double), c.c_char_p, c.c_size_t]),
        }
        try:
            _lib = bind(open_library(path), signatures)
        except (OSError, AttributeError) as e:
            raise Unavailable(f"{str(path)!r} is not a usable libnezha_grpc ({e}); rebuild it (make cpp) or unset "
                              f"${VARIABLE}") from None
    return _lib


def built():
    """libnezha_grpc, or Unavailable saying how to build it."""
    lib = library()
    if lib is None:
        from nezha.runtime.backends.cpp import library_path

        raise Unavailable(f"--grpc-transport native: {library_path(LIBRARY, VARIABLE)} is not built (make cpp, with "
                          f"Debian's libgrpc++-dev installed; or set ${VARIABLE})")
    return lib


class _Abort(Exception):
    def __init__(self, code, details: str):
        self.code, self.details = code, details


class _Context:
    """What the servicer asks of grpc.aio's ServicerContext: the deadline, and abort."""

    __slots__ = ("deadline",)

    def __init__(self, seconds_left: float):
        self.deadline = None if seconds_left < 0 else time.monotonic() + seconds_left

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    async def abort(self, code, details: str = ""):
        raise _Abort(code, details)


class NativeServer:
    """A started libnezha_grpc server whose calls run ``handlers`` ({"/pkg.Service/Method": (method, read)}:
    ``await method(read(bytes), context)`` -> a response message, or bytes) in the running loop. ``await stop(grace)``
    drains like grpc.aio's."""

    def __init__(self, lib, handle: int, handlers: dict):
        self.lib, self.handle, self.handlers = lib, handle, handlers
        self.loop = asyncio.get_running_loop()
        self.fd = lib.nezha_grpc_fd(handle)
        self.tasks: set[asyncio.Task] = set()
        c = ctypes
        self._out = (c.c_uint64(), c.c_void_p(), c.c_size_t(), c.c_void_p(), c.c_size_t(), c.c_double())
        self._refs = tuple(c.byref(x) for x in self._out)
        self.loop.add_reader(self.fd, self._take)

    def _take(self) -> None:
        call, method, method_size, request, request_size, left = self._out
        for _ in range(_TAKE_AT_ONCE):
            if self.handle is None or not self.lib.nezha_grpc_next(self.handle, *self._refs):
                return
            name = ctypes.string_at(method.value, method_size.value).decode("utf-8", "replace")
            handler = self.handlers.get(name)
            if handler is None:
                self._finish(call.value, _UNIMPLEMENTED, f"no method {name!r} here")
                continue
            data = ctypes.string_at(request.value, request_size.value)
            task = self.loop.create_task(self._run(call.value, handler, data, left.value))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run(self, call: int, handler, data: bytes, seconds_left: float) -> None:
        method, read = handler
        try:
            response = await method(read(data), _Context(seconds_left))
        except _Abort as a:
            return self._finish(call, a.code.value[0], a.details)
        except Exception:                                  # the servicer maps errors: this is a bug, logged
            log.exception("gRPC call %d failed", call)
            return self._finish(call, _INTERNAL, "internal error")
        self._finish(call, 0, "", response if isinstance(response, bytes) else response.SerializeToString())

    def _finish(self, call: int, code: int, message: str, data: bytes = b"") -> None:
        if self.handle is not None:                        # after stop: stop answered it UNAVAILABLE
            self.lib.nezha_grpc_finish(self.handle, call, code, message.encode(), data, len(data))

    async def stop(self, grace: float) -> None:
        """New calls get UNAVAILABLE; the calls in flight have ``grace`` seconds, then get UNAVAILABLE."""
        if self.handle is None:
            return
        await self.loop.run_in_executor(None, self.lib.nezha_grpc_stop, self.handle, grace)
        self.loop.remove_reader(self.fd)
        handle, self.handle = self.handle, None
        self.lib.nezha_grpc_free(handle)


def start(handlers: dict, host: str, port: int, max_message_bytes: int, max_calls: int,
          read_timeout: float = 30.0) -> NativeServer:
    """Listen on host:port (in the running loop); OSError when the port is taken. A call counts against
    ``max_calls`` from its arrival; its request must arrive within ``read_timeout`` seconds."""
    lib = built()
    error = ctypes.create_string_buffer(512)
    handle = lib.nezha_grpc_start(f"{host}:{port}".encode(), max_message_bytes, max_calls, read_timeout, error,
                                  len(error))
    if not handle:
        raise OSError(f"gRPC cannot listen on {host}:{port}: {error.value.decode(errors='replace')}")
    return NativeServer(lib, handle, handlers)


def load(host: str, port: int, method: str, bodies: list[bytes], concurrency: int, duration: float, offset: int = 0,
         timeout: float = 60.0) -> dict:
    """libnezha_grpc's load client (nezha_grpc_load): ``concurrency`` closed-loop clients on one channel for
    ``duration`` s. Returns what serve.loadclients.grpc_closed_loop returns: latencies (s) of OK answers,
    counts by status (OK as 200, else the code's name) and the run's seconds. Past 2^20 OK answers the
    latencies are a uniform sample of them (the count of OK answers is the status count)."""
    import grpc

    from .loadclients import GRPC_OK

    lib = built()
    keep = [ctypes.create_string_buffer(b, len(b)) for b in bodies]
    pointers = (ctypes.c_void_p * len(keep))(*[ctypes.addressof(b) for b in keep])
    sizes = (ctypes.c_size_t * len(keep))(*[len(b) for b in bodies])
    capacity = min(int(duration * 100_000) + 1024, 1 << 20)    # 8 MB at most; past it, a uniform sample
    latencies = (ctypes.c_double * capacity)()
    counts = (ctypes.c_int64 * 17)()
    n, seconds, error = ctypes.c_size_t(), ctypes.c_double(), ctypes.create_string_buffer(512)
    if lib.nezha_grpc_load(f"{host}:{port}".encode(), method.encode(), pointers, sizes, len(keep), concurrency, duration,
                           offset, timeout, latencies, capacity, ctypes.byref(n), counts, ctypes.byref(seconds), error,
                           len(error)):
        raise OSError(f"gRPC load client: {error.value.decode(errors='replace')}")
    names = {code.value[0]: code.name for code in grpc.StatusCode}
    statuses = {str(GRPC_OK if code == 0 else names.get(code, code)): int(c) for code, c in enumerate(counts) if c}
    return {"latencies": list(latencies[:min(n.value, capacity)]), "statuses": statuses, "seconds": seconds.value}
