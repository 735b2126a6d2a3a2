"""The item catalog: item id -> SID codes, and SID -> items (several items may share one SID).

Also the one strict reader of the JSON files a user hands over (item index, interactions, checkpoint
config): regular files only, UTF-8, each key once, no NaN, and Python's own limits (integer digits,
nesting depth) reported as one line."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nezha.runtime.errors import ArtifactError

from .datafile import read_bytes
from .encoding import SidLayout, lookup_codes

# ASCII digits only (``\d`` would take "١٠٠"), no sign, space, "_" or leading zero, at most 18 digits: an
# int64 for sure (19-digit ids are checked against 2**63 - 1 where they are read).
_ITEM_ID = re.compile(r"0|[1-9][0-9]{0,18}")
_TOKEN = re.compile(r"<([a-z])_(0|[1-9][0-9]{0,17})>")
INT64_MAX = 2 ** 63 - 1


class _DuplicateKey(ValueError):
    pass


class _NotJson(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def _no_constant(name: str):
    raise _NotJson(f"{name} is not a JSON value")


def parse_json(data: bytes, where: str, error: type[Exception]):
    """Strict JSON from UTF-8 ``data``: each key once per object, no NaN/Infinity; every refusal (also
    Python's 4300-digit integer limit and its nesting limit) is ``error`` naming ``where``."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _DuplicateKey as e:
        raise error(f"{where}: key {e.args[0]!r} appears twice in one object; each key may appear once") from None
    except UnicodeDecodeError as e:
        raise error(f"{where} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except RecursionError:
        raise error(f"{where} is not valid JSON: nested deeper than this reader allows") from None
    except ValueError as e:       # JSONDecodeError, _NotJson, an integer over Python's digit limit
        why = "an integer has more digits than Python reads (4300)" if "digits" in str(e) else str(e)
        raise error(f"{where} is not valid JSON: {why}") from None


def read_json(path: str | Path, what: str, error: type[Exception], max_bytes: int | None = None):
    """The JSON value in the regular file ``path`` (.json or .json.gz, checked against a SHA256SUMS beside it:
    ``datafile.read_bytes``; ``parse_json``), or ``error`` naming ``what`` and the file."""
    return parse_json(read_bytes(path, what, error, max_bytes), f"{what} {path}", error)


def read_json_object(path: Path, what: str, shape: str, error: type[Exception]) -> dict:
    """A non-empty JSON object from ``path`` (read strictly: ``read_json``), or ``error`` naming the file
    and what was expected."""
    raw = read_json(path, what, error)
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
            raise ArtifactError(f"item_ids [I] and item_codes [I, L] disagree: shapes {self.item_ids.shape} "
                                f"and {self.item_codes.shape}")
        if len(self.item_ids) == 0:
            raise ArtifactError("the catalog has no items")
        order = np.argsort(self.item_ids, kind="stable")
        self.item_ids, self.item_codes = self.item_ids[order], self.item_codes[order]
        if np.any(self.item_ids[1:] == self.item_ids[:-1]):
            raise ArtifactError("item ids must be unique")

    @property
    def levels(self) -> int:
        return self.item_codes.shape[1]

    @classmethod
    def from_index_json(cls, path: str | Path) -> "Catalog":
        """Read a LETTER-style index: {"<item id>": ["<a_183>", "<b_70>", ...]} (level letter a, b, c ..., code)."""
        path = Path(path)
        raw = read_json_object(path, "item index", "item id -> list of code tokens", ArtifactError)
        ids, codes = [], []
        levels = None
        for item, tokens in raw.items():
            if not _ITEM_ID.fullmatch(item) or int(item) > INT64_MAX:
                raise ArtifactError(f"item index {path}: item id {item!r} is not an integer 0..{INT64_MAX} written "
                                    "in ASCII digits (no sign, space, '_' or leading zero)")
            ids.append(int(item))
            if not isinstance(tokens, list) or (levels is not None and len(tokens) != levels):
                raise ArtifactError(f"item index {path}: item {item} has codes {tokens!r}; expected a list of "
                                    f"{levels or 'L'} tokens like '<a_12>'")
            levels = len(tokens)
            row = []
            for level, tok in enumerate(tokens):
                m = _TOKEN.fullmatch(tok) if isinstance(tok, str) else None
                if not m or ord(m.group(1)) - ord("a") != level:
                    raise ArtifactError(f"item index {path}: item {item} level {level} token {tok!r}; expected "
                                        f"'<{chr(ord('a') + level)}_N>' with N in ASCII digits")
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
        """Raise ArtifactError if these codes do not fit the layout's levels and code counts."""
        if self.levels != layout.levels:
            raise ArtifactError(f"{source}: items have {self.levels}-level SIDs, the model has {layout.levels} levels")
        too_big = self.item_codes >= np.asarray(layout.codes)
        if np.any(too_big) or np.any(self.item_codes < 0):
            level = int(np.argwhere(too_big | (self.item_codes < 0))[0, 1])
            raise ArtifactError(f"{source}: a level-{level} code is outside 0..{layout.codes[level] - 1}")

    def codes_of(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N] item ids -> ([N, L] codes, [N] bool known). Unknown items get codes 0 and known=False."""
        return lookup_codes(self.item_ids, self.item_codes, items)

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
