"""Build a NEZHA artifact: checkpoint -> validated ONNX graphs (fp32, fp16, int8, int8-cpu), optional
TensorRT engines, verifier tables and manifest.json.

    python export/build.py --checkpoint DIR --index FILE --out DIR [--precision fp32 fp16] [--backend tensorrt]
    python export/build.py ... --precision fp32 int8 int8-cpu [--calibration-data FILE --calibration-size N
        --calibration-method entropy --calibration-exclude N]

int8 calibrates activation ranges on real histories (the training split of --calibration-data), checks
the int8 backbone's hidden states against fp32 (cosine, relative error) and keeps the ranges in
calibration/cache.json, reused by a --force rebuild when graph, data and settings are unchanged.
int8-cpu (dynamic int8) needs no calibration data and runs on ONNX Runtime CPU only: the manifest marks
it cpu-only and no TensorRT engine is built for it.

Everything is built in a temporary folder beside --out and renamed into place at the end: a failed
build leaves nothing behind. ``build(...)`` is the same thing as a function; the CLI only parses.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, this folder would shadow real packages (export/tensorrt.py vs tensorrt).
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

import argparse
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

import nezha
from nezha.calibration import (CPU_ONLY, METHODS, MIN_SAMPLES, CalibrationError, CalibrationReader,
                               Int8ValidationError, validate_int8)
from nezha.calibration.data import default_interactions
from nezha.data import DEFAULT_DATA, DataError, find_pair
from nezha.export.graphs import EXPORTERS, ExportError, Limits, graph_specs, onnx_from_model
from nezha.export.precision import (CPU_ONLY_PRECISIONS, PRECISIONS, PrecisionError, check_precisions,
                                   fp16_from_onnx, int8_converter, int8_cpu_converter)
from nezha.export.tables import tables_from_catalog
from nezha.export.tensorrt import EngineBuildError, TensorRTUnavailable, engine_from_onnx
from nezha.export.validate import (EngineSteps, ValidationError, histories_from_data, synthetic_histories, validate_artifact,
                                   validation_feeds)
from nezha.model.checkpoint import CheckpointError, load_catalog, load_checkpoint
from nezha.runtime.catalog import CatalogError
from nezha.runtime.encoding import EncodingError
from nezha.runtime.manifest import write_manifest
from nezha.runtime.errors import NezhaError

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = REPO / "checkpoints" / "demo" / "nezha"
BACKENDS = ("onnxruntime", "tensorrt")
VALIDATION = "validation.json"
CALIBRATION_CACHE = "calibration/cache.json"      # inside the artifact; a --force rebuild starts from it
CALIBRATION_SEED = 0


class BuildError(NezhaError, ValueError):
    """A build that cannot start or finish: bad arguments, existing or unwritable output."""


USER_ERRORS = (BuildError, EncodingError, CheckpointError, PrecisionError, CatalogError, DataError, ExportError, ValidationError,
               EngineBuildError, CalibrationError, Int8ValidationError)


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
    calibration: dict | None = None                                      # the manifest's "calibration" entry
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


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers
    try:
        import tensorrt
        trt_version = tensorrt.__version__
    except ImportError:
        trt_version = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "tensorrt": trt_version, "nezha-deploy": nezha.__version__}


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise BuildError(f"output {out} exists; pass --force (force=True) to replace it")
    if out.exists() and not out.is_dir():
        raise BuildError(f"output {out} exists and is not a folder")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"cannot create {out}: its parent folder {parent} cannot be made ({e})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BuildError(f"cannot write to {parent}: the artifact is built beside --out and renamed into place")


def model_from_checkpoint(checkpoint: Path):
    """Checkpoint folder (public NEZHA format) -> NezhaModel, float32, eval mode."""
    return load_checkpoint(checkpoint)


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
    Returns a Summary; raises one of USER_ERRORS with a clear message, leaving nothing at ``out``.
    """
    out = Path(out).absolute()
    precisions = check_precisions(precision)
    if "int8" in precisions:
        calibration_data = _check_calibration(calibration_data, calibration_size, calibration_method,
                                              calibration_exclude)
    bad = [b for b in backend if b not in BACKENDS]
    if bad:
        raise BuildError(f"unsupported backend(s) {bad}; allowed: {', '.join(BACKENDS)}")
    if exporter not in EXPORTERS:
        raise BuildError(f"exporter {exporter!r}; allowed: {', '.join(EXPORTERS)}")
    try:
        limits = Limits(max_history=max_history, max_batch=max_batch, max_beam=max_beam)
    except ValueError as e:
        raise BuildError(str(e)) from None
    if not isinstance(validation_users, int) or validation_users < 1:
        raise BuildError(f"validation_users must be a positive integer, got {validation_users!r}")
    _check_output(out, force)
    demo = checkpoint is None
    checkpoint = Path(checkpoint) if checkpoint is not None else DEMO_CHECKPOINT
    if demo:
        index = index if index is not None else find_pair(DEFAULT_DATA)[0]
        histories = histories if histories is not None else find_pair(DEFAULT_DATA)[1]

    tensorrt = "tensorrt" in backend
    quantized = [p for p in precisions if p in ("int8", "int8-cpu")]
    # --force over an artifact with int8: its tensor ranges are reused if graph, data and settings match
    previous_cache = out / CALIBRATION_CACHE if force and "int8" in precisions else None
    # int8 adds two steps: its calibration feeds (read early: bad data fails before the export) and the graphs
    total = 5 + ("fp16" in precisions) + len(quantized) + ("int8" in precisions) + bool(quantized) + tensorrt
    summary = Summary(out)
    progress = Progress(total, summary, lambda *a, **k: log(*a, **k) if log else None)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        with progress.step("model_from_checkpoint") as notes:
            model = model_from_checkpoint(checkpoint)
            catalog = load_catalog(index, checkpoint, model.layout)
            if index is None:   # the reference format stores SIDs only: item ids become positions in that file
                notes.append(f"no --index: item ids are positions 0..{len(catalog.item_ids) - 1} in "
                             f"ava_sid{model.layout.levels}.pt; pass the item index to serve real item ids")
        if "int8" in precisions:
            with progress.step("calibration_feeds_from_data") as notes:
                reader = CalibrationReader.from_file(calibration_data, catalog, model.layout, max_history,
                                                     calibration_size, seed=CALIBRATION_SEED, progress=False)
                notes.append(f"{reader.samples} histories from {calibration_data} (train split, seed "
                             f"{CALIBRATION_SEED}), {len(reader)} batches")
        with progress.step("tables_from_catalog"):
            tables = tables_from_catalog(catalog, model.layout, tmp)
        specs = graph_specs(model, limits)
        graphs = {}
        with progress.step("onnx_from_model") as notes:
            graphs["fp32"] = onnx_from_model(model, tmp / "graphs" / "fp32", limits, opset, exporter, log=notes.append)
        if "fp16" in precisions:
            with progress.step("fp16_from_onnx"):
                graphs["fp16"] = {n: fp16_from_onnx(p, tmp / "graphs" / "fp16" / p.name) for n, p in graphs["fp32"].items()}
        if isinstance(histories, (str, Path)):
            history_source, histories = f"data:{Path(histories).name}", histories_from_data(
                Path(histories), catalog, validation_users)
        elif histories is None:
            history_source, histories = "synthetic", synthetic_histories(catalog, validation_users, max_history)
        else:
            history_source = "given"
        if "int8" in precisions:
            with progress.step("int8_from_onnx") as notes:
                cache = tmp / CALIBRATION_CACHE
                reused = previous_cache is not None and previous_cache.is_file()
                if reused:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(previous_cache, cache)
                done: dict = {}
                graphs["int8"] = int8_converter()(
                    graphs["fp32"], tmp / "graphs" / "int8", reader, method=calibration_method,
                    exclude_sensitive=calibration_exclude, cache_path=cache, progress=False,
                    log=lambda m: notes.append(m.replace(str(tmp) + os.sep, "")), report=done)
                if reused:
                    notes.append(f"calibration cache of {out.name}: reused (hit)" if done["cache_hit"] else
                                 f"calibration cache of {out.name}: stale (graph, data or settings changed), "
                                 "recalibrated")
                summary.calibration = {
                    "precision": "int8", "method": calibration_method, "size": calibration_size,
                    "samples": reader.samples, "data": str(calibration_data), "split": "train",
                    "seed": CALIBRATION_SEED, "batch_size": reader.batch_size,
                    "exclude_sensitive": calibration_exclude, "excluded": done["excluded"],
                    "quantized_nodes": done["quantized_nodes"], "heads": done["heads"],
                    "cache": CALIBRATION_CACHE, "cache_hit": done["cache_hit"]}
                summary.notes["int8"] = (f"{calibration_method} on {reader.samples} histories, "
                                         f"cache {'hit' if done['cache_hit'] else 'written'}")
        if "int8-cpu" in precisions:
            with progress.step("int8_cpu_from_onnx") as notes:
                graphs["int8-cpu"] = int8_cpu_converter()(graphs["fp32"], tmp / "graphs" / "int8-cpu",
                                                          log=notes.append)
                summary.notes["int8-cpu"] = "cpu-only (ONNX Runtime CPU; not for TensorRT)"
        hidden_state = {}
        if quantized:
            with progress.step("validate_int8") as notes:
                hidden_state = _validate_hidden_state(graphs, quantized, validation_feeds(histories, catalog, model,
                                                                                          limits))
                for p in quantized:
                    h = hidden_state[p]["hidden"]
                    notes.append(f"{p} vs fp32 hidden states: mean cosine {h['mean_cosine']:.5f} "
                                 f"(>= {h['tolerances']['min_mean_cosine']}), worst {h['min_cosine']:.5f} "
                                 f"(>= {h['tolerances']['min_cosine']})")
                    summary.notes[p] += f"; hidden cos vs fp32 {h['mean_cosine']:.4f}"
        graphs = {p: graphs[p] for p in precisions}       # fp32 is exported always; kept only if asked for
        with progress.step("validate_artifact"):
            report = validate_artifact(model, catalog, graphs, histories, limits, history_source=history_source)
            if hidden_state:
                report["hidden_state_vs_fp32"] = hidden_state
            (tmp / VALIDATION).write_text(json.dumps(report, indent=2))
        engines = {}
        if tensorrt:
            with progress.step("engine_from_onnx") as notes:
                for p in precisions:
                    if p in CPU_ONLY_PRECISIONS:
                        summary.engines_not_built[p] = "cpu-only graphs (dynamic int8, MatMulInteger): TensorRT " \
                                                       "cannot build them; use int8 for TensorRT"
                        notes.append(f"{p}: skipped, {summary.engines_not_built[p]}")
                try:
                    engines = _engines({p: gs for p, gs in graphs.items() if p not in CPU_ONLY_PRECISIONS}, specs, tmp)
                except TensorRTUnavailable as e:
                    summary.engines_skipped = str(e)
                    shutil.rmtree(tmp / "engines", ignore_errors=True)
                if engines:        # the engines, run by the runtime's TensorRT runners, against torch
                    report["tensorrt"] = validate_engines(model, catalog, engines, specs, tmp, histories, limits,
                                                          history_source)
                    (tmp / VALIDATION).write_text(json.dumps(report, indent=2))
                    notes.append("engines validated against PyTorch: top-k agreement " + ", ".join(
                        f"{p} {e['topk_agreement']:.3f}" for p, e in report["tensorrt"]["precisions"].items()))
        if "fp32" not in precisions:
            shutil.rmtree(tmp / "graphs" / "fp32")
        with progress.step("write_manifest"):
            manifest_graphs = {p: {n: {**specs[n].to_json(path.relative_to(tmp).as_posix()),
                                       **(CPU_ONLY if p in CPU_ONLY_PRECISIONS else {})}
                                   for n, path in gs.items()}
                               for p, gs in graphs.items()}
            write_manifest(tmp, {
                "layout": model.layout.to_json(),
                "limits": {"max_history": max_history, "max_batch": max_batch, "max_beam": max_beam,
                           "hidden_size": int(model.config.hidden_size)},
                "graphs": manifest_graphs, "tables": tables, "engines": engines, "versions": _versions(),
                "source": {"checkpoint": str(checkpoint.resolve()), "architecture": model.config.model_type,
                           "index": str(Path(index).resolve()) if index is not None else None,
                           "item_ids": "index" if index is not None else f"positions in ava_sid{model.layout.levels}.pt"},
                "validation": VALIDATION,
                **({"calibration": summary.calibration} if summary.calibration else {})})
        for p, gs in graphs.items():
            entry = report["precisions"][p]
            summary.topk_agreement[p] = entry["topk_agreement"]
            summary.graphs[p] = {n: {"file": manifest_graphs[p][n]["file"], "bytes": _size(path),
                                     "max_abs_diff": max(o["max_abs_diff"] for k, o in entry["outputs"].items()
                                                         if k.startswith(n + "."))}
                                 for n, path in gs.items()}
        summary.engines = engines
        if out.exists():                   # --force: swap, then drop the old artifact
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _check_calibration(data: str | Path | None, size: int, method: str, exclude: int) -> Path:
    """Check the int8 calibration settings before any work; returns the interactions file to sample
    (``data``, or the default dataset's)."""
    if method not in METHODS:
        raise CalibrationError(f"calibration method {method!r}; allowed: {', '.join(METHODS)}")
    if not isinstance(size, int) or size < MIN_SAMPLES:
        raise CalibrationError(f"calibration size {size!r} is too small: need at least {MIN_SAMPLES} histories")
    if not isinstance(exclude, int) or exclude < 0:
        raise CalibrationError(f"calibration exclude must be a non-negative integer (weight MatMuls kept float), "
                               f"got {exclude!r}")
    path = Path(data).absolute() if data is not None else default_interactions().resolve()
    if not path.is_file():
        raise CalibrationError(f"calibration data {path} does not exist: pass a LETTER *.inter.json")
    return path


