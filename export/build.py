"""Build a NEZHA artifact: checkpoint -> validated ONNX graphs (fp32, fp16, int8, int8-cpu), optional
TensorRT engines, verifier tables and manifest.json (the format: docs/artifact.md).

    python export/build.py --checkpoint DIR --index FILE --out DIR [--precision fp32 fp16 int8 int8-cpu]
    nezha build ...                       (the same command)

The build is the list STEPS below: each step (export/steps.py) turns the build state into the next,
enabled or not by the options; the progress lines, timings and summary come from that list. The last
step loads the finished artifact with the runtime and decodes a few histories.

int8 calibrates activation ranges on real histories (the training split of --calibration-data), checks
the int8 backbone's hidden states against fp32 (cosine, relative error) and keeps the ranges in
calibration/cache.json, reused by a --force rebuild when graph, data and settings are unchanged.
int8-cpu (dynamic int8) needs no calibration data and runs on ONNX Runtime CPU only: the manifest marks
it cpu-only and no TensorRT engine is built for it.

Everything is built in a staging folder beside --out and swapped into place at the end (export/staging.py):
a failed or killed build leaves the old artifact (where RENAME_EXCHANGE is missing, perhaps complete beside
--out), or nothing; --force replaces only an artifact (docs/build.md). ``build(...)`` is the same thing as
a function; the CLI only parses.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nezha.export import steps as S
from nezha.export.options import BuildOptions, check
from nezha.export.staging import staging
from nezha.runtime.cli import Parser, guarded
from nezha.runtime.options import add_arguments

QUANTIZED = ("int8", "int8-cpu")


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[S.State, list], S.State]
    enabled: Callable[[BuildOptions], bool] = lambda o: True


STEPS = (
    Step("model_from_checkpoint", S.model_from_checkpoint),
    Step("calibration_feeds_from_data", S.calibration_feeds_from_data, lambda o: "int8" in o.precision),
    Step("tables_from_catalog", S.tables_from_catalog_step),
    Step("onnx_from_model", S.onnx_from_checkpoint_model),
    Step("fp16_from_onnx", S.fp16_from_fp32, lambda o: "fp16" in o.precision),
    Step("int8_from_onnx", S.int8_from_fp32, lambda o: "int8" in o.precision),
    Step("int8_cpu_from_onnx", S.int8_cpu_from_fp32, lambda o: "int8-cpu" in o.precision),
    Step("validate_int8", S.validate_int8_hidden_states, lambda o: any(p in QUANTIZED for p in o.precision)),
    Step("validate_artifact", S.validate_against_torch),
    Step("engine_from_onnx", S.engines_from_onnx, lambda o: "tensorrt" in o.backend),
    Step("write_manifest", S.write_manifest_step),
    Step("load_with_runtime", S.load_with_runtime),
)


@dataclass
class Summary:
    """What the build made: per precision and graph the file size and max diff, the top-k agreement,
    engines built or the reason they were skipped, and the seconds of each step."""

    out: Path
    graphs: dict[str, dict[str, dict]] = field(default_factory=dict)      # precision -> graph -> {file, bytes, max_abs_diff}
    topk_agreement: dict[str, float] = field(default_factory=dict)
    engines: dict[str, dict] = field(default_factory=dict)
    engines_skipped: str | None = None
    engines_not_built: dict[str, str] = field(default_factory=dict)      # precision -> why it has no engines
    notes: dict[str, str] = field(default_factory=dict)                  # precision -> calibration, cpu-only, ...
    steps: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        rows = [("precision", "graph", "size", "max |diff|", "top-k agreement", "notes")]
        for precision, graphs in self.graphs.items():
            for i, (name, g) in enumerate(graphs.items()):
                rows.append((precision, name, f"{g['bytes'] / 1e6:.2f} MB", f"{g['max_abs_diff']:.2e}",
                             f"{self.topk_agreement.get(precision, float('nan')):.3f}",
                             self.notes.get(precision, "") if i == 0 else ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if self.engines_skipped:
            lines.append(f"TensorRT engines skipped: {self.engines_skipped}")
        elif self.engines:
            lines.append("TensorRT engines: " + ", ".join(f"{p}/{g}" for p, gs in self.engines.items() for g in gs))
        for precision, why in self.engines_not_built.items():
            lines.append(f"TensorRT engines not built for {precision}: {why}")
        lines.append(f"artifact: {self.out} ({sum(self.steps.values()):.1f} s)")
        return "\n".join(lines)


class Progress:
    """Prints '[3/8] fp16_from_onnx ... 1.2 s' per step and records the seconds in the summary. A step
    appends its own messages to the list it is given; they are printed, indented, after its line."""

    def __init__(self, total: int, summary: Summary, log):
        self.total, self.done, self.summary, self.log = total, 0, summary, log

    @contextmanager
    def step(self, name: str):
        self.done += 1
        t0 = time.perf_counter()
        self.log(f"[{self.done}/{self.total}] {name} ...", end="", flush=True)
        notes: list[str] = []
        try:
            yield notes
        except BaseException:
            self.log(" failed")          # ends the step's line; the error itself is the caller's to report
            raise
        seconds = time.perf_counter() - t0
        self.summary.steps[name] = seconds
        self.log(f" {seconds:.1f} s")
        for note in notes:
            for line in note.splitlines():
                self.log("    " + line.lstrip())


def build(*args, log=print, **options) -> Summary:
    """Build the artifact folder ``out`` from ``checkpoint`` (default: the demo checkpoint) and the item
    ``index`` (LETTER *.index.json; default: Beauty's; None with an explicit checkpoint: its ava_sid file).
    The arguments are BuildOptions' fields (export/options.py: defaults and meaning), ``log`` prints progress.

    ``histories`` for validation: a LETTER *.inter.json path, a list of item-id lists, or None (the default
    dataset's interactions with the demo checkpoint, synthetic ones otherwise).
    int8 only: ``calibration_size`` histories (seeded) from the training split of ``calibration_data``
    (LETTER *.inter.json; default: Beauty's), activation ranges by ``calibration_method`` ('entropy',
    'minmax', 'percentile'), the ``calibration_exclude`` most sensitive weight MatMuls kept float.
    Returns a Summary; raises a NezhaError with a clear message, leaving ``out`` as it was.
    """
    options = check(BuildOptions(*args, **options))
    steps = [step for step in STEPS if step.enabled(options)]
    summary = Summary(options.out)
    progress = Progress(len(steps), summary, lambda *a, **k: log(*a, **k) if log else None)
    with staging(options.out, options.force, log) as tmp:
        state = S.State(options, tmp)
        for step in steps:
            with progress.step(step.name) as notes:
                state = step.run(state, notes)
        summarize(state, summary)
    return summary


build.__signature__ = inspect.Signature([*inspect.signature(BuildOptions).parameters.values(),   # for help()
                                         inspect.Parameter("log", inspect.Parameter.KEYWORD_ONLY, default=print)])


def summarize(s: S.State, summary: Summary) -> None:
    """Sizes, max differences and top-k agreement per precision and graph, from the manifest and report."""
    for p, graphs in s.manifest.graphs.items():
        entry = s.report["precisions"][p]
        summary.topk_agreement[p] = entry["topk_agreement"]
        summary.graphs[p] = {n: {"file": g.file, "bytes": sum((s.tmp / f).stat().st_size for f in g.paths),
                                 "max_abs_diff": max(o["max_abs_diff"] for k, o in entry["outputs"].items()
                                                     if k.startswith(n + "."))}
                             for n, g in graphs.items()}
        if p in s.hidden_state:
            summary.notes[p] = f"hidden cos vs fp32 {s.hidden_state[p]['hidden']['mean_cosine']:.4f}"
        if s.manifest.precisions[p].execution == "cpu-only":
            summary.notes[p] = "cpu-only (ONNX Runtime CPU; not for TensorRT); " + summary.notes.get(p, "")
    summary.engines = {p: list(es) for p, es in s.engines.items()}
    summary.engines_skipped = s.engines_note.get("all")
    summary.engines_not_built = {p: why for p, why in s.engines_note.items() if p != "all"}


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python export/build.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p, BuildOptions)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return guarded("build", lambda: print(build(**vars(args)).table()))      # an error: one line, its exit code


if __name__ == "__main__":
    sys.exit(main())
