"""The machine a build or a measurement ran on, described once: the CPU's model, the instruction-set
extensions it offers (of one list: the ones that decide which kernels ONNX Runtime, NumPy and the int8 paths
run), the cores this process may use. Standard library only: the build's manifest (its ``machine`` record)
and the benchmarks describe machines with this one module."""

from __future__ import annotations

import os
import platform
import sys

# x86 names as /proc/cpuinfo's "flags" writes them, then Arm's ("Features").
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
             "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")


def _cpuinfo() -> tuple[str | None, set[str]]:
    """(model name, flags) of the first processor /proc/cpuinfo lists; (None, set()) where it cannot be read."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def cpu() -> dict:
    """{"system", "arch", "cpu": the model name, "isa": the ISA_FLAGS this CPU offers, in ISA_FLAGS' order}:
    the manifest's ``machine`` record."""
    model, flags = _cpuinfo()
    return {"system": platform.system(), "arch": platform.machine(),
            "cpu": model or platform.processor() or platform.machine(), "isa": [f for f in ISA_FLAGS if f in flags]}


def describe() -> dict:
    """cpu() and where a measurement ran: platform, cores (all, and usable by this process), the load
    average, the Python version."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:                                   # not Linux
        usable = os.cpu_count()
    return {**cpu(), "platform": platform.platform(), "cpu_count": os.cpu_count(), "cpu_usable": usable,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "python": sys.version.split()[0]}
