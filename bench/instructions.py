"""The instruction-count regression gate: the runtime's work per request, counted by Valgrind.

Instructions executed do not depend on the machine's load, its neighbours or its clock, so a 2% gate holds
on a shared 2-core CI machine where wall-clock times move by 20%. What is counted: one worker process
(``bench/worker.py count``) under ``valgrind --tool=callgrind --instr-atstart=no``, which loads the
artifact and warms each contender up uninstrumented (near native speed), starts the instrumentation, and
then runs N requests per phase, switching callgrind's event collection on only while a phase's requests
run and dumping the counts after each phase (valgrind client requests, issued through a few bytes of
machine code called with ctypes). Phases: ``floor`` (encode + backbone), ``runtime`` (the full
NEZHA decode), and ``runtime:head``/``runtime:verify``/``runtime:select``, the runtime again with collection
on only inside the draft head's graph runs, the verifier's mask or the top-k selection: the stages. The
gated figures: the runtime's **own** instructions per request (runtime minus floor: head graphs, verifier,
selection, the decode loop) at 2%, and its **end-to-end** instructions per request at 1%.

Why collection toggled around the requests, and callgrind: setup (Python's start, imports, loading the
artifact, ONNX Runtime's session creation) is not deterministic to the instruction (ONNX Runtime's session
setup was measured to vary by up to 10M instructions between identical processes), so counting whole
processes and subtracting runs with N and 0 requests put that noise into the per-request figures (3.45M,
3.72M, 3.54M own instructions per request over three identical runs of 30 requests: 8% apart). Toggling
leaves setup out by construction. Cachegrind can toggle only from valgrind 3.22 (``--instr-at-start``
and client requests); Debian 12 ships 3.19, whose callgrind has had ``CALLGRIND_TOGGLE_COLLECT`` and
``CALLGRIND_DUMP_STATS_AT`` for years (``--toggle-collect=FUNCTION`` selects C functions by name, and the
timed loop is Python: every frame is ``_PyEval_EvalFrameDefault``). Callgrind also names the object of every
function, so ONNX Runtime's unnamed (stripped) kernels are attributed to its library.

Machines: valgrind's virtual CPU offers AVX2/FMA3 but no AVX-512, so ONNX Runtime, NumPy and glibc dispatch
to their AVX2 kernels under it on an AVX-512 host as on an AVX2-only one (the result records the CPU
features NumPy sees natively and under valgrind). Other versions of Python, NumPy, ONNX Runtime or glibc
change the counts: the result records them, and the gate's report names each difference from the baseline.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from .stats import machine as wall_clock_machine
from nezha.runtime.errors import NezhaError

FORMAT = "nezha-instructions"
BASELINE_FORMAT = "nezha-instructions-baseline"
VERSION = 1
WORKER = Path(__file__).with_name("worker.py")
# The workload of the gate (batch 1, beam 20, 30 requests per phase): about 1.6G instructions counted on
# the demo artifact with the stages, about 4 minutes of one core under callgrind (1.5 without stages).
DEFAULTS = {"requests": 30, "warmup": 3, "beam": 20, "batch_size": 1, "histories": 500, "threads": 1}
OWN_TOLERANCE = 0.02          # of the runtime's own instructions per request (runtime - floor)
END_TO_END_TOLERANCE = 0.01   # of the runtime's instructions per request (backbone included)
TOP_FUNCTIONS = 150           # functions kept per contender in a result (by |instructions per request|)
SAVE_COMMAND = "bench/record-instruction-baseline"
# Thread counts of every library the runtime may load, the hash seed, and no .pyc writes (the native dry
# run writes them once, so that no counted run depends on a cache being warm).
WORKER_ENV = {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "NUMEXPR_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
             "avx512_bf16", "avx_vnni", "amx_tile")
GROUPS = ("onnxruntime", "numpy", "python", "system", "other")
STAGES = ("head", "verify", "select")          # the runtime's stages counted apart (see bench/worker.py)


class InstructionsError(NezhaError, RuntimeError):
    """The instruction count cannot be taken or compared (no valgrind, a failed worker, a baseline of a
    different workload); the message says what to do."""


# --- counting --------------------------------------------------------------------------------------------

def phases_of(requests: int, stages: bool = True) -> list[tuple[str, int]]:
    """The worker's phases: the floor's and the runtime's N requests, then (``stages``) the runtime's
    N requests once per stage, collecting only inside that stage."""
    return [("floor", requests), ("runtime", requests)] + \
        ([(f"runtime:{st}", requests) for st in STAGES] if stages else [])


def worker_env(inject: str | None = None) -> dict:
    """The worker's environment: ours, made deterministic; ``inject`` (else NEZHA_BENCH_INJECT, if set)
    is the test-only slowdown hook of bench/worker.py."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSTARTUP", "PYTHONPROFILEIMPORTTIME")}
    env.update(WORKER_ENV)
    if inject is not None:
        env["NEZHA_BENCH_INJECT"] = inject
    return env


