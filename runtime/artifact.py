"""An artifact folder on disk: the manifest read strictly, every path kept inside the folder, every file
checked against its sha256, tables checked against their entries and invariants before use.

Threat model: the folder may be hostile. Nothing outside it is opened, hashed or stat-ed: paths are
resolved one component at a time, and a symbolic link whose target leaves the folder is refused before
anything at the target is touched."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import stat
import tempfile
from pathlib import Path

import numpy as np

from .errors import ArtifactError

from .datafile import read_regular_file
from .manifest import CONTRACT, Manifest, table_names

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
MAX_JSON_DEPTH = 32             # containers around any value: the C++ reader's limit, the same here
_MAX_LINKS = 40


def resolve_inside(root: str, rel: str) -> str:
    """The real path of ``root/rel`` (``root`` already real), refusing any step that leaves ``root``."""
    parts, cur, links = [p for p in rel.split("/") if p not in ("", ".")], root, 0
    while parts:
        part = parts.pop(0)
        nxt = os.path.dirname(cur) if part == ".." else os.path.join(cur, part)
        if not _inside(root, nxt):
            raise ArtifactError(f"{rel}: leaves the artifact folder {root}")
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            return nxt                                  # the caller reports it missing
        except OSError as e:                            # a file used as a folder, a name too long ...
            raise ArtifactError(f"{rel}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            target = os.path.normpath(os.path.join(cur, os.readlink(nxt)))
            if links > _MAX_LINKS:
                raise ArtifactError(f"{rel}: too many levels of symbolic links (a loop?)")
            if not _inside(root, target):
                raise ArtifactError(f"{rel}: symbolic link {os.path.relpath(nxt, root)} points outside the "
                                    f"artifact folder {root}")
            parts = [p for p in os.path.relpath(target, root).split("/") if p not in ("", ".")] + parts
            cur = root
        else:
            cur = nxt
    return cur


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def external_data_path(graph: str | Path) -> Path:
    """Where an ONNX graph's external weights live, if it has them: ``<graph>.onnx.data`` beside it."""
    return Path(str(graph) + ".data")


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ArtifactError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _bad_constant(name):
    raise ArtifactError(f"{name} is not valid JSON")


def _number(text: str):
    """A JSON number as the C++ reader (nlohmann) reads it: integers past 64 bits become doubles there, so
    one that no double holds is refused here too, as is any non-finite number."""
    value = int(text) if text.lstrip("-").isdigit() else float(text)
    try:
        finite = math.isfinite(value if -2**63 <= value < 2**64 else float(value))
    except OverflowError:
        finite = False
    if not finite:
        raise ValueError(f"number {text[:40]!r} is out of range")
    return value


def parse_json(data: bytes, shown: str):
    """Strict JSON as both readers take it: UTF-8 (a leading BOM is skipped), no duplicate key, no NaN,
    numbers a double or int64 holds, strings of Unicode scalars (no lone surrogate), at most
    MAX_JSON_DEPTH containers deep. ArtifactError naming ``shown`` otherwise."""
    try:
        value = json.loads(data.decode("utf-8-sig"), object_pairs_hook=_no_duplicates, parse_constant=_bad_constant,
                           parse_int=_number, parse_float=_number)
        todo = [(value, 0)]
        while todo:
            v, depth = todo.pop()
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(v, str):
                v.encode("utf-8")                                   # a lone surrogate ("\ud800") fails here
            elif isinstance(v, (dict, list)):
                todo += [(x, depth + 1) for x in (list(v) + list(v.values()) if isinstance(v, dict) else v)]
    except ArtifactError as e:
        raise ArtifactError(f"{shown}: {e}") from None
    except (ValueError, RecursionError) as e:     # UTF-8, syntax, numbers, nesting (UnicodeError is a ValueError)
        raise ArtifactError(f"{shown} is not valid JSON: {e}") from None
    return value


