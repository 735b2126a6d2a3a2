"""Build a NEZHA artifact: checkpoint -> validated ONNX graphs (fp32, fp16, int8), optional TensorRT
engines, verifier tables and manifest.json.

    python export/build.py --checkpoint DIR --index FILE --out DIR [--precision fp32 fp16] [--backend tensorrt]

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
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import nezha
from nezha.data import DEFAULT_DATA, DataError, find_pair
from nezha.export.graphs import EXPORTERS, ExportError, Limits, graph_specs, onnx_from_model
from nezha.export.precision import PRECISIONS, PrecisionError, check_precisions, fp16_from_onnx, int8_converter
from nezha.export.tables import tables_from_catalog
from nezha.export.tensorrt import EngineBuildError, TensorRTUnavailable, engine_from_onnx
from nezha.export.validate import (ValidationError, histories_from_data, synthetic_histories, validate_artifact,
                                   validation_feeds)
from nezha.model.checkpoint import CheckpointError, load_catalog, load_checkpoint
from nezha.runtime.catalog import CatalogError
from nezha.runtime.manifest import write_manifest

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = REPO / "checkpoints" / "demo" / "nezha"
BACKENDS = ("onnxruntime", "tensorrt")
VALIDATION = "validation.json"


class BuildError(ValueError):
    """A build that cannot start or finish: bad arguments, existing or unwritable output."""


USER_ERRORS = (BuildError, CheckpointError, PrecisionError, CatalogError, DataError, ExportError, ValidationError, EngineBuildError)


@dataclass
class Summary:
    """What the build made: per precision and graph the file size and max diff, the top-k agreement,
    engines built or the reason they were skipped, and the seconds of each step."""

    out: Path
    graphs: dict[str, dict[str, dict]] = field(default_factory=dict)      # precision -> graph -> {file, bytes, max_abs_diff}
    topk_agreement: dict[str, float] = field(default_factory=dict)
    engines: dict[str, dict] = field(default_factory=dict)
    engines_skipped: str | None = None
    steps: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        rows = [("precision", "graph", "size", "max |diff|", "top-k agreement")]
        for precision, graphs in self.graphs.items():
            for name, g in graphs.items():
                rows.append((precision, name, f"{g['bytes'] / 1e6:.2f} MB", f"{g['max_abs_diff']:.2e}",
                             f"{self.topk_agreement.get(precision, float('nan')):.3f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        if self.engines_skipped:
            lines.append(f"TensorRT engines skipped: {self.engines_skipped}")
        elif self.engines:
            lines.append("TensorRT engines: " + ", ".join(f"{p}/{g}" for p, gs in self.engines.items() for g in gs))
        lines.append(f"artifact: {self.out} ({sum(self.steps.values()):.1f} s)")
        return "\n".join(lines)


class Progress:
    """Prints '[3/8] fp16_from_onnx ... 1.2 s' per step and records the seconds in the summary."""

    def __init__(self, total: int, summary: Summary, log):
        self.total, self.done, self.summary, self.log = total, 0, summary, log

    @contextmanager
    def step(self, name: str):
        self.done += 1
        t0 = time.perf_counter()
        self.log(f"[{self.done}/{self.total}] {name} ...", end="", flush=True)
        yield
        seconds = time.perf_counter() - t0
        self.summary.steps[name] = seconds
        self.log(f" {seconds:.1f} s")


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
          force: bool = False, log=print) -> Summary:
    """Build the artifact folder ``out`` from ``checkpoint`` (default: the demo checkpoint) and the item
    ``index`` (LETTER *.index.json; default: Beauty's; None with an explicit checkpoint: its ava_sid file).

    ``histories`` for validation: a LETTER *.inter.json path, a list of item-id lists, or None (the default
    dataset's interactions with the demo checkpoint, synthetic ones otherwise). Returns a Summary; raises
    one of USER_ERRORS with a clear message, leaving nothing at ``out``.
    """
    out = Path(out).absolute()
    precisions = check_precisions(precision)
    bad = [b for b in backend if b not in BACKENDS]
    if bad:
        raise BuildError(f"unsupported backend(s) {bad}; allowed: {', '.join(BACKENDS)}")
    if exporter not in EXPORTERS:
        raise BuildError(f"exporter {exporter!r}; allowed: {', '.join(EXPORTERS)}")
    try:
        limits = Limits(max_history=max_history, max_batch=max_batch, max_beam=max_beam)
    except ValueError as e:
        raise BuildError(str(e)) from None
    _check_output(out, force)
    demo = checkpoint is None
    checkpoint = Path(checkpoint) if checkpoint is not None else DEMO_CHECKPOINT
    if demo:
        index = index if index is not None else find_pair(DEFAULT_DATA)[0]
        histories = histories if histories is not None else find_pair(DEFAULT_DATA)[1]

    tensorrt = "tensorrt" in backend
    total = 5 + ("fp16" in precisions) + ("int8" in precisions) + tensorrt
    summary = Summary(out)
    progress = Progress(total, summary, lambda *a, **k: log(*a, **k) if log else None)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        with progress.step("model_from_checkpoint"):
            model = model_from_checkpoint(checkpoint)
            catalog = load_catalog(index, checkpoint, model.layout)
        with progress.step("tables_from_catalog"):
            tables = tables_from_catalog(catalog, model.layout, tmp)
        specs = graph_specs(model, limits)
        graphs = {}
        with progress.step("onnx_from_model"):
            graphs["fp32"] = onnx_from_model(model, tmp / "graphs" / "fp32", limits, opset, exporter, log=log)
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
            with progress.step("int8_from_onnx"):
                feeds = list(validation_feeds(histories, catalog, model, limits).values())
                graphs["int8"] = int8_converter()(graphs["fp32"], tmp / "graphs" / "int8", feeds)
        graphs = {p: graphs[p] for p in precisions}       # fp32 is exported always; kept only if asked for
        with progress.step("validate_artifact"):
            report = validate_artifact(model, catalog, graphs, histories, limits, tmp / VALIDATION,
                                       history_source=history_source)
        engines = {}
        if tensorrt:
            with progress.step("engine_from_onnx"):
                try:
                    engines = _engines(graphs, specs, tmp)
                except TensorRTUnavailable as e:
                    summary.engines_skipped = str(e)
                    shutil.rmtree(tmp / "engines", ignore_errors=True)
        if "fp32" not in precisions:
            shutil.rmtree(tmp / "graphs" / "fp32")
        with progress.step("write_manifest"):
            manifest_graphs = {p: {n: specs[n].to_json(path.relative_to(tmp).as_posix()) for n, path in gs.items()}
                               for p, gs in graphs.items()}
            write_manifest(tmp, {
                "layout": model.layout.to_json(),
                "limits": {"max_history": max_history, "max_batch": max_batch, "max_beam": max_beam,
                           "hidden_size": int(model.config.hidden_size)},
                "graphs": manifest_graphs, "tables": tables, "engines": engines, "versions": _versions(),
                "source": {"checkpoint": str(checkpoint.resolve()), "architecture": model.config.model_type,
                           "index": str(Path(index).resolve()) if index is not None else None},
                "validation": VALIDATION})
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


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


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
                   help="graph precisions to build; int8 needs calibration/ (not available yet)")
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