def valgrind_version() -> str:
    exe = shutil.which("valgrind")
    if exe is None:
        raise InstructionsError("valgrind not found: install it (Debian/Ubuntu: apt-get install -y valgrind)")
    return subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout.strip()


def group_of(obj: str) -> str:
    """Which library an object file (callgrind's ``ob=``) is: onnxruntime, numpy (with its OpenBLAS),
    python (the interpreter and its extension modules), system (libc, libm, libstdc++, the loader) or other."""
    name = obj.rsplit("/", 1)[-1]
    if "onnxruntime" in obj:
        return "onnxruntime"
    if "/numpy" in obj:
        return "numpy"
    if re.match(r"(python3|libpython3)", name) or "/lib-dynload/" in obj:
        return "python"
    if re.match(r"(libc|libm|libstdc\+\+|libgcc_s|ld-linux|libpthread|libdl|libffi)[.-]", name):
        return "system"
    return "other"


def function_label(obj: str, function: str) -> str:
    """"group: name"; code without a symbol (ONNX Runtime's PyPI library is stripped) is "(unnamed)",
    as callgrind's names for it are load addresses."""
    function = re.sub(r"'[0-9]+$", "", function)           # callgrind's recursion depth suffix ('2)
    if re.fullmatch(r"0x[0-9a-fA-F]+", function) or function == "???":
        function = "(unnamed)"
    return f"{group_of(obj)}: {function}"


def read_callgrind(path: str | Path) -> tuple[str, int, dict[str, int]]:
    """One callgrind dump (``--compress-strings=no --compress-pos=no``, Ir only) -> (the part's name as given
    to DUMP_STATS_AT, total instructions, {function label: self instructions})."""
    name, total, per_fn, ob, fn, skip = None, None, {}, "???", "???", False
    with open(path) as f:
        for line in f:
            if skip:                                  # the line after calls= is the call's inclusive cost
                skip = False
                continue
            c = line[:1]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                if len(parts) >= 2:
                    key = (ob, fn)
                    per_fn[key] = per_fn.get(key, 0) + int(parts[1])
            elif line.startswith("calls="):
                skip = True
            elif line.startswith("fn="):
                fn = line[3:].rstrip("\n")
            elif line.startswith("ob="):
                ob = line[3:].rstrip("\n")
            elif line.startswith("desc: Trigger: Client Request: "):
                name = line.split("Client Request: ", 1)[1].strip()
            elif line.startswith(("totals:", "summary:")):
                total = int(line.split()[1])
            elif line.startswith("events:") and line.split()[1:2] != ["Ir"]:
                raise InstructionsError(f"{path}: expected Ir as the first event, got {line.strip()!r}")
    if total is None:
        raise InstructionsError(f"{path} has no totals line: not a complete callgrind dump")
    labels: dict[str, int] = {}
    for (ob, fn), ir in per_fn.items():
        label = function_label(ob, fn)
        labels[label] = labels.get(label, 0) + ir
    return name, total, labels