def _validate_hidden_state(graphs: dict[str, dict[str, Path]], precisions: list[str],
                           feeds: dict[str, dict[str, np.ndarray]]) -> dict:
    """Each int8 backbone against the fp32 one on the validation feeds (held out from calibration):
    {precision: validate_int8's result}. Checks every precision, then raises one Int8ValidationError."""
    results, failures = {}, []
    for p in precisions:
        try:
            results[p] = validate_int8(graphs["fp32"]["backbone"], graphs[p]["backbone"], list(feeds.values()))
        except Int8ValidationError as e:
            failures.append(f"{p}: {e}")
    if failures:
        raise Int8ValidationError("\n".join(failures))
    return results


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def validate_engines(model, catalog, engines: dict, specs: dict, root: Path, histories, limits: Limits,
                     history_source: str) -> dict:
    """TensorRT engines {precision: {graph: {file, sidecar}}} vs the torch model, with the graphs' tolerances."""
    opened = []

    def steps_for(precision, _paths):
        steps = EngineSteps(engines[precision], {g: specs[g].to_json("") for g in engines[precision]}, root)
        opened.append(steps)
        return steps
    try:
        return validate_artifact(model, catalog, {p: dict(gs) for p, gs in engines.items()}, histories, limits,
                                 history_source=history_source, steps_for=steps_for, what="TensorRT engines")
    finally:
        for steps in opened:
            steps.close()


