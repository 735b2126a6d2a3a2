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
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
from nezha.calibration import METHODS, MIN_SAMPLES, CalibrationError
from nezha.calibration.data import default_interactions
from nezha.export import steps as S
from nezha.export.graphs import EXPORTERS
from nezha.export.precision import check_precisions
from nezha.export.staging import BuildError, check_output, staging
from nezha.model.checkpoint import CheckpointError
from nezha.runtime.catalog import CatalogError
from nezha.runtime.cli import Parser, ascii_int
from nezha.runtime.data import DEFAULT_DATA, find_pair
from nezha.runtime.errors import NezhaError
from nezha.runtime.manifest import PRECISIONS

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = REPO / "checkpoints" / "demo" / "nezha"
BACKENDS = ("onnxruntime", "tensorrt")
QUANTIZED = ("int8", "int8-cpu")
OPSETS = (18, onnx.defs.onnx_opset_version())     # the dynamo exporter writes opset 18 and up


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[S.State, list], S.State]
    enabled: Callable[[S.Options], bool] = lambda o: True


STEPS = (
    Step("model_from_checkpoint", S.model_from_checkpoint),
    Step("calibration_feeds_from_data", S.calibration_feeds_from_data, lambda o: "int8" in o.precisions),
    Step("tables_from_catalog", S.tables_from_catalog_step),
    Step("onnx_from_model", S.onnx_from_checkpoint_model),
    Step("fp16_from_onnx", S.fp16_from_fp32, lambda o: "fp16" in o.precisions),
    Step("int8_from_onnx", S.int8_from_fp32, lambda o: "int8" in o.precisions),
    Step("int8_cpu_from_onnx", S.int8_cpu_from_fp32, lambda o: "int8-cpu" in o.precisions),
    Step("validate_int8", S.validate_int8_hidden_states, lambda o: any(p in QUANTIZED for p in o.precisions)),
    Step("validate_artifact", S.validate_against_torch),
    Step("engine_from_onnx", S.engines_from_onnx, lambda o: "tensorrt" in o.backends),
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


def check_options(checkpoint, index, out, precision, backend, max_batch, max_history, max_beam, opset, exporter,
                  histories, validation_users, calibration_data, calibration_size, calibration_method,
                  calibration_exclude, force) -> S.Options:
    """Every option checked before the slow steps start (inputs exist, --out is safe to write)."""
    precisions = check_precisions(precision)
    bad = [b for b in backend if b not in BACKENDS]
    if bad or not backend:
        raise BuildError(f"unsupported backend(s) {bad or '(none)'}; allowed: {', '.join(BACKENDS)}")
    if exporter not in EXPORTERS:
        raise BuildError(f"exporter {exporter!r}; allowed: {', '.join(EXPORTERS)}")
    for name, value in (("max_batch", max_batch), ("max_history", max_history), ("max_beam", max_beam),
                        ("validation_users", validation_users)):
        if type(value) is not int or value < 1:
            raise BuildError(f"{name} must be a positive integer, got {value!r}")
    if type(opset) is not int or not OPSETS[0] <= opset <= OPSETS[1]:
        raise BuildError(f"opset must be an integer in {OPSETS[0]}..{OPSETS[1]} (this onnx package's newest), got {opset!r}")
    demo = checkpoint is None
    checkpoint = Path(checkpoint) if checkpoint is not None else DEMO_CHECKPOINT
    if demo:
        index = index if index is not None else find_pair(DEFAULT_DATA)[0]
        histories = histories if histories is not None else find_pair(DEFAULT_DATA)[1]
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist or is not a folder: pass a checkpoint in "
                              "the public NEZHA format")
    if index is not None and not Path(index).is_file():
        raise CatalogError(f"item index {index} {'is not a file' if Path(index).exists() else 'does not exist'}: "
                           "pass a LETTER *.index.json")
    if isinstance(histories, (str, Path)):
        histories = Path(histories)
        if not histories.is_file():
            raise BuildError(f"validation histories {histories} {'are not a file' if histories.exists() else 'do not exist'}"
                             ": pass a LETTER *.inter.json")
    if "int8" in precisions:
        calibration_data = _check_calibration(calibration_data, calibration_size, calibration_method,
                                              calibration_exclude)
    out = Path(out).absolute()
    check_output(out, force, {"checkpoint": checkpoint, "item index": index, "validation histories":
                              histories if isinstance(histories, Path) else None,
                              "calibration data": calibration_data if "int8" in precisions else None,
                              "demo data folder": DEFAULT_DATA if demo else None})
    return S.Options(checkpoint, Path(index) if index is not None else None, out, precisions, tuple(backend),
                     max_history, max_batch, max_beam, opset, exporter, histories, validation_users,
                     calibration_data, calibration_size, calibration_method, calibration_exclude, force)


