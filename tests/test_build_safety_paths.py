"""The build never loses data: --out may not overlap an input, a forced rebuild replaces only an
artifact, the swap is atomic (a kill leaves a loadable artifact), stale staging folders of killed builds
are cleaned, bad paths fail before the slow export, and the artifact is readable by other users."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from nezha.export.build import build, main
from nezha.runtime import Recommender
from nezha.runtime.errors import ArtifactError, InputError
from build_safety_helpers import QUICK, _snapshot, inputs  # noqa: F401


@pytest.mark.parametrize("where", ["checkpoint", "inside checkpoint", "index", "parent of index"])
def test_out_over_an_input_is_refused_and_the_input_kept(inputs, tmp_path, where):
    ckpt, index = inputs
    out = {"checkpoint": ckpt, "inside checkpoint": ckpt / "art", "index": index, "parent of index": index.parent}[where]
    before = _snapshot(ckpt), index.read_bytes()
    with pytest.raises(InputError, match="overlaps the (checkpoint|item index)"):
        build(ckpt, index, out, force=True, **QUICK)
    assert (_snapshot(ckpt), index.read_bytes()) == before


def test_force_never_replaces_a_folder_that_is_not_an_artifact(inputs, tmp_path):
    ckpt, index = inputs
    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(InputError, match="not a nezha artifact .* refusing to replace it"):
        build(ckpt, index, mine, force=True, **QUICK)
    assert (mine / "thesis.txt").read_text() == "years of work"


def test_bad_paths_fail_before_the_export(inputs, tmp_path):
    ckpt, index = inputs
    lines = []
    with pytest.raises(InputError, match="cannot write the artifact beside /proc/x"):
        build(ckpt, index, "/proc/x/art", **{**QUICK, "log": lines.append})
    with pytest.raises(InputError, match="validation histories .* do not exist"):
        build(ckpt, index, tmp_path / "art", histories=tmp_path / "nope.inter.json", **QUICK)
    with pytest.raises(ArtifactError, match="item index .* does not exist"):
        build(ckpt, tmp_path / "nope.index.json", tmp_path / "art", **QUICK)
    assert not any(line.startswith("[") for line in lines)           # no step started
    assert not (tmp_path / "art").exists()


def test_cli_errors_are_one_line_and_exit_2(inputs, tmp_path, capsys):
    ckpt, index = inputs
    assert main(["--checkpoint", str(ckpt), "--index", str(index), "--out", str(ckpt), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nezha build: error: --out") and err.count("\n") == 1 and "Traceback" not in err


def test_artifact_is_readable_by_other_users(inputs, tmp_path):
    ckpt, index = inputs
    old = os.umask(0o022)
    try:
        out = build(ckpt, index, tmp_path / "art", **QUICK).out
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes["."] == 0o755 and modes["manifest.json"] == 0o644
    assert all(m == (0o755 if (out / p).is_dir() else 0o644) for p, m in modes.items()), modes


KILL_AFTER_SWAP = textwrap.dedent("""
    import os, sys
    from nezha.export import staging
    real = staging.exchange
    def exchange_then_die(a, b):
        assert real(a, b)
        os._exit(9)                                   # killed right after the swap, before the cleanup
    staging.exchange = exchange_then_die
    from nezha.export.build import build
    build(sys.argv[1], sys.argv[2], sys.argv[3], precision=("fp32", "fp16"), exporter="torchscript", max_batch=2,
          max_beam=4, force=True, log=None)
""")


def test_a_kill_during_the_swap_leaves_a_loadable_artifact_and_the_next_build_cleans_up(inputs, tmp_path):
    ckpt, index = inputs
    out = build(ckpt, index, tmp_path / "art", **QUICK).out                 # the old artifact: fp32 only
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_SWAP, str(ckpt), str(index), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    with Recommender.load(out, precision="fp16") as rec:                    # the new one is in place, whole
        assert rec.recommend([[100, 101]], k=2, beam=4)
    stale = [p.name for p in tmp_path.iterdir() if ".building-" in p.name]
    assert len(stale) == 1                                                   # the old artifact, left by the kill
    lines = []
    build(ckpt, index, out, **{**QUICK, "force": True, "log": lambda *a, **k: lines.append("".join(map(str, a)))})
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name or ".old-" in p.name]
    assert any("left by a build that was killed" in line for line in lines)


def test_a_live_builds_staging_folder_is_left_alone(inputs, tmp_path):
    ckpt, index = inputs
    live = tmp_path / f".art.building-{os.getppid()}-abc"                     # the test runner's parent: alive
    live.mkdir()
    build(ckpt, index, tmp_path / "art", **QUICK)
    assert live.is_dir()


def test_force_needs_a_real_artifact_and_out_is_no_link(inputs, tmp_path):
    ckpt, index = inputs
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "my web app"}')       # a manifest, but not ours
    (webapp / "index.html").write_text("<html>")
    with pytest.raises(InputError, match="not a nezha artifact"):
        build(ckpt, index, webapp, force=True, **QUICK)
    assert (webapp / "index.html").read_text() == "<html>"
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    with pytest.raises(InputError, match="is a symbolic link"):
        build(ckpt, index, tmp_path / "link", force=True, **QUICK)


def test_absurd_limits_and_opsets_fail_before_the_export(inputs, tmp_path):
    ckpt, index = inputs
    lines = []
    with pytest.raises(InputError, match="would need .* GiB at its largest shape"):
        build(ckpt, index, tmp_path / "art", **{**QUICK, "max_beam": 10 ** 11, "log": lambda *a, **k: lines.append(a[0])})
    assert [line for line in lines if line.startswith("[")] == ["[1/6] model_from_checkpoint ..."]
    with pytest.raises(InputError, match="opset must be an integer in 18.."):
        build(ckpt, index, tmp_path / "art", **{**QUICK, "opset": 1})
