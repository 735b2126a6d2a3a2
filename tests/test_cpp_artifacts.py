"""The C++ runtime reads artifacts as the Python runtime does: corrupt ones and graph files that are another
graph are refused with the reason, the default precision is the same whatever the JSON order, every case
of the conformance corpus (tests/manifest_corpus.py) gets the same verdict from both readers, and the
binding decodes any error message."""

from __future__ import annotations

import os

import pytest

from conftest import corrupted, tampered
from nezha.runtime import Recommender
from nezha.runtime.errors import NezhaError
from cpp_helpers import artifact, cpp, cpp_build  # noqa: F401


def test_corrupt_artifacts_are_refused_with_the_reason(cpp_build, artifact, tmp_path):
    from nezha.runtime.errors import ArtifactError                  # the class Python's loader raises
    bad = corrupted(artifact, tmp_path, "tables/sid_keys.npy")
    with pytest.raises(ArtifactError, match="sid_keys.npy: sha256 mismatch"):
        cpp(bad)
    with pytest.raises(ArtifactError, match="sid_keys.npy"):
        Recommender.load(bad)
    with pytest.raises(NezhaError, match="does not exist"):
        cpp(tmp_path / "missing")
    with pytest.raises(NezhaError, match="has no 'fp16' graphs"):
        cpp(artifact, "fp16")


@pytest.mark.parametrize("edit, message", [
    (lambda p: setattr(p, "doc_string", "nezha-deploy graph head_2"), "says it is 'nezha-deploy graph head_2'"),
    (lambda p: setattr(p.graph.input[0].type.tensor_type.shape.dim[0], "dim_param", "beams"),
     r"input parent_state has shape \[beams, 32\], the manifest's dims differ"),
])
def test_a_graph_file_that_is_another_graph_is_refused(cpp_build, artifact, tmp_path, edit, message):
    """As in Python (tests/test_artifact_files.py): a head file swapped for another of one interface, or whose
    dynamic dims are not the manifest's, is refused at load although its sha256 is listed."""
    import onnx
    from nezha.runtime.errors import ArtifactError
    rel = "graphs/fp32/head_1.onnx"
    proto = onnx.load(str(artifact / rel))
    edit(proto)
    with pytest.raises(ArtifactError, match=message):
        cpp(tampered(artifact, tmp_path, files={rel: proto.SerializeToString()}))


def test_default_precision_is_the_same_in_both_runtimes_whatever_the_json_order(cpp_build, artifact, tmp_path):
    """fp32 first if built, by rule: not the manifest's key order (Python) nor a sorted map's (C++)."""
    import json
    import shutil
    moved = tmp_path / "art"
    shutil.copytree(artifact, moved)
    raw = json.loads((moved / "manifest.json").read_text())
    for section in ("precisions", "graphs"):                  # int8-cpu's graphs named fp16: sorted keys put it
        raw[section] = {"fp16": raw[section]["int8-cpu"], "fp32": raw[section]["fp32"]}    # first, and so does JSON
    (moved / "manifest.json").write_text(json.dumps(raw))
    from manifest_edits import rebind
    rebind(moved)                                             # renamed on purpose: the contract follows
    with Recommender.load(moved, threads=1) as py, Recommender.load(moved, backend="cpp", threads=1) as cc:
        assert py.precision == cc.precision == "fp32"


# --- one conformance corpus, both readers ---------------------------------------------------------------

def _verdict(check, folder, verify) -> tuple[str, str]:
    """("ok", "") or ("refused", the one-line message); any other exception is a bug and fails the test."""
    try:
        check(folder, verify)
    except NezhaError as e:
        return "refused", str(e)
    return "ok", ""


def test_both_readers_give_every_corpus_case_the_same_verdict(cpp_build, artifact, tmp_path):
    """tests/manifest_corpus.py: good and bad manifests, contracts, tables and folders, each loaded by the
    Python loader and by the C++ loader (C ABI, through ctypes), with file hashing on and off."""
    from manifest_corpus import CASES, make_case
    from nezha.runtime.artifact import Artifact
    from nezha.runtime.backends.cpp import check_artifact
    python = lambda folder, verify: Artifact.open(folder, verify=verify).tables()
    rows = []
    for i, name in enumerate(CASES):
        folder = make_case(artifact, tmp_path / f"case{i}", name)
        want = CASES[name][0]
        for verify in (True, False):
            expected = ("refused" if verify else "ok") if want == "refused if verified" else want
            rows.append((name, verify, expected, _verdict(python, folder, verify), _verdict(check_artifact, folder, verify)))
    differ = [r for r in rows if not r[2] == r[3][0] == r[4][0]]
    print(f"\ncorpus: {len(CASES)} cases x verify on/off = {len(rows)} verdicts, "
          f"{sum(r[3][0] == r[4][0] for r in rows)} identical; {sum(r[2] == 'refused' for r in rows)} refusals")
    assert not differ, "\n".join(f"{n!r} verify={v}: expected {e}; Python {p}; C++ {c}" for n, v, e, p, c in differ)


def test_the_binding_decodes_any_error_message(cpp_build, artifact, tmp_path):
    """C messages carry bytes from the artifact (a Latin-1 byte nlohmann quotes, a folder name that is not
    UTF-8): decoded with replacement, never a UnicodeDecodeError."""
    from manifest_corpus import make_case
    from nezha.runtime.errors import ArtifactError
    with pytest.raises(ArtifactError, match="ill-formed UTF-8") as e:
        cpp(make_case(artifact, tmp_path / "latin1", "Latin-1 byte in a string"))
    assert "\ufffd" in str(e.value)
    with pytest.raises(ArtifactError, match="is not valid JSON") as e:
        cpp(make_case(artifact, tmp_path / "utf16", "UTF-16"))
    with pytest.raises(ArtifactError, match="does not exist") as e:
        cpp(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))           # a str holding a surrogate escape
    assert "caf\ufffd" in str(e.value)
