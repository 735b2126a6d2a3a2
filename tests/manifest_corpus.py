"""The conformance corpus of artifacts that both readers run (tests/test_cpp.py): named small mutations of
one tiny built artifact, each with the verdict both the Python loader (``Artifact.open(dir).tables()``) and
the C++ loader (``nezha_check_artifact`` through ctypes) must give: "ok" or "refused" (one case: "refused if
verified", a file changed after the build that only hashing finds).

Mutations of the manifest's content are re-bound (contract.json rewritten and re-hashed) so that the check
under test is the one that must catch them, except the ``unbound`` ones, which test the binding itself.
Mutations of a table or file are re-hashed for the same reason."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np

CONTRACT_SECTIONS = ("layout", "limits", "precisions", "graphs", "engines", "tables")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def contract_of(raw: dict) -> dict | None:
    """contract.json for a manifest, computed independently of runtime/manifest.py (the canonical JSON of
    docs/artifact.md); None if the manifest is too broken to have one (the parser refuses it anyway)."""
    try:
        sections = {**raw, "precisions": {p: e["execution"] for p, e in raw["precisions"].items()}}
        canonical = lambda v: json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        return {s: _sha(canonical(sections[s])) for s in CONTRACT_SECTIONS}
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
            raw["files"][rel] = _sha(data)
    (folder / "manifest.json").write_text(json.dumps(raw))


def rebind(folder: Path) -> Path:
    """Re-record contract.json for the manifest of ``folder`` as it stands (a test that edits the manifest on
    purpose, to reach a check behind the contract)."""
    write(folder, json.loads((folder / "manifest.json").read_text()))
    return folder


def _npy(array, fortran=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(array) if fortran else array)
    return buf.getvalue()


def _npy_header(array: np.ndarray, header: str, version=(1, 0)) -> bytes:
    """A .npy file with a header dict written by hand (numpy's own parser reads any dict literal)."""
    width = 2 if version == (1, 0) else 4                    # bytes of the header length
    header = header + " " * (-(8 + width + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY" + bytes(version) + len(header).to_bytes(width, "little") + header.encode() + array.tobytes()


def _ids_npy(art: Path, header="{'descr': '<i8', 'fortran_order': False, 'shape': (%d,), }", version=(1, 0)) -> dict:
    ids = _table(art, "item_ids")
    return {"tables/item_ids.npy": _npy_header(ids, header % len(ids), version)}


def _nest(k: int):
    value = 1
    for _ in range(k):
        value = [value]
    return value


def _set(*path_value):
    *path, value = path_value

    def edit(raw):
        node = raw
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return edit


def _each_graph(change):
    def edit(raw):
        for graphs in raw["graphs"].values():
            for name, g in graphs.items():
                change(name, g)
    return edit


def _offsets(delta):
    def edit(raw):
        raw["layout"]["offsets"] = [o + delta for o in raw["layout"]["offsets"]]
        raw["layout"]["placeholder_start"] += delta
    return edit


def _max_history(value):
    def edit(raw):
        raw["limits"]["max_history"] = value
        L = len(raw["layout"]["codes"])
        _each_graph(lambda n, g: g["dynamic"].update(tokens=[2 * L, (value + 1) * L]) if n == "backbone" else None)(raw)
    return edit


def _engines(profiles=None):
    """An engines section for fp32 whose plan files exist and are hashed (the loaders do not open them)."""
    def edit(raw):
        names = list(raw["graphs"]["fp32"])
        shapes = {"min": [1, 6], "opt": [2, 9], "max": [4, 63]}
        raw["engines"] = {"fp32": {n: {"file": f"engines/fp32/{n}.plan", "compute_capability": "9.0", "tensorrt": "10.3",
                                       "strongly_typed": False,
                                       "profiles": copy.deepcopy(profiles) if profiles is not None else
                                       [{"input_ids": shapes, "attention_mask": shapes}]} for n in names}}
        return {f"engines/fp32/{n}.plan": b"plan " + n.encode() for n in names}
    return edit


def _external_data(rel):
    def edit(raw):
        raw["graphs"]["fp32"]["head_0"]["external_data"] = rel
        return {rel: b"\0" * 8}
    return edit


def _link_inside(d: Path) -> None:
    """validation.json becomes a symbolic link to a listed copy inside the folder."""
    data = (d / "validation.json").read_bytes()
    (d / "tables" / "v.json").write_bytes(data)
    (d / "validation.json").unlink()
    os.symlink("tables/v.json", d / "validation.json")
    raw = json.loads((d / "manifest.json").read_text())
    write(d, raw, rebind=False, files={"tables/v.json": data})


def _swap_backbones(raw):
    a, b = raw["graphs"]["fp32"]["backbone"], raw["graphs"]["int8-cpu"]["backbone"]
    a["file"], b["file"] = b["file"], a["file"]


def _renamed_graph(d: Path) -> None:
    """fp32's head_0 under a name with non-ASCII, non-BMP and control characters: the contract's canonical
    JSON escapes them, identically in both readers (re-bound from this module's own canonical form)."""
    raw = json.loads((d / "manifest.json").read_text())
    old, new = "graphs/fp32/head_0.onnx", "graphs/fp32/h\u00e9ad\u2603\U0001F600\x7f\x01\t\"0.onnx"
    os.rename(d / old, d / new)
    raw["graphs"]["fp32"]["head_0"]["file"] = new
    raw["files"][new] = raw["files"].pop(old)
    write(d, raw)


def _swap_heads(raw):
    g = raw["graphs"]["fp32"]
    g["head_1"]["file"], g["head_2"]["file"] = g["head_2"]["file"], g["head_1"]["file"]


def _swap_tables(raw):
    t = raw["tables"]
    last = f"valid_prefixes_{len(raw['layout']['codes']) - 1}"          # the same array as sid_keys
    t["sid_keys"]["file"], t[last]["file"] = t[last]["file"], t["sid_keys"]["file"]


# name -> (verdict, kind, mutation). kinds: "edit" (changes the manifest dict, may return {rel: bytes} to write;
# re-bound), "unbound" (the same, contract.json kept), "files" (artifact -> {rel: bytes}, re-hashed), "text"
# (manifest bytes -> bytes), "folder" (changes the copied folder).
CASES = {
    # the built artifact and edits that change nothing a reader acts on
    "as built": ("ok", "edit", lambda raw: None),
    "compact JSON, keys reversed": ("ok", "text", lambda b: json.dumps(_reversed(json.loads(b)), separators=(",", ":")).encode()),
    "UTF-8 byte order mark": ("ok", "text", lambda b: b"\xef\xbb\xbf" + b),
    "non-ASCII informational string": ("ok", "text", lambda b: b.replace(b'"cpu": "', '"cpu": "\u00c4rger \u2603 \U0001F600 '.encode(), 1)),
    "escaped NUL in an informational string": ("ok", "text", lambda b: b.replace(b'"cpu": "', b'"cpu": "a\\u0000b', 1)),
    "negative zero": ("ok", "text", lambda b: b.replace(b'"pad_token_id": 0', b'"pad_token_id": -0', 1)),
    "versions.tensorrt null": ("ok", "edit", _set("versions", "tensorrt", None)),
    "source.index null": ("ok", "edit", _set("source", "index", None)),
    "quantization 32 deep": ("ok", "edit", _set("precisions", "fp32", "quantization", {"x": _nest(28)})),
    "quantization: an integer past 64 bits": ("ok", "edit", _set("precisions", "fp32", "quantization", {"n": 2 ** 70})),
    "quantization: 1e-400": ("ok", "text", lambda b: b.replace(b'"quantization": null', b'"quantization": {"x": 1e-400}', 1)),
    "pad_token_id 2^63-1": ("ok", "edit", _set("layout", "pad_token_id", 2 ** 63 - 1)),
    "engines, hashed plans": ("ok", "edit", _engines()),
    "engines, no profile": ("ok", "edit", _engines([])),
    "symbolic link inside": ("ok", "folder", _link_inside),
    "graph file name to escape": ("ok", "folder", _renamed_graph),
    "external data beside its graph": ("ok", "edit", _external_data("graphs/fp32/head_0.onnx.data")),
    "npy header as numpy writes it": ("ok", "files", lambda art: _ids_npy(art)),
    "npy header keys in another order": ("ok", "files", lambda art: _ids_npy(art, "{'shape': (%d,), 'fortran_order': False, 'descr': '<i8'}")),
    "npy format 2.0": ("ok", "files", lambda art: _ids_npy(art, version=(2, 0))),

    # JSON both readers refuse
    "bytes after a NUL at the end": ("refused", "text", lambda b: b + b"\0garbage"),
    "a NUL at the end": ("refused", "text", lambda b: b + b"\0"),
    "UTF-16": ("refused", "text", lambda b: b.decode().encode("utf-16")),
    "UTF-32": ("refused", "text", lambda b: b.decode().encode("utf-32")),
    "Latin-1 byte in a string": ("refused", "text", lambda b: b.replace(b'"cpu": "', b'"cpu": "\xe9', 1)),
    "overlong UTF-8": ("refused", "text", lambda b: b.replace(b'"cpu": "', b'"cpu": "\xc0\xaf', 1)),
    "UTF-8 encoded surrogate": ("refused", "text", lambda b: b.replace(b'"cpu": "', b'"cpu": "\xed\xa0\x80', 1)),
    "lone surrogate escape": ("refused", "text", lambda b: b.replace(b'"cpu": "', b'"cpu": "\\ud800', 1)),
    "trailing text": ("refused", "text", lambda b: b + b" {}"),
    "duplicate nested key": ("refused", "text", lambda b: b.replace(b'"max_batch":', b'"max_beam": 16, "max_batch":', 1)),
    "NaN": ("refused", "text", lambda b: b.replace(b'"quantization": null', b'"quantization": {"x": NaN}', 1)),
    "1e400": ("refused", "text", lambda b: b.replace(b'"quantization": null', b'"quantization": {"x": 1e400}', 1)),
    "a 400-digit integer": ("refused", "text", lambda b: b.replace(b'"quantization": null', b'"quantization": {"x": 1' + b"0" * 400 + b"}", 1)),
    "a 5000-digit integer": ("refused", "text", lambda b: b.replace(b'"quantization": null', b'"quantization": {"x": ' + b"9" * 5000 + b"}", 1)),
    "quantization 33 deep": ("refused", "edit", _set("precisions", "fp32", "quantization", {"x": _nest(29)})),
    "deeply nested": ("refused", "text", lambda b: b"[" * 100000 + b"]" * 100000),
    "empty file": ("refused", "text", lambda b: b""),
    "a list": ("refused", "text", lambda b: b"[]"),

    # the manifest's keys and types
    "extra versions key": ("refused", "edit", _set("versions", "numpy", "2.0")),
    "missing versions key": ("refused", "edit", _set("versions", "tensorrt", KeyError)),
    "versions value an integer": ("refused", "edit", _set("versions", "onnx", 1)),
    "profile not an object": ("refused", "edit", _engines([["input_ids"]])),
    "profile without opt": ("refused", "edit", _engines([{"input_ids": {"min": [1, 6], "max": [4, 63]}}])),
    "profile with an extra key": ("refused", "edit", _engines([{"input_ids": {"min": [1], "opt": [1], "max": [1], "x": [1]}}])),
    "profile dims not integers": ("refused", "edit", _engines([{"input_ids": {"min": [1.0], "opt": [1], "max": [1]}}])),
    "profile dims negative": ("refused", "edit", _engines([{"input_ids": {"min": [-1], "opt": [1], "max": [1]}}])),
    "profile dims past int64": ("refused", "edit", _engines([{"input_ids": {"min": [2 ** 63], "opt": [1], "max": [1]}}])),
    "profiles an object": ("refused", "edit", _engines({"input_ids": {}})),
    "pad_token_id 2^63": ("refused", "edit", _set("layout", "pad_token_id", 2 ** 63)),
    "unknown top-level key": ("refused", "edit", _set("extra", 1)),
    "missing files": ("refused", "edit", _set("files", KeyError)),
    "old format version": ("refused", "edit", _set("version", 3)),
    "float version": ("refused", "edit", _set("version", 4.0)),
    "bool for an int": ("refused", "edit", _set("limits", "max_beam", True)),
    "float for an int": ("refused", "edit", _set("layout", "pad_token_id", 0.0)),
    "exponent for an int": ("refused", "text", lambda b: b.replace(b'"pad_token_id": 0', b'"pad_token_id": 0e0', 1)),
    "string for an int": ("refused", "edit", _set("limits", "max_batch", "4")),
    "max_history 2^24": ("refused", "edit", _max_history(2 ** 24)),
    "max_batch * max_beam 2^31": ("refused", "edit", lambda raw: (raw["limits"].update(max_batch=2 ** 16, max_beam=2 ** 15), _each_graph(
        lambda n, g: g["dynamic"].update({d: [1, 2 ** 31] if d != "batch" else [1, 2 ** 16] for d in g["dynamic"] if d != "tokens"}))(raw))),
    "external data elsewhere": ("refused", "edit", _external_data("graphs/x.data")),
    "unknown precision": ("refused", "edit", lambda raw: (raw["precisions"].update(fp8=raw["precisions"]["fp32"]),
                                                         raw["graphs"].update(fp8=raw["graphs"]["fp32"]))),
    "no precision": ("refused", "edit", lambda raw: (raw["precisions"].clear(), raw["graphs"].clear())),
    "table dtype": ("refused", "edit", _set("tables", "item_ids", "dtype", "int32")),
    "table shape": ("refused", "edit", _set("tables", "sid_items", "shape", [3])),
    "parent path": ("refused", "edit", _set("tables", "item_ids", "file", "../outside.npy")),
    "upper-case sha256": ("refused", "edit", lambda raw: raw["files"].update({"validation.json": raw["files"]["validation.json"].upper()})),
    "contract.json not listed": ("refused", "unbound", lambda raw: raw["files"].pop("contract.json")),
    "contract.json missing": ("refused", "folder", lambda d: (d / "contract.json").unlink()),
    "contract.json with an extra key": ("refused", "files", lambda art: {"contract.json": json.dumps(
        {**json.loads((art / "contract.json").read_text()), "files": "0" * 64}).encode()}),
    "contract.json not JSON": ("refused", "files", lambda art: {"contract.json": b"layout"}),
    "unlisted file": ("refused", "folder", lambda d: (d / "tables" / "extra.npy").write_bytes(b"x")),
    "FIFO": ("refused", "folder", lambda d: os.mkfifo(d / "tables" / "fifo")),
    "manifest.json a folder": ("refused", "folder", lambda d: ((d / "manifest.json").unlink(), (d / "manifest.json").mkdir())),

    # the binding: edits that the graphs cannot see (or that load and decode other items), contract not re-bound
    "offsets raised by one": ("refused", "unbound", _offsets(1)),
    "offsets lowered by one": ("refused", "unbound", _offsets(-1)),
    "placeholder_start raised": ("refused", "unbound", _set("layout", "placeholder_start", 99)),
    "pad_token_id changed": ("refused", "unbound", _set("layout", "pad_token_id", 1)),
    "max_history lowered, graphs' ranges too": ("refused", "unbound", _max_history(3)),
    "max_beam lowered, graphs' ranges too": ("refused", "unbound", lambda raw: (raw["limits"].update(max_beam=8), _each_graph(
        lambda n, g: g["dynamic"].update({d: [1, 8 * raw["limits"]["max_batch"]] for d in g["dynamic"] if d in ("beams", "parents")}))(raw))),
    "backbones of two precisions swapped": ("refused", "unbound", _swap_backbones),
    "int8-cpu allowed on GPUs": ("refused", "unbound", _set("precisions", "int8-cpu", "execution", "any")),
    "two equal tables swapped": ("refused", "unbound", _swap_tables),
    "head files swapped": ("refused", "unbound", _swap_heads),
    "contract edited, manifest not": ("refused", "files", lambda art: {"contract.json": json.dumps(
        {**json.loads((art / "contract.json").read_text()), "layout": "0" * 64}).encode()}),

    # tables (re-hashed)
    "table of int32": ("refused", "files", lambda art: {"tables/item_ids.npy": _npy(_table(art, "item_ids").astype(np.int32))}),
    "big-endian table": ("refused", "files", lambda art: {"tables/sid_keys.npy": _npy(_table(art, "sid_keys").astype(">u8"))}),
    "Fortran order": ("refused", "files", lambda art: {"tables/item_codes.npy": _npy(_table(art, "item_codes"), fortran=True)}),
    "truncated table": ("refused", "files", lambda art: {"tables/sid_items.npy": _npy(_table(art, "sid_items"))[:-8]}),
    "padded table": ("refused", "files", lambda art: {"tables/sid_items.npy": _npy(_table(art, "sid_items")) + b"\0" * 8}),
    "not npy": ("refused", "files", lambda art: {"tables/sid_items.npy": b"hello"}),
    "npy format 3.0": ("refused", "files", lambda art: _ids_npy(art, version=(3, 0))),
    "npy header with an extra key": ("refused", "files", lambda art: _ids_npy(art, "{'descr': '<i8', 'fortran_order': False, 'shape': (%d,), 'x': 1}")),
    "ids not ascending": ("refused", "files", lambda art: _rows(art, "item_ids", lambda a: a.__setitem__(slice(0, 2), a[1::-1]))),
    "code out of range": ("refused", "files", lambda art: _rows(art, "item_codes", lambda a: a.__setitem__((0, 0), 99))),
    "offsets end short": ("refused", "files", lambda art: _rows(art, "sid_offsets", lambda a: a.__setitem__(-1, a[-1] - 1))),
    "a prefix missing": ("refused", "files", lambda art: _rows(art, "valid_prefixes_1", lambda a: a.__setitem__(-1, a[-1] + 1))),
    "duplicate sid item": ("refused", "files", lambda art: _rows(art, "sid_items", lambda a: a.__setitem__(0, a[1]))),
    "codes of an item changed": ("refused", "files", lambda art: _rows(art, "item_codes", lambda a: a.__setitem__((5, 2), (a[5, 2] + 1) % 5))),
    "modified file, not re-hashed": ("refused if verified", "folder", lambda d: (d / "validation.json").write_text("{}")),
}


def _reversed(value):
    if isinstance(value, dict):
        return {k: _reversed(value[k]) for k in reversed(list(value))}
    return [_reversed(v) for v in value] if isinstance(value, list) else value


def _table(art: Path, name: str) -> np.ndarray:
    return np.load(art / "tables" / f"{name}.npy")


def _rows(art: Path, name: str, change) -> dict[str, bytes]:
    a = _table(art, name).copy()
    change(a)
    return {f"tables/{name}.npy": _npy(a)}


def make_case(artifact: Path, out: Path, name: str) -> Path:
    """A copy of ``artifact`` at ``out`` with the mutation ``name`` applied."""
    _, kind, mutate = CASES[name]
    shutil.copytree(artifact, out, symlinks=True)
    raw = json.loads((out / "manifest.json").read_text())
    if kind == "text":
        (out / "manifest.json").write_bytes(mutate((out / "manifest.json").read_bytes()))
    elif kind == "folder":
        mutate(out)
    elif kind == "files":
        write(out, raw, rebind=False, files=mutate(artifact))
    else:
        files = mutate(raw)
        write(out, raw, rebind=kind == "edit", files=files if isinstance(files, dict) else None)
    return out
