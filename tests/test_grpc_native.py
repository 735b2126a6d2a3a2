"""The native gRPC transport (libnezha_grpc through serve.grpc_native) at its edges, under Python's own grpc
client: answers and status codes, unknown methods, the call limit, the client's deadline, a taken port,
drain on stop, a client that gives up; and its load client, counted against grpcio's. The same tests run
again on the sanitizer build (-fsanitize=address,undefined) of the library."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import pytest

grpc = pytest.importorskip("grpc")
from nezha.serve import grpc_native  # noqa: E402
from serve_fixtures import free_port  # noqa: E402

pytestmark = pytest.mark.skipif(grpc_native.library() is None,
                                reason="libnezha_grpc is not built (make cpp with Debian's libgrpc++-dev)")
TIMEOUT = 10.0


class Running:
    """A NativeServer in an event loop on its own thread: Echo answers its request reversed, Slow sleeps the
    seconds its request names, Refuse aborts with INVALID_ARGUMENT, Deadline answers what time is left."""

    def __init__(self, max_calls: int = 64, port: int | None = None, read_timeout: float = 30.0):
        self.port, self.loop = port or free_port(), asyncio.new_event_loop()
        self.finished = []                               # (method, what it answered)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def echo(data, context):
            return data[::-1]

        async def slow(data, context):
            await asyncio.sleep(float(data))
            self.finished.append(("Slow", data))
            return b"slept " + data

        async def refuse(data, context):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no such thing: " + data.decode())

        async def deadline(data, context):
            left = context.time_remaining()
            return b"none" if left is None else b"%.3f" % left
        handlers = {f"/t.S/{f.__name__.capitalize()}": (f, bytes) for f in (echo, slow, refuse, deadline)}

        async def start():
            return grpc_native.start(handlers, "127.0.0.1", self.port, 1 << 16, max_calls, read_timeout)
        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(TIMEOUT)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def call(self, method: str, data: bytes, timeout: float = TIMEOUT) -> bytes:
        return self.channel.unary_unary(f"/t.S/{method}")(data, timeout=timeout)

    def stop(self, grace: float = 1.0):
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(TIMEOUT + grace)
        self.channel.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)


@pytest.fixture
def running():
    servers = []

    def start(**kw) -> Running:
        servers.append(Running(**kw))
        return servers[-1]
    yield start
    for s in servers:
        if s.server.handle is not None:
            s.stop()


def _code(call) -> tuple:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_answers_status_codes_and_unknown_methods(running):
    s = running()
    assert s.call("Echo", b"abc") == b"cba" and s.call("Echo", b"") == b""
    big = bytes(range(256)) * 200                        # 51,200 bytes both ways, every byte value
    assert s.call("Echo", big) == big[::-1]
    assert _code(lambda: s.call("Refuse", b"shoe")) == (grpc.StatusCode.INVALID_ARGUMENT, "no such thing: shoe")
    assert _code(lambda: s.call("Nothing", b"")) == (grpc.StatusCode.UNIMPLEMENTED, "no method '/t.S/Nothing' here")
    assert _code(lambda: s.call("Echo", b"x" * (1 << 17)))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED   # over 64 KiB
    with ThreadPoolExecutor(32) as pool:                 # concurrent calls each get their own answer
        assert list(pool.map(lambda i: s.call("Echo", b"%d" % i), range(500))) == [(b"%d" % i)[::-1] for i in range(500)]


def test_the_client_deadline_reaches_the_handler(running):
    s = running()
    assert s.call("Deadline", b"", timeout=None) == b"none"
    left = float(s.call("Deadline", b"", timeout=5.0))
    assert 4.0 < left <= 5.1                           # grpc-timeout is sent rounded up
    assert _code(lambda: s.call("Slow", b"0.5", timeout=0.1))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.6)                                      # the handler finished the abandoned call: no harm
    assert ("Slow", b"0.5") in s.finished and s.call("Echo", b"still here") == b"ereh llits"


def test_calls_over_the_limit_are_resource_exhausted(running):
    s = running(max_calls=2)
    with ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(s.call, "Slow", b"0.6") for _ in range(2)]
        time.sleep(0.2)
        code, details = _code(lambda: s.call("Echo", b"x"))
        assert [f.result() for f in slow] == [b"slept 0.6"] * 2
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "more than 2 calls in flight" in details
    assert s.call("Echo", b"ok") == b"ko"                # the limit counts calls in flight, not calls made


def _stalled(s: Running, release: threading.Event):
    """A call opened on Echo whose request never comes until ``release`` (a client stream that waits)."""
    def requests():
        release.wait(TIMEOUT)
        return
        yield
    return s.channel.stream_unary("/t.S/Echo").future(requests(), timeout=TIMEOUT)


def test_calls_without_their_request_count_and_time_out(running):
    s = running(max_calls=2, read_timeout=0.5)
    release = threading.Event()
    stalled = [_stalled(s, release) for _ in range(2)]
    time.sleep(0.2)
    code, details = _code(lambda: s.call("Echo", b"x"))       # the two stalled calls hold the two places
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "more than 2 calls in flight" in details
    for call in stalled:                                       # answered after the read timeout
        e = call.exception(TIMEOUT)
        assert (e.code(), e.details()) == (grpc.StatusCode.DEADLINE_EXCEEDED,
                                           "the request message did not arrive within 0.5 s")
    assert s.call("Echo", b"ok") == b"ko"                      # their places are free again
    release.set()
    code, details = _code(lambda: s.channel.stream_unary("/t.S/Echo")(iter(()), timeout=TIMEOUT))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "the call sent no request message")


def test_stop_with_calls_still_waiting_for_their_request(running):
    """Calls the stop cancels before their request came (and one arriving) end cleanly: no abort, no hang."""
    s = running()
    release = threading.Event()
    stalled = [_stalled(s, release) for _ in range(20)]
    time.sleep(0.3)
    s.stop(0.2)
    for call in stalled:
        assert call.exception(TIMEOUT).code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    release.set()


def test_a_taken_port_is_one_oserror(running):
    s = running()
    with pytest.raises(OSError, match=f"gRPC cannot listen on 127.0.0.1:{s.port}"):
        Running(port=s.port)


def test_stop_lets_calls_in_flight_finish_then_refuses_the_rest(running):
    s = running()
    with ThreadPoolExecutor(3) as pool:
        quick, late = pool.submit(s.call, "Slow", b"0.3"), pool.submit(s.call, "Slow", b"5")
        time.sleep(0.1)
        t0 = time.monotonic()
        stopping = pool.submit(s.stop, 1.0)
        time.sleep(0.1)
        new_code = _code(lambda: s.call("Echo", b"x"))[0]
        assert quick.result() == b"slept 0.3"           # in flight: answered within the grace
        assert _code(late.result) == (grpc.StatusCode.UNAVAILABLE, "the server stopped before answering")
        stopping.result()
    assert new_code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - t0 < 4.0                   # the grace bounds the stop, not the slow call


@pytest.mark.parametrize("native", [True, False])
def test_the_load_clients_count_answers_and_refusals_alike(running, native):
    from nezha.serve.loadclients import GRPC_OK, grpc_closed_loop

    s = running()
    bodies = [(b"", b"%d" % i) for i in range(50)]
    # loadclients sends ModelInfer: point both clients at it by name through a handler of that name
    s.server.handlers["/inference.GRPCInferenceService/ModelInfer"] = s.server.handlers["/t.S/Echo"]
    got = grpc_closed_loop("127.0.0.1", s.port, bodies, 4, 0.5, native=native)
    ok = got["statuses"].pop(str(GRPC_OK))
    assert ok == len(got["latencies"]) > 20 and not got["statuses"] and 0.4 < got["seconds"] < 5
    assert all(0 < t < 1 for t in got["latencies"])
    s.server.handlers["/inference.GRPCInferenceService/ModelInfer"] = s.server.handlers["/t.S/Refuse"]
    got = grpc_closed_loop("127.0.0.1", s.port, bodies, 4, 0.3, native=native)
    assert list(got["statuses"]) == ["INVALID_ARGUMENT"] and got["statuses"]["INVALID_ARGUMENT"] > 10
    assert got["latencies"] == []


def test_the_same_tests_pass_on_the_sanitizer_build():
    """This file again, in a Python that loads runtime/cpp/build-asan's libnezha_grpc with ASan and UBSan
    preloaded: a use after free or undefined behaviour in the transport (the call lifecycle: cancel, stop,
    over-the-limit) aborts that run. Leaks are not checked: the interpreter's own would drown them."""
    from cpp_helpers import ASAN_BUILD

    lib = ASAN_BUILD / "libnezha_grpc.so"
    if os.environ.get("NEZHA_GRPC_SANITIZED"):
        pytest.skip("this is the sanitized run")
    if not lib.is_file():
        pytest.skip(f"no sanitizer build of libnezha_grpc at {lib} (make cpp)")
    runtimes = [subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
                for name in ("libasan.so", "libubsan.so")]
    env = {**os.environ, "LD_PRELOAD": ":".join(runtimes), "NEZHA_GRPC_LIBRARY": str(lib), "NEZHA_GRPC_SANITIZED": "1",
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1", "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                       capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parent)
    assert r.returncode == 0 and " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
