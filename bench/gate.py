"""The regression gates' one baseline/compare implementation (``Gate``: a baseline file written atomically,
read strictly; each of its figures judged against this run's with a direction and a tolerance), and the
wall-clock gate on it, which compares a run's RATIOS (NEZHA / floor, AR / NEZHA, ...), never absolute
times, so that a baseline made on one machine holds on another (the instruction gate: instructions.py)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nezha.runtime.datafile import read_text
from nezha.runtime.errors import InputError, NezhaError

from .report import write_atomic
from .run import flat_ratios


def regressed(value: float, baseline: float, higher_is_better: bool, tolerance: float) -> bool:
    """Whether ``value`` is worse than ``baseline`` by more than ``tolerance`` (a fraction: 0.10 = 10 %)."""
    if tolerance < 0:
        raise InputError(f"tolerance must be >= 0, got {tolerance}")
    if higher_is_better:
        return value < baseline * (1.0 - tolerance)
    return value > baseline * (1.0 + tolerance)


@dataclass
class Figure:
    """One figure of a run judged against its baseline value."""

    figure: str                 # "batch=1 beam=20: nezha[onnxruntime-fp32-cpu] / floor[onnxruntime-fp32-cpu]"
    value: float | None         # None: the run did not produce this figure (a regression)
    baseline: float
    higher_is_better: bool
    tolerance: float
    unit: str = "ratio"         # or "instructions" (per request; written in millions)

    @property
    def change(self) -> float | None:
        return None if self.value is None else self.value / self.baseline - 1.0

    @property
    def regressed(self) -> bool:
        return self.value is None or regressed(self.value, self.baseline, self.higher_is_better, self.tolerance)

    def _text(self, x: float) -> str:
        return f"{x / 1e6:.4f}M" if self.unit == "instructions" else f"{x:.3f}"

    def message(self) -> str:
        if self.value is None:
            return f"{self.figure}: missing from this run (baseline {self._text(self.baseline)})"
        per = " instructions per request" if self.unit == "instructions" else ""
        limit = self.baseline * (1 - self.tolerance if self.higher_is_better else 1 + self.tolerance)
        better = "higher" if self.higher_is_better else "lower"
        return (f"{self.figure}: {self._text(self.value)}{per} vs baseline {self._text(self.baseline)} "
                f"({self.change:+.2%}); allowed {'>=' if self.higher_is_better else '<='} {self._text(limit)} "
                f"(tolerance {self.tolerance:.0%}, {better} is better)")

    def to_json(self) -> dict:
        return {**asdict(self), "change": self.change, "regressed": self.regressed, "message": self.message()}


@dataclass(frozen=True)
class Gate:
    """A regression gate's baseline file and judgement. ``schema``: the keys a baseline must have, each
    with its type or (a dict) the schema of its value; ``version`` is checked where given."""

    format: str                 # the document's "format" value
    what: str                   # "a nezha bench baseline", in messages
    record: str                 # how to write one, in messages
    error: type[NezhaError]
    unit: str = "ratio"
    version: int | None = None
    schema: dict = field(default_factory=dict)

    def save(self, doc: dict, path: str | Path) -> Path:
        return write_atomic(path, json.dumps(doc, indent=1) + "\n")

    def load(self, path: str | Path) -> dict:
        """Read and check a baseline file; raises ``error`` naming the file and the bad key."""
        try:
            raw = json.loads(read_text(Path(path), "baseline", self.error))
        except FileNotFoundError:
            raise self.error(f"baseline {path} does not exist ({self.record})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self.error(f"baseline {path} is not valid JSON: {e}") from None
        found = raw.get("format") if isinstance(raw, dict) else None
        if found != self.format:
            raise self.error(f"{path} is not {self.what} (format {found!r}, expected {self.format!r})")
        if self.version is not None and raw.get("version") != self.version:
            raise self.error(f"{path}: baseline version {raw.get('version')!r}, this nezha reads {self.version}")
        todo = [(raw, self.schema, "")]
        while todo:                                 # (document, its schema, its key path)
            doc, schema, trail = todo.pop()
            for key, kind in schema.items():
                want, where = dict if isinstance(kind, dict) else kind, f"{path}: {trail}" if trail else str(path)
                if key not in doc:
                    raise self.error(f"{where}: missing key {key!r}")
                if not isinstance(doc[key], want):
                    raise self.error(f"{where}: {key!r} must be {getattr(want, '__name__', want)}, "
                                     f"got {type(doc[key]).__name__}")
                if isinstance(kind, dict):
                    todo.append((doc[key], kind, f"{trail}.{key}" if trail else key))
        return raw

    def judge(self, now: dict[str, float], base: dict[str, tuple[float, bool, float]]) -> list[Figure]:
        """Every baseline figure {name: (value, higher_is_better, tolerance)} against this run's value
        (``now``; a missing one regresses). Figures new in this run are not judged (nothing to judge by)."""
        bad = [f"{tol} for {name}" for name, (_, _, tol) in base.items() if tol < 0]
        if bad:
            raise self.error(f"tolerances must be >= 0, got {bad[0]}")
        return [Figure(name, now.get(name), value, hib, tol, self.unit) for name, (value, hib, tol) in base.items()]


# --- the wall-clock gate ------------------------------------------------------------------------------------

WALL_CLOCK = Gate("nezha-bench-baseline", "a nezha bench baseline", "write one with --save-baseline", InputError,
                  schema={"ratios": dict})


def baseline_from(result: dict, tolerance: float = 0.10) -> dict:
    """A baseline document: the run's ratios and where they were measured."""
    return {"format": WALL_CLOCK.format, "version": 1, "created": result.get("created"),
            "machine": result.get("machine"), "setup": result.get("setup"), "tolerance": tolerance,
            "ratios": {k: {"value": v["value"], "higher_is_better": v["higher_is_better"]}
                       for k, v in flat_ratios(result).items()}}


def save_baseline(result: dict, path: str | Path, tolerance: float = 0.10) -> Path:
    return WALL_CLOCK.save(baseline_from(result, tolerance), path)


def load_baseline(path: str | Path) -> dict:
    return WALL_CLOCK.load(path)


def compare(result: dict, baseline: dict, tolerance: float = 0.10) -> list[Figure]:
    """Every baseline ratio that this run made worse by more than ``tolerance`` (a fraction), or lacks."""
    now = {k: v["value"] for k, v in flat_ratios(result).items()}
    base = {k: (b["value"], bool(b["higher_is_better"]), tolerance) for k, b in sorted(baseline["ratios"].items())}
    return [f for f in WALL_CLOCK.judge(now, base) if f.regressed]
