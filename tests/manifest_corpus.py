"""The conformance corpus of artifacts that both readers run (tests/test_cpp_artifacts.py): named small mutations of
one tiny built artifact, each with the verdict both the Python loader (``Artifact.open(dir).tables()``) and
the C++ loader (``nezha_check_artifact`` through ctypes) must give: "ok" or "refused" (one case: "refused if
verified", a file changed after the build that only hashing finds).

Mutations of the manifest's content are re-bound (contract.json rewritten and re-hashed) so that the check
under test is the one that must catch them, except the ``unbound`` ones, which test the binding itself.
Mutations of a table or file are re-hashed for the same reason."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from manifest_edits import (engines, external_data, ids_npy, link_inside, max_history, nest, npy, offsets,
                            renamed_graph, reversed, rows, swap_backbones, swap_heads, swap_tables, table,
                            each_graph, set_key, write)

# name -> (verdict, kind, mutation). kinds: "edit" (changes the manifest dict, may return {rel: bytes} to write;
# re-bound), "unbound" (the same, contract.json kept), "files" (artifact -> {rel: bytes}, re-hashed), "text"
# (manifest bytes -> bytes), "folder" (changes the copied folder).
CASES = {
    # the built artifact and edits that change nothing a reader acts on
    "as built": ("ok", "edit", lambda raw: None),
    "compact JSON, keys reversed": ("ok", "text", lambda b: json.dumps(reversed(json.loads(b)), separators=(",", ":")).encode()),
    "UTF-8 byte order mark": ("ok", "text", lambda b: b"\xef\xbb\xbf" + b),
    "non-ASCII informational string": ("ok", "text", lambda b: b.replace(b'"cpu": "', '"cpu": "\u00c4rger \u2603 \U0001F600 '.encode(), 1)),
    "escaped NUL in an informational string": ("ok", "text", lambda b: b.replace(b'"cpu": "', b'"cpu": "a\\u0000b', 1)),
    "negative zero": ("ok", "text", lambda b: b.replace(b'"pad_token_id": 0', b'"pad_token_id": -0', 1)),
    "versions.tensorrt null": ("ok", "edit", set_key(["versions", "tensorrt"], None)),
    "source.index null": ("ok", "edit", set_key(["source", "index"], None)),
    "quantization 32 deep": ("ok", "edit", set_key(["precisions", "fp32", "quantization"], {"x": nest(28)})),
    "quantization: an integer past 64 bits": ("ok", "edit", set_key(["precisions", "fp32", "quantization"], {"n": 2 ** 70})),
    "quantization: 1e-400": ("ok", "text", lambda b: b.replace(b'"quantization": null', b'"quantization": {"x": 1e-400}', 1)),
    "pad_token_id 2^63-1": ("ok", "edit", set_key(["layout", "pad_token_id"], 2 ** 63 - 1)),
    "engines, hashed plans": ("ok", "edit", engines()),
    "engines, no profile": ("ok", "edit", engines([])),
    "symbolic link inside": ("ok", "folder", link_inside),
    "graph file name to escape": ("ok", "folder", renamed_graph),
    "external data beside its graph": ("ok", "edit", external_data("graphs/fp32/head_0.onnx.data")),
    "npy header as numpy writes it": ("ok", "files", lambda art: ids_npy(art)),
    "npy header keys in another order": ("ok", "files", lambda art: ids_npy(art, "{'shape': (%d,), 'fortran_order': False, 'descr': '<i8'}")),
    "npy format 2.0": ("ok", "files", lambda art: ids_npy(art, version=(2, 0))),

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
    "quantization 33 deep": ("refused", "edit", set_key(["precisions", "fp32", "quantization"], {"x": nest(29)})),
    "deeply nested": ("refused", "text", lambda b: b"[" * 100000 + b"]" * 100000),
    "empty file": ("refused", "text", lambda b: b""),
    "a list": ("refused", "text", lambda b: b"[]"),

    # the manifest's keys and types
    "extra versions key": ("refused", "edit", set_key(["versions", "numpy"], "2.0")),
    "missing versions key": ("refused", "edit", set_key(["versions", "tensorrt"], KeyError)),
    "versions value an integer": ("refused", "edit", set_key(["versions", "onnx"], 1)),
    "profile not an object": ("refused", "edit", engines([["input_ids"]])),
    "profile without opt": ("refused", "edit", engines([{"input_ids": {"min": [1, 6], "max": [4, 63]}}])),
    "profile with an extra key": ("refused", "edit", engines([{"input_ids": {"min": [1], "opt": [1], "max": [1], "x": [1]}}])),
    "profile dims not integers": ("refused", "edit", engines([{"input_ids": {"min": [1.0], "opt": [1], "max": [1]}}])),
    "profile dims negative": ("refused", "edit", engines([{"input_ids": {"min": [-1], "opt": [1], "max": [1]}}])),
    "profile dims past int64": ("refused", "edit", engines([{"input_ids": {"min": [2 ** 63], "opt": [1], "max": [1]}}])),
    "profiles an object": ("refused", "edit", engines({"input_ids": {}})),
    "engine without its GPU": ("refused", "edit", engines(entry=lambda e: e.pop("device"))),
    "engine GPU with an extra key": ("refused", "edit", engines(entry=lambda e: e["device"].update(bus=1))),
    "engine GPU name not a string": ("refused", "edit", engines(entry=lambda e: e["device"].update(name=7))),
    "unknown hardware compatibility": ("refused", "edit", engines(entry=lambda e: e.update(hardware_compatibility="any"))),
    "hardware compatibility level": ("ok", "edit", engines(entry=lambda e: e.update(hardware_compatibility="ampere_plus"))),
    "pad_token_id 2^63": ("refused", "edit", set_key(["layout", "pad_token_id"], 2 ** 63)),
    "unknown top-level key": ("refused", "edit", set_key(["extra"], 1)),
    "missing files": ("refused", "edit", set_key(["files"], KeyError)),
    "old format version": ("refused", "edit", set_key(["version"], 3)),
    "float version": ("refused", "edit", set_key(["version"], 4.0)),
    "bool for an int": ("refused", "edit", set_key(["limits", "max_beam"], True)),
    "float for an int": ("refused", "edit", set_key(["layout", "pad_token_id"], 0.0)),
    "exponent for an int": ("refused", "text", lambda b: b.replace(b'"pad_token_id": 0', b'"pad_token_id": 0e0', 1)),
    "string for an int": ("refused", "edit", set_key(["limits", "max_batch"], "4")),
    "max_history 2^24": ("refused", "edit", max_history(2 ** 24)),
    "max_batch * max_beam 2^31": ("refused", "edit", lambda raw: (raw["limits"].update(max_batch=2 ** 16, max_beam=2 ** 15), each_graph(
        lambda n, g: g["dynamic"].update({d: [1, 2 ** 31] if d != "batch" else [1, 2 ** 16] for d in g["dynamic"] if d != "tokens"}))(raw))),
    "external data elsewhere": ("refused", "edit", external_data("graphs/x.data")),
    "unknown precision": ("refused", "edit", lambda raw: (raw["precisions"].update(fp8=raw["precisions"]["fp32"]),
                                                         raw["graphs"].update(fp8=raw["graphs"]["fp32"]))),
    "no precision": ("refused", "edit", lambda raw: (raw["precisions"].clear(), raw["graphs"].clear())),
    "table dtype": ("refused", "edit", set_key(["tables", "item_ids", "dtype"], "int32")),
    "table shape": ("refused", "edit", set_key(["tables", "sid_items", "shape"], [3])),
    "parent path": ("refused", "edit", set_key(["tables", "item_ids", "file"], "../outside.npy")),
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
    "offsets raised by one": ("refused", "unbound", offsets(1)),
    "offsets lowered by one": ("refused", "unbound", offsets(-1)),
    "placeholder_start raised": ("refused", "unbound", set_key(["layout", "placeholder_start"], 99)),
    "pad_token_id changed": ("refused", "unbound", set_key(["layout", "pad_token_id"], 1)),
    "max_history lowered, graphs' ranges too": ("refused", "unbound", max_history(3)),
    "max_beam lowered, graphs' ranges too": ("refused", "unbound", lambda raw: (raw["limits"].update(max_beam=8), each_graph(
        lambda n, g: g["dynamic"].update({d: [1, 8 * raw["limits"]["max_batch"]] for d in g["dynamic"] if d in ("beams", "parents")}))(raw))),
    "backbones of two precisions swapped": ("refused", "unbound", swap_backbones),
    "int8-cpu allowed on GPUs": ("refused", "unbound", set_key(["precisions", "int8-cpu", "execution"], "any")),
    "two equal tables swapped": ("refused", "unbound", swap_tables),
    "head files swapped": ("refused", "unbound", swap_heads),
    "contract edited, manifest not": ("refused", "files", lambda art: {"contract.json": json.dumps(
        {**json.loads((art / "contract.json").read_text()), "layout": "0" * 64}).encode()}),

    # tables (re-hashed)
    "table of int32": ("refused", "files", lambda art: {"tables/item_ids.npy": npy(table(art, "item_ids").astype(np.int32))}),
    "big-endian table": ("refused", "files", lambda art: {"tables/sid_keys.npy": npy(table(art, "sid_keys").astype(">u8"))}),
    "Fortran order": ("refused", "files", lambda art: {"tables/item_codes.npy": npy(table(art, "item_codes"), fortran=True)}),
    "truncated table": ("refused", "files", lambda art: {"tables/sid_items.npy": npy(table(art, "sid_items"))[:-8]}),
    "padded table": ("refused", "files", lambda art: {"tables/sid_items.npy": npy(table(art, "sid_items")) + b"\0" * 8}),
    "not npy": ("refused", "files", lambda art: {"tables/sid_items.npy": b"hello"}),
    "npy format 3.0": ("refused", "files", lambda art: ids_npy(art, version=(3, 0))),
    "npy header with an extra key": ("refused", "files", lambda art: ids_npy(art, "{'descr': '<i8', 'fortran_order': False, 'shape': (%d,), 'x': 1}")),
    "ids not ascending": ("refused", "files", lambda art: rows(art, "item_ids", lambda a: a.__setitem__(slice(0, 2), a[1::-1]))),
    "code out of range": ("refused", "files", lambda art: rows(art, "item_codes", lambda a: a.__setitem__((0, 0), 99))),
    "offsets end short": ("refused", "files", lambda art: rows(art, "sid_offsets", lambda a: a.__setitem__(-1, a[-1] - 1))),
    "a prefix missing": ("refused", "files", lambda art: rows(art, "valid_prefixes_1", lambda a: a.__setitem__(-1, a[-1] + 1))),
    "duplicate sid item": ("refused", "files", lambda art: rows(art, "sid_items", lambda a: a.__setitem__(0, a[1]))),
    "codes of an item changed": ("refused", "files", lambda art: rows(art, "item_codes", lambda a: a.__setitem__((5, 2), (a[5, 2] + 1) % 5))),
    "modified file, not re-hashed": ("refused if verified", "folder", lambda d: (d / "validation.json").write_text("{}")),
}


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
