"""``nezha bench ARTIFACT``: a thin layer over nezha.bench.suite.run_bench (option names = its arguments).

    nezha bench artifacts/demo --checkpoint checkpoints/demo/nezha --out runs/bench
    nezha bench artifacts/demo --quick --out runs/quick                                     # wall-clock report
    nezha bench artifacts/ci --instructions --baseline bench/baseline-instructions.json      # the CI gate
    nezha bench artifacts/ci --instructions --save-baseline bench/baseline-instructions.json # accept a change
    nezha bench artifacts/ci --against main                                                 # wall-clock A/B
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
from pathlib import Path

from nezha.runtime.cli import ascii_int
from nezha.runtime.errors import InputError, RegressionError

if importlib.util.find_spec("matplotlib") is None:      # nezha.cli leaves 'bench' out without the extra
    raise ImportError("nezha bench needs matplotlib: pip install 'nezha-deploy[bench]'")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark an artifact against the floor, the reference and AR",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, nargs="?", help="artifact folder (omit for a torch-only run on --checkpoint)")
    p.add_argument("--checkpoint", type=Path, help="NEZHA checkpoint of the artifact (for the reference and AR; "
                   "default: the one the manifest records, if any)")
    p.add_argument("--ar-checkpoint", type=Path, help="AR baseline checkpoint (default: the NEZHA backbone with "
                   "a random LM head: right cost, meaningless scores)")
    p.add_argument("--data", type=Path, help="LETTER dataset folder for histories (default: Beauty test users)")
    p.add_argument("--backends", nargs="+", help="runtime backends (default: onnxruntime, + tensorrt if available)")
    p.add_argument("--precisions", nargs="+", help="artifact precisions (default: all in the manifest)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (runtime and torch contenders)")
    p.add_argument("--batch-sizes", type=ascii_int, nargs="+", help="histories per request (default 1)")
    p.add_argument("--beams", type=ascii_int, nargs="+", help="beam widths (default 20 512; --instructions and "
                   "--against: one, default 20)")
    p.add_argument("--requests", type=ascii_int, help="timed (counted) requests per configuration (default 30)")
    p.add_argument("--warmup", type=ascii_int, help="untimed requests first (default 3)")
    p.add_argument("--history-limit", type=ascii_int, help="histories drawn from the data (default 2000; "
                   "--instructions and --against: 500)")
    p.add_argument("--max-history", type=ascii_int, help="items kept per history (default: the artifact's)")
    p.add_argument("--threads", type=ascii_int, help="intra-op threads of ONNX Runtime and torch (default: theirs)")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="time the PyTorch reference NEZHA")
    p.add_argument("--ar", action=argparse.BooleanOptionalAction, default=True, help="time the AR baseline")
    p.add_argument("--hf-generate", action=argparse.BooleanOptionalAction, default=False,
                   help="also time HF generate() with prefix_allowed_tokens_fn (the naive approach; slow)")
    p.add_argument("--quick", action="store_true", help="one small configuration (batch 1, beam 20), for CI")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="writes bench.json, bench.md, bench.png")
    p.add_argument("--baseline", type=Path, help="baseline file: exit 1 if a ratio (with --instructions: an "
                   "instruction count) regressed")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed ratio regression (fraction)")
    p.add_argument("--save-baseline", type=Path, help="write this run's ratios (instruction counts) as a baseline")
    p.add_argument("--title", help="label of the run in the reports")
    g = p.add_argument_group("instruction-count gate (Valgrind callgrind; see docs/bench.md)")
    g.add_argument("--instructions", action="store_true", help="count instructions per request of the floor "
                   "and the runtime under callgrind instead of timing (the CI gate)")
    for name, what, default in (("own", "the runtime's own instructions per request (runtime - floor)", 0.02),
                                 ("end-to-end", "the runtime's instructions per request", 0.01)):
        g.add_argument(f"--{name}-tolerance", type=float, help=f"allowed growth of {what}, fraction (default: "
                       f"the baseline's, {default})")
    g.add_argument("--stages", action=argparse.BooleanOptionalAction, default=True, help="also count the "
                   "runtime's stages apart (head, verify, select: N more requests each)")
    a = p.add_argument_group("wall-clock A/B against a git revision (a report, not a gate)")
    a.add_argument("--against", metavar="REV", help="time the current tree against REV (a git worktree with its "
                   "own artifact build), interleaved request by request; report current / base with a CI")
    a.add_argument("--build-args", default="--precision fp32", help="export/build.py options of both sides' "
                   "artifacts, one quoted string (default: '--precision fp32')")
    p.set_defaults(run=run)
    return p


WALL_CLOCK_DEFAULTS = {"batch_sizes": [1], "beams": [20, 512], "requests": 30, "warmup": 3, "history_limit": 2000}


def _one(values, name: str, default):
    if values is None:
        return default
    if len(values) != 1:
        raise InputError(f"{name} takes one value with --instructions or --against, got {values}")
    return values[0]


WORKLOAD = {"batch_sizes": 1, "beams": 1, "requests": 1, "warmup": 0, "history_limit": 1}     # the least of each


def _check_workload(args) -> None:
    """Each workload option at least its least; --quick fixes the workload, so it takes none of them."""
    for name, least in WORKLOAD.items():
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if value is not None and args.quick and not (args.instructions or args.against):
            raise InputError(f"--quick runs one fixed small workload: drop {flag} or --quick")
        if value is not None and min(value if isinstance(value, list) else [value]) < least:
            raise InputError(f"{flag} must be at least {least}, got {value}")
    if not 0 <= args.tolerance < 1:                        # nan fails too
        raise InputError(f"--tolerance is a fraction in [0, 1), got {args.tolerance}")


def run(args) -> int:
    if args.instructions and args.against:
        raise InputError("--instructions and --against are two different runs: give one")
    _check_workload(args)
    if args.out == Path("runs/bench") and (args.instructions or args.against):
        args.out = Path("runs/instructions" if args.instructions else "runs/ab")
    for folder in (args.out, args.save_baseline and args.save_baseline.parent):
        _writable(folder)                                  # before the run, not after minutes of it
    if not (args.instructions or args.against):
        return run_wall_clock(args)
    from .callgrind import DEFAULTS

    workload = {k: DEFAULTS[d] if v is None else v for k, v, d in (
        ("requests", args.requests, "requests"), ("warmup", args.warmup, "warmup"),
        ("history_limit", args.history_limit, "histories"), ("threads", args.threads, "threads"))}
    workload.update(beam=_one(args.beams, "--beams", DEFAULTS["beam"]),
                    batch_size=_one(args.batch_sizes, "--batch-sizes", DEFAULTS["batch_size"]))
    say = lambda msg: print(msg, file=sys.stderr)                                       # noqa: E731
    if args.against:
        from .ab import report, run_against

        print(report(run_against(args.against, artifact=args.artifact, data=args.data, out=args.out, progress=say,
                                 build_args=shlex.split(args.build_args), **workload)))
        print(f"wrote {args.out}/ab.json, ab.md")
        return 0
    from .instructions import load_baseline, report, run_gate

    if args.artifact is None:
        raise InputError("--instructions needs an ARTIFACT folder")
    result = run_gate(args.artifact, data=args.data, baseline=args.baseline, save_baseline_to=args.save_baseline,
                      own_tolerance=args.own_tolerance, end_to_end_tolerance=args.end_to_end_tolerance, out=args.out,
                      stages=args.stages, progress=say, **workload)
    print(report(result, load_baseline(args.baseline) if args.baseline else None))
    print(f"wrote {args.out}/instructions.json, instructions.md{_saved(args)}")
    gate = result.get("gate")
    if gate and not gate["passed"]:
        _regressed(gate["regressions"])
    return 0


def run_wall_clock(args) -> int:
    from .report import markdown
    from .suite import run_bench

    skip = ("run", "command", "instructions", "own_tolerance", "end_to_end_tolerance", "stages", "against", "build_args")
    kwargs = {k: v for k, v in vars(args).items() if k not in skip}
    kwargs.update({k: v for k, v in WALL_CLOCK_DEFAULTS.items() if kwargs[k] is None})
    result, regressions = run_bench(**kwargs, progress=True)
    print(markdown(result))
    print(f"wrote {args.out}/bench.json, bench.md, bench.png{_saved(args)}")
    if regressions:
        _regressed([r.message() for r in regressions])
    return 0


def _saved(args) -> str:
    return f"; baseline {args.save_baseline}" if args.save_baseline else ""


def _regressed(messages: list[str]) -> None:
    """A line per regression, then RegressionError: one more line and exit code 1."""
    for msg in messages:
        print(f"REGRESSED {msg}", file=sys.stderr)
    raise RegressionError(f"{len(messages)} regression(s) past the tolerance against --baseline")


def _writable(folder: Path | None) -> None:
    """Make ``folder`` (the results' or the baseline's) or refuse it in one line, before anything runs."""
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write results to {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise InputError(f"cannot write results to {folder}: permission denied")
