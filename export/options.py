"""The build's options, declared once (runtime/options.py): each field of ``BuildOptions`` is a keyword of
``build()``, a flag of ``python export/build.py`` (same name, dashes), its default, its --help text and its
check. ``check`` runs every check before the slow steps start and returns the options resolved."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import onnx
from nezha.calibration import METHODS, MIN_SAMPLES
from nezha.calibration.data import default_interactions
from nezha.runtime.cli import ascii_int
from nezha.runtime.data import DEFAULT_DATA, find_pair
from nezha.runtime.manifest import PRECISIONS
from nezha.runtime.options import checked, option, rule
from nezha.runtime.errors import ArtifactError, InputError

from .graphs import EXPORTERS
from .precision import check_precisions
from .staging import check_output

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = REPO / "checkpoints" / "demo" / "nezha"
BACKENDS = ("onnxruntime", "tensorrt")
OPSETS = (18, onnx.defs.onnx_opset_version())     # the dynamo exporter writes opset 18 and up


def _precisions(value, f):
    return check_precisions(value)


def _backends(value, f):
    bad = [b for b in value if b not in BACKENDS]
    if bad or not value:
        raise InputError(f"unsupported backend(s) {bad or '(none)'}; allowed: {', '.join(BACKENDS)}")
    return tuple(value)


_positive = rule(lambda v: type(v) is int and v >= 1, lambda v, f: f"{f.name} must be a positive integer, got {v!r}",
                 InputError)
_opset = rule(lambda v: type(v) is int and OPSETS[0] <= v <= OPSETS[1],
              lambda v, f: f"opset must be an integer in {OPSETS[0]}..{OPSETS[1]} (this onnx package's newest), "
                           f"got {v!r}", InputError)
_calibration_size = rule(lambda v: type(v) is int and v >= MIN_SAMPLES, lambda v, f: f"calibration size {v!r} is too "
                         f"small: need at least {MIN_SAMPLES} histories", InputError)
_calibration_exclude = rule(lambda v: type(v) is int and v >= 0, lambda v, f: "calibration exclude must be a "
                            f"non-negative integer (weight MatMuls kept float), got {v!r}", InputError)


def _one_of(allowed, error):
    return rule(lambda v: v in allowed, lambda v, f: f"{f.name.replace('_', ' ')} {v!r}; allowed: {', '.join(allowed)}",
                error)


def _int8(o) -> bool:
    return "int8" in o.precision


@dataclass(frozen=True)
class BuildOptions:
    """What the build is asked for. ``check`` resolves it: the demo checkpoint and data where none is given,
    ``precision`` ordered (a list), ``backend`` a tuple, ``out`` absolute, ``calibration_data`` (int8) a file."""

    checkpoint: Path | None = option(
        None, f"checkpoint folder in the public NEZHA format (default: the demo checkpoint {DEMO_CHECKPOINT}, "
        "validated on the Beauty interactions)", type=Path)
    index: Path | None = option(
        None, "item index (LETTER *.index.json: item id -> SID code tokens); default with the demo checkpoint: "
        "Beauty.index.json; otherwise the checkpoint's ava_sid{L}.pt", type=Path)
    out: Path = option(Path("artifacts/nezha"), "artifact folder to create", type=Path)
    precision: tuple[str, ...] = option(
        ("fp32", "fp16"), "graph precisions to build. int8: static Q/DQ int8 calibrated on real histories (ONNX "
        "Runtime and TensorRT); int8-cpu: dynamic int8 for ONNX Runtime on CPU only, marked cpu-only in the "
        "manifest, never built for TensorRT", _precisions, nargs="+", choices=PRECISIONS)
    backend: tuple[str, ...] = option(
        ("onnxruntime",), "tensorrt also builds engines (needs TensorRT 10+ and a GPU; skipped with a message "
        "otherwise)", _backends, nargs="+", choices=BACKENDS)
    max_batch: int = option(64, "largest batch of users per request", _positive, type=ascii_int)
    max_history: int = option(20, "most recent items kept per history", _positive, type=ascii_int)
    max_beam: int = option(512, "largest beam width (head graphs accept max-batch * max-beam rows)", _positive,
                           type=ascii_int)
    opset: int = option(18, "ONNX opset of the exported graphs", _opset, type=ascii_int)
    exporter: str = option(
        "dynamo", "torch.onnx exporter; dynamo falls back to torchscript (dynamo=False) per graph on failure",
        _one_of(EXPORTERS, InputError), choices=EXPORTERS)
    histories: Path | list | None = option(
        None, "LETTER *.inter.json to sample validation histories from (default: the demo data with the demo "
        "checkpoint, synthetic histories otherwise)", type=Path)
    validation_users: int = option(16, "histories used for validation", _positive, type=ascii_int)
    calibration_data: Path | None = option(
        None, "int8: LETTER *.inter.json whose training split (all but each user's last two items) gives the "
        "calibration histories; none: the Beauty interactions", type=Path, metavar="FILE")
    calibration_size: int = option(
        512, f"int8: calibration histories, sampled with a fixed seed (at least {MIN_SAMPLES})", _calibration_size,
        _int8, type=ascii_int)
    calibration_method: str = option(
        "entropy", "int8: how activation ranges are chosen from the calibration histograms (percentile: the "
        "99.999th)", _one_of(METHODS, InputError), _int8, choices=list(METHODS))
    calibration_exclude: int = option(
        0, "int8: keep this many weight MatMuls float, the ones whose quantization alone costs the most "
        "hidden-state cosine (a sensitivity pass: one quantized graph per MatMul)", _calibration_exclude, _int8,
        type=ascii_int)
    force: bool = option(False, "replace --out if it is an artifact (its manifest.json lists every file in it) or "
                         "empty; any other folder is refused, naming the unknown files", action="store_true")


def _must_be_file(path: Path, what: str, hint: str, error: type[Exception], plural: bool = False) -> None:
    if not path.is_file():
        verbs = ("are not a file", "do not exist") if plural else ("is not a file", "does not exist")
        raise error(f"{what} {path} {verbs[0] if path.exists() else verbs[1]}: {hint}")


def check(options: BuildOptions) -> BuildOptions:
    """Every option checked before the slow steps start (values, then inputs exist and --out is safe to
    write) -> the options resolved (see BuildOptions)."""
    o = replace(options, **checked(options))
    demo = o.checkpoint is None
    checkpoint = Path(o.checkpoint) if not demo else DEMO_CHECKPOINT
    index, histories = o.index, o.histories
    if demo:
        index = index if index is not None else find_pair(DEFAULT_DATA)[0]
        histories = histories if histories is not None else find_pair(DEFAULT_DATA)[1]
    if not checkpoint.is_dir():
        raise ArtifactError(f"checkpoint {checkpoint} does not exist or is not a folder: pass a checkpoint in "
                            "the public NEZHA format")
    if index is not None:
        index = Path(index)
        _must_be_file(index, "item index", "pass a LETTER *.index.json", ArtifactError)
    if isinstance(histories, (str, Path)):
        histories = Path(histories)
        _must_be_file(histories, "validation histories", "pass a LETTER *.inter.json", InputError, plural=True)
    calibration_data = o.calibration_data
    if _int8(o):
        calibration_data = Path(calibration_data).absolute() if calibration_data is not None else \
            default_interactions().resolve()
        _must_be_file(calibration_data, "calibration data", "pass a LETTER *.inter.json", InputError)
    out = Path(o.out).absolute()
    check_output(out, o.force, {"checkpoint": checkpoint, "item index": index, "validation histories":
                                histories if isinstance(histories, Path) else None,
                                "calibration data": calibration_data if _int8(o) else None,
                                "demo data folder": DEFAULT_DATA if demo else None})
    return replace(o, checkpoint=checkpoint, index=index, out=out, histories=histories,
                   calibration_data=calibration_data)
