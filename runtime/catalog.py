"""The item catalog: item id -> SID codes, and SID -> items (several items may share one SID)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nezha.runtime.errors import NezhaError

from .datafile import read_text
from .layout import SidLayout

_TOKEN = re.compile(r"^<([a-z])_(\d+)>$")


class CatalogError(NezhaError, ValueError):
    """A malformed item index or catalog table."""


def read_json_object(path: Path, what: str, shape: str, error: type[Exception]) -> dict:
    """A non-empty JSON object from ``path`` (.json or .json.gz), or ``error`` naming the file and what was
    expected."""
    try:
        raw = json.loads(read_text(path, what, error))
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise error(f"{what} {path} must be a non-empty JSON object: {shape}")
    return raw


@dataclass
class Catalog:
    """Items and their SIDs as flat arrays (the layout written to tables/*.npy).

    item_ids    [I] int64, ascending
    item_codes  [I, L] int64, the SID of each item
    """

    item_ids: np.ndarray
    item_codes: np.ndarray

    def __post_init__(self):
        self.item_ids = np.asarray(self.item_ids, dtype=np.int64)
        self.item_codes = np.asarray(self.item_codes, dtype=np.int64)
        if self.item_ids.ndim != 1 or self.item_codes.ndim != 2 or len(self.item_ids) != len(self.item_codes):
            raise CatalogError(f"item_ids [I] and item_codes [I, L] disagree: shapes {self.item_ids.shape} "
                               f"and {self.item_codes.shape}")
        if len(self.item_ids) == 0:
            raise CatalogError("the catalog has no items")
        order = np.argsort(self.item_ids, kind="stable")
        self.item_ids, self.item_codes = self.item_ids[order], self.item_codes[order]
        if np.any(self.item_ids[1:] == self.item_ids[:-1]):
            raise CatalogError("item ids must be unique")

    @property
    def levels(self) -> int:
        return self.item_codes.shape[1]

    @classmethod
    def from_index_json(cls, path: str | Path) -> "Catalog":
        """Read a LETTER-style index: {"<item id>": ["<a_183>", "<b_70>", ...]} (level letter a, b, c ..., code)."""
        path = Path(path)
        raw = read_json_object(path, "item index", "item id -> list of code tokens", CatalogError)
        ids, codes = [], []
        levels = None
        for item, tokens in raw.items():
            try:
                ids.append(int(item))
            except ValueError:
                raise CatalogError(f"item index {path}: item id {item!r} is not an integer") from None
            if not isinstance(tokens, list) or (levels is not None and len(tokens) != levels):
                raise CatalogError(f"item index {path}: item {item} has codes {tokens!r}; expected a list of "
                                   f"{levels or 'L'} tokens like '<a_12>'")
            levels = len(tokens)
            row = []
            for level, tok in enumerate(tokens):
                m = _TOKEN.match(str(tok))
                if not m or ord(m.group(1)) - ord("a") != level:
                    raise CatalogError(f"item index {path}: item {item} level {level} token {tok!r}; expected "
                                       f"'<{chr(ord('a') + level)}_N>'")
                row.append(int(m.group(2)))
            codes.append(row)
        return cls(np.array(ids), np.array(codes))

    def to_index_json(self, path: str | Path) -> Path:
        """Write the catalog as a LETTER-style index (the inverse of from_index_json); returns ``path``."""
        path = Path(path)
        path.write_text(json.dumps({str(i): [f"<{chr(ord('a') + level)}_{c}>" for level, c in enumerate(codes)]
                                    for i, codes in zip(self.item_ids.tolist(), self.item_codes.tolist())}))
        return path

    def check_layout(self, layout: SidLayout, source: str = "catalog") -> None:
        """Raise CatalogError if these codes do not fit the layout's levels and code counts."""
        if self.levels != layout.levels:
            raise CatalogError(f"{source}: items have {self.levels}-level SIDs, the model has {layout.levels} levels")
        too_big = self.item_codes >= np.asarray(layout.codes)
        if np.any(too_big) or np.any(self.item_codes < 0):
            level = int(np.argwhere(too_big | (self.item_codes < 0))[0, 1])
            raise CatalogError(f"{source}: a level-{level} code is outside 0..{layout.codes[level] - 1}")

    def codes_of(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N] item ids -> ([N, L] codes, [N] bool known). Unknown items get codes 0 and known=False."""
        items = np.asarray(items, dtype=np.int64)
        pos = np.searchsorted(self.item_ids, items)
        pos = np.minimum(pos, len(self.item_ids) - 1)
        known = self.item_ids[pos] == items
        return np.where(known[:, None], self.item_codes[pos], 0), known

    def sid_table(self, layout: SidLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SID -> items as CSR: (sid_keys [S] uint64 ascending, offsets [S+1] int64, items [I] int64).

        Items of SID ``sid_keys[s]`` are ``items[offsets[s]:offsets[s+1]]``, ascending by item id.
        """
        keys = layout.sid_keys(self.item_codes)
        order = np.lexsort((self.item_ids, keys))
        keys_sorted = keys[order]
        sid_keys, counts = np.unique(keys_sorted, return_counts=True)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return sid_keys, offsets, self.item_ids[order]

    def valid_prefixes(self, layout: SidLayout) -> list[np.ndarray]:
        """Per level i, the sorted unique uint64 keys of every item's first i+1 codes."""
        return [np.unique(layout.prefix_keys(self.item_codes, i)) for i in range(layout.levels)]
