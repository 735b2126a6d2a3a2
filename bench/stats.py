"""Statistics of a benchmark: percentiles, paired ratios and their direction, peak memory, the machine.
NumPy and the standard library only, so the gate can run where torch is not installed."""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from importlib import metadata

import numpy as np
from nezha.runtime.errors import InputError
from nezha.runtime.machine import describe

PERCENTILES = (50, 90, 99)


def percentiles(seconds, qs=PERCENTILES) -> dict[str, float]:
    """[N] seconds -> {"p50": s, "p90": s, "p99": s} (linear interpolation between order statistics)."""
    x = np.asarray(seconds, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise InputError("no timings to summarise: the contender ran no timed request")
    if np.any(x < 0) or not np.all(np.isfinite(x)):
        raise InputError(f"timings must be finite and >= 0 seconds, got min {x.min()}")
    return {f"p{q}": float(np.percentile(x, q)) for q in qs}


def summarize(seconds, batch_size: int) -> dict[str, float]:
    """[N] seconds per request of ``batch_size`` histories -> percentiles, mean, std, min (s), n, and
    throughput (histories per second)."""
    x = np.asarray(seconds, dtype=np.float64).reshape(-1)
    return {**percentiles(x), "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "n": int(x.size),
            "throughput": float(batch_size * x.size / x.sum()) if x.sum() > 0 else float("inf")}


def paired_ratio(numerator, denominator) -> float:
    """Median over requests of numerator[i] / denominator[i]: both contenders timed on the same request,
    back to back, so slow drift of the machine (another job, clock changes) cancels in each pair."""
    a = np.asarray(numerator, dtype=np.float64).reshape(-1)
    b = np.asarray(denominator, dtype=np.float64).reshape(-1)
    if a.size == 0 or a.size != b.size:
        raise InputError(f"a paired ratio needs two equally long, non-empty timing lists; got {a.size} and {b.size}")
    if np.any(b <= 0):
        raise InputError("a paired ratio needs positive denominator timings")
    return float(np.median(a / b))


@dataclass(frozen=True)
class RatioSpec:
    """``numerator / denominator`` of two contenders' latencies; lower is better for overheads (NEZHA /
    floor: 1.0 is the ideal), higher for speed-ups (AR / NEZHA)."""

    numerator: str
    denominator: str
    higher_is_better: bool

    @property
    def name(self) -> str:
        return f"{self.numerator} / {self.denominator}"


def current_rss_bytes() -> int | None:
    """Resident set size now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0: write 5 to clear_refs).
    False where that is not possible; peak_rss_bytes is then the peak since the process started."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size: VmHWM (since the last reset_peak_rss) on Linux, else getrusage's ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)     # bytes on macOS, KiB on Linux


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """Where the figures were measured (runtime/machine.py: platform, CPU and its ISA, cores usable by this
    process, load, Python), the versions of every library that can change a timing, and the GPU if torch
    sees one."""
    out = {**describe(), "versions": {d: _version(d) for d in ("nezha-deploy", "numpy", "onnxruntime",
                                                               "onnxruntime-gpu", "tensorrt", "torch",
                                                               "transformers", "matplotlib")}}
    torch = sys.modules.get("torch")        # described only if a contender already loaded it
    if torch is not None:
        out["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
            out["cuda"] = torch.version.cuda
    return out