def _engines(graphs: dict[str, dict[str, Path]], specs: dict, root: Path) -> dict:
    """engines/<precision>/<graph>.plan + .json for every graph; the timing cache is shared by all."""
    cache = root / "engines" / "timing.cache"
    entries = {}
    for precision, paths in graphs.items():
        for name, onnx_path in paths.items():
            plan = root / "engines" / precision / f"{name}.plan"
            engine_from_onnx(onnx_path, plan, specs[name].to_json(""), timing_cache=cache)
            entries.setdefault(precision, {})[name] = {"file": plan.relative_to(root).as_posix(),
                                                       "sidecar": plan.with_suffix(".json").relative_to(root).as_posix()}
    return entries


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python export/build.py", description=__doc__.split("\n\n")[0],
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
    p.add_argument("--max-batch", type=int, default=64, help="largest batch of users per request")
    p.add_argument("--max-history", type=int, default=20, help="most recent items kept per history")
    p.add_argument("--max-beam", type=int, default=512, help="largest beam width (head graphs accept max-batch * max-beam rows)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset of the exported graphs")
    p.add_argument("--exporter", default="dynamo", choices=EXPORTERS,
                   help="torch.onnx exporter; dynamo falls back to torchscript (dynamo=False) per graph on failure")
    p.add_argument("--histories", type=Path, default=None,
                   help="LETTER *.inter.json to sample validation histories from (default: the demo data with the "
                        "demo checkpoint, synthetic histories otherwise)")
    p.add_argument("--validation-users", type=int, default=16, help="histories used for validation")
    p.add_argument("--calibration-data", type=Path, default=None,
                   metavar="FILE", help="int8: LETTER *.inter.json whose training split (all but each user's "
                   "last two items) gives the calibration histories; none: the Beauty interactions")
    p.add_argument("--calibration-size", type=int, default=512,
                   help=f"int8: calibration histories, sampled with a fixed seed (at least {MIN_SAMPLES})")
    p.add_argument("--calibration-method", default="entropy", choices=list(METHODS),
                   help="int8: how activation ranges are chosen from the calibration histograms "
                        "(percentile: the 99.999th)")
    p.add_argument("--calibration-exclude", type=int, default=0,
                   help="int8: keep this many weight MatMuls float, the ones whose quantization alone costs the "
                        "most hidden-state cosine (a sensitivity pass: one quantized graph per MatMul)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        summary = build(**vars(args))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