def run_worker(artifact: Path, requests_file: Path, workdir: Path, phases: list[tuple[str, int]], *, warmup: int,
               beam: int, threads: int, inject: str | None = None, valgrind: bool = True) -> dict:
    """The worker process (under callgrind if ``valgrind``): {"facts", "seconds", "parts": {name: (total,
    {label: instructions})}}. Raises InstructionsError with the worker's last output lines if it fails."""
    tag = "callgrind" if valgrind else "native"
    spec = {"artifact": str(artifact), "requests": str(requests_file), "beam": beam, "threads": threads,
            "warmup": warmup, "phases": phases, "out": str(workdir / f"{tag}.facts.json")}
    spec_file = workdir / f"{tag}.spec.json"
    spec_file.write_text(json.dumps(spec))
    cmd = [sys.executable, str(WORKER), "count", str(spec_file)]
    out_file = workdir / "callgrind.out"
    if valgrind:
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no", "--compress-strings=no",
               "--compress-pos=no", f"--callgrind-out-file={out_file}"] + cmd
    env = worker_env(inject)
    if not valgrind:
        env.pop("PYTHONDONTWRITEBYTECODE")           # the native dry run writes the .pyc files the count reads
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print("\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:]), file=sys.stderr)
        raise InstructionsError(f"the worker failed (exit {proc.returncode}; its last lines above): {' '.join(cmd)}")
    facts = json.loads(Path(spec["out"]).read_text())
    out = {"facts": facts, "seconds": round(seconds, 2), "parts": {}}
    if valgrind:
        if not facts.get("client_requests"):
            raise InstructionsError("the worker's valgrind client requests were not seen (not x86-64, or the "
                                    "python executable is a wrapper that valgrind does not follow)")
        for dump in sorted(workdir.glob("callgrind.out.*")):
            name, total, fns = read_callgrind(dump)
            if name is not None:
                out["parts"][name] = (total, fns)
        missing = {p for p, _ in phases} - set(out["parts"])
        if missing:
            raise InstructionsError(f"callgrind wrote no part for {sorted(missing)} in {workdir}")
    return out


def requests_file_of(histories: Sequence[Sequence[int]], batch_size: int, n: int, path: Path) -> str:
    """Write n requests of batch_size histories (taken in order, wrapping) as JSON; returns its sha256."""
    from .run import requests_of

    text = json.dumps(requests_of(histories, batch_size, n))
    path.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def artifact_digest(artifact: Path) -> str:
    """sha256 over the artifact's files (names and bytes), to tell in a report whether two runs measured
    the same graphs. Reads no manifest key: the manifest's format is the runtime's business."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(artifact).rglob("*") if q.is_file()):
        h.update(str(p.relative_to(artifact)).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def host_isa() -> list[str]:
    """The ISA flags of ISA_FLAGS that /proc/cpuinfo lists for this CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [fl for fl in ISA_FLAGS if fl in have]
    except OSError:
        pass
    return []


def measure(artifact: str | Path, histories: Sequence[Sequence[int]], requests: int = DEFAULTS["requests"],
            warmup: int = DEFAULTS["warmup"], beam: int = DEFAULTS["beam"], batch_size: int = DEFAULTS["batch_size"],
            threads: int = DEFAULTS["threads"], inject: str | None = None, stages: bool = True,
            workdir: str | Path | None = None, description: dict | None = None, progress=None) -> dict:
    """Count the instructions per request of the floor and the runtime (and its stages) on ``artifact``.

    ``histories``: the request histories (item ids); request i is histories[i*batch_size ...], the first
    ``warmup`` requests warm up, the next ``requests`` are counted. ``inject``: the test-only slowdown
    hook (bench/worker.py). ``workdir`` keeps the callgrind dumps (default: a temporary folder, removed).
    Returns the result document (see result_from)."""
    if requests < 1 or warmup < 0 or beam < 1 or batch_size < 1:
        raise InstructionsError(f"need requests >= 1, warmup >= 0, beam >= 1, batch_size >= 1; got "
                                f"requests={requests}, warmup={warmup}, beam={beam}, batch_size={batch_size}")
    artifact = Path(artifact).resolve()
    if not artifact.is_dir():
        raise InstructionsError(f"artifact folder {artifact} does not exist")
    vg = valgrind_version()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="nezha-instr-")
        workdir = tmp.name
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        req_sha = requests_file_of(histories, batch_size, warmup + requests, workdir / "requests.json")
        kw = dict(warmup=warmup, beam=beam, threads=threads, inject=inject)
        say = progress or (lambda msg: None)
        say("dry run (native): checks the artifact and writes the .pyc files the counted run reads")
        dry = run_worker(artifact, workdir / "requests.json", workdir, phases_of(1, stages), valgrind=False, **kw)
        say(f"counting under callgrind: {requests} requests per phase")
        counted = run_worker(artifact, workdir / "requests.json", workdir, phases_of(requests, stages), **kw)
    finally:
        if tmp is not None:
            tmp.cleanup()
    workload = {"artifact_sha256": artifact_digest(artifact), "requests": requests, "warmup": warmup, "beam": beam,
                "batch_size": batch_size, "threads": threads, "requests_sha256": req_sha, **(description or {})}
    env = {"valgrind": vg, "python": platform.python_version(), "numpy": dry["facts"]["numpy"],
           "onnxruntime": dry["facts"]["onnxruntime"], "glibc": "-".join(platform.libc_ver())}
    wc = wall_clock_machine()
    mach = {"cpu": wc["cpu"], "platform": wc["platform"], "isa": host_isa(),
            "cpuid_native": dry["facts"].get("cpuid"), "cpuid_valgrind": counted["facts"].get("cpuid"),
            "cpu_features_native": dry["facts"]["cpu_features"],
            "cpu_features_valgrind": counted["facts"]["cpu_features"]}
    return result_from(counted["parts"], workload, env, mach, inject, counted["seconds"])