def read_json(root: str, rel: str, shown: str, max_bytes: int):
    """``root/rel`` (inside the folder, a regular file of at most ``max_bytes``: ``read_regular_file``) parsed
    by ``parse_json``."""
    return parse_json(read_regular_file(resolve_inside(root, rel), rel, ArtifactError, max_bytes), shown)


class Artifact:
    """``Artifact.open(folder)``: the typed manifest plus safe access to the folder's files."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root, self.manifest = root, manifest

    @classmethod
    def open(cls, folder: str | Path, verify: bool = True) -> "Artifact":
        """Read and check ``folder/manifest.json``; with ``verify`` (the default) hash every listed file.
        ``verify=False`` is an explicit opt-out for trusted hot reloads: paths, keys and tables are still checked."""
        if not isinstance(folder, (str, os.PathLike)) or isinstance(folder, bytes):
            raise ArtifactError(f"an artifact folder is a path (str or pathlib.Path), got {type(folder).__name__}")
        folder = Path(folder)
        if not folder.is_dir():
            raise ArtifactError(f"{folder} is not an artifact folder ({'not a folder' if folder.exists() else 'does not exist'}); "
                                "build one with python export/build.py")
        root = os.path.realpath(folder)
        if not os.path.exists(resolve_inside(root, MANIFEST)):
            raise ArtifactError(f"{folder / MANIFEST} not found: {folder} is not a nezha artifact folder "
                                "(build one with python export/build.py)")
        raw = read_json(root, MANIFEST, str(folder / MANIFEST), MAX_MANIFEST_BYTES)
        try:
            manifest = Manifest.from_json(raw)
        except ArtifactError as e:
            raise ArtifactError(f"artifact {folder}: {e}") from None
        artifact = cls(Path(root), manifest)
        artifact.check_tree()
        for rel in manifest.files:
            artifact.path(rel)                          # every listed path stays inside, before any hashing
        if verify:
            artifact.verify()
        try:                                            # hashed above; compared even when verify is off
            manifest.check_contract(read_json(root, CONTRACT, CONTRACT, 1 << 20))
        except ArtifactError as e:
            raise ArtifactError(f"artifact {folder}: {e}") from None
        return artifact

    def check_tree(self) -> None:
        """Every entry of the folder is a folder, a regular file or a link that stays inside, and every file
        is listed in the manifest's ``files`` (so it is hashed): ONNX Runtime opens files the manifest does
        not name (a graph's external data), so no unlisted file, no link leading out and no FIFO or device
        may stand in the folder. Links are read, never followed, to check this."""
        root = str(self.root)
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(folder, name)
                rel, mode = os.path.relpath(path, root), os.lstat(path).st_mode
                if stat.S_ISLNK(mode):
                    if os.path.isdir(resolve_inside(root, rel)):
                        continue
                elif stat.S_ISDIR(mode):
                    continue
                elif not stat.S_ISREG(mode):
                    raise ArtifactError(f"{rel}: not a regular file or folder (a FIFO, socket or device has no "
                                        "place in an artifact)")
                if rel != MANIFEST and rel not in self.manifest.files:
                    raise ArtifactError(f"{rel}: a file the manifest does not list (every file of an artifact "
                                        "has a sha256 entry)")

    def path(self, rel: str) -> Path:
        """The real path of a manifest path, inside the folder (ArtifactError otherwise)."""
        return Path(resolve_inside(str(self.root), rel))

    def verify(self) -> None:
        """Raise ArtifactError naming every missing, non-regular or modified file."""
        problems = []
        for rel, digest in self.manifest.files.items():
            p = self.path(rel)
            if not p.is_file():
                problems.append(f"{rel}: missing or not a regular file")
            elif sha256(p) != digest:
                problems.append(f"{rel}: sha256 mismatch (file modified or corrupt)")
        if problems:
            raise ArtifactError(f"artifact {self.root} failed verification: " + "; ".join(problems))

    def table(self, name: str) -> np.ndarray:
        """One table, its .npy header checked against the manifest entry (dtype, shape, C order)."""
        entry = self.manifest.tables[name]
        path = self.path(entry.file)
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f".npy format {version}; 1.0 and 2.0 are read")
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                if fortran or dtype != np.dtype(entry.dtype).newbyteorder("<") or shape != entry.shape:
                    raise ValueError(f"holds {dtype.str} {list(shape)}{' Fortran order' if fortran else ''}; the "
                                     f"manifest says {entry.dtype} {list(entry.shape)} little-endian C order")
                count = int(np.prod(shape, dtype=object))
                if os.fstat(f.fileno()).st_size - f.tell() != count * dtype.itemsize:
                    raise ValueError("data size does not match its header (truncated or padded)")
                array = np.fromfile(f, dtype=dtype, count=count)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"table {name} ({entry.file}): {e}") from None
        return array.reshape(shape).astype(entry.dtype, copy=False)

    def tables(self) -> dict[str, np.ndarray]:
        """Every table, checked against the invariants of docs/artifact.md."""
        tables = {name: self.table(name) for name in table_names(self.manifest.layout.levels)}
        problem = table_problem(tables, self.manifest.layout)
        if problem:
            raise ArtifactError(f"artifact {self.root}: {problem}")
        return tables


def table_problem(t: dict[str, np.ndarray], layout) -> str | None:
    """The first broken table invariant, or None (vectorised: cheap at load)."""
    ascending = lambda a: len(a) < 2 or bool(np.all(a[1:] > a[:-1]))
    codes = np.asarray(layout.codes)
    if not ascending(t["item_ids"]):
        return "item_ids are not strictly ascending"
    if np.any(t["item_codes"] < 0) or np.any(t["item_codes"] >= codes):
        return f"item_codes hold a code outside 0..codes-1 per level {list(layout.codes)}"
    if not ascending(t["sid_keys"]) or (len(t["sid_keys"]) and int(t["sid_keys"][-1]) >= int(np.prod(codes, dtype=object))):
        return "sid_keys are not strictly ascending keys of the SID space"
    off = t["sid_offsets"]
    if off[0] != 0 or off[-1] != len(t["item_ids"]) or not ascending(off):
        return f"sid_offsets must rise strictly from 0 to the item count {len(t['item_ids'])}"
    items = t["sid_items"]
    if not np.array_equal(np.sort(items), t["item_ids"]):
        return "sid_items are not the item ids, each once"
    row_start = np.zeros(len(items), dtype=bool)
    row_start[off[:-1]] = True
    if np.any(np.diff(items)[~row_start[1:]] <= 0):
        return "sid_items are not ascending within each SID"
    codes_of_items = t["item_codes"][np.searchsorted(t["item_ids"], items)]
    if not np.array_equal(layout.sid_keys(codes_of_items), np.repeat(t["sid_keys"], np.diff(off))):
        return "sid_items name items whose item_codes are another SID than their row's key"
    for i in range(layout.levels):
        if not np.array_equal(t[f"valid_prefixes_{i}"], np.unique(layout.prefix_keys(t["item_codes"], i))):
            return f"valid_prefixes_{i} are not the sorted keys of every item's first {i + 1} codes"
    return None


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest`` with the sha256 of every other file under ``folder`` (atomically, mode 0644
    less the umask); the result is checked by the same strict parse the runtime uses."""
    folder = Path(folder)
    _write_atomic(folder / CONTRACT, json.dumps(manifest.contract(), indent=2) + "\n")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = dataclasses.replace(manifest, files={p.relative_to(folder).as_posix(): sha256(p) for p in files})
    text = json.dumps(manifest.to_json(), indent=2)
    Manifest.from_json(json.loads(text))                  # the writer never writes what the reader refuses
    _write_atomic(folder / MANIFEST, text)
    return folder / MANIFEST


def _write_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` through a temporary file beside it (mode 0644 less the umask)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o666 & ~umask())
    os.replace(tmp, path)


def umask() -> int:
    """The process's umask (read by setting it and back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
