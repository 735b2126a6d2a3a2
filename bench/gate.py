"""The latency-regression gate: compares the RATIOS of a run (NEZHA / floor, AR / NEZHA, ...) with a
stored baseline, never absolute times, so that a baseline made on one machine holds on another."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from nezha.runtime.catalog import read_json_object
from nezha.runtime.errors import NezhaError

from .run import flat_ratios
from .stats import regressed

BASELINE_FORMAT = "nezha-bench-baseline"


class GateError(NezhaError, ValueError):
    """A baseline file that is missing or not a nezha bench baseline."""


@dataclass
class Regression:
    """One figure worse than its baseline by more than the tolerance (or missing from the run)."""

    figure: str                 # "batch=1 beam=20: nezha[onnxruntime-fp32-cpu] / floor[onnxruntime-fp32-cpu]"
    value: float | None         # None: the run did not produce this figure
    baseline: float
    higher_is_better: bool
    tolerance: float

    def message(self) -> str:
        if self.value is None:
            return f"{self.figure}: missing from this run (baseline {self.baseline:.3f})"
        change = self.value / self.baseline - 1.0
        want = (f">= {self.baseline * (1 - self.tolerance):.3f}" if self.higher_is_better
                else f"<= {self.baseline * (1 + self.tolerance):.3f}")
        return (f"{self.figure}: {self.value:.3f} vs baseline {self.baseline:.3f} ({change:+.1%}); "
                f"allowed {want} (tolerance {self.tolerance:.0%}, {'higher' if self.higher_is_better else 'lower'} "
                "is better)")

    def to_json(self) -> dict:
        return {**asdict(self), "message": self.message()}


def baseline_from(result: dict, tolerance: float = 0.10) -> dict:
    """A baseline document: the run's ratios and where they were measured."""
    return {"format": BASELINE_FORMAT, "version": 1, "created": result.get("created"),
            "machine": result.get("machine"), "setup": result.get("setup"), "tolerance": tolerance,
            "ratios": {k: {"value": v["value"], "higher_is_better": v["higher_is_better"]}
                       for k, v in flat_ratios(result).items()}}


def save_baseline(result: dict, path: str | Path, tolerance: float = 0.10) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline_from(result, tolerance), indent=1))
    return path


def load_baseline(path: str | Path) -> dict:
    raw = read_json_object(Path(path), "baseline (write one with --save-baseline)", "a nezha bench baseline",
                           GateError)
    if raw.get("format") != BASELINE_FORMAT or not isinstance(raw.get("ratios"), dict):
        raise GateError(f"{path} is not a nezha bench baseline (format {raw.get('format')!r}, "
                        f"expected {BASELINE_FORMAT!r} with a 'ratios' object)")
    return raw


def compare(result: dict, baseline: dict, tolerance: float = 0.10) -> list[Regression]:
    """Every baseline ratio that this run made worse by more than ``tolerance`` (a fraction), or lacks.
    Figures new in this run are not judged (no baseline to judge them by)."""
    now = flat_ratios(result)
    out = []
    for figure, base in sorted(baseline["ratios"].items()):
        hib = bool(base["higher_is_better"])
        cur = now.get(figure)
        if cur is None:
            out.append(Regression(figure, None, base["value"], hib, tolerance))
        elif regressed(cur["value"], base["value"], hib, tolerance):
            out.append(Regression(figure, cur["value"], base["value"], hib, tolerance))
    return out
