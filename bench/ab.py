"""``nezha bench --against REV``: wall-clock A/B of the current tree against a base revision, in one run.

What instruction counts miss (memory traffic, threads, a kernel choice) shows in time; on a shared machine
time drifts, so both sides run at once and are compared request by request: REV is checked out in a git
worktree in a temporary folder, its artifact built by its own ``export/build.py``, and two worker processes
(``bench/worker.py serve``: one imports the current ``nezha.runtime``, the other REV's, through a package
folder of links made from REV's own package mapping) run the same requests; for request i and contender c
the two sides run back to back, the first side alternating with i. The report is current / base per
contender (the median of per-request ratios) with a paired bootstrap interval, as ``pyperf compare_to``
and ``asv continuous`` report theirs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from nezha.runtime.errors import InputError

from .callgrind import print_tail, worker_command, worker_env
from .report import document, table, write_result
from .run import load_histories, requests_of
from .stats import machine

ROOT = Path(__file__).resolve().parents[1]       # the current tree (an editable install's source folder)
CONTENDERS = ("floor", "runtime")
NAMES = {"floor": "floor (encode + backbone)", "runtime": "runtime (full decode)",
         "runtime_own": "runtime own (runtime - floor)"}


def paired_bootstrap(stat, arrays: Sequence[np.ndarray], confidence: float = 0.95, resamples: int = 4000,
                     seed: int = 0) -> tuple[float, float, float]:
    """(estimate, low, high): ``stat(*arrays)`` and its percentile bootstrap interval, resampling the
    requests (the same indices in every array, so pairs stay pairs)."""
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = len(arrays[0])
    if n < 2 or any(len(a) != n for a in arrays):
        raise InputError(f"a paired bootstrap needs >= 2 requests of equal count per side, got {[len(a) for a in arrays]}")
    boots = [stat(*(a[i] for a in arrays)) for i in np.random.default_rng(seed).integers(0, n, size=(resamples, n))]
    alpha = (1.0 - confidence) / 2
    return float(stat(*arrays)), float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))


def compare_sides(seconds: dict, confidence: float = 0.95) -> dict:
    """{side: {contender: [seconds per request]}} -> per contender and for the runtime's own time (runtime -
    floor): both sides' medians (ms), current / base with its interval, and the verdict. A contender's ratio
    is median(current_i / base_i): a request preempted on one side moves it by one rank, not by its size;
    the own time's is the ratio of the sides' median runtime - floor."""
    cur, base = ({c: np.asarray(v, dtype=np.float64) for c, v in seconds[side].items()} for side in ("current", "base"))
    cur["runtime_own"], base["runtime_own"] = cur["runtime"] - cur["floor"], base["runtime"] - base["floor"]
    out = {}
    for c in NAMES:
        if c == "runtime_own":
            est, lo, hi = paired_bootstrap(lambda a, b, x, y: np.median(a - b) / np.median(x - y),
                                           [cur["runtime"], cur["floor"], base["runtime"], base["floor"]], confidence)
        else:
            est, lo, hi = paired_bootstrap(lambda a, b: np.median(a / b), [cur[c], base[c]], confidence)
        verdict = "slower" if lo > 1.0 else "faster" if hi < 1.0 else "no significant change"
        out[c] = {"current_median_ms": float(np.median(cur[c]) * 1e3),
                  "base_median_ms": float(np.median(base[c]) * 1e3), "ratio": est, "low": lo, "high": hi, "verdict": verdict}
    return out


def _git(*args, cwd: Path = ROOT) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InputError(f"git {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}")
    return proc.stdout.strip()


def resolve(rev: str) -> str:
    """A revision -> its full commit sha (InputError if the current tree is no git checkout or rev unknown)."""
    if not (ROOT / ".git").exists():
        raise InputError(f"{ROOT} is not a git checkout: --against needs the repository's history")
    try:
        return _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except InputError:
        raise InputError(f"unknown revision {rev!r} (git rev-parse found no commit)") from None


def package_folder(tree: Path, dest: Path) -> Path:
    """A folder to put first on PYTHONPATH so that ``import nezha...`` loads ``tree``'s code: ``dest``/nezha
    holds links to each package folder as ``tree``'s pyproject maps them (nezha.runtime -> runtime/ ...)."""
    import tomllib

    try:
        mapping = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"{tree}/pyproject.toml has no [tool.setuptools.package-dir] table ({e})") from None
    pkg = dest / "nezha"
    pkg.mkdir(parents=True)
    for entry in (tree / mapping.get("nezha", "nezha")).iterdir():
        (pkg / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name.startswith("nezha.") and not (pkg / name.split(".", 1)[1]).exists():
            (pkg / name.split(".", 1)[1]).symlink_to(tree / folder)
    return dest


def build_artifact(tree: Path, out: Path, build_args: Sequence[str], env: dict, log) -> Path:
    """``tree``'s own export/build.py -> artifact folder ``out``."""
    cmd = [sys.executable, str(tree / "export" / "build.py"), *build_args, "--out", str(out), "--force"]
    log(f"building {out.name} with {tree}'s export/build.py")
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print_tail(proc.stderr or proc.stdout)
        raise InputError(f"building the artifact of {tree} failed (its last lines above): {' '.join(cmd)}")
    return out


class Side:
    """One worker process serving requests on one artifact with one tree's runtime (``module_under``: where
    its ``nezha.runtime`` must come from)."""

    def __init__(self, name: str, artifact: Path, tmp: Path, requests_file: Path, beam: int, threads: int,
                 env: dict, module_under: Path):
        cmd = worker_command("serve", tmp / f"{name}.spec.json", artifact=str(artifact), requests=str(requests_file),
                             beam=beam, threads=threads, warmup=0)
        self.name = name
        self.proc = subprocess.Popen(cmd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready = self._read()
        self.module, self.inject = ready.get("runtime_module", ""), ready.get("inject")
        if not Path(self.module).is_relative_to(module_under):
            self.close()
            raise InputError(f"the {name} worker imported nezha.runtime from {self.module}, "
                             f"expected it under {module_under}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            print_tail(self.proc.stderr.read())
            raise InputError(f"the {self.name} worker stopped (its last lines above)")
        return json.loads(line)

    def _send(self, **msg) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def run(self, contender: str, request: int) -> float:
        self._send(contender=contender, request=request)
        return float(self._read()["seconds"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._send(stop=True)
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def run_against(rev: str, artifact: str | Path | None = None, data: str | Path | None = None, histories=None,
                requests: int = 30, warmup: int = 3, beam: int = 20, batch_size: int = 1, threads: int = 1,
                history_limit: int = 500, build_args: Sequence[str] = ("--precision", "fp32"),
                confidence: float = 0.95, out: str | Path | None = None, progress=None) -> dict:
    """Time the current tree against revision ``rev``, interleaved request by request.

    ``artifact``: the current side's artifact (default: built here by the current export/build.py with
    ``build_args``); the base side's is always built by the base's own export/build.py with ``build_args``.
    Returns {"base": {"rev", "sha"}, "seconds": {side: {contender: [s]}}, "comparison": compare_sides(...)};
    writes ``out``/ab.json and ab.md if ``out``."""
    say = progress or (lambda msg: None)
    if requests < 2 or warmup < 0:
        raise InputError(f"need requests >= 2 and warmup >= 0, got requests={requests}, warmup={warmup}")
    sha = resolve(rev)
    tmp = Path(tempfile.mkdtemp(prefix="nezha-ab-"))
    base_tree, sides = tmp / "base", []
    try:
        say(f"checking out {rev} ({sha[:12]}) into {base_tree}")
        _git("worktree", "add", "--detach", str(base_tree), sha)
        if not (base_tree / "data" / "beauty").is_dir():
            raise InputError(f"{rev} predates the bundled demo data (data/beauty): --against needs a later revision")
        base_path = package_folder(base_tree, tmp / "base-path")
        base_env = {k: v for k, v in worker_env().items() if k != "NEZHA_BENCH_INJECT"}   # the slowdown: current only
        base_env["PYTHONPATH"] = os.pathsep.join([str(base_path)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        base_artifact = build_artifact(base_tree, tmp / "base-artifact", build_args, base_env, say)
        if artifact is None:
            artifact = build_artifact(ROOT, tmp / "current-artifact", build_args, worker_env(), say)
        if histories is None:
            histories = load_histories(data, history_limit)
        (tmp / "requests.json").write_text(json.dumps(requests_of(histories, batch_size, warmup + requests)))
        sides.append(Side("current", Path(artifact), tmp, tmp / "requests.json", beam, threads, worker_env(), ROOT))
        sides.append(Side("base", base_artifact, tmp, tmp / "requests.json", beam, threads, base_env, base_path))
        seconds = {s.name: {c: [] for c in CONTENDERS} for s in sides}
        t0 = time.perf_counter()
        for i in range(warmup + requests):
            for c in CONTENDERS:
                for s in sides if i % 2 == 0 else sides[::-1]:
                    t = s.run(c, i)
                    if i >= warmup:
                        seconds[s.name][c].append(t)
            if (i + 1) % 10 == 0:
                say(f"request {i + 1}/{warmup + requests}")
        wall, inject = time.perf_counter() - t0, sides[0].inject
    finally:
        for s in sides:
            s.close()
        if base_tree.exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    result = document("nezha-ab", machine=machine(), base={"rev": rev, "sha": sha},
                      current={"tree": str(ROOT), "head": _git("rev-parse", "HEAD"), "inject": inject,
                               "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))},
                      setup={"requests": requests, "warmup": warmup, "beam": beam, "batch_size": batch_size,
                             "threads": threads, "build_args": list(build_args), "confidence": confidence,
                             "order": "per request and contender, both sides back to back; the first side alternates"},
                      seconds=seconds, wall_seconds=round(wall, 1), comparison=compare_sides(seconds, confidence))
    if out is not None:
        write_result(out, "ab", result, report(result))
    return result


def report(result: dict) -> str:
    """Markdown: per contender both medians and current / base with its confidence interval."""
    s, m, cur = result["setup"], result["machine"], result["current"]
    lines = [f"# A/B: current tree vs {result['base']['rev']} ({result['base']['sha'][:12]})", "",
             f"- current: {cur['head'][:12]}" + (" + uncommitted changes" if cur["dirty"] else "") +
             (f"; **test-only slowdown injected: NEZHA_BENCH_INJECT={cur['inject']}**" if cur.get("inject") else ""),
             f"- machine: {m['cpu']}, {m['cpu_usable']} usable cores, load {m.get('load_average')}",
             f"- batch {s['batch_size']}, beam {s['beam']}, {s['requests']} timed requests after {s['warmup']} warm-up, "
             f"ONNX Runtime {s['threads']} thread(s); {s['order']}"]
    lines += table(f"contender | base p50 | current p50 | current / base | {s['confidence']:.0%} CI | verdict", [
        [NAMES[key], f"{r['base_median_ms']:.3f} ms", f"{r['current_median_ms']:.3f} ms", f"{r['ratio']:.3f}",
         f"[{r['low']:.3f}, {r['high']:.3f}]", r["verdict"]] for key, r in result["comparison"].items()])
    lines += ["", "Ratios: median of per-request ratios (own: ratio of the sides' median runtime - floor); intervals: "
              "paired bootstrap over requests. A report, not a gate: the instruction count is the gate."]
    return "\n".join(lines) + "\n"