def build(checkpoint: str | Path | None = None, index: str | Path | None = None, out: str | Path = "artifacts/nezha",
          precision: tuple[str, ...] = ("fp32", "fp16"), backend: tuple[str, ...] = ("onnxruntime",),
          max_batch: int = 64, max_history: int = 20, max_beam: int = 512, opset: int = 18,
          exporter: str = "dynamo", histories: str | Path | list | None = None, validation_users: int = 16,
          calibration_data: str | Path | None = None, calibration_size: int = 512,
          calibration_method: str = "entropy", calibration_exclude: int = 0,
          force: bool = False, log=print) -> Summary:
    """Build the artifact folder ``out`` from ``checkpoint`` (default: the demo checkpoint) and the item
    ``index`` (LETTER *.index.json; default: Beauty's; None with an explicit checkpoint: its ava_sid file).

    ``histories`` for validation: a LETTER *.inter.json path, a list of item-id lists, or None (the default
    dataset's interactions with the demo checkpoint, synthetic ones otherwise).
    int8 only: ``calibration_size`` histories (seeded) from the training split of ``calibration_data``
    (LETTER *.inter.json; default: Beauty's), activation ranges by ``calibration_method`` ('entropy',
    'minmax', 'percentile'), the ``calibration_exclude`` most sensitive weight MatMuls kept float.
    Returns a Summary; raises a NezhaError with a clear message, leaving ``out`` as it was.
    """
    options = check_options(checkpoint, index, out, precision, backend, max_batch, max_history, max_beam, opset,
                            exporter, histories, validation_users, calibration_data, calibration_size,
                            calibration_method, calibration_exclude, force)
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


def _check_calibration(data: str | Path | None, size: int, method: str, exclude: int) -> Path:
    """Check the int8 calibration settings before any work; returns the interactions file to sample
    (``data``, or the default dataset's)."""
    if method not in METHODS:
        raise CalibrationError(f"calibration method {method!r}; allowed: {', '.join(METHODS)}")
    if type(size) is not int or size < MIN_SAMPLES:
        raise CalibrationError(f"calibration size {size!r} is too small: need at least {MIN_SAMPLES} histories")
    if type(exclude) is not int or exclude < 0:
        raise CalibrationError(f"calibration exclude must be a non-negative integer (weight MatMuls kept float), "
                               f"got {exclude!r}")
    path = Path(data).absolute() if data is not None else default_interactions().resolve()
    if not path.is_file():
        raise CalibrationError(f"calibration data {path} does not exist: pass a LETTER *.inter.json")
    return path


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python export/build.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"checkpoint folder in the public NEZHA format (default: the demo checkpoint {DEMO_CHECKPOINT}, "
                        "validated on the Beauty interactions)")
    p.add_argument("--index", type=Path, default=None,
                   help="item index (LETTER *.index.json: item id -> SID code tokens); default with the demo "
                        "checkpoint: Beauty.index.json; otherwise the checkpoint's ava_sid{L}.pt")
    p.add_argument("--out", type=Path, default=Path("artifacts/nezha"), help="artifact folder to create")
    p.add_argument("--precision", nargs="+", default=["fp32", "fp16"], choices=PRECISIONS,
                   help="graph precisions to build. int8: static Q/DQ int8 calibrated on real histories (ONNX "
                        "Runtime and TensorRT); int8-cpu: dynamic int8 for ONNX Runtime on CPU only, marked "
                        "cpu-only in the manifest, never built for TensorRT")
    p.add_argument("--backend", nargs="+", default=["onnxruntime"], choices=BACKENDS,
                   help="tensorrt also builds engines (needs TensorRT 10+ and a GPU; skipped with a message otherwise)")
    p.add_argument("--max-batch", type=ascii_int, default=64, help="largest batch of users per request")
    p.add_argument("--max-history", type=ascii_int, default=20, help="most recent items kept per history")
    p.add_argument("--max-beam", type=ascii_int, default=512, help="largest beam width (head graphs accept max-batch * max-beam rows)")
    p.add_argument("--opset", type=ascii_int, default=18, help="ONNX opset of the exported graphs")
    p.add_argument("--exporter", default="dynamo", choices=EXPORTERS,
                   help="torch.onnx exporter; dynamo falls back to torchscript (dynamo=False) per graph on failure")
    p.add_argument("--histories", type=Path, default=None,
                   help="LETTER *.inter.json to sample validation histories from (default: the demo data with the "
                        "demo checkpoint, synthetic histories otherwise)")
    p.add_argument("--validation-users", type=ascii_int, default=16, help="histories used for validation")
    p.add_argument("--calibration-data", type=Path, default=None,
                   metavar="FILE", help="int8: LETTER *.inter.json whose training split (all but each user's "
                   "last two items) gives the calibration histories; none: the Beauty interactions")
    p.add_argument("--calibration-size", type=ascii_int, default=512,
                   help=f"int8: calibration histories, sampled with a fixed seed (at least {MIN_SAMPLES})")
    p.add_argument("--calibration-method", default="entropy", choices=list(METHODS),
                   help="int8: how activation ranges are chosen from the calibration histograms "
                        "(percentile: the 99.999th)")
    p.add_argument("--calibration-exclude", type=ascii_int, default=0,
                   help="int8: keep this many weight MatMuls float, the ones whose quantization alone costs the "
                        "most hidden-state cosine (a sensitivity pass: one quantized graph per MatMul)")
    p.add_argument("--force", action="store_true", help="replace --out if it is an artifact (its manifest.json "
                   "lists every file in it) or empty; any other folder is refused, naming the unknown files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        summary = build(**vars(args))
    except NezhaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
