"""A hostile artifact folder gets one clear ArtifactError naming the file and the problem, never a raw
KeyError or NumPy / ONNX Runtime exception, and nothing outside the folder is opened: the manifest (key
paths, strict JSON, a bounded regular file, its types, layouts and the recorded contract) and symlinks.

Each case copies a real artifact, changes one thing (re-hashing what it changed, so that the check under
test is the one that must catch it) and loads it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import tampered
from manifest_edits import rebind, set_key as _set
from nezha.runtime import Recommender
from nezha.runtime.artifact import Artifact
from nezha.runtime.manifest import Manifest
from nezha.runtime.errors import ArtifactError
from artifact_helpers import _forged_layout, _table, artifact  # noqa: F401

_OPENED: list[str] | None = None


def _audit(event, args):
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


MANIFEST_CASES = {
    "absolute path": (_set(["tables", "item_ids", "file"], "/etc/passwd"), "not a plain relative path"),
    "parent path": (_set(["tables", "item_ids", "file"], "../outside.npy"), "not a plain relative path"),
    "dot segment": (_set(["validation"], "./validation.json"), "not a plain relative path"),
    "backslash": (_set(["graphs", "fp32", "backbone", "file"], "graphs\\fp32\\backbone.onnx"), "not a plain relative"),
    "unlisted file": (lambda raw: raw["files"].pop("tables/sid_items.npy"), "has no sha256 entry"),
    "no checksum list": (_set(["files"], KeyError), "files: missing"),
    "bad checksum value": (lambda raw: raw["files"].update({"validation.json": "xyz"}), "lower-case hex sha256"),
    "unknown top-level key": (_set(["extra"], 1), "extra: unknown key"),
    "missing nested key": (_set(["graphs", "fp32", "head_1", "dynamic"], KeyError), "graphs.fp32.head_1.dynamic: missing"),
    "string for an int": (_set(["limits", "max_batch"], "4"), "limits.max_batch: expected an integer"),
    "bool for an int": (_set(["limits", "max_beam"], True), "limits.max_beam: expected an integer"),
    "float for an int": (_set(["layout", "pad_token_id"], 0.0), "layout.pad_token_id: expected an integer"),
    "list for an object": (_set(["tables"], []), "tables: expected an object"),
    "max_batch vs graphs": (_set(["limits", "max_batch"], 9999), "contradicts limits"),
    "hidden size vs graphs": (_set(["limits", "hidden_size"], 64), "contradicts limits"),
    "codes vs graphs": (lambda raw: raw["layout"].update(codes=[9, 8, 8], offsets=[2, 11, 19], placeholder_start=27), "contradicts"),
    "broken layout": (_set(["layout", "offsets"], [2, 3, 4]), "code tokens must be contiguous"),
    "absurd buffers": (lambda raw: (raw["limits"].update(max_batch=2 ** 15, max_beam=2 ** 15),
                                   [g["dynamic"].update({d: [1, 2 ** 30] for d in g["dynamic"]})
                                    for n, g in raw["graphs"]["fp32"].items() if n.startswith("head")],
                                   raw["graphs"]["fp32"]["backbone"]["dynamic"].update(batch=[1, 2 ** 15])),
                       "GiB at its largest shape"),
    "table shape vs manifest": (_set(["tables", "sid_items", "shape"], [3]), "tables.sid_items"),
    "missing table": (lambda raw: raw["tables"].pop("valid_prefixes_1"), "expected exactly"),
    "unknown precision": (lambda raw: (raw["precisions"].update(fp8=raw["precisions"]["fp32"]),
                                       raw["graphs"].update(fp8=raw["graphs"]["fp32"])), "fp8"),
    "cpu-only engine": (lambda raw: raw["precisions"]["fp32"].update(execution="gpu"), "one of any, cpu-only"),
    "other version": (_set(["version"], 3), "version: 3; this runtime reads version 4: rebuild the artifact"),
    "float version": (_set(["version"], 4.0), "reads version 4"),
    "path through a file": (lambda raw: raw["files"].update({"validation.json/x": "0" * 64}), "Not a directory"),
    "name too long": (lambda raw: raw["files"].update({"a" * 300: "0" * 64}), "too long"),
    "huge table": (lambda raw: [raw["tables"][t].update(shape=[2 ** 40] + raw["tables"][t]["shape"][1:])
                                for t in ("item_ids", "item_codes", "sid_items")], "needs more than 16 GiB"),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_hostile_manifests_are_refused_with_the_key_path(artifact, tmp_path, case):
    edit, message = MANIFEST_CASES[case]
    bad = tampered(artifact, tmp_path, edit)
    with pytest.raises(ArtifactError, match=message):
        Recommender.load(bad)
    with pytest.raises(ArtifactError, match=message):           # verify=False skips hashing, not the contract
        Recommender.load(bad, verify=False)


def test_a_manifest_that_lies_about_its_graphs_is_refused_at_load(artifact, tmp_path):
    """hidden_size 64 everywhere in the manifest, consistent with itself, but the ONNX graphs say 32."""
    def edit(raw):
        raw["limits"]["hidden_size"] = 64
        for g in raw["graphs"]["fp32"].values():
            for t in g["inputs"] + g["outputs"]:
                t["shape"] = [64 if d == 32 else d for d in t["shape"]]
    with pytest.raises(ArtifactError, match="the graph's (inputs|outputs) .* differ from the manifest's"):
        Recommender.load(rebind(tampered(artifact, tmp_path, edit)))


def test_json_that_is_not_strict_json_is_refused(artifact, tmp_path):
    bad = tampered(artifact, tmp_path)
    text = (bad / "manifest.json").read_text()
    (bad / "manifest.json").write_text(text.replace('"format":', '"version": 2, "format":', 1))
    with pytest.raises(ArtifactError, match="'version' appears twice"):
        Artifact.open(bad)
    (bad / "manifest.json").write_text(text.replace('"max_batch": 4', '"max_batch": NaN'))
    with pytest.raises(ArtifactError, match="NaN is not valid JSON"):
        Artifact.open(bad)
    (bad / "manifest.json").write_text(text.replace('"max_batch": 4', '"max_batch": ' + "9" * 5000))
    with pytest.raises(ArtifactError, match="not valid JSON"):                 # past Python's digit limit
        Artifact.open(bad)
    (bad / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ArtifactError, match="not valid JSON|expected an object"):
        Artifact.open(bad)


def test_symlinks_out_of_the_folder_are_refused_before_anything_outside_is_opened(artifact, tmp_path):
    global _OPENED
    secret = tmp_path / "secret"
    secret.mkdir()
    np.save(secret / "item_ids.npy", _table(artifact, "item_ids"))
    bad = tampered(artifact, tmp_path)
    (bad / "tables" / "item_ids.npy").unlink()
    (bad / "tables" / "item_ids.npy").symlink_to(secret / "item_ids.npy")
    linked_dir = tampered(artifact, tmp_path / "b")
    shutil.rmtree(linked_dir / "graphs")
    (linked_dir / "graphs").symlink_to(secret)
    for folder, message in ((bad, "tables/item_ids.npy: symbolic link"), (linked_dir, "symbolic link graphs")):
        _OPENED = []
        try:
            with pytest.raises(ArtifactError, match=message):
                Recommender.load(folder)
            assert not [p for p in _OPENED if str(secret) in p], _OPENED
        finally:
            _OPENED = None
    unlisted = tampered(artifact, tmp_path / "d")                  # a link the manifest does not name (ONNX
    (unlisted / "graphs" / "fp32" / "weights.bin").symlink_to(secret / "item_ids.npy")   # external data could use it)
    with pytest.raises(ArtifactError, match="symbolic link graphs/fp32/weights.bin points outside"):
        Recommender.load(unlisted)
    fifo = tampered(artifact, tmp_path / "e")
    os.mkfifo(fifo / "tables" / "extra")
    with pytest.raises(ArtifactError, match="tables/extra: not a regular file or folder"):
        Recommender.load(fifo)
    copy = (artifact / "tables" / "item_ids.npy").read_bytes()      # a link that stays inside is fine
    inside = tampered(artifact, tmp_path / "c", files={"tables/copy.npy": copy})
    (inside / "tables" / "item_ids.npy").unlink()
    (inside / "tables" / "item_ids.npy").symlink_to("copy.npy")
    Recommender.load(inside).close()


def test_manifest_json_is_read_as_a_bounded_regular_file(artifact, tmp_path, monkeypatch):
    """The artifact's JSON files go through the one reader of regular files (datafile.read_regular_file): a
    FIFO is refused from its stat, never opened (no hang), and an oversized manifest before it is read."""
    from nezha.runtime import artifact as artifact_module
    fifo = tampered(artifact, tmp_path / "a")
    (fifo / "manifest.json").unlink()
    os.mkfifo(fifo / "manifest.json")
    with pytest.raises(ArtifactError, match=r"^manifest.json \S+ is a FIFO, not a regular file$"):
        Artifact.open(fifo, verify=False)
    monkeypatch.setattr(artifact_module, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(ArtifactError, match=r"^manifest.json \S+ is \d+ bytes; at most 100 are read$"):
        Artifact.open(artifact, verify=False)


def test_the_manifest_round_trips_through_its_types(artifact):
    raw = json.loads((artifact / "manifest.json").read_text())
    assert Manifest.from_json(raw).to_json() == raw


@pytest.mark.parametrize("edit", [
    lambda raw: raw["layout"].update(offsets=[o + 1 for o in raw["layout"]["offsets"]],
                                     placeholder_start=raw["layout"]["placeholder_start"] + 1),
    lambda raw: raw["layout"].update(offsets=[o - 1 for o in raw["layout"]["offsets"]],
                                     placeholder_start=raw["layout"]["placeholder_start"] - 1),
], ids=["offsets raised by one", "offsets lowered by one"])
def test_an_edited_layout_is_refused_at_load_not_answered(artifact, tmp_path, edit):
    """Offsets moved by one: before contract.json, +1 raised a raw ONNX Runtime error at the first request and
    -1 loaded and answered other items. Now the load names the section, with hashing on or off."""
    bad = tampered(artifact, tmp_path, edit)
    for verify in (True, False):
        with pytest.raises(ArtifactError, match="manifest.json: layout: differs from what the build recorded in "
                                                "contract.json .* rebuild the artifact"):
            Recommender.load(bad, verify=verify)


def test_the_build_records_the_contract_of_what_it_wrote(artifact):
    """contract.json holds each answer-deciding section's sha256, is hashed in `files`, and equals what the
    reader computes: from the typed manifest (runtime) and from the raw JSON (tests/manifest_corpus.py)."""
    from manifest_edits import contract_of
    raw = json.loads((artifact / "manifest.json").read_text())
    recorded = json.loads((artifact / "contract.json").read_text())
    assert "contract.json" in raw["files"]
    assert recorded == Manifest.from_json(raw).contract() == contract_of(raw)
    assert sorted(recorded) == ["engines", "graphs", "layout", "limits", "precisions", "tables"]


def test_a_forged_layout_beyond_the_graphs_vocabulary_is_refused_at_load(artifact, tmp_path):
    """contract.json re-forged to match: the load runs the backbone once on the layout's highest tokens, so
    the Gather beyond the embedding is one ArtifactError here, not a raw ONNX Runtime error at the first request."""
    bad = _forged_layout(artifact, tmp_path, +1)
    for verify in (True, False):
        with pytest.raises(ArtifactError, match=r"manifest.json's layout \(tokens up to \d+\) does not fit the backbone "
                                                r"graph: graph backbone failed in ONNX Runtime: .*Gather"):
            Recommender.load(bad, verify=verify)
    out = subprocess.run([sys.executable, "-m", "nezha.cli", "recommend", str(bad), "--history", "100"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr    # ONNX Runtime's own log silenced
    assert "does not fit the backbone graph" in out.stderr
