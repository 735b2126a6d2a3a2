"""LETTER-format datasets (an ``*.index.json`` + ``*.inter.json`` pair) and the leave-one-out split.
NumPy only: used by the trainer, evaluation, calibration, the benchmark and the load generator."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .catalog import read_json_object
from .errors import InputError

# The one default data location: the demo data the project carries (data/beauty, gzipped LETTER JSON),
# or the folder NEZHA_DATA names. Every tool's --data / --index / --histories option overrides it.
DEFAULT_DATA = Path(os.environ.get("NEZHA_DATA") or Path(__file__).resolve().parents[1] / "data" / "beauty")


def find_pair(data_dir: str | Path) -> tuple[Path, Path]:
    """A dataset folder -> (index file, interactions file), each .json or .json.gz."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"dataset folder {data_dir} {'is not a folder' if data_dir.exists() else 'does not exist'}"
                         " (set NEZHA_DATA or pass a folder)")
    index, inter = ([p for s in (".json", ".json.gz") for p in sorted(data_dir.glob(f"*.{kind}{s}"))]
                    for kind in ("index", "inter"))
    if len(index) != 1 or len(inter) != 1:
        raise InputError(f"dataset folder {data_dir} must hold exactly one *.index.json[.gz] and one *.inter.json[.gz], "
                         f"found {[p.name for p in index + inter]}")
    return index[0], inter[0]


def read_interactions(path: str | Path) -> dict[str, list[int]]:
    """{"<user id>": [item id, ...]} in time order."""
    path = Path(path)
    raw = read_json_object(path, "interactions file", "user id -> list of item ids", InputError)
    for user, items in raw.items():
        if not isinstance(items, list) or not all(type(i) is int for i in items):
            raise InputError(f"interactions file {path}: user {user!r} must map to a list of integer item ids")
    return raw


@dataclass
class Split:
    """Leave-one-out: per user, histories and the target that follows each."""

    users: list[str]
    histories: list[list[int]]
    targets: np.ndarray            # [U] int64


def leave_one_out(interactions: dict[str, list[int]], part: str) -> Split:
    """part 'test': history = all but the last item, target = the last; 'valid': one item earlier;
    'train': the training prefixes (all but the last two), target = their last item. Users with too
    few items for the part are left out."""
    drop = {"test": 0, "valid": 1, "train": 2}
    if part not in drop:
        raise InputError(f"split part {part!r}; allowed: test, valid, train")
    users, hist, targets = [], [], []
    for user, items in interactions.items():
        seq = items[:len(items) - drop[part]] if drop[part] else items
        if len(seq) < 2:
            continue
        users.append(user)
        hist.append(seq[:-1])
        targets.append(seq[-1])
    return Split(users, hist, np.asarray(targets, dtype=np.int64))