def result_from(parts: dict, workload: dict, env: dict, machine: dict, inject: str | None = None,
                seconds: float | None = None) -> dict:
    """The result document from the worker's callgrind parts {name: (total, {label: instructions})}.

    "per_request": {"floor", "runtime", "runtime_own"} instructions per request; "stages": the runtime's
    own instructions per request by stage (head, verify, select, and "loop": the rest of the decode loop),
    if measured; "groups" /
    "functions": {contender: {label: instructions per request}} (the top TOP_FUNCTIONS functions)."""
    n = workload["requests"]
    per_request = {"floor": parts["floor"][0] / n, "runtime": parts["runtime"][0] / n}
    per_request["runtime_own"] = per_request["runtime"] - per_request["floor"]
    functions = {c: {k: v / n for k, v in parts[c][1].items()} for c in ("floor", "runtime")}
    functions["runtime_own"] = {k: functions["runtime"].get(k, 0.0) - functions["floor"].get(k, 0.0)
                                for k in set(functions["runtime"]) | set(functions["floor"])}
    stages = None
    if all(f"runtime:{st}" in parts for st in STAGES):
        stages = {st: parts[f"runtime:{st}"][0] / n for st in STAGES}
        stages["loop"] = per_request["runtime_own"] - sum(stages.values())
    groups = {c: {g: 0.0 for g in GROUPS} for c in functions}
    for c, per_fn in functions.items():
        for label, ir in per_fn.items():
            g = label.split(":", 1)[0]
            groups[c][g] = groups[c].get(g, 0.0) + ir
    top = {c: dict(sorted(((k, round(v, 1)) for k, v in per_fn.items() if abs(v) >= 0.5),
                          key=lambda kv: -abs(kv[1]))[:TOP_FUNCTIONS]) for c, per_fn in functions.items()}
    return {"format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine, "environment": env, "workload": workload, "inject": inject,
            "per_request": {k: round(v, 1) for k, v in per_request.items()},
            "stages": None if stages is None else {k: round(v, 1) for k, v in stages.items()},
            "groups": {c: {g: round(v, 1) for g, v in gs.items()} for c, gs in groups.items()},
            "functions": top, "seconds": None if seconds is None else round(seconds, 1)}


# --- the gate ----------------------------------------------------------------------------------------------

@dataclass
class Figure:
    """One gated figure of a comparison: instructions per request now and in the baseline."""

    name: str               # "runtime own (runtime - floor)"
    value: float
    baseline: float
    tolerance: float

    @property
    def change(self) -> float:
        return self.value / self.baseline - 1.0

    @property
    def regressed(self) -> bool:
        return self.value > self.baseline * (1.0 + self.tolerance)

    def message(self) -> str:
        return (f"{self.name}: {self.value / 1e6:.4f}M instructions per request vs baseline "
                f"{self.baseline / 1e6:.4f}M ({self.change:+.2%}); allowed <= "
                f"{self.baseline * (1 + self.tolerance) / 1e6:.4f}M (+{self.tolerance:.0%})")

    def to_json(self) -> dict:
        return {**asdict(self), "change": self.change, "regressed": self.regressed, "message": self.message()}


GATED = (("runtime_own", "runtime own (runtime - floor)", "own_tolerance"),
         ("runtime", "runtime end-to-end", "end_to_end_tolerance"))


