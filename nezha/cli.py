"""The ``nezha`` command: ``nezha recommend``, ``nezha bench``, ``nezha serve`` and ``nezha loadtest``.
A thin layer: each subcommand's options are its library function's argument names."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nezha", description="Serve and benchmark NEZHA artifacts.")
    sub = parser.add_subparsers(dest="command", required=True)
    from nezha.runtime import cli as runtime_cli
    runtime_cli.add_parser(sub)
    try:
        from nezha.bench import cli as bench_cli
    except ImportError:          # the bench needs matplotlib (the 'bench' extra)
        bench_cli = None
    if bench_cli is not None:
        bench_cli.add_parser(sub)
    try:
        from nezha.serve import cli as serve_cli
    except ImportError:          # serve and loadtest need the 'serve' extra
        serve_cli = None
    if serve_cli is not None:
        serve_cli.add_parsers(sub)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
