"""The artifact manifest (``manifest.json``), typed: the only contract between the build (writer) and
every runtime (reader). ``Manifest.from_json`` parses strictly (a missing or unknown key, a wrong type
or a contradiction between limits, layout and graphs is an ArtifactError naming the key's path);
``to_json`` writes exactly what ``from_json`` reads. The format is documented in docs/artifact.md."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

from .errors import ArtifactError

from .encoding import SidLayout
from .shapes import (DTYPE_BYTES, Limits, Tensor, expected_graphs, graph_names, largest_tensor,  # noqa: F401
                     table_names, token_range)
from .strict import array, exact_keys, fail, integer, obj, relpath, show, string, strings, typed

FORMAT = "nezha-artifact"
VERSION = 4                          # 4: contract.json binds the sections that decide the answers
PRECISIONS = ("fp32", "fp16", "int8", "int8-cpu")
EXECUTIONS = ("any", "cpu-only")
MAX_TENSOR_BYTES = 16 << 30          # one buffer of the largest shapes; above this a manifest is refused
CONTRACT = "contract.json"           # section -> sha256 of its canonical JSON, written with the manifest (hashed)
CONTRACT_SECTIONS = ("layout", "limits", "precisions", "graphs", "engines", "tables")
VERSION_KEYS = ("torch", "transformers", "onnx", "onnxruntime", "tensorrt", "nezha-deploy")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class GraphEntry:
    """One ONNX graph: its file, tensors (in order) and the [lo, hi] range of each named dim."""

    file: str
    external_data: str | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    dynamic: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, value, path: str) -> "GraphEntry":
        tensors = lambda v, p: tuple(Tensor.from_json(t, f"{p}[{i}]") for i, t in enumerate(array(v, p)))

        def ranges(v, p):
            out = {}
            for dim, r in obj(v, p).items():
                r = array(r, f"{p}.{dim}")
                if len(r) != 2 or integer(r[0], f"{p}.{dim}[0]", 1) > integer(r[1], f"{p}.{dim}[1]", 1):
                    fail(f"{p}.{dim}", f"expected [lo, hi] with 1 <= lo <= hi, got {r!r}")
                out[dim] = (r[0], r[1])
            return out
        return typed(cls, value, path, file=relpath, inputs=tensors, outputs=tensors, dynamic=ranges,
                     external_data=lambda v, p: None if v is None else relpath(v, p))

    def to_json(self) -> dict:
        return {"file": self.file, "external_data": self.external_data,
                "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
                "dynamic": {k: list(v) for k, v in self.dynamic.items()}}

    def max_shape(self, tensor: Tensor) -> tuple[int, ...]:
        return tuple(self.dynamic[d][1] if isinstance(d, str) else d for d in tensor.shape)

    @property
    def paths(self) -> list[str]:
        return [self.file] + ([self.external_data] if self.external_data else [])


HARDWARE_LEVELS = ("none", "same_compute_capability", "ampere_plus")


@dataclass(frozen=True)
class EngineEntry:
    """A TensorRT engine and what it needs of the machine that runs it."""

    file: str
    compute_capability: str
    tensorrt: str
    strongly_typed: bool
    profiles: tuple[dict, ...]          # per profile: input name -> {"min", "opt", "max"} shapes
    device: dict = field(default_factory=lambda: {"name": "", "uuid": ""})   # the GPU it was built on
    hardware_compatibility: str = "none"                                     # TensorRT's level: HARDWARE_LEVELS

    @classmethod
    def from_json(cls, value, path: str) -> "EngineEntry":
        def flag(v, p):
            if not isinstance(v, bool):
                fail(p, f"expected true or false, got {v!r}")
            return v
        def profile(v, p):                  # input name -> {"min", "opt", "max"}: shapes (lists of ints)
            for name, shapes in obj(v, p).items():
                for k in exact_keys(shapes, f"{p}.{name}", ("min", "opt", "max")):
                    [integer(d, f"{p}.{name}.{k}[{i}]") for i, d in enumerate(array(shapes[k], f"{p}.{name}.{k}"))]
            return v
        return typed(cls, value, path, file=relpath, compute_capability=string, tensorrt=string, strongly_typed=flag,
                     profiles=lambda v, p: tuple(profile(x, f"{p}[{i}]") for i, x in enumerate(array(v, p))),
                     device=lambda v, p: dict(strings(v, p, ("name", "uuid"))),
                     hardware_compatibility=lambda v, p: string(v, p, HARDWARE_LEVELS))

    def to_json(self) -> dict:
        return {"file": self.file, "compute_capability": self.compute_capability, "tensorrt": self.tensorrt,
                "strongly_typed": self.strongly_typed, "profiles": list(self.profiles), "device": dict(self.device),
                "hardware_compatibility": self.hardware_compatibility}


@dataclass(frozen=True)
class TableEntry:
    file: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def from_json(cls, value, path: str) -> "TableEntry":
        return typed(cls, value, path, file=relpath, dtype=lambda v, p: string(v, p, ("int64", "uint64")),
                     shape=lambda v, p: tuple(integer(d, f"{p}[{i}]") for i, d in enumerate(array(v, p))))

    def to_json(self) -> dict:
        return {"file": self.file, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class PrecisionEntry:
    """``execution``: 'any', or 'cpu-only' (ONNX Runtime CPU only: no CUDA, no TensorRT engine).
    ``quantization``: how int8 graphs were made (informational), None for float precisions."""

    execution: str = "any"
    quantization: dict | None = None

    @classmethod
    def from_json(cls, value, path: str) -> "PrecisionEntry":
        return typed(cls, value, path, execution=lambda v, p: string(v, p, EXECUTIONS),
                     quantization=lambda v, p: None if v is None else obj(v, p))

    def to_json(self) -> dict:
        return {"execution": self.execution, "quantization": self.quantization}


SOURCE_KEYS = ("checkpoint", "architecture", "index", "item_ids")
TOP_KEYS = ("format", "version", "layout", "limits", "precisions", "graphs", "engines", "tables", "versions",
            "source", "machine", "validation", "files")


@dataclass(frozen=True)
class Manifest:
    """The whole contract. Build one with the typed entries and ``to_json()``; read one with ``from_json``."""

    layout: SidLayout
    limits: Limits
    precisions: dict[str, PrecisionEntry]
    graphs: dict[str, dict[str, GraphEntry]]
    engines: dict[str, dict[str, EngineEntry]]
    tables: dict[str, TableEntry]
    versions: dict[str, str | None]
    source: dict
    machine: dict
    validation: str
    files: dict[str, str]               # path -> sha256 of every file but manifest.json

    @classmethod
    def from_json(cls, raw) -> "Manifest":
        raw = exact_keys(raw, "", TOP_KEYS)
        if type(raw["format"]) is not str or raw["format"] != FORMAT:
            fail("format", f"{raw['format']!r}, expected {FORMAT!r}: not a nezha artifact")
        if type(raw["version"]) is not int or raw["version"] != VERSION:
            fail("version", f"{raw['version']!r}; this runtime reads version {VERSION}: rebuild the artifact "
                             "with the matching nezha-deploy")
        layout = SidLayout.from_json(raw["layout"])
        precisions = {p: PrecisionEntry.from_json(v, f"precisions.{p}") for p, v in obj(raw["precisions"], "precisions").items()}
        for p in precisions:
            string(p, "precisions", PRECISIONS)
        if not precisions:
            fail("precisions", "no precision: the artifact has no graphs")
        each = lambda v, p, parse: {k: parse(x, f"{p}.{k}") for k, x in obj(v, p).items()}
        graphs = {p: each(g, f"graphs.{p}", GraphEntry.from_json) for p, g in obj(raw["graphs"], "graphs").items()}
        engines = {p: each(g, f"engines.{p}", EngineEntry.from_json) for p, g in obj(raw["engines"], "engines").items()}
        files = obj(raw["files"], "files")
        for path, digest in files.items():
            relpath(path, f"files[{path!r}]")
            if not isinstance(digest, str) or not _SHA256.match(digest):
                fail(f"files[{path!r}]", f"expected a lower-case hex sha256, got {digest!r}")
        versions = strings(raw["versions"], "versions", VERSION_KEYS, nullable=VERSION_KEYS)
        source = strings(raw["source"], "source", SOURCE_KEYS, nullable=("index",))
        string(source["item_ids"], "source.item_ids", ("index", "positions"))
        machine = strings(raw["machine"], "machine", ("system", "arch", "cpu"), extra=("isa",))
        [string(x, "machine.isa") for x in array(machine["isa"], "machine.isa")]
        m = cls(layout, Limits.from_json(raw["limits"]), precisions, graphs, engines,
                {n: TableEntry.from_json(t, f"tables.{n}") for n, t in obj(raw["tables"], "tables").items()},
                versions, source, machine, relpath(raw["validation"], "validation"), files)
        m.check()
        return m

    def to_json(self) -> dict:
        nested = lambda d: {p: {n: e.to_json() for n, e in g.items()} for p, g in d.items()}
        return {"format": FORMAT, "version": VERSION, "layout": self.layout.to_json(), "limits": self.limits.to_json(),
                "precisions": {p: e.to_json() for p, e in self.precisions.items()}, "graphs": nested(self.graphs),
                "engines": nested(self.engines), "tables": {n: t.to_json() for n, t in self.tables.items()},
                "versions": self.versions, "source": self.source, "machine": self.machine,
                "validation": self.validation, "files": self.files}

    def check(self) -> None:
        """The invariants between sections (docs/artifact.md): graphs vs limits and layout, tables, engines,
        buffers of sane size, and a checksum for every file the manifest uses."""
        names = graph_names(self.layout.levels)
        if set(self.graphs) != set(self.precisions):
            fail("graphs", f"precisions {sorted(self.graphs)} differ from the 'precisions' section {sorted(self.precisions)}")
        expected = expected_graphs(self.layout, self.limits)
        for p, graphs in self.graphs.items():
            if sorted(graphs) != sorted(names):
                fail(f"graphs.{p}", f"graphs {sorted(graphs)}; expected exactly {names}")
            for n, g in graphs.items():
                inputs, outputs, dynamic = expected[n]
                for what, want, have in (("inputs", inputs, g.inputs), ("outputs", outputs, g.outputs),
                                         ("dynamic", dynamic, g.dynamic)):
                    if have != want:
                        fail(f"graphs.{p}.{n}.{what}", f"{show(have)} contradicts limits {self.limits.to_json()} "
                                                         f"and layout codes {list(self.layout.codes)}: expected {show(want)}")
                if g.external_data not in (None, g.file + ".data"):
                    fail(f"graphs.{p}.{n}.external_data", f"{g.external_data!r}; external data lies beside its graph, "
                                                         f"as {g.file + '.data'!r}")
        lim = self.limits          # the C++ runtime's indices: 32-bit candidates, tokens well below 2^31
        if lim.max_batch * lim.max_beam >= 2**31 or max(self.layout.codes) * lim.max_beam >= 2**31:
            fail("limits", "max_batch * max_beam and max_beam * codes (per level) must be < 2^31")
        if lim.max_history >= 2**24:
            fail("limits.max_history", f"{lim.max_history}; must be < 2^24")
        tensor, size = largest_tensor(self.layout, self.limits)
        if size > MAX_TENSOR_BYTES:
            fail("limits", f"{tensor} needs {size / 2**30:.1f} GiB at its largest shape (limit "
                           f"{MAX_TENSOR_BYTES >> 30} GiB): lower max_batch/max_beam")
        for p, engines in self.engines.items():
            if p not in self.precisions or self.precisions[p].execution != "any":
                fail(f"engines.{p}", "engines exist only for built precisions that may run on GPUs")
            if sorted(engines) != sorted(names):
                fail(f"engines.{p}", f"engines {sorted(engines)}; expected exactly {names}")
        self._check_tables()
        used = [self.validation, CONTRACT] + [t.file for t in self.tables.values()] + [
            path for gs in self.graphs.values() for g in gs.values() for path in g.paths] + [
            e.file for es in self.engines.values() for e in es.values()]
        unlisted = [u for u in used if u not in self.files]
        if unlisted:
            fail("files", f"{unlisted[0]!r} is used but has no sha256 entry: integrity is not optional")

    def _check_tables(self) -> None:
        L, names = self.layout.levels, table_names(self.layout.levels)
        if sorted(self.tables) != sorted(names):
            fail("tables", f"tables {sorted(self.tables)}; expected exactly {names}")
        I, S = (self.tables["item_ids"].shape or (0,))[0], (self.tables["sid_keys"].shape or (0,))[0]
        want = {"item_ids": ("int64", (I,)), "item_codes": ("int64", (I, L)), "sid_keys": ("uint64", (S,)),
                "sid_offsets": ("int64", (S + 1,)), "sid_items": ("int64", (I,))}
        for i in range(L):
            shape = self.tables[f"valid_prefixes_{i}"].shape
            want[f"valid_prefixes_{i}"] = ("uint64", (S,) if i == L - 1 else shape[:1] if len(shape) == 1 else (-1,))
        for name, (dtype, shape) in want.items():
            t = self.tables[name]
            if 8 * math.prod(t.shape) > MAX_TENSOR_BYTES:
                fail(f"tables.{name}", f"shape {list(t.shape)} needs more than {MAX_TENSOR_BYTES >> 30} GiB")
            if (t.dtype, t.shape) != (dtype, shape) or I < 1 or S < 1:
                fail(f"tables.{name}", f"{t.dtype} {list(t.shape)}; expected {dtype} {list(shape)} "
                                        f"for {I} items, {S} SIDs and {L} levels")

    def contract(self) -> dict[str, str]:
        """Section -> sha256 of its canonical JSON (keys sorted, no spaces, non-ASCII escaped): the sections
        that decide the answers, of which ``precisions`` contributes only each ``execution`` (quantization
        is informational). The build records it in contract.json, a hashed file; both readers recompute it."""
        raw = {**self.to_json(), "precisions": {p: e.execution for p, e in self.precisions.items()}}
        canonical = lambda v: json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        return {s: hashlib.sha256(canonical(raw[s])).hexdigest() for s in CONTRACT_SECTIONS}

    def check_contract(self, recorded) -> None:
        """``recorded`` (contract.json, parsed) against this manifest: an edited section is refused by name."""
        if not isinstance(recorded, dict) or sorted(recorded) != sorted(CONTRACT_SECTIONS) or not all(
                isinstance(v, str) and _SHA256.match(v) for v in recorded.values()):
            raise ArtifactError(f"{CONTRACT}: expected an object of a sha256 per section {', '.join(CONTRACT_SECTIONS)}")
        for section, digest in self.contract().items():
            if recorded[section] != digest:
                fail(section, f"differs from what the build recorded in {CONTRACT} (sha256 {digest[:12]}..., recorded "
                              f"{recorded[section][:12]}...): the manifest was edited after the build; answers depend "
                              "on it, so rebuild the artifact (python export/build.py) rather than edit it")

    def graph(self, precision: str, name: str) -> GraphEntry:
        if precision not in self.graphs:
            raise ArtifactError(f"the artifact has no {precision!r} graphs; it has {sorted(self.graphs)}")
        return self.graphs[precision][name]