def baseline_from(result: dict, own_tolerance: float = OWN_TOLERANCE,
                  end_to_end_tolerance: float = END_TO_END_TOLERANCE) -> dict:
    """A baseline document: the result plus its tolerances and the command that re-records it."""
    if result.get("inject"):
        raise InstructionsError(f"refusing to save a baseline measured with the test-only slowdown "
                                f"NEZHA_BENCH_INJECT={result['inject']!r}")
    return {"format": BASELINE_FORMAT, "version": VERSION, "record_with": SAVE_COMMAND,
            "own_tolerance": own_tolerance, "end_to_end_tolerance": end_to_end_tolerance,
            "result": {k: v for k, v in result.items() if k != "gate"}}


def save_baseline(result: dict, path: str | Path, **tolerances) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline_from(result, **tolerances), indent=1) + "\n")
    return path


def _require(doc: dict, key: str, kind, where: str):
    if key not in doc:
        raise InstructionsError(f"{where}: missing key {key!r}")
    if not isinstance(doc[key], kind):
        raise InstructionsError(f"{where}: {key!r} must be {getattr(kind, '__name__', kind)}, "
                                f"got {type(doc[key]).__name__}")
    return doc[key]


def load_baseline(path: str | Path) -> dict:
    """Read and check a baseline file; raises InstructionsError naming the file and the bad key."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InstructionsError(f"baseline {path} does not exist (record one: {SAVE_COMMAND})") from None
    except json.JSONDecodeError as e:
        raise InstructionsError(f"baseline {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != BASELINE_FORMAT:
        raise InstructionsError(f"{path} is not an instruction-count baseline (format "
                                f"{raw.get('format') if isinstance(raw, dict) else None!r}, expected "
                                f"{BASELINE_FORMAT!r})")
    if raw.get("version") != VERSION:
        raise InstructionsError(f"{path}: baseline version {raw.get('version')!r}, this nezha reads {VERSION}")
    for key in ("own_tolerance", "end_to_end_tolerance"):
        _require(raw, key, (int, float), str(path))
    result = _require(raw, "result", dict, str(path))
    per = _require(result, "per_request", dict, f"{path}: result")
    for key in ("floor", "runtime", "runtime_own"):
        _require(per, key, (int, float), f"{path}: result.per_request")
    for key in ("workload", "environment", "machine", "groups", "functions"):
        _require(result, key, dict, f"{path}: result")
    return raw


COMPARABLE = ("requests", "warmup", "beam", "batch_size", "threads", "requests_sha256")


def compare(result: dict, baseline: dict, own_tolerance: float | None = None,
            end_to_end_tolerance: float | None = None) -> dict:
    """Judge ``result`` against a loaded baseline. Tolerances default to the baseline's.

    Returns {"figures": [Figure.to_json()], "regressions": [messages], "notes": [differences of machine,
    versions or artifact that can explain a change], "passed": bool}. Raises InstructionsError when
    the workloads differ (other requests, beam, ...): the counts would not be comparable."""
    base = baseline["result"]
    tol = {"own_tolerance": baseline["own_tolerance"] if own_tolerance is None else own_tolerance,
           "end_to_end_tolerance": baseline["end_to_end_tolerance"] if end_to_end_tolerance is None
           else end_to_end_tolerance}
    for v in tol.values():
        if v < 0:
            raise InstructionsError(f"tolerances must be >= 0, got {tol}")
    differ = [f"{k} {base['workload'].get(k)!r} -> {result['workload'].get(k)!r}" for k in COMPARABLE
              if base["workload"].get(k) != result["workload"].get(k)]
    if differ:
        raise InstructionsError("this run measured another workload than the baseline (" + "; ".join(differ) +
                                f"): rerun with the baseline's settings, or record a new baseline: {SAVE_COMMAND}")
    figures = [Figure(name, result["per_request"][key], base["per_request"][key], tol[t]) for key, name, t in GATED]
    notes = []
    for k in sorted(set(base["environment"]) | set(result["environment"])):
        a, b = base["environment"].get(k), result["environment"].get(k)
        if a != b:
            notes.append(f"{k} differs from the baseline's ({a!r} -> {b!r}): counts may move with it")
    if base["machine"].get("cpuid_valgrind") != result["machine"].get("cpuid_valgrind"):
        notes.append(f"valgrind's virtual CPU identifies otherwise than at the baseline "
                     f"({base['machine'].get('cpuid_valgrind')!r} -> {result['machine'].get('cpuid_valgrind')!r})")
    if base["machine"].get("cpu_features_valgrind") != result["machine"].get("cpu_features_valgrind"):
        notes.append(f"valgrind's virtual CPU offers other features than at the baseline "
                     f"({base['machine'].get('cpu_features_valgrind')} -> "
                     f"{result['machine'].get('cpu_features_valgrind')}): libraries may pick other kernels")
    if base["machine"].get("cpu") != result["machine"].get("cpu"):
        notes.append(f"CPU differs from the baseline's ({base['machine'].get('cpu')!r} -> "
                     f"{result['machine'].get('cpu')!r}); under valgrind both offer "
                     f"{result['machine'].get('cpu_features_valgrind')}")
    if base["workload"].get("artifact_sha256") != result["workload"].get("artifact_sha256"):
        notes.append("the artifact's files differ from the baseline's (a changed export, checkpoint or manifest)")
    return {"baseline_created": base.get("created"), **tol, "figures": [f.to_json() for f in figures],
            "regressions": [f.message() for f in figures if f.regressed], "notes": notes,
            "passed": not any(f.regressed for f in figures)}


# --- the report ----------------------------------------------------------------------------------------------

CONTENDERS = (("floor", "floor (encode + backbone)"), ("runtime", "runtime (full NEZHA decode)"),
              ("runtime_own", "runtime own (runtime - floor)"))


def _m(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:.4f}M"


def _pct(now: float, base: float | None) -> str:
    if base is None or base == 0:
        return "-"
    return f"{now / base - 1:+.2%}"


def report(result: dict, baseline: dict | None = None, top: int = 8) -> str:
    """Markdown: instructions per request per contender (and vs the baseline), the verdict, then what
    moved: per library group and the functions that moved most, per contender."""
    w, env, m = result["workload"], result["environment"], result["machine"]
    base = baseline["result"] if baseline else None
    lines = ["# NEZHA instruction counts (callgrind)", "",
             f"- workload: batch {w['batch_size']}, beam {w['beam']}, {w['requests']} counted requests after "
             f"{w['warmup']} warm-up, ONNX Runtime {w['threads']} thread(s)",
             f"- machine: {m['cpu']}; host ISA {' '.join(m['isa'])}; under valgrind cpuid says "
             f"{m.get('cpuid_valgrind')!r} and NumPy sees {' '.join(m['cpu_features_valgrind'])}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in env.items()),
             "- setup (start, imports, load, warm-up) runs uninstrumented and is not counted: it is not "
             "deterministic to the instruction; each phase counts only its requests"]
    if result.get("inject"):
        lines.append(f"- **test-only slowdown injected**: NEZHA_BENCH_INJECT={result['inject']}")
    lines += ["", "| contender | instructions / request | baseline | change |", "|---|---:|---:|---:|"]
    for key, name in CONTENDERS:
        b = base["per_request"][key] if base else None
        lines.append(f"| {name} | {_m(result['per_request'][key])} | {_m(b)} | {_pct(result['per_request'][key], b)} |")
    gate = result.get("gate")
    if gate:
        lines += ["", "**Gate: " + ("passed" if gate["passed"] else "FAILED") + "** (own tolerance "
                  f"{gate['own_tolerance']:.0%}, end-to-end {gate['end_to_end_tolerance']:.0%}; baseline of "
                  f"{gate['baseline_created']})", ""]
        lines += [("- REGRESSED " if f["regressed"] else "- ok ") + f["message"] for f in gate["figures"]]
        lines += [f"- note: {n}" for n in gate["notes"]]
    lines += ["", "## What moved: instructions per request by library", "",
              "| contender | " + " | ".join(GROUPS) + " |", "|---|" + "---:|" * len(GROUPS)]
    for key, name in CONTENDERS:
        now = result["groups"][key]
        cells = []
        for g in GROUPS:
            cell = _m(now.get(g, 0.0))
            if base:
                cell += f" ({_delta(now.get(g, 0.0) - base['groups'][key].get(g, 0.0))})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "By the object callgrind names: onnxruntime (its kernels; the PyPI library is stripped, so they "
              "show as \"(unnamed)\"), numpy (with its OpenBLAS), python (the interpreter and its extension "
              "modules), system (libc's malloc/memcpy, libm, libstdc++)." +
              (" In brackets: the change from the baseline." if base else "")]
    if result.get("stages"):
        names = {"head": "head (draft-head graph runs)", "verify": "verify (expand: candidate scores + verifier mask)",
                 "select": "select (top-k + gathers)", "loop": "loop (the rest: Python glue, beam reindexing)"}
        bst = (base or {}).get("stages") or {}
        lines += ["", "## What moved: the runtime's own instructions per request by stage", "",
                  "| stage | now | baseline | change |", "|---|---:|---:|---:|"]
        for st, v in result["stages"].items():
            b = bst.get(st)
            lines.append(f"| {names.get(st, st)} | {_m(v)} | {_m(b)} | {_pct(v, b)} |")
    for key, name in CONTENDERS:
        now = result["functions"][key]
        if base:
            was = base["functions"][key]
            # a function kept on one side only may lie just below the other side's cut: not a move
            cut_now, cut_was = _cut(now), _cut(was)
            known = [k for k in set(now) | set(was) if (k in now and k in was) or
                     (k in now and abs(now[k]) > 2 * cut_was) or (k in was and abs(was[k]) > 2 * cut_now)]
            moved = sorted(known, key=lambda k: -abs(now.get(k, 0.0) - was.get(k, 0.0)))[:top]
            lines += ["", f"### {name}: functions that moved most (instructions per request)", "",
                      "| function | now | baseline | change |", "|---|---:|---:|---:|"]
            for k in moved:
                lines.append(f"| `{_short(k)}` | {_m(now.get(k))} | {_m(was.get(k))} | "
                             f"{_delta(now.get(k, 0.0) - was.get(k, 0.0))} |")
        else:
            lines += ["", f"### {name}: top functions (instructions per request)", "",
                      "| function | instructions / request |", "|---|---:|"]
            for k in list(now)[:top]:
                lines.append(f"| `{_short(k)}` | {_m(now[k])} |")
    return "\n".join(lines) + "\n"


def _cut(functions: dict) -> float:
    """The smallest |instructions per request| a result kept (0 if it kept every function)."""
    return min((abs(v) for v in functions.values()), default=0.0) if len(functions) >= TOP_FUNCTIONS else 0.0


def _delta(x: float) -> str:
    return f"{x / 1e6:+.4f}M"


def _short(label: str, width: int = 90) -> str:
    return label if len(label) <= width else label[:width - 3] + "..."


# --- one call ----------------------------------------------------------------------------------------------

def run_gate(artifact: str | Path, data: str | Path | None = None, histories=None, baseline: str | Path | None = None,
             save_baseline_to: str | Path | None = None, own_tolerance: float | None = None,
             end_to_end_tolerance: float | None = None, out: str | Path | None = None, inject: str | None = None,
             requests: int = DEFAULTS["requests"], warmup: int = DEFAULTS["warmup"], beam: int = DEFAULTS["beam"],
             batch_size: int = DEFAULTS["batch_size"], history_limit: int = DEFAULTS["histories"],
             threads: int = DEFAULTS["threads"], stages: bool = True, progress=None) -> dict:
    """Measure; judge against ``baseline`` (its own tolerances unless given); write ``out``/instructions.json
    and instructions.md; save the result as a baseline to ``save_baseline_to``. Histories: ``histories``,
    else the leave-one-out test users of ``data`` (default Beauty), shuffled with seed 0."""
    base = load_baseline(baseline) if baseline is not None else None      # a bad baseline fails before counting
    description = {}
    if histories is None:
        from nezha.data import DEFAULT_DATA

        from .run import load_histories
        data = Path(data) if data is not None else DEFAULT_DATA
        histories = load_histories(data, "test", history_limit)
        description["histories"] = f"{data.name} leave-one-out test users (shuffled, seed 0, first {len(histories)})"
    result = measure(artifact, histories, requests, warmup, beam, batch_size, threads, inject, stages,
                     description=description, progress=progress)
    if base is not None:
        result["gate"] = compare(result, base, own_tolerance, end_to_end_tolerance)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "instructions.json").write_text(json.dumps(result, indent=1))
        (out / "instructions.md").write_text(report(result, base))
    if save_baseline_to is not None:
        kw = {k: v for k, v in (("own_tolerance", own_tolerance), ("end_to_end_tolerance", end_to_end_tolerance))
              if v is not None}
        save_baseline(result, save_baseline_to, **kw)
    return result
