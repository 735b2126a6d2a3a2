"""nezha build's bad inputs and options: one clear error each and nothing left behind, options resolved
once, an output that needs --force, the help text and the progress output."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from nezha.export.build import build, main
from nezha.runtime.artifact import Artifact
from nezha.runtime.errors import ArtifactError, InputError, StepError
from export_helpers import _leftovers, checkpoint  # noqa: F401


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        build(tmp_path / "nope", None, tmp_path / "art", log=None)
    assert not (tmp_path / "art").exists() and _leftovers(tmp_path) == []


def test_wrong_index(tmp_path, checkpoint):
    index = tmp_path / "two_levels.index.json"
    index.write_text(json.dumps({"1": ["<a_1>", "<b_2>"], "2": ["<a_3>", "<b_4>"]}))
    with pytest.raises(ArtifactError, match="2-level SIDs, the model has 3 levels"):
        build(checkpoint, index, tmp_path / "art", log=None)
    with pytest.raises(ArtifactError, match="does not exist"):
        build(checkpoint, tmp_path / "missing.index.json", tmp_path / "art", log=None)
    assert not (tmp_path / "art").exists() and _leftovers(tmp_path) == []


def test_unsupported_precision(tmp_path, checkpoint, capsys):
    with pytest.raises(InputError, match="unsupported precision.*'bf16'.*allowed: fp32, fp16, int8"):
        build(checkpoint, None, tmp_path / "art", precision=("bf16",), log=None)
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "art"), "--precision", "bf16"])
    assert "invalid choice: 'bf16'" in capsys.readouterr().err
    assert not (tmp_path / "art").exists() and _leftovers(tmp_path) == []


BAD_OPTIONS = [  # every check of BuildOptions (export/options.py), through build(): one error, nothing written
    (dict(backend=("x",)), InputError, r"unsupported backend\(s\) \['x'\]; allowed: onnxruntime, tensorrt"),
    (dict(backend=()), InputError, r"unsupported backend\(s\) \(none\); allowed"),
    (dict(precision=()), InputError, r"unsupported precision\(s\) \(none\); allowed"),
    (dict(exporter="x"), InputError, "exporter 'x'; allowed: dynamo, torchscript"),
    (dict(max_batch=0), InputError, "max_batch must be a positive integer, got 0"),
    (dict(max_history=-1), InputError, "max_history must be a positive integer, got -1"),
    (dict(max_beam=2.0), InputError, "max_beam must be a positive integer, got 2.0"),
    (dict(validation_users=True), InputError, "validation_users must be a positive integer, got True"),
    (dict(opset="18"), InputError, r"opset must be an integer in 18\.\.\d+ .*got '18'"),
    (dict(precision=("int8",), calibration_size=3), "calibration", "calibration size 3 is too small: need at least 16"),
    (dict(precision=("int8",), calibration_method="kl"), "calibration", "calibration method 'kl'; allowed: minmax"),
    (dict(precision=("int8",), calibration_exclude=-1), "calibration", "calibration exclude must be a non-negative"),
]


@pytest.mark.parametrize("options,error,message", BAD_OPTIONS, ids=[next(iter(o)) + str(i) for i, (o, _, _) in
                                                                    enumerate(BAD_OPTIONS)])
def test_each_bad_option_is_one_clear_error(tmp_path, options, error, message):
    (tmp_path / "ckpt").mkdir()                       # the values are checked before any input is read
    with pytest.raises(InputError if error == "calibration" else error, match=message):
        build(tmp_path / "ckpt", None, tmp_path / "art", log=None, **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_options_are_resolved_once_and_int8_settings_checked_only_for_int8(tmp_path, capsys):
    from nezha.export.options import BuildOptions, check
    (tmp_path / "ckpt").mkdir()
    o = check(BuildOptions(tmp_path / "ckpt", None, "art", precision=["fp16", "fp32", "fp16"], backend=["onnxruntime"],
                           calibration_method="kl", calibration_size=0))
    assert (o.precision, o.backend, o.out) == (["fp32", "fp16"], ("onnxruntime",), Path("art").absolute())
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "art"), "--max-batch", "0"]) == 2
    assert capsys.readouterr().err == "nezha build: error: max_batch must be a positive integer, got 0\n"


def test_unwritable_output(tmp_path, checkpoint):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cannot write the artifact beside"):
        build(checkpoint, None, blocker / "art", log=None)
    if os.geteuid() != 0:                 # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(InputError, match="cannot write the artifact beside"):
            build(checkpoint, None, locked / "art", log=None)
    assert _leftovers(tmp_path) == []


def test_existing_output_needs_force(tmp_path, checkpoint, capsys):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("old")                                  # an old artifact: its manifest lists it
    (out / "manifest.json").write_text(json.dumps({"format": "nezha-artifact", "version": 1, "files": {
        "keep.txt": hashlib.sha256(b"old").hexdigest()}}))
    assert main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and (out / "keep.txt").read_text() == "old"
    summary = build(checkpoint, None, out, precision=("fp32",), exporter="torchscript", max_batch=4, max_beam=8,
                    force=True, log=None)
    assert not (out / "keep.txt").exists() and list(Artifact.open(out).manifest.precisions) == ["fp32"]
    assert summary.topk_agreement["fp32"] == 1.0 and _leftovers(tmp_path) == []


def test_failed_validation_leaves_nothing(tmp_path, checkpoint, monkeypatch):
    from nezha.export import validate
    monkeypatch.setitem(validate.TOLERANCES, "fp32", validate.Tolerance(0.0, 1.0))
    with pytest.raises(StepError, match="FAIL fp32 backbone.hidden"):
        build(checkpoint, None, tmp_path / "art", precision=("fp32",), exporter="torchscript", log=None)
    assert not (tmp_path / "art").exists() and _leftovers(tmp_path) == []


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ["--checkpoint", "--index", "--out", "--precision", "--backend", "--max-batch", "--max-history",
                   "--max-beam", "--opset", "--exporter", "--histories", "--validation-users", "--force"]:
        assert option in text


def test_progress_output(tmp_path, checkpoint):
    lines = []
    build(checkpoint, None, tmp_path / "art", precision=("fp32",), exporter="torchscript", max_batch=4,
          max_beam=8, log=lambda *a, **k: lines.append("".join(map(str, a))))
    steps = [line for line in lines if line.startswith("[")]
    assert steps[0] == "[1/6] model_from_checkpoint ..." and steps[-1] == "[6/6] load_with_runtime ..."
    assert all(line.endswith(" s") or line.startswith("    ") for line in lines if not line.startswith("["))
    assert any("no --index: item ids are positions 0..69 in ava_sid3.pt" in line for line in lines)
