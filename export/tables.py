"""Verifier and catalog tables as ``.npy`` files (NumPy format 1.0: a short text header, then the raw
little-endian C-order array), readable from C++ without NumPy.

Layout (I items, S distinct SIDs, L levels; keys are mixed radix, most significant level first,
``key = ((c_0 * codes_1 + c_1) * codes_2 + c_2) ...``, see runtime/encoding.py):

  item_ids           [I]    int64   ascending item ids
  item_codes         [I, L] int64   SID codes of item_ids[i]
  sid_keys           [S]    uint64  ascending whole-SID keys
  sid_offsets        [S+1]  int64   CSR row starts: the items of sid_keys[s] are
  sid_items          [I]    int64   sid_items[sid_offsets[s]:sid_offsets[s+1]], ascending by id
  valid_prefixes_{i} [P_i]  uint64  ascending keys of every item's first i+1 codes (i = 0 .. L-1);
                                    the verifier keeps a candidate prefix iff its key is in this set
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nezha.runtime.catalog import Catalog
from nezha.runtime.encoding import SidLayout


def tables_from_catalog(catalog: Catalog, layout: SidLayout, out_dir: Path, prefix: str = "tables") -> dict[str, dict]:
    """Write the tables above to ``out_dir/<prefix>/<name>.npy``; returns the manifest's
    ``tables`` entry {name: {"file" (relative to out_dir), "dtype", "shape"}}."""
    catalog.check_layout(layout)
    sid_keys, sid_offsets, sid_items = catalog.sid_table(layout)
    arrays = {"item_ids": catalog.item_ids, "item_codes": catalog.item_codes,
              "sid_keys": sid_keys, "sid_offsets": sid_offsets, "sid_items": sid_items}
    arrays.update({f"valid_prefixes_{i}": keys for i, keys in enumerate(catalog.valid_prefixes(layout))})
    (out_dir / prefix).mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, array in arrays.items():
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        file = f"{prefix}/{name}.npy"
        np.save(out_dir / file, array, allow_pickle=False)
        entries[name] = {"file": file, "dtype": array.dtype.name, "shape": list(array.shape)}
    return entries
