"""The ``nezha`` command: ``build``, ``recommend``, ``bench``, ``train``, ``evaluate``, ``serve`` and ``loadtest``.

A thin layer: each subcommand's options are its library function's argument names. Every user error
(a ``NezhaError``) becomes one line ``nezha <command>: error: ...`` and its class's exit code (docs/errors.md);
a traceback means a bug."""

from __future__ import annotations

import sys

from nezha.runtime.cli import Parser, guarded

# Subcommands whose module parses its own options (they import torch, so they load only when used).
FORWARDED = {
    "build": ("nezha.export.build", "build an artifact from a checkpoint (same as python export/build.py)"),
    "train": ("nezha.model.train", "train the demo NEZHA and AR checkpoints on a LETTER dataset"),
    "evaluate": ("nezha.model.evaluate", "Recall/NDCG of checkpoints and artifacts on the test users"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        import importlib
        module = importlib.import_module(FORWARDED[argv[0]][0])
        return guarded(argv[0], lambda: module.main(argv[1:]))
    parser = Parser(prog="nezha", description="Build, serve and benchmark NEZHA artifacts.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, text) in FORWARDED.items():
        sub.add_parser(name, help=text, add_help=False)
    from nezha.runtime import cli as runtime_cli
    runtime_cli.add_parser(sub)
    try:
        from nezha.bench import cli as bench_cli
    except ImportError as e:          # the bench needs matplotlib (the 'bench' extra)
        bench_cli = None
        sub.add_parser("bench", help=f"unavailable: {e} (pip install 'nezha-deploy[bench]')")
    if bench_cli is not None:
        bench_cli.add_parser(sub)
    try:
        from nezha.serve import cli as serve_cli
    except ImportError:          # serve and loadtest need the 'serve' extra
        serve_cli = None
    if serve_cli is not None:
        serve_cli.add_parsers(sub)
    args = parser.parse_args(argv)
    return guarded(args.command, lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
