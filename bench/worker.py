"""The benchmark's worker process: one loaded artifact, driven from outside. Run as a script (never imported
as ``nezha.bench.worker`` by the measured process), so that it imports only ``nezha.runtime`` and NumPy: the
same file drives the current tree and, in ``nezha bench --against REV``, a base revision's runtime.

    python bench/worker.py count SPEC.json     # run phases once and exit (under callgrind: counts per phase)
    python bench/worker.py serve SPEC.json     # answer JSON lines on stdin: {"contender", "request"} -> seconds

Contenders: ``floor`` (encode + one backbone pass) and ``runtime`` (``GraphRecommender.decode``). SPEC: {"artifact",
"requests" (JSON file: a list of requests, each a list of histories), "beam", "threads", "warmup", "phases"
and "out" (count only)}.

The stage counts and the test-only slowdown go through the runtime's own stage hook (``stages=`` of
``GraphRecommender.decode``, runtime/decode.py): ``NEZHA_BENCH_INJECT=verify:x0.5`` repeats the decode loop's
verify step (candidate scores + the verifier's mask) on half of its calls (``select:x1``: the top-k
selection on every call). Nothing of the runtime is patched."""

from __future__ import annotations

import gc
import json
import os
import sys
import time

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]          # run as a script: bench/'s modules (run, stats, ...) must not shadow anything

INJECT_ENV, INJECT_TARGETS = "NEZHA_BENCH_INJECT", ("verify", "select")
STAGES = ("head", "verify", "select")


def parse_inject(spec: str) -> tuple[str, float]:
    """``"verify:x0.5"`` -> ("verify", 0.5): the target and the extra repetitions per call (a fraction
    repeats on that share of calls, spread evenly)."""
    target, _, work = spec.partition(":")
    try:
        extra = float(work[1:]) if target in INJECT_TARGETS and work.startswith("x") else 0.0
    except ValueError:
        extra = 0.0
    if not 0 < extra <= 100:
        raise ValueError(f"{INJECT_ENV}={spec!r}: expected TARGET:xF with TARGET one of {INJECT_TARGETS} and "
                         "F in (0, 100] extra repetitions per call (e.g. verify:x0.5)")
    return target, extra


def machine_code(code: str, restype, *argtypes):
    """(function, page): ``code`` (x86-64, hex) in an executable page, callable through ctypes. Keep the page
    while the function is used; drop the function first."""
    import ctypes
    import mmap

    page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(bytes.fromhex(code.replace(" ", "")))
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return ctypes.CFUNCTYPE(restype, *argtypes)(address), page


def on_x86_64() -> bool:
    import platform

    return platform.machine() in ("x86_64", "AMD64")


class Callgrind:
    """Valgrind client requests without a compiler: the 19-byte magic sequence of valgrind.h's
    VALGRIND_DO_CLIENT_REQUEST (amd64), called through ctypes. Natively it is a no-op returning its
    default (0), so ``running`` tells whether callgrind (or any tool) runs us."""

    # VG_USERREQ_TOOL_BASE('C','T') + 2, 3, 4 (callgrind.h)
    TOGGLE_COLLECT, DUMP_STATS_AT, START_INSTRUMENTATION = 0x43540002, 0x43540003, 0x43540004
    RUNNING_ON_VALGRIND = 0x1001
    # mov rax,rdi; xor edx,edx; rol rdi,3; rol rdi,13; rol rdi,61; rol rdi,51; xchg rbx,rbx; mov rax,rdx; ret
    CODE = "4889f8 31d2 48c1c703 48c1c70d 48c1c73d 48c1c733 4887db 4889d0 c3"

    def __init__(self):
        import ctypes

        self._ctypes, self.running = ctypes, False
        if on_x86_64():
            self._call, self._page = machine_code(self.CODE, ctypes.c_uint64, ctypes.c_void_p)
            self._args = (ctypes.c_uint64 * 6)()
            self.running = self._request(self.RUNNING_ON_VALGRIND) > 0

    def _request(self, code: int, arg: int = 0) -> int:
        self._args[0], self._args[1] = code, arg
        return self._call(self._ctypes.addressof(self._args))

    def toggle(self) -> None:                      # collection on if off, off if on
        self.running and self._request(self.TOGGLE_COLLECT)

    def start_instrumentation(self) -> None:       # with --instr-atstart=no, all before runs near native speed
        self.running and self._request(self.START_INSTRUMENTATION)

    def dump(self, name: str) -> None:
        """Write the counts collected since the last dump as a part named ``name``, and zero them."""
        label = self._ctypes.create_string_buffer(name.encode())
        self.running and self._request(self.DUMP_STATS_AT, self._ctypes.addressof(label))


def cpu_identity() -> str | None:
    """The CPU's vendor and brand string as the ``cpuid`` instruction reports them to this process (under
    valgrind: valgrind's virtual CPU, whatever the host); None off x86-64."""
    import ctypes

    if not on_x86_64():
        return None
    # push rbx; mov eax,edi; mov r8,rsi; xor ecx,ecx; cpuid; mov [r8],eax; mov [r8+4],ebx; mov [r8+8],ecx;
    # mov [r8+12],edx; pop rbx; ret
    cpuid, page = machine_code("53 89f8 4989f0 31c9 0fa2 418900 41895804 41894808 4189500c 5b c3", None,
                               ctypes.c_uint32, ctypes.c_void_p)
    regs = (ctypes.c_uint32 * 4)()

    def leaf(n: int) -> bytes:
        cpuid(n, ctypes.addressof(regs))
        return bytes(regs)                                               # eax, ebx, ecx, edx

    r = leaf(0)
    vendor = (r[4:8] + r[12:16] + r[8:12]).decode(errors="replace")      # ebx, edx, ecx
    brand = b"".join(leaf(0x80000002 + i) for i in range(3)).split(b"\0")[0].decode(errors="replace").strip()
    cpuid = None                                     # the function pointer goes before its page
    return f"{vendor} {brand}"


