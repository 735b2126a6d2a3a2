"""Calibration data from real traffic: user histories sampled from an interactions file (the training
split of Beauty by default), encoded by the runtime's own encoder and served as backbone feeds
(``dict[str, np.ndarray]``: input_ids, attention_mask [B, T] int64)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from nezha.runtime.catalog import Catalog
from nezha.runtime.data import (
    DEFAULT_DATA,
    find_pair,
    leave_one_out,
    read_interactions,
)
from nezha.runtime.encoding import encode_codes, history_codes
from nezha.runtime.errors import InputError
from nezha.runtime.encoding import SidLayout
from onnxruntime.quantization import CalibrationDataReader
from tqdm import tqdm

log = logging.getLogger(__name__)

# Below this many histories, activation ranges (and the entropy/percentile histograms) are mostly noise.
MIN_SAMPLES = 16


def default_interactions() -> Path:
    """The interactions file of the default calibration set (Beauty, runtime.data.DEFAULT_DATA)."""
    try:
        return find_pair(DEFAULT_DATA)[1]
    except InputError as e:
        raise InputError(f"no default calibration data: {e}; pass an interactions file") from None


def sample_histories(interactions: str | Path | None = None, size: int = 512, seed: int = 0,
                     part: str = "train") -> list[list[int]]:
    """``size`` user histories (item-id lists, time order) drawn without replacement, by ``seed``, from the
    ``part`` split (leave-one-out: 'train' = all but a user's last two items) of ``interactions``
    ({"user": [item, ...]} JSON; default: Beauty). Users too short for the split are skipped."""
    if not isinstance(size, (int, np.integer)) or size < MIN_SAMPLES:
        raise InputError(f"calibration size {size!r} is too small: need at least {MIN_SAMPLES} histories")
    path = Path(interactions) if interactions is not None else default_interactions()
    try:
        split = leave_one_out(read_interactions(path), part)
    except InputError as e:
        raise InputError(f"calibration data: {e}") from None
    if len(split.histories) < size:
        raise InputError(f"calibration data {path}: {len(split.histories)} usable histories in the {part!r} "
                         f"split (users with enough items), {size} requested; lower the calibration size "
                         f"or give more data")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(split.histories), size=size, replace=False))
    return [split.histories[i] for i in chosen]


class CalibrationReader(CalibrationDataReader):
    """Backbone feeds for calibration: batches of ``batch_size`` histories, each encoded with
    ``nezha.runtime.encoding.encode_codes`` (items unknown to the catalog dropped, as the runtime's
    'skip' policy does), left padded to the batch's longest. Iterable many times (``rewind``), and an
    ONNX Runtime ``CalibrationDataReader`` (``get_next`` -> feed or None)."""

    def __init__(self, histories: Sequence[Sequence[int]], catalog: Catalog, layout: SidLayout, max_history: int,
                 batch_size: int = 32, progress: bool = True):
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        catalog.check_layout(layout, "calibration catalog")
        codes = [c for c in history_codes(histories, catalog, unknown="skip") if len(c)]
        if not codes:
            raise InputError(f"none of the {len(histories)} calibration histories has an item of the catalog "
                             f"({len(catalog.item_ids)} items): wrong interactions file for this model?")
        if len(codes) < MIN_SAMPLES:
            raise InputError(f"only {len(codes)} of {len(histories)} calibration histories have items of the "
                             f"catalog; need at least {MIN_SAMPLES}")
        if len(codes) < len(histories):
            log.warning("calibration: %d of %d histories have no item of the catalog and are skipped",
                        len(histories) - len(codes), len(histories))
        self.codes, self.layout, self.max_history = codes, layout, max_history
        self.batch_size, self.progress = batch_size, progress
        self._feeds: list[dict[str, np.ndarray]] | None = None
        self._next = 0

    @classmethod
    def from_file(cls, interactions: str | Path | None, catalog: Catalog, layout: SidLayout, max_history: int,
                  size: int = 512, seed: int = 0, batch_size: int = 32, progress: bool = True) -> "CalibrationReader":
        """Sample ``size`` training-split histories of ``interactions`` (default: Beauty) and encode them."""
        return cls(sample_histories(interactions, size, seed), catalog, layout, max_history, batch_size, progress)

    @property
    def samples(self) -> int:
        return len(self.codes)

    def feeds(self) -> list[dict[str, np.ndarray]]:
        """All batches: input_ids, attention_mask [B, T] int64 (encoded once, then reused)."""
        if self._feeds is None:
            starts = range(0, len(self.codes), self.batch_size)
            self._feeds = [encode_codes(self.codes[s:s + self.batch_size], self.layout, self.max_history)
                           for s in tqdm(starts, desc="encode calibration data", unit="batch",
                                         disable=not self.progress, leave=False)]
        return self._feeds

    def __len__(self) -> int:
        return -(-len(self.codes) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.feeds())

    def get_next(self) -> dict[str, np.ndarray] | None:
        feeds = self.feeds()
        if self._next >= len(feeds):
            return None
        self._next += 1
        return feeds[self._next - 1]

    def rewind(self) -> None:
        self._next = 0


class FeedList(CalibrationDataReader):
    """Any iterable of feeds, held in memory (ONNX Runtime's calibrators read them once per pass;
    sensitivity and validation read them again)."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self.feeds = [dict(f) for f in feeds]
        if not self.feeds:
            raise InputError("no calibration feeds: the iterable of backbone feeds is empty")
        self._next = 0

    def __len__(self) -> int:
        return len(self.feeds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.feeds):
            return None
        self._next += 1
        return self.feeds[self._next - 1]

    def rewind(self) -> None:
        self._next = 0
