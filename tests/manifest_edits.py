"""Edits of a built artifact for the tests: contract.json re-recorded as the build would (``rebind``), manifest
keys set, .npy files written by hand, and the small named mutations of tests/manifest_corpus.py."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

CONTRACT_SECTIONS = ("layout", "limits", "precisions", "graphs", "engines", "tables")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def contract_of(raw: dict) -> dict | None:
    """contract.json for a manifest, computed independently of runtime/manifest.py (the canonical JSON of
    docs/artifact.md); None if the manifest is too broken to have one (the parser refuses it anyway)."""
    try:
        sections = {**raw, "precisions": {p: e["execution"] for p, e in raw["precisions"].items()}}
        canonical = lambda v: json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        return {s: sha(canonical(sections[s])) for s in CONTRACT_SECTIONS}
    except (KeyError, TypeError, AttributeError):
        return None


def write(folder: Path, raw: dict, rebind: bool = True, files: dict[str, bytes] | None = None) -> None:
    """Write ``files`` (re-hashed) and ``raw`` as the manifest of ``folder``; with ``rebind``, contract.json
    too (re-hashed), so that only the edit itself stands between the manifest and the readers."""
    files = dict(files or {})
    contract = contract_of(raw) if rebind else None
    if contract is not None:
        files["contract.json"] = json.dumps(contract).encode()
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
        if isinstance(raw.get("files"), dict):
            raw["files"][rel] = sha(data)
    (folder / "manifest.json").write_text(json.dumps(raw))


def rebind(folder: Path) -> Path:
    """Re-record contract.json for the manifest of ``folder`` as it stands (a test that edits the manifest on
    purpose, to reach a check behind the contract)."""
    write(folder, json.loads((folder / "manifest.json").read_text()))
    return folder


def npy(array, fortran=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(array) if fortran else array)
    return buf.getvalue()


def npy_header(array: np.ndarray, header: str, version=(1, 0)) -> bytes:
    """A .npy file with a header dict written by hand (numpy's own parser reads any dict literal)."""
    width = 2 if version == (1, 0) else 4                    # bytes of the header length
    header = header + " " * (-(8 + width + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY" + bytes(version) + len(header).to_bytes(width, "little") + header.encode() + array.tobytes()


def ids_npy(art: Path, header="{'descr': '<i8', 'fortran_order': False, 'shape': (%d,), }", version=(1, 0)) -> dict:
    ids = table(art, "item_ids")
    return {"tables/item_ids.npy": npy_header(ids, header % len(ids), version)}


def nest(k: int):
    value = 1
    for _ in range(k):
        value = [value]
    return value


def set_key(path: list, value):
    """An edit that sets the manifest key at ``path`` (a list of keys) to ``value`` (KeyError: deletes it)."""
    def edit(raw):
        node = raw
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return edit


def each_graph(change):
    def edit(raw):
        for graphs in raw["graphs"].values():
            for name, g in graphs.items():
                change(name, g)
    return edit


def offsets(delta):
    def edit(raw):
        raw["layout"]["offsets"] = [o + delta for o in raw["layout"]["offsets"]]
        raw["layout"]["placeholder_start"] += delta
    return edit


def max_history(value):
    def edit(raw):
        raw["limits"]["max_history"] = value
        L = len(raw["layout"]["codes"])
        each_graph(lambda n, g: g["dynamic"].update(tokens=[2 * L, (value + 1) * L]) if n == "backbone" else None)(raw)
    return edit


def engines(profiles=None, entry=lambda e: None):
    """An engines section for fp32 whose plan files exist and are hashed (the loaders do not open them);
    ``entry`` edits each engine entry in place."""
    def edit(raw):
        names = list(raw["graphs"]["fp32"])
        shapes = {"min": [1, 6], "opt": [2, 9], "max": [4, 63]}
        raw["engines"] = {"fp32": {n: {"file": f"engines/fp32/{n}.plan", "compute_capability": "9.0", "tensorrt": "10.3",
                                       "strongly_typed": False, "hardware_compatibility": "none",
                                       "device": {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-0"},
                                       "profiles": copy.deepcopy(profiles) if profiles is not None else
                                       [{"input_ids": shapes, "attention_mask": shapes}]} for n in names}}
        for e in raw["engines"]["fp32"].values():
            entry(e)
        return {f"engines/fp32/{n}.plan": b"plan " + n.encode() for n in names}
    return edit


def external_data(rel):
    def edit(raw):
        raw["graphs"]["fp32"]["head_0"]["external_data"] = rel
        return {rel: b"\0" * 8}
    return edit


def link_inside(d: Path) -> None:
    """validation.json becomes a symbolic link to a listed copy inside the folder."""
    data = (d / "validation.json").read_bytes()
    (d / "tables" / "v.json").write_bytes(data)
    (d / "validation.json").unlink()
    os.symlink("tables/v.json", d / "validation.json")
    raw = json.loads((d / "manifest.json").read_text())
    write(d, raw, rebind=False, files={"tables/v.json": data})


def swap_backbones(raw):
    a, b = raw["graphs"]["fp32"]["backbone"], raw["graphs"]["int8-cpu"]["backbone"]
    a["file"], b["file"] = b["file"], a["file"]


def renamed_graph(d: Path) -> None:
    """fp32's head_0 under a name with non-ASCII, non-BMP and control characters: the contract's canonical
    JSON escapes them, identically in both readers (re-bound from this module's own canonical form)."""
    raw = json.loads((d / "manifest.json").read_text())
    old, new = "graphs/fp32/head_0.onnx", "graphs/fp32/h\u00e9ad\u2603\U0001F600\x7f\x01\t\"0.onnx"
    os.rename(d / old, d / new)
    raw["graphs"]["fp32"]["head_0"]["file"] = new
    raw["files"][new] = raw["files"].pop(old)
    write(d, raw)


def swap_heads(raw):
    g = raw["graphs"]["fp32"]
    g["head_1"]["file"], g["head_2"]["file"] = g["head_2"]["file"], g["head_1"]["file"]


def swap_tables(raw):
    t = raw["tables"]
    last = f"valid_prefixes_{len(raw['layout']['codes']) - 1}"          # the same array as sid_keys
    t["sid_keys"]["file"], t[last]["file"] = t[last]["file"], t["sid_keys"]["file"]


def reversed(value):
    if isinstance(value, dict):
        return {k: reversed(value[k]) for k in reversed(list(value))}
    return [reversed(v) for v in value] if isinstance(value, list) else value


def table(art: Path, name: str) -> np.ndarray:
    return np.load(art / "tables" / f"{name}.npy")


def rows(art: Path, name: str, change) -> dict[str, bytes]:
    a = table(art, name).copy()
    change(a)
    return {f"tables/{name}.npy": npy(a)}
