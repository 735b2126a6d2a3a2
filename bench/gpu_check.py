"""The GPU check: one prepared command that times the PyTorch reference NEZHA, the floor and the AR
baseline on CUDA, plus the runtime through TensorRT (fp16 and int8 engines) and ONNX Runtime CUDA (fp32)
where those are installed, on a random-weight backbone of Qwen3-0.6B's shape, and writes bench.json +
bench.md + bench.png to a folder, with the GPU's memory (NVML, else cudaMemGetInfo) after each phase.
``preflight.json``/``preflight.md`` are written first (GPU, versions, which backends run and why not),
so a run cut short by a time limit still says what it found.

    python -m nezha.bench.gpu_check --out runs/gpu                  # on a CUDA machine (a few minutes)
    python -m nezha.bench.gpu_check --out runs/gpu --no-runtime     # torch contenders only (no export)
    python -m nezha.bench.gpu_check --out /tmp/g --tiny             # CPU smoke test: tiny backbone, seconds

Qwen3-0.6B's backbone: hidden 1024, 28 layers, 16 heads, 8 kv heads, head_dim 128, intermediate 3072,
vocabulary 151,669 tokens before the SID tokens (the AR baseline's LM head spans it, as in TIGER-style
serving). Weights are random: latency only. Histories: Beauty test users; with ``--layout 3x512`` each
Beauty item gets a random 3-level SID of 512 codes (the public training scripts' shape)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

QWEN3_0_6B = {"hidden_size": 1024, "num_layers": 28, "num_heads": 16, "num_kv_heads": 8, "head_dim": 128,
              "intermediate_size": 3072, "vocab": 151669}
TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
        "intermediate_size": 128, "vocab": 2}


def layout_and_catalog(kind: str, data: Path, vocab: int, seed: int = 0):
    """("3x512" | "beauty") -> (SidLayout with code tokens after ``vocab`` tokens, Catalog of the Beauty items)."""
    from nezha.runtime.catalog import Catalog
    from nezha.runtime.data import find_pair
    from nezha.runtime.encoding import SidLayout

    index, _ = find_pair(data)
    beauty = Catalog.from_index_json(index)
    if kind == "beauty":
        catalog = beauty
        codes = tuple(int(c) for c in beauty.item_codes.max(0) + 1)
    elif kind == "3x512":
        codes = (512, 512, 512)
        rng = np.random.default_rng(seed)
        catalog = Catalog(beauty.item_ids, np.stack([rng.integers(0, c, len(beauty.item_ids)) for c in codes], 1))
    else:
        raise ValueError(f"layout {kind!r}; allowed: 3x512, beauty")
    offsets = tuple(vocab + sum(codes[:i]) for i in range(len(codes)))
    return SidLayout(codes, offsets, placeholder_start=offsets[-1] + codes[-1], pad_token_id=0), catalog


def random_model(layout, shape: dict, seed: int = 0):
    """A random-weight NEZHA model (float32, eval) of the given backbone shape."""
    import torch
    from nezha.model.checkpoint import make_config
    from nezha.model.nezha import NezhaModel

    config = make_config(layout, "qwen3", hidden_size=shape["hidden_size"], num_layers=shape["num_layers"],
                         num_heads=shape["num_heads"], num_kv_heads=shape["num_kv_heads"],
                         intermediate_size=shape["intermediate_size"])
    config.head_dim = shape["head_dim"]          # Qwen3-0.6B: 16 heads x 128 != hidden 1024
    torch.manual_seed(seed)
    return NezhaModel(config).float().eval()


def runtime_available(device: str) -> tuple[list[str], dict[str, str]]:
    """Runtime backends usable on ``device`` here -> (backends, {backend: why not}): onnxruntime (with the
    CUDA provider on cuda), tensorrt (TensorRT 10.8+, Polygraphy, the CUDA runtime and a GPU)."""
    found, why_not = [], {}
    try:
        import onnxruntime
        if device == "cpu" or "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            found.append("onnxruntime")
        else:
            why_not["onnxruntime"] = "no CUDAExecutionProvider (pip install onnxruntime-gpu)"
    except ImportError as e:
        why_not["onnxruntime"] = str(e)
    if device != "cpu":
        from nezha.export.engines import TensorRTUnavailable, gpu_for_engines
        try:
            gpu_for_engines()
            found.append("tensorrt")
        except TensorRTUnavailable as e:
            why_not["tensorrt"] = str(e)
    return found, why_not


# The precisions each backend is timed at: TensorRT's fp16 and int8 engines (int8: Q/DQ on the fp16 graph),
# ONNX Runtime CUDA's fp32 graphs.
RUNTIME_PRECISIONS = {"onnxruntime": ("fp32",), "tensorrt": ("fp16", "int8")}


def gpu_memory(device: str) -> dict | None:
    """The GPU's memory in use and total in MB (all processes), from NVML when nvidia-ml-py is installed,
    else the CUDA runtime's cudaMemGetInfo; None on CPU or when neither answers."""
    if not device.startswith("cuda"):
        return None
    index = int(device.partition(":")[2] or 0)
    try:
        import pynvml
        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        return {"source": "nvml", "used_mb": round(info.used / 2**20, 1), "total_mb": round(info.total / 2**20, 1)}
    except Exception:            # no nvidia-ml-py, or NVML unusable in this container: ask the CUDA runtime
        pass
    try:
        from nezha.runtime.backends.cuda import memory_info
        m = memory_info(index)
        return {"source": "cudaMemGetInfo", "used_mb": round(m["total_mb"] - m["free_mb"], 1), "total_mb": m["total_mb"]}
    except Exception as e:       # the report says why rather than failing the whole check
        return {"source": None, "error": f"{type(e).__name__}: {e}"}


