"""Human-readable outputs of a benchmark result: a Markdown summary and a PNG (matplotlib, Agg)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

STAGE_ORDER = ("encode", "backbone", "head", "verify", "select", "host")
STAGE_COLORS = {"encode": "#9e9e9e", "backbone": "#1f77b4", "head": "#ff7f0e", "verify": "#2ca02c",
                "select": "#d62728", "host": "#c7c7c7"}
# line style and marker by kind (floor dashed, NEZHA solid ...), colour by contender
KIND_STYLE = {"floor": ("--", "s"), "nezha": ("-", "o"), "reference": ("-.", "^"), "ar": (":", "D"),
              "hf-generate": (":", "x")}
PALETTE = ("#1f77b4", "#d62728", "#17becf", "#ff7f0e", "#7f7f7f", "#9467bd", "#2ca02c", "#8c564b", "#e377c2",
           "#bcbd22")


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_result(out: str | Path, stem: str, result: dict, text: str) -> list[Path]:
    """``out``/STEM.json (every figure of ``result``) and ``out``/STEM.md (``text``, its summary)."""
    return [write_atomic(Path(out) / f"{stem}.json", json.dumps(result, indent=1)),
            write_atomic(Path(out) / f"{stem}.md", text)]


def document(format: str, version: int = 1, **fields) -> dict:
    """A result document: its format name and version, when it was made, then ``fields``."""
    return {"format": format, "version": version, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}


def table(head: str, rows) -> list[str]:
    """A Markdown table: a blank line, the header ("a | b | c"; columns after the first right-aligned), rows."""
    return ["", f"| {head} |", "|---|" + "---:|" * head.count("|")] + ["| " + " | ".join(map(str, r)) + " |"
                                                                       for r in rows]


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def stage_order(stages: dict) -> list[str]:
    """Stage names in pipeline order: encode, backbone, head_0.., verify_0.., select, host, then any other."""
    per_level = lambda prefix: sorted((s for s in stages if s.startswith(prefix)), key=lambda s: int(s.split("_")[1]))
    known = [s for s in ("encode", "backbone") if s in stages] + per_level("head_") + per_level("verify_") + \
            [s for s in ("select", "host") if s in stages]
    return known + sorted(set(stages) - set(known))


def markdown(result: dict) -> str:
    """The summary: machine, setup, per configuration latency table, ratios and stage breakdown (ms)."""
    m, s = result["machine"], result["setup"]
    bb = s.get("backbone") or {}
    lines = [f"# NEZHA benchmark ({s.get('title', '')})", "",
             f"- machine: {m['cpu']}, {m['cpu_usable']} usable of {m['cpu_count']} cores, {m['platform']}, "
             f"Python {m['python']}" + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
             f"- histories: {s.get('histories', len(s.get('contenders', [])))}; mean {s['mean_history_items']:.1f} "
             f"items; {s['requests']} timed requests after {s['warmup']} warm-up, interleaved round-robin"]
    if bb:
        lines.append(f"- backbone: {bb['architecture']} hidden {bb['hidden_size']}, {bb['layers']} layers, "
                     f"{bb['heads']} heads ({bb['kv_heads']} kv), intermediate {bb['intermediate_size']}, "
                     f"{bb['backbone_params'] / 1e6:.1f}M params; SID codes {bb['sid_codes']}")
    if s.get("ar"):
        lines.append(f"- AR baseline: {s['ar']}")
    if s.get("torch_side"):
        lines.append(f"- torch side: {s['torch_side']}")
    lines.append(f"- process peak RSS: {result['memory']['process_peak_rss_mb']} MiB")
    for c in result["configs"]:
        lines += ["", f"## batch {c['batch_size']}, beam {c['beam']}"]
        lines += table("contender | p50 ms | p90 ms | p99 ms | histories/s | peak RSS MiB", [
            [name, *(_ms(r["latency"][p]) for p in ("p50", "p90", "p99")), f"{r['latency']['throughput']:.1f}",
             "-" if r["peak_rss_mb"] is None else r["peak_rss_mb"]] for name, r in c["contenders"].items()
        ] + [[name, f"skipped: {why}", "", "", "", ""] for name, why in c["skipped"].items()])
        if c["ratios"]:
            lines += table("ratio (median of per-request ratios) | value | p50 / p50 | better", [
                [name, f"{r['value']:.2f}", f"{r['p50_over_p50']:.2f}", "higher" if r["higher_is_better"] else "lower"]
                for name, r in c["ratios"].items()])
        staged = {n: r["stages"] for n, r in c["contenders"].items() if len(r["stages"]) > 1}
        if staged:
            cols = stage_order({k: 0 for st in staged.values() for k in st})
            lines += table("stage, mean ms | " + " | ".join(cols),
                           [[name, *(_ms(st.get(k)) for k in cols)] for name, st in staged.items()])
    if result.get("gate"):
        g = result["gate"]
        lines += ["", f"## gate against {g['baseline']} (tolerance {g['tolerance']:.0%})", ""]
        lines += [f"- REGRESSED {r['message']}" for r in g["regressions"]] or ["- pass: no ratio regressed"]
    return "\n".join(lines) + "\n"


def _stage_group(name: str) -> str:
    group = name.split("_")[0]
    return group if group in ("head", "verify") else name if name in STAGE_COLORS else "host"


def plot(result: dict, path: str | Path, dpi: int = 90) -> Path:
    """Two panels: p50 latency vs beam per contender (bars from p50 to p90, log scale; first batch size),
    and the stage breakdown (stacked mean ms) at the largest beam of that batch size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = result["configs"][0]["batch_size"]
    configs = sorted((c for c in result["configs"] if c["batch_size"] == batch), key=lambda c: c["beam"])
    names = list(dict.fromkeys(n for c in configs for n in c["contenders"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1, 1.25]})
    for i, name in enumerate(names):
        pts = [(c["beam"], c["contenders"][name]["latency"]) for c in configs if name in c["contenders"]]
        p50, p90 = ([lat[p] * 1e3 for _, lat in pts] for p in ("p50", "p90"))
        ls, marker = KIND_STYLE.get(name.split("[", 1)[0], ("-", "o"))
        ax1.errorbar([b for b, _ in pts], p50, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p90)]], label=name,
                     color=PALETTE[i % len(PALETTE)], linestyle=ls, marker=marker, capsize=3)
    ax1.set(yscale="log", xlabel="beam width", title="latency vs beam",
            ylabel=f"latency per request of {batch} (ms, p50; bar to p90)")
    ax1.set_xscale("log", base=2)
    ax1.set_xticks([c["beam"] for c in configs], [str(c["beam"]) for c in configs])
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7, loc="upper left")
    # without a stage timer (AR, generate: up to 100x slower) in text, so the NEZHA stages stay readable
    last = configs[-1]
    rows = [(n, r) for n, r in last["contenders"].items() if len(r["stages"]) > 1]
    others = [f"{n}: {r['latency']['mean'] * 1e3:.1f} ms" for n, r in last["contenders"].items() if len(r["stages"]) <= 1]
    seen = set()
    for i, (name, r) in enumerate(rows):
        order = stage_order(r["stages"])
        ms = [r["stages"][st] * 1e3 for st in order]
        groups = [g if g in ("head", "verify") else st if st in STAGE_COLORS else "host"
                  for st in order for g in [st.split("_")[0]]]
        seen.update(groups)
        ax2.barh(i, ms, left=[sum(ms[:j]) for j in range(len(ms))], color=[STAGE_COLORS[g] for g in groups],
                 edgecolor="white", linewidth=0.5)
        ax2.text(sum(ms), i, f" {sum(ms):.2f}", va="center", fontsize=7)
    ax2.set_yticks(range(len(rows)), [n for n, _ in rows], fontsize=7)
    ax2.invert_yaxis()
    ax2.set(xlabel="mean ms per request", title=f"stages at batch {batch}, beam {last['beam']}")
    ax2.title.set_fontsize(10)
    order = [g for g in STAGE_ORDER if g in seen]
    ax2.legend([plt.Rectangle((0, 0), 1, 1, color=STAGE_COLORS[g]) for g in order], order, fontsize=7, ncol=6,
               loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)
    ax2.grid(True, axis="x", alpha=0.3)
    ax2.margins(x=0.12)
    if others:
        ax2.text(0.99, 0.99, "not drawn (no stage timer):\n" + "\n".join(others), transform=ax2.transAxes,
                 ha="right", va="top", fontsize=7, bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "#cccccc"})
    bb = result["setup"].get("backbone") or {}
    sub = (f"{bb.get('architecture', '')} {bb.get('hidden_size', '')}x{bb.get('layers', '')}, "
           f"{bb.get('backbone_params', 0) / 1e6:.1f}M params; " if bb else "")
    threads = result["setup"].get("threads")
    fig.suptitle(f"NEZHA benchmark: {sub}{result['machine'].get('gpu') or result['machine']['cpu']}, "
                 f"{result['machine']['cpu_usable']} cores" + (f", {threads} thread(s) per library" if threads else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)
