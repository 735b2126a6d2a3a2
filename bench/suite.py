"""A whole benchmark as one call: choose the contenders for an artifact and/or a checkpoint, load real
histories, measure, write JSON + Markdown + PNG, and (optionally) gate against a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nezha.runtime.errors import InputError

from . import gate, report
from .contenders import Contender, ar_contender, ar_model_from, hf_generate_contender, reference_contenders
from .contenders import runtime_contenders
from .run import benchmark, load_histories


def runtime_engines(manifest, backends: Sequence[str] | None, precisions: Sequence[str] | None) -> list[tuple[str, str]]:
    """(backend, precision) pairs to run: the artifact's precisions x the asked backends (default:
    onnxruntime, plus tensorrt when TensorRT imports and the artifact carries engines)."""
    if backends is None:
        backends = ["onnxruntime"]
        if manifest.engines:
            try:
                import tensorrt  # noqa: F401
                backends.append("tensorrt")
            except ImportError:
                pass
    have = list(manifest.precisions)
    missing = [p for p in precisions or () if p not in have]
    if missing:
        raise InputError(f"precision(s) {missing} not in the artifact; it has {have}")
    return [(b, p) for b in backends for p in precisions or have]


def build_contenders(artifact=None, checkpoint=None, ar_checkpoint=None, data=None, backends=None, precisions=None,
                     device: str = "cpu", reference: bool = True, ar: bool = True, hf_generate: bool = False,
                     max_history: int | None = None, catalog=None, threads: int | None = None, engines=None
                     ) -> tuple[list[Contender], dict]:
    """The contenders and a description of where each came from. ``engines``: the (backend, precision) pairs
    of the runtime (default: runtime_engines). ``catalog`` (else the artifact's, else the dataset's index when
    it fits the checkpoint's layout, else the checkpoint's ava_sid) feeds the torch side. ``checkpoint``
    defaults to the one the artifact's manifest records, if it still exists. ``threads``: intra-op threads of
    ONNX Runtime and torch (None: each library's default)."""
    contenders: list[Contender] = []
    desc: dict = {"artifact": str(artifact) if artifact else None, "device": device, "threads": threads}
    if artifact is not None:
        from nezha.runtime.artifact import Artifact
        from nezha.runtime.catalog import Catalog

        opened = Artifact.open(artifact)
        manifest = opened.manifest
        desc.update(layout=manifest.layout.to_json(), limits=manifest.limits.to_json())
        max_history = max_history or manifest.limits.max_history
        for backend, precision in engines or runtime_engines(manifest, backends, precisions):
            contenders += runtime_contenders(artifact, backend, precision, device, threads)
        if catalog is None:
            catalog = Catalog(opened.tables()["item_ids"], opened.tables()["item_codes"])
        recorded = manifest.source["checkpoint"]
        if checkpoint is None and recorded and (Path(recorded) / "config.json").is_file():
            checkpoint = Path(recorded)
    desc["max_history"] = max_history = max_history or 20
    if checkpoint is None:
        if artifact is None:
            raise InputError("nothing to benchmark: give an artifact and/or a checkpoint")
        if reference or ar or hf_generate:
            desc["torch_side"] = "skipped: no checkpoint (pass checkpoint=DIR for the reference and AR baseline)"
        return contenders, desc
    import torch
    from nezha.model.checkpoint import load_catalog, load_checkpoint

    if threads is not None:
        torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint)
    desc["checkpoint"], desc["backbone"] = str(checkpoint), backbone_description(model)
    catalog = catalog if catalog is not None else catalog_for(model.layout, data, checkpoint, load_catalog)
    if reference:
        contenders += reference_contenders(model, catalog, device, max_history)
    if ar or hf_generate:
        if ar_checkpoint is not None:
            ar_model, desc["ar"] = load_checkpoint(ar_checkpoint), f"AR checkpoint {ar_checkpoint}"
        else:
            ar_model, desc["ar"] = ar_model_from(model), "same backbone weights, random LM head (latency only)"
        if ar:
            contenders.append(ar_contender(ar_model, catalog, device, max_history, desc["ar"]))
        if hf_generate:
            contenders.append(hf_generate_contender(ar_model, catalog, device, max_history))
    return contenders, desc


def catalog_for(layout, data, checkpoint, load_catalog):
    """The dataset's item index if its SIDs fit ``layout`` (so real histories encode), else ava_sid."""
    from nezha.runtime.catalog import Catalog
    from nezha.runtime.errors import ArtifactError

    if data is not None:
        from nezha.runtime.data import find_pair
        index, _ = find_pair(data)
        cat = Catalog.from_index_json(index)
        try:
            cat.check_layout(layout, str(index))
            return cat
        except ArtifactError:
            pass
    return load_catalog(None, checkpoint, layout)


def backbone_description(model) -> dict:
    c = model.config
    return {"architecture": c.model_type, "hidden_size": c.hidden_size, "layers": c.num_hidden_layers,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "head_dim": getattr(c, "head_dim", None), "intermediate_size": c.intermediate_size,
            "backbone_params": sum(p.numel() for p in model.model.parameters()),
            "sid_codes": list(model.layout.codes)}


def run_bench(artifact=None, *, data=None, histories=None, history_limit: int = 2000,
              batch_sizes: Sequence[int] = (1,), beams: Sequence[int] = (20, 512), requests: int = 30,
              warmup: int = 3, quick: bool = False, out: str | Path | None = None, baseline: str | Path | None = None,
              tolerance: float = 0.10, save_baseline: str | Path | None = None, title: str | None = None,
              progress: bool = False, **choose) -> tuple[dict, list[gate.Figure]]:
    """Run the benchmark; write ``out``/bench.json, bench.md, bench.png if ``out``; compare with ``baseline``.

    ``choose``: build_contenders' arguments. Histories: ``histories`` if given, else the leave-one-out test
    histories of ``data`` (default Beauty). ``quick``: one small configuration (batch 1, beam 20, 100
    requests after 10 on 500 histories), for CI. Returns (result, the ratios that regressed)."""
    if quick:
        batch_sizes, beams, requests, warmup, history_limit = (1,), (20,), 100, 10, 500
    if data is None:
        from nezha.runtime.data import DEFAULT_DATA
        data = DEFAULT_DATA
    contenders, desc = build_contenders(artifact, data=data if histories is None else None, **choose)
    if histories is None:
        histories = load_histories(data, history_limit)
        desc["histories"] = f"{data} leave-one-out test users (shuffled, first {len(histories)})"
    try:
        result = benchmark(contenders, histories, batch_sizes, beams, requests, warmup, desc, progress)
    finally:
        for c in contenders:
            c.close()
    result["setup"]["title"] = title or ("quick" if quick else "full")
    regressions = []
    if baseline is not None:
        regressions = gate.compare(result, gate.load_baseline(baseline), tolerance)
        result["gate"] = {"baseline": str(baseline), "tolerance": tolerance,
                          "regressions": [r.to_json() for r in regressions]}
    if out is not None:
        write_outputs(result, out)
    if save_baseline is not None:
        gate.save_baseline(result, save_baseline, tolerance)
    return result, regressions


def write_outputs(result: dict, out: str | Path) -> list[Path]:
    """``out``/bench.json (every figure), bench.md (the summary tables), bench.png (the plot)."""
    return report.write_result(out, "bench", result, report.markdown(result)) + [report.plot(result, Path(out) / "bench.png")]
