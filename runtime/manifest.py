"""The artifact manifest (``manifest.json``): the only contract between the build and the runtime.

It names every graph, engine and table file with its tensors, dtypes and dynamic ranges, the SID
layout, the limits (max history, batch, beam), precisions, tool versions and the sha256 of every file.
The runtime never parses file names."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .layout import SidLayout
from nezha.runtime.errors import NezhaError

FORMAT = "nezha-artifact"
VERSION = 1
MANIFEST = "manifest.json"


class ManifestError(NezhaError, ValueError):
    """An artifact folder that is missing, corrupt or of another format version."""


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(artifact_dir: str | Path, manifest: dict) -> Path:
    """Write ``manifest`` with format/version and the sha256 of every other file under the folder, atomically."""
    artifact_dir = Path(artifact_dir)
    files = sorted(p for p in artifact_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": FORMAT, "version": VERSION, **manifest,
                "files": {p.relative_to(artifact_dir).as_posix(): sha256(p) for p in files}}
    fd, tmp = tempfile.mkstemp(dir=artifact_dir, prefix=".manifest.")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, artifact_dir / MANIFEST)
    return artifact_dir / MANIFEST


@dataclass
class Manifest:
    """A loaded, verified manifest. ``raw`` is the JSON; accessors give typed views."""

    root: Path
    raw: dict

    @classmethod
    def load(cls, artifact_dir: str | Path, verify: bool = True) -> "Manifest":
        """Read ``artifact_dir/manifest.json``; with ``verify``, check every file's sha256."""
        root = Path(artifact_dir)
        path = root / MANIFEST
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{path} not found: {root} is not a nezha artifact folder "
                                "(build one with python export/build.py)") from None
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path} is not valid JSON: {e}") from None
        if raw.get("format") != FORMAT:
            raise ManifestError(f"{path}: format {raw.get('format')!r}, expected {FORMAT!r}")
        if raw.get("version") != VERSION:
            raise ManifestError(f"{path}: manifest version {raw.get('version')!r}; this runtime reads version "
                                f"{VERSION}: rebuild the artifact with the matching nezha-deploy")
        m = cls(root, raw)
        if verify:
            m.verify()
        return m

    def verify(self) -> None:
        """Raise ManifestError naming every missing or modified file."""
        problems = []
        for rel, digest in self.raw.get("files", {}).items():
            p = self.root / rel
            if not p.is_file():
                problems.append(f"{rel}: missing")
            elif sha256(p) != digest:
                problems.append(f"{rel}: sha256 mismatch (file modified or corrupt)")
        if problems:
            raise ManifestError(f"artifact {self.root} failed verification:\n  " + "\n  ".join(problems))

    @property
    def layout(self) -> SidLayout:
        return SidLayout.from_json(self.raw["layout"])

    @property
    def limits(self) -> dict:
        """max_history, max_batch, max_beam, hidden_size."""
        return self.raw["limits"]

    @property
    def precisions(self) -> list[str]:
        return list(self.raw["graphs"])

    def graph(self, precision: str, name: str) -> dict:
        """The entry of one graph: file, inputs, outputs (each name, dtype, shape with named dims), dynamic ranges."""
        graphs = self.raw["graphs"]
        if precision not in graphs:
            raise ManifestError(f"artifact {self.root} has no {precision!r} graphs; it has {sorted(graphs)}")
        if name not in graphs[precision]:
            raise ManifestError(f"artifact {self.root}: no graph {name!r} in {precision}; has {sorted(graphs[precision])}")
        return graphs[precision][name]

    def path(self, rel: str) -> Path:
        return self.root / rel

    def table(self, name: str) -> np.ndarray:
        """A verifier/catalog table by manifest name (see export/tables.py for the layout)."""
        entry = self.raw["tables"][name]
        return np.load(self.root / entry["file"], allow_pickle=False)
