"""The GPU check: one prepared command that times the PyTorch reference NEZHA, the floor and the AR
baseline on CUDA (plus the runtime through ONNX Runtime CUDA / TensorRT when those are installed and
the exporter is available) on a random-weight backbone of Qwen3-0.6B's shape, and writes
bench.json + bench.md + bench.png to a folder.

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
    from nezha.runtime.layout import SidLayout

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


def runtime_available(device: str) -> list[str]:
    """Runtime backends usable on ``device`` here: onnxruntime (with the CUDA provider on cuda), tensorrt."""
    found = []
    try:
        import onnxruntime
        if device == "cpu" or "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            found.append("onnxruntime")
    except ImportError:
        pass
    if device != "cpu":
        try:
            import tensorrt  # noqa: F401
            found.append("tensorrt")
        except ImportError:
            pass
    return found


def build_artifact(model, catalog, folder: Path, backends: list[str], max_beam: int, log) -> Path:
    """Save ``model`` as a checkpoint and build an artifact from it with nezha.export.build."""
    from nezha.export.build import build
    from nezha.model.checkpoint import save_checkpoint

    ckpt = save_checkpoint(model, folder / "checkpoint", catalog, overwrite=True)
    log(f"building artifact for {backends} (max_beam {max_beam}) ...")
    index = catalog.to_index_json(folder / "items.index.json")     # so that the artifact keeps the Beauty item ids
    build(checkpoint=ckpt, index=index, out=folder / "artifact", precision=("fp32",), backend=tuple(backends),
          max_beam=max_beam, force=True, log=log)
    return folder / "artifact"


def _runtime_contenders(model, catalog, device: str, work, max_beam: int, desc: dict, log) -> list:
    """The runtime's contenders on ``device`` from a freshly built artifact (its folder in ``desc``), or none
    with the reason in ``desc["runtime"]``: the torch figures are still worth having."""
    import tempfile

    from .contenders import runtime_contenders
    contenders, backends = [], runtime_available(device)
    if not backends:
        desc["runtime"] = f"skipped: no runtime backend usable on {device} (onnxruntime-gpu / tensorrt)"
        return contenders
    try:
        work_dir = Path(work) if work else Path(tempfile.mkdtemp(prefix="nezha-gpu-check-"))
        artifact = build_artifact(model, catalog, work_dir, backends, max_beam, log)
        for b in backends:
            contenders += runtime_contenders(artifact, b, "fp32", device)
        desc["artifact"] = str(artifact)
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
    contenders = []
    if runtime:
        contenders += _runtime_contenders(model, catalog, device, work, max(beams), desc, log)
    ar_model = ar_model_from(model, seed)
    contenders += reference_contenders(model, catalog, device)
    contenders.append(ar_contender(ar_model, catalog, device, note=desc["ar"]))
    histories = load_histories(data, "test", 2000, seed)
    desc["histories"] = f"{data} leave-one-out test users (shuffled, first {len(histories)})"
    log(f"timing {[c.name for c in contenders]} at beams {list(beams)}, batch sizes {list(batch_sizes)}")
    result = benchmark(contenders, histories, batch_sizes, beams, requests, warmup, desc, progress=True)
    if device.startswith("cuda"):
        result["memory"]["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
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