def preflight(device: str, out: Path, log) -> dict:
    """What this machine offers, written to ``out``/preflight.{json,md} before any timing."""
    import json
    import platform

    from .stats import machine
    backends, why_not = runtime_available(device)
    found = {"device": device, "machine": machine(), "python": platform.python_version(),
             "runtime_backends": backends, "not_available": why_not, "gpu_memory": gpu_memory(device)}
    if device.startswith("cuda"):
        import torch
        found["gpu"] = torch.cuda.get_device_name(int(device.partition(":")[2] or 0))
    out.mkdir(parents=True, exist_ok=True)
    (out / "preflight.json").write_text(json.dumps(found, indent=1, default=str))
    lines = [f"# gpu_check preflight ({device})", "", f"- GPU: {found.get('gpu', '-')}",
             f"- runtime backends: {', '.join(backends) or 'none'}",
             *[f"- {b} not available: {why}" for b, why in why_not.items()], f"- GPU memory: {found['gpu_memory']}"]
    (out / "preflight.md").write_text("\n".join(lines) + "\n")
    log(" | ".join(lines[2:]))
    return found


def build_artifact(model, catalog, folder: Path, backends: list[str], max_beam: int, max_batch: int, log) -> Path:
    """Save ``model`` as a checkpoint and build an artifact from it with nezha.export.build: the precisions
    of RUNTIME_PRECISIONS for ``backends``; validation and int8 calibration kept small (time, not quality:
    the weights are random)."""
    from nezha.calibration import MIN_SAMPLES
    from nezha.export.build import build
    from nezha.model.checkpoint import save_checkpoint

    ckpt = save_checkpoint(model, folder / "checkpoint", catalog, overwrite=True)
    precisions = tuple(dict.fromkeys(p for b in backends for p in RUNTIME_PRECISIONS[b]))
    log(f"building artifact {precisions} for {backends} (max_beam {max_beam}, max_batch {max_batch}) ...")
    index = catalog.to_index_json(folder / "items.index.json")     # so that the artifact keeps the Beauty item ids
    build(checkpoint=ckpt, index=index, out=folder / "artifact", precision=precisions, backend=tuple(backends),
          max_beam=max_beam, max_batch=max_batch, validation_users=4, calibration_size=MIN_SAMPLES,
          calibration_method="minmax", force=True, log=log)
    return folder / "artifact"


def _runtime_contenders(model, catalog, device: str, work, max_beam: int, max_batch: int, desc: dict, log) -> list:
    """The runtime's contenders on ``device`` from a freshly built artifact (its folder in ``desc``), or none
    with the reason in ``desc["runtime"]``: the torch figures are still worth having."""
    import tempfile

    from .contenders import runtime_contenders
    contenders, (backends, why_not) = [], runtime_available(device)
    desc["runtime_not_available"] = why_not
    if not backends:
        desc["runtime"] = f"skipped: no runtime backend usable on {device}: {why_not}"
        return contenders
    try:
        work_dir = Path(work) if work else Path(tempfile.mkdtemp(prefix="nezha-gpu-check-"))
        t0 = time.perf_counter()
        artifact = build_artifact(model, catalog, work_dir, backends, max_beam, max_batch, log)
        desc["artifact"], desc["build_seconds"] = str(artifact), round(time.perf_counter() - t0, 1)
        for b in backends:
            for precision in RUNTIME_PRECISIONS[b]:
                contenders += runtime_contenders(artifact, b, precision, device)
    except Exception as e:       # any failure of the GPU stack: record why, go on with torch
        desc["runtime"] = f"skipped: {type(e).__name__}: {e}"
        log(desc["runtime"])
    return contenders


