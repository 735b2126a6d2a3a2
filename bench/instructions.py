"""The instruction-count regression gate: the runtime's work per request, counted by Valgrind (bench/callgrind.py),
judged by the gates' one baseline/compare implementation (bench/gate.py).

Phases: ``floor`` (encode + backbone), ``runtime`` (the full decode), and the runtime's stages (head, verify,
select). Gated: the runtime's **own** instructions per request (runtime - floor) at 2%, and its
**end-to-end** instructions per request at 1%. Why instructions, and what valgrind's virtual CPU means for
the counts on other machines: docs/bench.md."""

from __future__ import annotations

from pathlib import Path

from nezha.runtime.errors import StepError

from .callgrind import DEFAULTS, GROUPS, TOP_FUNCTIONS, VERSION, measure
from .gate import Gate
from .report import table, write_result

BASELINE_FORMAT, SAVE_COMMAND = "nezha-instructions-baseline", "bench/record-instruction-baseline"
OWN_TOLERANCE = 0.02          # of the runtime's own instructions per request (runtime - floor)
END_TO_END_TOLERANCE = 0.01   # of the runtime's instructions per request (backbone included)
NUMBER = (int, float)
INSTRUCTIONS = Gate(BASELINE_FORMAT, "an instruction-count baseline", f"record one: {SAVE_COMMAND}", StepError,
                    unit="instructions", version=VERSION,
                    schema={"own_tolerance": NUMBER, "end_to_end_tolerance": NUMBER,
                            "result": {"per_request": {"floor": NUMBER, "runtime": NUMBER, "runtime_own": NUMBER},
                                       "workload": dict, "environment": dict, "machine": dict, "groups": dict,
                                       "functions": dict}})
GATED = (("runtime_own", "runtime own (runtime - floor)", "own_tolerance"),
         ("runtime", "runtime end-to-end", "end_to_end_tolerance"))
COMPARABLE = ("requests", "warmup", "beam", "batch_size", "threads", "requests_sha256")


def baseline_from(result: dict, own_tolerance: float = OWN_TOLERANCE,
                  end_to_end_tolerance: float = END_TO_END_TOLERANCE) -> dict:
    """A baseline document: the result plus its tolerances and the command that re-records it."""
    if result.get("inject"):
        raise StepError(f"refusing to save a baseline measured with the test-only slowdown "
                        f"NEZHA_BENCH_INJECT={result['inject']!r}")
    return {"format": BASELINE_FORMAT, "version": VERSION, "record_with": SAVE_COMMAND,
            "own_tolerance": own_tolerance, "end_to_end_tolerance": end_to_end_tolerance,
            "result": {k: v for k, v in result.items() if k != "gate"}}


def save_baseline(result: dict, path: str | Path, **tolerances) -> Path:
    return INSTRUCTIONS.save(baseline_from(result, **tolerances), path)


def load_baseline(path: str | Path) -> dict:
    """Read and check a baseline file; raises StepError naming the file and the bad key."""
    return INSTRUCTIONS.load(path)


def compare(result: dict, baseline: dict, own_tolerance: float | None = None,
            end_to_end_tolerance: float | None = None) -> dict:
    """Judge ``result`` against a loaded baseline. Tolerances default to the baseline's.

    Returns {"figures": [Figure.to_json()], "regressions": [messages], "notes": [differences of machine,
    versions or artifact that can explain a change], "passed": bool}. Raises StepError when
    the workloads differ (other requests, beam, ...): the counts would not be comparable."""
    base = baseline["result"]
    tol = {"own_tolerance": baseline["own_tolerance"] if own_tolerance is None else own_tolerance,
           "end_to_end_tolerance": baseline["end_to_end_tolerance"] if end_to_end_tolerance is None
           else end_to_end_tolerance}
    differ = [f"{k} {base['workload'].get(k)!r} -> {result['workload'].get(k)!r}" for k in COMPARABLE
              if base["workload"].get(k) != result["workload"].get(k)]
    if differ:
        raise StepError("this run measured another workload than the baseline (" + "; ".join(differ) +
                        f"): rerun with the baseline's settings, or record a new baseline: {SAVE_COMMAND}")
    figures = INSTRUCTIONS.judge({name: result["per_request"][key] for key, name, _ in GATED},
                                 {name: (base["per_request"][key], False, tol[t]) for key, name, t in GATED})
    return {"baseline_created": base.get("created"), **tol, "figures": [f.to_json() for f in figures],
            "regressions": [f.message() for f in figures if f.regressed], "notes": notes(result, base),
            "passed": not any(f.regressed for f in figures)}


def notes(result: dict, base: dict) -> list[str]:
    """The differences of versions, machine or artifact from the baseline's that can explain a change."""
    out = [f"{k} differs from the baseline's ({base['environment'].get(k)!r} -> {result['environment'].get(k)!r}): "
           "counts may move with it" for k in sorted(set(base["environment"]) | set(result["environment"]))
           if base["environment"].get(k) != result["environment"].get(k)]
    was, now = base["machine"], result["machine"]
    if was.get("cpuid_valgrind") != now.get("cpuid_valgrind"):
        out.append(f"valgrind's virtual CPU identifies otherwise than at the baseline "
                   f"({was.get('cpuid_valgrind')!r} -> {now.get('cpuid_valgrind')!r})")
    if was.get("cpu_features_valgrind") != now.get("cpu_features_valgrind"):
        out.append(f"valgrind's virtual CPU offers other features than at the baseline "
                   f"({was.get('cpu_features_valgrind')} -> {now.get('cpu_features_valgrind')}): "
                   "libraries may pick other kernels")
    if was.get("cpu") != now.get("cpu"):
        out.append(f"CPU differs from the baseline's ({was.get('cpu')!r} -> {now.get('cpu')!r}); under valgrind "
                   f"both offer {now.get('cpu_features_valgrind')}")
    if base["workload"].get("artifact_sha256") != result["workload"].get("artifact_sha256"):
        out.append("the artifact's files differ from the baseline's (a changed export, checkpoint or manifest)")
    return out


