"""A hostile artifact folder's files get one clear ArtifactError naming the file and the problem: tables that
break their entry or invariants, a graph file that is another graph or that ONNX Runtime cannot open, files
the manifest does not list, modified or missing files, a graph that fails while running.

Each case copies a real artifact, changes one thing (re-hashing what it changed, so that the check under
test is the one that must catch it) and loads it."""

from __future__ import annotations


import numpy as np
import pytest

from conftest import tampered
from nezha.runtime import Recommender
from nezha.runtime.errors import ArtifactError

from artifact_helpers import _forged_layout, _npy, _table, artifact  # noqa: F401


def _rows(artifact, name, change):
    a = _table(artifact, name).copy()
    change(a)
    return {f"tables/{name}.npy": _npy(a)}


TABLE_CASES = {
    "dtype": (lambda art: {"tables/item_ids.npy": _npy(_table(art, "item_ids").astype(np.int32))}, "holds <i4"),
    "big-endian": (lambda art: {"tables/sid_keys.npy": _npy(_table(art, "sid_keys").astype(">u8"))}, "holds >u8"),
    "fortran order": (lambda art: {"tables/item_codes.npy": _npy(_table(art, "item_codes"), fortran=True)}, "Fortran"),
    "object array": (lambda art: {"tables/item_ids.npy": _npy(np.array([1, "a"], dtype=object))}, "holds \\|O"),
    "truncated": (lambda art: {"tables/sid_items.npy": _npy(_table(art, "sid_items"))[:-8]}, "truncated or padded"),
    "padded": (lambda art: {"tables/sid_items.npy": _npy(_table(art, "sid_items")) + b"\0" * 8}, "truncated or padded"),
    "not npy": (lambda art: {"tables/sid_items.npy": b"hello"}, "table sid_items"),
    "ids not ascending": (lambda art: _rows(art, "item_ids", lambda a: a.__setitem__(slice(0, 2), a[1::-1])),
                          "item_ids are not strictly ascending"),
    "code out of range": (lambda art: _rows(art, "item_codes", lambda a: a.__setitem__((0, 0), 99)),
                          "item_codes hold a code outside"),
    "offsets": (lambda art: _rows(art, "sid_offsets", lambda a: a.__setitem__(-1, a[-1] - 1)), "sid_offsets must rise"),
    "keys not ascending": (lambda art: _rows(art, "valid_prefixes_1", lambda a: a.__setitem__(slice(0, 2), a[1::-1])),
                           "valid_prefixes_1 are not the sorted keys"),
    "prefix missing": (lambda art: _rows(art, "valid_prefixes_1", lambda a: a.__setitem__(-1, a[-1] + 1)),
                       "valid_prefixes_1 are not the sorted keys"),
    "unknown sid item": (lambda art: _rows(art, "sid_items", lambda a: a.__setitem__(0, 10 ** 9)),
                         "not the item ids, each once"),
    "duplicate sid item": (lambda art: _rows(art, "sid_items", lambda a: a.__setitem__(0, a[1])), "each once"),
    "items of two SIDs swapped": (lambda art: _rows(art, "sid_items", lambda a: a.__setitem__([0, -1], a[[-1, 0]])),
                                  "another SID than their row's key"),
    "codes of an item changed": (lambda art: _rows(art, "item_codes", lambda a: a.__setitem__((5, 2), (a[5, 2] + 1) % 5)),
                                 "another SID"),
}


@pytest.mark.parametrize("case", TABLE_CASES)
def test_tables_that_break_their_entry_or_invariants_are_refused(artifact, tmp_path, case):
    make, message = TABLE_CASES[case]
    bad = tampered(artifact, tmp_path, files=make(artifact))
    with pytest.raises(ArtifactError, match=message):
        Recommender.load(bad)


def _graph_bytes(artifact, rel, edit) -> bytes:
    import onnx
    proto = onnx.load(str(artifact / rel))
    edit(proto)
    return proto.SerializeToString()


def _described_as_head_2(proto):
    proto.doc_string = "nezha-deploy graph head_2"


def _parents_dim_renamed(proto):
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "beams"


@pytest.mark.parametrize("edit, message", [
    (_described_as_head_2, r"says it is 'nezha-deploy graph head_2', the manifest uses it as 'head_1'"),
    (_parents_dim_renamed, r"the graph's inputs .*'beams', 32.* differ from the manifest's"),
])
def test_a_graph_file_that_is_another_graph_is_refused_at_load(artifact, tmp_path, edit, message):
    """Two heads of one interface (a swapped file) or a graph whose dynamic dims are not the manifest's
    (a head that would ignore `parent`): the loader reads what the graph says of itself. Rehashed, so
    only these checks stand between it and a wrong answer."""
    rel = "graphs/fp32/head_1.onnx"
    bad = tampered(artifact, tmp_path, files={rel: _graph_bytes(artifact, rel, edit)})
    with pytest.raises(ArtifactError, match=message):
        Recommender.load(bad)


def test_an_onnx_file_onnx_runtime_cannot_open_is_a_clear_error(artifact, tmp_path):
    bad = tampered(artifact, tmp_path, files={"graphs/fp32/head_1.onnx": b"\x08\x07garbage"})
    with pytest.raises(ArtifactError, match="head_1.onnx: ONNX Runtime cannot open this graph"):
        Recommender.load(bad)


def test_files_the_manifest_does_not_list_are_refused(artifact, tmp_path):
    """ONNX Runtime would read a graph's external data from any file beside it: every file must be hashed."""
    bad = tampered(artifact, tmp_path)
    (bad / "graphs" / "fp32" / "weights.bin").write_bytes(b"\0" * 64)
    for verify in (True, False):
        with pytest.raises(ArtifactError, match="graphs/fp32/weights.bin: a file the manifest does not list"):
            Recommender.load(bad, verify=verify)


def test_modified_or_missing_files_fail_verification_but_not_with_verify_off(artifact, tmp_path):
    bad = tampered(artifact, tmp_path, files={"validation.json": b"{}"}, rehash=False)
    with pytest.raises(ArtifactError, match="validation.json: sha256 mismatch"):
        Recommender.load(bad)
    Recommender.load(bad, verify=False).close()                  # the trusted hot-reload opt-out
    (bad / "validation.json").unlink()
    with pytest.raises(ArtifactError, match="validation.json: missing"):
        Recommender.load(bad)


def test_a_graph_that_fails_while_running_is_one_nezha_error(artifact, tmp_path, monkeypatch):
    """Past the load check, a backend's run failure is still one line (GraphRunError), never a RuntimeError."""
    from nezha.runtime.errors import GraphRunError
    from nezha.runtime.recommender import GraphRecommender
    monkeypatch.setattr(GraphRecommender, "_check_layout_fits_backbone", lambda self: None)
    with Recommender.load(_forged_layout(artifact, tmp_path, +1)) as rec:
        with pytest.raises(GraphRunError, match=r"^graph backbone failed in ONNX Runtime: [^\n]*idx=\d+ must be within"):
            rec.recommend([[100]], k=2)
