"""``nezha bench ARTIFACT``: a thin layer over nezha.bench.suite.run_bench (option names = its arguments).

    nezha bench artifacts/demo --checkpoint checkpoints/demo/nezha --out runs/bench
    nezha bench artifacts/demo --quick --baseline bench-baseline.json --tolerance 0.10     # CI gate
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

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
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="histories per request")
    p.add_argument("--beams", type=int, nargs="+", default=[20, 512], help="beam widths")
    p.add_argument("--requests", type=int, default=30, help="timed requests per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed requests first")
    p.add_argument("--history-limit", type=int, default=2000, help="histories drawn from the data")
    p.add_argument("--max-history", type=int, help="items kept per history (default: the artifact's)")
    p.add_argument("--threads", type=int, help="intra-op threads of ONNX Runtime and torch (default: theirs)")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="time the PyTorch reference NEZHA")
    p.add_argument("--ar", action=argparse.BooleanOptionalAction, default=True, help="time the AR baseline")
    p.add_argument("--hf-generate", action=argparse.BooleanOptionalAction, default=False,
                   help="also time HF generate() with prefix_allowed_tokens_fn (the naive approach; slow)")
    p.add_argument("--quick", action="store_true", help="one small configuration (batch 1, beam 20), for CI")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="writes bench.json, bench.md, bench.png")
    p.add_argument("--baseline", type=Path, help="baseline file: exit 1 if a ratio regressed")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed ratio regression (fraction)")
    p.add_argument("--save-baseline", type=Path, help="write this run's ratios as a baseline file")
    p.add_argument("--title", help="label of the run in the reports")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from .suite import run_bench

    kwargs = {k: v for k, v in vars(args).items() if k not in ("run", "command")}
    result, regressions = run_bench(**kwargs, progress=True)
    from .report import markdown
    print(markdown(result))
    print(f"wrote {args.out}/bench.json, bench.md, bench.png" + (f"; baseline {args.save_baseline}"
                                                                   if args.save_baseline else ""))
    if regressions:
        for r in regressions:
            print(f"REGRESSED {r.message()}", file=sys.stderr)
        return 1
    return 0