class StageHook:
    """The runtime's stage hook as the count needs it: callgrind collects only inside the steps of stage
    ``collect`` (head: the draft head's graph runs; verify: the candidate scores and the verifier's mask;
    select: top-k and the gathers), and the steps of stage ``inject[0]`` run 1 + ``inject[1]`` times per
    call on average (deterministic: a running credit, no randomness)."""

    def __init__(self, cg: Callgrind | None = None, collect: str | None = None,
                 inject: tuple[str, float] | None = None):
        self.cg, self.collect = cg, collect
        self.target, self.extra = inject or (None, 0.0)
        self.credit = 0.0

    def __call__(self, name: str, step, *args):
        stage = name.split("_", 1)[0]                                    # "head_2" -> "head"
        if stage == self.collect:
            self.cg.toggle()
        try:
            out = step(*args)
            if stage == self.target:                                     # the injected step's extra runs
                self.credit += self.extra
                for _ in range(int(self.credit)):
                    step(*args)
                self.credit -= int(self.credit)
            return out
        finally:
            if stage == self.collect:
                self.cg.toggle()


def load(spec: dict):
    """(Recommender with ``spec["threads"]`` ONNX Runtime threads, requests, the injected slowdown or None)."""
    from nezha.runtime import Recommender

    with open(spec["requests"]) as f:
        requests = json.load(f)
    return Recommender.load(spec["artifact"], threads=spec["threads"]), requests, os.environ.get(INJECT_ENV) or None


def contenders(rec, beam: int, inject: str | None, cg: Callgrind | None = None, collect: str | None = None) -> dict:
    """{"floor", "runtime"} -> the callable that runs one request (a list of histories) and returns a small
    integer digest of its output (runs can be checked to have done the same work). The runtime gets a stage
    hook only where one is needed (no hook: any revision's runtime)."""
    if collect not in (None, "") + STAGES:
        raise ValueError(f"stage {collect!r}; allowed: {', '.join(STAGES)}")
    hook = StageHook(cg, collect, parse_inject(inject) if inject else None) if inject or collect else None
    kw = {} if hook is None else {"stages": hook}

    def floor(histories):
        hidden = rec.backbone(rec.encode(histories))
        return int(hidden.shape[0] * hidden.shape[1])

    def runtime(histories):
        keys, _ = rec.decode(histories, beam, **kw)
        return int(keys.sum() % 1000003)

    return {"floor": floor, "runtime": runtime}


def cpu_features() -> dict:
    """The CPU features NumPy detected (via cpuid; under valgrind, valgrind's virtual CPU), only the true ones."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:                                                     # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    return sorted(k for k, v in __cpu_features__.items() if v)


def count(spec: dict) -> dict:
    """Under ``valgrind --tool=callgrind --instr-atstart=no --collect-atstart=no``: warm every contender up on
    the first ``warmup`` requests (uninstrumented, not counted), start the instrumentation; then per phase
    (contender, n) collect only while it runs the next n requests and dump a part named after the phase
    ("runtime:STAGE": collect only inside STAGE's steps). Natively the same runs happen, nothing is dumped."""
    cg = Callgrind()
    rec, requests, inject = load(spec)
    beam, warmup = spec["beam"], spec["warmup"]
    runs = contenders(rec, beam, inject)
    needed = warmup + max([n for _, n in spec["phases"]] + [0])
    if needed > len(requests):
        raise ValueError(f"the spec asks for {needed} requests, the requests file has {len(requests)}")
    for name in runs:
        for req in requests[:warmup]:
            runs[name](req)
    cg.start_instrumentation()
    digests = {}
    for phase, n in spec["phases"]:
        name, _, stage = phase.partition(":")
        # A full collection (uncounted) zeroes the collector's counters, so cyclic collections fall on the
        # same requests in every run (without it one whole-heap collection moved between the floor and the
        # runtime phase: 2.8% of the runtime's own count between unchanged runs).
        gc.collect()
        run = contenders(rec, beam, inject, cg, stage)[name] if stage else runs[name]
        d = 0
        stage or cg.toggle()
        for req in requests[warmup:warmup + n]:
            d = (d * 31 + run(req)) % 1000003
        stage or cg.toggle()
        cg.dump(phase)
        digests[phase] = d
    rec.close()
    import numpy as np
    import onnxruntime
    return {"digests": digests, "inject": inject, "cpu_features": cpu_features(), "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__, "runtime_module": sys.modules["nezha.runtime"].__file__,
            "client_requests": cg.running, "cpuid": cpu_identity()}


def serve(spec: dict) -> None:
    """A JSON-lines loop: {"contender": NAME, "request": I} -> {"seconds": S} (the request's wall-clock time,
    measured here so that the pipe is not timed); {"stop": true} ends. Says {"ready": ...} once loaded."""
    rec, requests, inject = load(spec)
    runs = contenders(rec, spec["beam"], inject)
    print(json.dumps({"ready": True, "requests": len(requests), "inject": inject,
                      "runtime_module": sys.modules["nezha.runtime"].__file__}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("stop"):
            break
        run, req = runs[msg["contender"]], requests[msg["request"]]
        t0 = time.perf_counter()
        run(req)
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    rec.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("count", "serve"):
        print("usage: worker.py count|serve SPEC.json", file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        spec = json.load(f)
    if argv[0] == "serve":
        return serve(spec) or 0
    facts = count(spec)
    with open(spec["out"], "w") as f:
        json.dump(facts, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
