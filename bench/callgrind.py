"""Counting the runtime's instructions per request under Valgrind's callgrind (the gate: bench/instructions.py):
one worker process (``bench/worker.py count``) per run, collection switched on only around each phase's
requests (setup is not deterministic to the instruction: why toggling and why callgrind, in docs/bench.md);
the parsed per-function counts become one result. Callgrind names the object of every function, so ONNX
Runtime's unnamed (stripped) kernels are attributed to its library."""

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
from pathlib import Path
from typing import Sequence

from nezha.runtime.errors import StepError
from nezha.runtime.machine import describe

from .report import document

FORMAT = "nezha-instructions"
VERSION = 1
WORKER = Path(__file__).with_name("worker.py")
# The workload of the gate (batch 1, beam 20, 30 requests per phase): about 1.6G instructions counted on
# the demo artifact with the stages, about 4 minutes of one core under callgrind (1.5 without stages).
DEFAULTS = {"requests": 30, "warmup": 3, "beam": 20, "batch_size": 1, "histories": 500, "threads": 1}
TOP_FUNCTIONS = 150           # functions kept per contender in a result (by |instructions per request|)
# Thread counts of every library the runtime may load, the hash seed, and no .pyc writes (the native dry
# run writes them once, so that no counted run depends on a cache being warm).
WORKER_ENV = {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "NUMEXPR_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
GROUPS = ("onnxruntime", "numpy", "python", "system", "other")
STAGES = ("head", "verify", "select")          # the runtime's stages counted apart (see bench/worker.py)


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


def worker_command(mode: str, spec_file: Path, **spec) -> list[str]:
    """Write ``spec`` to ``spec_file``; the command that runs bench/worker.py ``mode`` (count, serve) on it."""
    spec_file.write_text(json.dumps(spec))
    return [sys.executable, str(WORKER), mode, str(spec_file)]


def print_tail(output: str, lines: int = 12) -> None:
    """The last lines of a failed subprocess's output, on stderr, before the one-line error that names it."""
    print("\n".join(output.strip().splitlines()[-lines:]), file=sys.stderr)


def valgrind_version() -> str:
    exe = shutil.which("valgrind")
    if exe is None:
        raise StepError("valgrind not found: install it (Debian/Ubuntu: apt-get install -y valgrind)")
    return subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout.strip()


def function_label(obj: str, function: str) -> str:
    """"group: name", the group being which library the object file (callgrind's ``ob=``) is: onnxruntime,
    numpy (with its OpenBLAS), python (the interpreter and its extension modules), system (libc, libm,
    libstdc++, the loader) or other. Code without a symbol (ONNX Runtime's PyPI library is stripped) is
    "(unnamed)", as callgrind's names for it are load addresses."""
    name = obj.rsplit("/", 1)[-1]
    group = ("onnxruntime" if "onnxruntime" in obj else "numpy" if "/numpy" in obj else
             "python" if re.match(r"(python3|libpython3)", name) or "/lib-dynload/" in obj else
             "system" if re.match(r"(libc|libm|libstdc\+\+|libgcc_s|ld-linux|libpthread|libdl|libffi)[.-]", name)
             else "other")
    function = re.sub(r"'[0-9]+$", "", function)           # callgrind's recursion depth suffix ('2)
    if re.fullmatch(r"0x[0-9a-fA-F]+", function) or function == "???":
        function = "(unnamed)"
    return f"{group}: {function}"


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
                raise StepError(f"{path}: expected Ir as the first event, got {line.strip()!r}")
    if total is None:
        raise StepError(f"{path} has no totals line: not a complete callgrind dump")
    labels: dict[str, int] = {}
    for (ob, fn), ir in per_fn.items():
        label = function_label(ob, fn)
        labels[label] = labels.get(label, 0) + ir
    return name, total, labels


def run_worker(artifact: Path, requests_file: Path, workdir: Path, phases: list[tuple[str, int]], *, warmup: int,
               beam: int, threads: int, inject: str | None = None, valgrind: bool = True) -> dict:
    """The worker process (under callgrind if ``valgrind``): {"facts", "seconds", "parts": {name: (total,
    {label: instructions})}}. Raises StepError with the worker's last output lines if it fails."""
    tag = "callgrind" if valgrind else "native"
    facts_file = workdir / f"{tag}.facts.json"
    cmd = worker_command("count", workdir / f"{tag}.spec.json", artifact=str(artifact), requests=str(requests_file),
                         beam=beam, threads=threads, warmup=warmup, phases=phases, out=str(facts_file))
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
        print_tail(proc.stderr or proc.stdout)
        raise StepError(f"the worker failed (exit {proc.returncode}; its last lines above): {' '.join(cmd)}")
    facts = json.loads(facts_file.read_text())
    out = {"facts": facts, "seconds": round(seconds, 2), "parts": {}}
    if valgrind:
        if not facts.get("client_requests"):
            raise StepError("the worker's valgrind client requests were not seen (not x86-64, or the "
                            "python executable is a wrapper that valgrind does not follow)")
        for dump in sorted(workdir.glob("callgrind.out.*")):
            name, total, fns = read_callgrind(dump)
            if name is not None:
                out["parts"][name] = (total, fns)
        missing = {p for p, _ in phases} - set(out["parts"])
        if missing:
            raise StepError(f"callgrind wrote no part for {sorted(missing)} in {workdir}")
    return out


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
        raise StepError(f"need requests >= 1, warmup >= 0, beam >= 1, batch_size >= 1; got "
                        f"requests={requests}, warmup={warmup}, beam={beam}, batch_size={batch_size}")
    artifact = Path(artifact).resolve()
    if not artifact.is_dir():
        raise StepError(f"artifact folder {artifact} does not exist")
    from .run import requests_of

    vg = valgrind_version()
    tmp = tempfile.TemporaryDirectory(prefix="nezha-instr-") if workdir is None else None
    workdir = Path(tmp.name if tmp else workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        text = json.dumps(requests_of(histories, batch_size, warmup + requests))
        (workdir / "requests.json").write_text(text)
        req_sha = hashlib.sha256(text.encode()).hexdigest()
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
    host = describe()
    mach = {"cpu": host["cpu"], "platform": host["platform"], "isa": host["isa"],
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
    groups = {c: {g: round(sum(v for k, v in per_fn.items() if k.split(":", 1)[0] == g), 1) for g in GROUPS}
              for c, per_fn in functions.items()}              # function_label puts every label in a group
    top = {c: dict(sorted(((k, round(v, 1)) for k, v in per_fn.items() if abs(v) >= 0.5),
                          key=lambda kv: -abs(kv[1]))[:TOP_FUNCTIONS]) for c, per_fn in functions.items()}
    return document(FORMAT, VERSION, machine=machine, environment=env, workload=workload, inject=inject,
                    per_request={k: round(v, 1) for k, v in per_request.items()},
                    stages=None if stages is None else {k: round(v, 1) for k, v in stages.items()},
                    groups=groups,
                    functions=top, seconds=None if seconds is None else round(seconds, 1))


