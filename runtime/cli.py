"""``nezha recommend ARTIFACT --history 12,55,102 -k 10 [--json]`` (also ``python -m nezha.runtime.cli``)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from .errors import NezhaError

_DIGITS = re.compile(r"[0-9]+")
_INTEGER = re.compile(r"-?[0-9]+")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``prog: error: ...``) and exit code 2, like every user error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def ascii_int(text: str) -> int:
    """An integer option in ASCII digits (int() would also take '1_0' and other scripts' digits)."""
    if not _INTEGER.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer in ASCII digits")
    return int(text)


def _history(text: str) -> list[int]:
    """Comma-separated item ids in plain ASCII digits (Python's int() would also take '1_2' and other
    scripts' digits)."""
    ids = [x.strip() for x in text.split(",")]
    if not ids or not all(_DIGITS.fullmatch(x) for x in ids):
        raise argparse.ArgumentTypeError(f"history {text!r} must be comma-separated item ids in ASCII digits "
                                         "(e.g. 12,55,102)")
    return [int(x) for x in ids]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("recommend", help="next items for one or more histories",
                       description="Recommend the next items for item-id histories with an artifact folder.")
    p.add_argument("artifact", help="artifact folder written by python export/build.py")
    p.add_argument("--history", type=_history, action="append", required=True,
                   help="comma-separated item ids, oldest first; repeat for a batch")
    p.add_argument("-k", "--k", type=ascii_int, default=10, help="items per history (default 10)")
    p.add_argument("--beam", type=ascii_int, default=None,
                   help="beam width (default max(k, 20), at most the artifact's max_beam)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt", "cpp"],
                   help="cpp: the C++ runtime's loop (runtime/cpp, built by make test or make cpp), CPU only")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu; cuda with tensorrt)")
    p.add_argument("--precision", default=None, help="fp32, fp16, int8 ... (default: the artifact's first)")
    p.add_argument("--unknown", default="error", choices=["error", "skip"], help="policy for unknown item ids")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)
    return p


def run(a) -> int:
    from .contract import Recommender
    with Recommender.load(a.artifact, backend=a.backend, device=a.device, precision=a.precision) as rec:
        results = rec.recommend(a.history, k=a.k, beam=a.beam, unknown=a.unknown)
    if a.json:
        print(json.dumps([{"history": h, "items": [{"item": i, "score": round(s, 6)} for i, s in r]}
                          for h, r in zip(a.history, results)], indent=2))
    else:
        for h, r in zip(a.history, results):
            print(f"history {','.join(map(str, h))}")
            for rank, (item, score) in enumerate(r, 1):
                print(f"  {rank:3d}  item {item:<10d} score {score:.4f}")
    return 0


def guarded(command: str, run) -> int:
    """Run a CLI command: a NezhaError becomes one line on stderr and its class's exit code; a file that
    cannot be read or written (OSError) one line and exit 2; a reader that closed stdout (``| head``) ends
    the command quietly."""
    try:
        return int(run() or 0)
    except NezhaError as e:
        print(f"nezha {command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())    # no second error at exit's flush
        return 0
    except OSError as e:
        print(f"nezha {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    parser = Parser(prog="python -m nezha.runtime.cli")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    sys.exit(guarded(args.command, lambda: args.run(args)))