CONTENDERS = {"floor": "floor (encode + backbone)", "runtime": "runtime (full NEZHA decode)",
              "runtime_own": "runtime own (runtime - floor)"}
STAGE_NAMES = {"head": "head (draft-head graph runs)", "verify": "verify (expand: candidate scores + verifier mask)",
               "select": "select (top-k + gathers)", "loop": "loop (the rest: Python glue, beam reindexing)"}


def _m(x: float | None, sign: str = "") -> str:
    return "-" if x is None else f"{x / 1e6:{sign}.4f}M"


def _vs(now: float, base: float | None) -> list[str]:
    """[now, baseline, change] cells."""
    return [_m(now), _m(base), "-" if not base else f"{now / base - 1:+.2%}"]


def report(result: dict, baseline: dict | None = None, top: int = 8) -> str:
    """Markdown: instructions per request per contender (and vs the baseline), the verdict, then what
    moved: per library group, per stage of the runtime, and the functions that moved most, per contender."""
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
    lines += table("contender | instructions / request | baseline | change",
                    [[name, *_vs(result["per_request"][key], base["per_request"][key] if base else None)]
                     for key, name in CONTENDERS.items()])
    gate = result.get("gate")
    if gate:
        lines += ["", "**Gate: " + ("passed" if gate["passed"] else "FAILED") + "** (own tolerance "
                  f"{gate['own_tolerance']:.0%}, end-to-end {gate['end_to_end_tolerance']:.0%}; baseline of "
                  f"{gate['baseline_created']})", ""]
        lines += [("- REGRESSED " if f["regressed"] else "- ok ") + f["message"] for f in gate["figures"]]
        lines += [f"- note: {n}" for n in gate["notes"]]
    lines += ["", "## What moved: instructions per request by library"]
    lines += table("contender | " + " | ".join(GROUPS), [
        [name] + [_m(result["groups"][key].get(g, 0.0)) + (f" ({_m(result['groups'][key].get(g, 0.0) - base['groups'][key].get(g, 0.0), '+')})" if base else "")
                  for g in GROUPS] for key, name in CONTENDERS.items()])
    lines += ["", "By the object callgrind names: onnxruntime (its kernels; the PyPI library is stripped, so they "
              "show as \"(unnamed)\"), numpy (with its OpenBLAS), python (the interpreter and its extension "
              "modules), system (libc's malloc/memcpy, libm, libstdc++)." +
              (" In brackets: the change from the baseline." if base else "")]
    if result.get("stages"):
        was = (base or {}).get("stages") or {}
        lines += ["", "## What moved: the runtime's own instructions per request by stage"]
        lines += table("stage | now | baseline | change",
                        [[STAGE_NAMES.get(st, st), *_vs(v, was.get(st))] for st, v in result["stages"].items()])
    for key, name in CONTENDERS.items():
        now = result["functions"][key]
        if not base:
            lines += ["", f"### {name}: top functions (instructions per request)"]
            lines += table("function | instructions / request", [[f"`{_short(k)}`", _m(now[k])] for k in list(now)[:top]])
            continue
        was = base["functions"][key]
        # a function kept on one side only may lie just below the other side's cut: not a move
        cut_now, cut_was = _cut(now), _cut(was)
        known = [k for k in set(now) | set(was) if (k in now and k in was) or
                 (k in now and abs(now[k]) > 2 * cut_was) or (k in was and abs(was[k]) > 2 * cut_now)]
        moved = sorted(known, key=lambda k: -abs(now.get(k, 0.0) - was.get(k, 0.0)))[:top]
        lines += ["", f"### {name}: functions that moved most (instructions per request)"]
        lines += table("function | now | baseline | change", [[f"`{_short(k)}`", _m(now.get(k)), _m(was.get(k)),
                                                                _m(now.get(k, 0.0) - was.get(k, 0.0), "+")] for k in moved])
    return "\n".join(lines) + "\n"


def _cut(functions: dict) -> float:
    """The smallest |instructions per request| a result kept (0 if it kept every function)."""
    return min((abs(v) for v in functions.values()), default=0.0) if len(functions) >= TOP_FUNCTIONS else 0.0


def _short(label: str, width: int = 90) -> str:
    return label if len(label) <= width else label[:width - 3] + "..."


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
        from nezha.runtime.data import DEFAULT_DATA

        from .run import load_histories
        data = Path(data or DEFAULT_DATA)
        histories = load_histories(data, history_limit)
        description["histories"] = f"{data.name} leave-one-out test users (shuffled, seed 0, first {len(histories)})"
    result = measure(artifact, histories, requests, warmup, beam, batch_size, threads, inject, stages,
                     description=description, progress=progress)
    if base is not None:
        result["gate"] = compare(result, base, own_tolerance, end_to_end_tolerance)
    if out is not None:
        write_result(out, "instructions", result, report(result, base))
    if save_baseline_to is not None:
        kw = {k: v for k, v in (("own_tolerance", own_tolerance), ("end_to_end_tolerance", end_to_end_tolerance))
              if v is not None}
        save_baseline(result, save_baseline_to, **kw)
    return result
