"""The GPU check: one prepared command timing the PyTorch reference NEZHA, the floor and the AR baseline on
CUDA, and the runtime through TensorRT (fp16, int8) and ONNX Runtime CUDA (fp32) where installed, on a
random-weight backbone of Qwen3-0.6B's shape (hidden 1024, 28 layers, 16 heads, 8 kv heads, head_dim 128,
intermediate 3072, 151,669 tokens before the SID tokens: the AR baseline's LM head spans them). Writes
preflight.{json,md} first (GPU, versions, which backends run and why not: a run cut short still says what it
found), then bench.{json,md,png} with the GPU's memory before and after. Weights are random: latency only.
``--layout 3x512`` gives each Beauty item a random 3-level SID of 512 codes (the public training scripts').

    python -m nezha.bench.gpu_check --out runs/gpu                  # on a CUDA machine (a few minutes)
    python -m nezha.bench.gpu_check --out runs/gpu --no-runtime     # torch contenders only (no export)
    python -m nezha.bench.gpu_check --out /tmp/g --tiny             # CPU smoke test: tiny backbone, seconds
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .report import write_result

QWEN3_0_6B = {"hidden_size": 1024, "num_layers": 28, "num_heads": 16, "num_kv_heads": 8, "head_dim": 128,
              "intermediate_size": 3072, "vocab": 151669}
TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
        "intermediate_size": 128, "vocab": 2}
RUNTIME_PRECISIONS = {"onnxruntime": ("fp32",), "tensorrt": ("fp16", "int8")}


def runtime_available(device: str) -> tuple[list[str], dict[str, str]]:
    """Runtime backends usable on ``device`` here -> (backends, {backend: why not}): onnxruntime (with the
    CUDA provider on cuda), tensorrt (TensorRT 10.8+, Polygraphy, the CUDA runtime and a GPU)."""
    found, why_not = [], {}
    try:
        import onnxruntime
        if device != "cpu" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise ImportError("no CUDAExecutionProvider (pip install onnxruntime-gpu)")
        found.append("onnxruntime")
    except ImportError as e:
        why_not["onnxruntime"] = str(e)
    if device != "cpu":
        from nezha.export.engines import gpu_for_engines
        from nezha.runtime.errors import Unavailable
        try:
            gpu_for_engines()
            found.append("tensorrt")
        except Unavailable as e:
            why_not["tensorrt"] = str(e)
    return found, why_not


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
        try:
            from nezha.runtime.backends.cuda import memory_info
            m = memory_info(index)
            return {"source": "cudaMemGetInfo", "used_mb": round(m["total_mb"] - m["free_mb"], 1),
                    "total_mb": m["total_mb"]}
        except Exception as e:   # the report says why rather than failing the whole check
            return {"source": None, "error": f"{type(e).__name__}: {e}"}


def preflight(device: str, out: Path, log) -> dict:
    """What this machine offers, written to ``out``/preflight.{json,md} before any timing."""
    from .stats import machine
    backends, why_not = runtime_available(device)
    found = {"device": device, "machine": machine(), "runtime_backends": backends, "not_available": why_not, "gpu_memory": gpu_memory(device)}
    if device.startswith("cuda"):
        import torch
        found["gpu"] = torch.cuda.get_device_name(int(device.partition(":")[2] or 0))
    lines = [f"- GPU: {found.get('gpu', '-')}", f"- runtime backends: {', '.join(backends) or 'none'}",
             *[f"- {b} not available: {why}" for b, why in why_not.items()], f"- GPU memory: {found['gpu_memory']}"]
    write_result(out, "preflight", json.loads(json.dumps(found, default=str)),
                 "\n".join([f"# gpu_check preflight ({device})", "", *lines]) + "\n")
    log(" | ".join(lines))
    return found


def gpu_check(out: Path, tiny: bool = False, device: str | None = None, layout: str = "3x512",
              beams=(20, 128, 512), batch_sizes=(1,), requests: int = 30, warmup: int = 3,
              runtime: bool = True, data: Path | None = None, work: Path | None = None, seed: int = 0) -> dict:
    """Run the check and write ``out``/bench.{json,md,png}; returns the result. The checkpoint and
    artifact (gigabytes at full size) go to ``work`` (default: a temporary folder, removed at the end),
    never to ``out``. A runtime that cannot be built or loaded is skipped with the reason in the result:
    the torch figures are still worth having."""
    import torch
    from nezha.calibration import MIN_SAMPLES
    from nezha.export.build import build

    from nezha.model.random_checkpoint import random_checkpoint
    from .suite import run_bench, write_outputs

    def log(msg="", **print_kwargs):                # the build logs progress with end=""
        print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", **{"flush": True, **print_kwargs})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if tiny:
        beams, requests, warmup = tuple(b for b in beams if b <= 64) or (20,), min(requests, 3), min(warmup, 1)
    shape = TINY if tiny else QWEN3_0_6B
    folder = Path(work) if work else Path(tempfile.mkdtemp(prefix="nezha-gpu-check-"))
    try:
        ckpt = random_checkpoint(folder / "checkpoint", **shape, layout=layout, data=data, seed=seed)
        found = preflight(device, out, log)
        backends, engines, skipped = found["runtime_backends"] if runtime else [], None, None
        if backends:
            engines = [(b, p) for b in backends for p in RUNTIME_PRECISIONS[b]]
            precisions = tuple(dict.fromkeys(p for _, p in engines))
            log(f"building artifact {precisions} for {backends} (max_beam {max(beams)}, max_batch {max(batch_sizes)})")
            try:      # validation and int8 calibration kept small: time, not quality (the weights are random)
                build(checkpoint=ckpt, index=folder / "checkpoint.index.json", out=folder / "artifact",
                      precision=precisions, backend=tuple(backends), max_beam=max(beams),
                      max_batch=max(batch_sizes), validation_users=4, calibration_size=MIN_SAMPLES,
                      calibration_method="minmax", force=True, log=log)
            except Exception as e:       # any failure of the GPU stack: record why, go on with torch
                backends, skipped = [], f"skipped: {type(e).__name__}: {e}"
        elif runtime:
            skipped = f"skipped: no runtime backend usable on {device}: {found['not_available']}"
        kw = dict(checkpoint=ckpt, data=data, device=device, beams=beams, batch_sizes=batch_sizes, requests=requests,
                  warmup=warmup, title=f"gpu check ({'tiny' if tiny else 'Qwen3-0.6B shape'}, {layout}, {device})",
                  progress=True)
        try:
            result, _ = run_bench(folder / "artifact" if backends else None, engines=engines, **kw)
        except Exception as e:       # an engine that will not load or run: the torch side alone
            if not backends:
                raise
            skipped = f"skipped: {type(e).__name__}: {e}"
            result, _ = run_bench(None, **kw)
        if skipped:
            log(skipped)
        result["setup"].update(runtime=skipped, runtime_not_available=found["not_available"], gpu=found.get("gpu"))
        if device.startswith("cuda"):        # torch's own peak; the TensorRT/ONNX Runtime share is in "gpu"
            result["memory"]["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            result["memory"]["gpu"] = {"start": found["gpu_memory"], "after_timing": gpu_memory(device)}
        log(f"wrote {', '.join(map(str, write_outputs(result, out)))}")
        return result
    finally:
        if not work:
            shutil.rmtree(folder, ignore_errors=True)


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
    from .report import markdown
    print(markdown(gpu_check(**vars(p.parse_args(argv)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