def gpu_check(out: Path, tiny: bool = False, device: str | None = None, layout: str = "3x512",
              beams=(20, 128, 512), batch_sizes=(1,), requests: int = 30, warmup: int = 3,
              runtime: bool = True, data: Path | None = None, work: Path | None = None, seed: int = 0) -> dict:
    """Run the check and write ``out``/bench.{json,md,png}; returns the result. The checkpoint and
    artifact (gigabytes at full size) go to ``work`` (default: a temporary folder, removed at the end),
    never to ``out``."""
    import shutil

    import torch
    from nezha.runtime.data import DEFAULT_DATA

    from .contenders import ar_contender, ar_model_from, reference_contenders
    from .run import benchmark, load_histories
    from .suite import backbone_description, write_outputs

    def log(msg="", **print_kwargs):
        print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", **{"flush": True, **print_kwargs})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if tiny:
        beams, requests, warmup = tuple(b for b in beams if b <= 64) or (20,), min(requests, 3), min(warmup, 1)
    shape = TINY if tiny else QWEN3_0_6B
    data = data or DEFAULT_DATA
    sid_layout, catalog = layout_and_catalog(layout, data, shape["vocab"], seed)
    model = random_model(sid_layout, shape, seed)
    desc = {"title": f"gpu check ({'tiny' if tiny else 'Qwen3-0.6B shape'}, {layout}, {device})",
            "device": device, "backbone": backbone_description(model), "layout": sid_layout.to_json(),
            "ar": "same backbone weights, random LM head over the full vocabulary (latency only)", "max_history": 20}
    log(f"model: {desc['backbone']}")
    found = preflight(device, out, log)
    desc["gpu"], desc["gpu_memory"] = found.get("gpu"), {"start": found["gpu_memory"]}
    contenders = []
    if runtime:
        contenders += _runtime_contenders(model, catalog, device, work, max(beams), max(batch_sizes), desc, log)
        desc["gpu_memory"]["runtime_loaded"] = gpu_memory(device)
    ar_model = ar_model_from(model, seed)
    contenders += reference_contenders(model, catalog, device)
    contenders.append(ar_contender(ar_model, catalog, device, note=desc["ar"]))
    histories = load_histories(data, "test", 2000, seed)
    desc["histories"] = f"{data} leave-one-out test users (shuffled, first {len(histories)})"
    log(f"timing {[c.name for c in contenders]} at beams {list(beams)}, batch sizes {list(batch_sizes)}")
    result = benchmark(contenders, histories, batch_sizes, beams, requests, warmup, desc, progress=True)
    if device.startswith("cuda"):            # torch's own peak; the TensorRT/ONNX Runtime share is in gpu_memory
        result["memory"]["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["memory"]["gpu"] = {**desc["gpu_memory"], "after_timing": gpu_memory(device)}
    for c in contenders:
        c.close()
    if runtime and not work and "artifact" in desc:
        shutil.rmtree(Path(desc["artifact"]).parent, ignore_errors=True)
    paths = write_outputs(result, out)
    log(f"wrote {', '.join(map(str, paths))}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for bench.json, bench.md, bench.png")
    p.add_argument("--tiny", action="store_true", help="a tiny backbone and few requests (CPU smoke test)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--layout", default="3x512", choices=["3x512", "beauty"], help="SID layout")
    p.add_argument("--beams", type=int, nargs="+", default=[20, 128, 512])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runtime", action=argparse.BooleanOptionalAction, default=True,
                   help="also export an artifact and time the runtime through ONNX Runtime CUDA / TensorRT "
                   "where installed (default: on; skipped with a note where neither is)")
    p.add_argument("--data", type=Path, help="LETTER dataset folder (default: Beauty)")
    p.add_argument("--work", type=Path, help="keep the checkpoint and artifact here (default: a temporary folder)")
    args = p.parse_args(argv)
    result = gpu_check(**vars(args))
    from .report import markdown
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
