"""What a build may replace (docs/build.md): a folder or artifact that appears at --out meanwhile, files added
to the old artifact, folders only like an artifact, a kill anywhere on the rename fallback, cleaning and
publishing that keep what is not theirs and name it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import re
import textwrap
from contextlib import nullcontext
from pathlib import Path

import pytest

from nezha.export.build import build
from nezha.export.staging import _discard, artifact_problem, check_output, clean_stale, publish, staging
from nezha.runtime.artifact import Artifact
from nezha.runtime.errors import ArtifactError, InputError
from build_safety_helpers import QUICK, _leftovers, inputs  # noqa: F401


# ---------------------------------------------------------------- what may be replaced (docs/build.md)
@pytest.fixture(scope="module")
def artifacts(inputs, tmp_path_factory):
    """Two finished artifacts told apart by their max_batch: 'old' (2) and 'new' (3)."""
    ckpt, index = inputs
    root = tmp_path_factory.mktemp("artifacts")
    return {name: build(ckpt, index, root / name, **{**QUICK, "max_batch": b}).out for name, b in (("old", 2), ("new", 3))}


def _max_batch(folder: Path) -> int:
    return Artifact.open(folder).manifest.limits.max_batch


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_created_at_out_during_the_build_is_never_replaced(inputs, tmp_path, force):
    ckpt, index = inputs
    out = tmp_path / "o"

    def log(*a, **k):                  # a user makes --out while the build runs (issue 20, case 1)
        if str(a[0]).startswith("[1/"):
            out.mkdir()
            (out / "thesis.txt").write_text("work")
    with pytest.raises(InputError, match="appeared while this build ran" + (".*thesis.txt" if force else "")):
        build(ckpt, index, out, **{**QUICK, "force": force, "log": log})
    assert (out / "thesis.txt").read_text() == "work" and [p.name for p in out.iterdir()] == ["thesis.txt"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_an_artifact_that_appears_at_out_meanwhile_is_replaced_only_with_force(artifacts, tmp_path, force):
    out = tmp_path / "o"
    with pytest.raises(InputError, match="appeared while this build ran") if not force else nullcontext():
        with staging(out, force) as tmp:
            shutil.copytree(artifacts["new"], tmp, dirs_exist_ok=True)
            shutil.copytree(artifacts["old"], out)
    assert _max_batch(out) == (3 if force else 2) and _leftovers(tmp_path) == []


def test_files_added_to_the_old_artifact_during_a_forced_build_are_kept(artifacts, tmp_path):
    out = shutil.copytree(artifacts["old"], tmp_path / "o")
    with pytest.raises(InputError, match=r"files manifest.json does not list: notes.txt.*refusing to replace"):
        with staging(out, force=True) as tmp:
            shutil.copytree(artifacts["new"], tmp, dirs_exist_ok=True)
            (out / "notes.txt").write_text("mine")
    assert (out / "notes.txt").read_text() == "mine" and _leftovers(tmp_path) == []
    (out / "notes.txt").unlink()
    assert _max_batch(out) == 2


def _folder_like_an_artifact(artifact: Path, tmp_path: Path, case: str) -> Path:
    folder = tmp_path / "o"
    if case == "format line only":                            # issue 20, case 3
        folder.mkdir()
        (folder / "manifest.json").write_text('{"format": "nezha-artifact"}')
    else:
        shutil.copytree(artifact, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if case == "an unlisted file":
        (folder / "graphs" / "thesis.txt").write_text("work")
    elif case == "a link":
        (folder / "thesis.txt").symlink_to(tmp_path)
    elif case == "a FIFO":
        os.mkfifo(folder / "thesis.txt")
    elif case == "a duplicate key":
        (folder / "manifest.json").write_text(json.dumps(manifest)[:-1] + ', "files": {}}')
    elif case == "a manifest the current format refuses":
        manifest["layout"]["codes"] = "many"
        (folder / "manifest.json").write_text(json.dumps(manifest))
    elif case == "another version":                            # an older artifact is still ours to replace
        (folder / "manifest.json").write_text(json.dumps({**manifest, "version": 1, "layout": None}))
    return folder


@pytest.mark.parametrize("case, problem", [
    ("format line only", "no files object .*; files manifest.json does not list: manifest.json, thesis.txt$"),
    ("an unlisted file", "^files manifest.json does not list: graphs/thesis.txt$"),
    ("a link", "^files manifest.json does not list: thesis.txt$"),
    ("a FIFO", "^files manifest.json does not list: thesis.txt$"),
    ("a duplicate key", "key 'files' appears twice.*does not list: "),
    ("a manifest the current format refuses", "layout.codes.*does not list: "),
    ("another version", None),
    ("the artifact", None),
])
def test_force_replaces_only_a_folder_its_manifest_fully_lists(artifacts, tmp_path, case, problem):
    folder = _folder_like_an_artifact(artifacts["old"], tmp_path, case)
    if case == "format line only":
        (folder / "thesis.txt").write_text("work")
    if problem is None:
        assert artifact_problem(folder) is None
        check_output(folder, True, {})
        return
    assert re.search(problem, artifact_problem(folder))
    with pytest.raises(InputError, match="is not a nezha artifact this build can replace"):
        check_output(folder, True, {})


# ---------------------------------------------------------------- kills on the rename fallback path
KILL_ON_FALLBACK = textwrap.dedent("""
    import os, shutil, sys
    from pathlib import Path
    from nezha.export import staging
    new, out, point = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    staging.exchange = lambda a, b: False                    # renameat2(RENAME_EXCHANGE) missing
    renames, rename, rmtree = [], os.rename, shutil.rmtree
    def rename_or_die(a, b):
        renames.append(b)
        if point == ("first", "second")[len(renames) - 1 if len(renames) <= 2 else 0]:
            os._exit(9)                                      # killed just before this rename
        rename(a, b)
    def rmtree_or_die(path, **kw):
        if ".old-" in str(path) and point in ("discard", "mid-discard"):
            if point == "mid-discard":                       # killed with the old artifact half deleted
                os.remove(next(Path(path).rglob("*.onnx")))
            os._exit(9)
        rmtree(path, **kw)
    staging.os.rename, staging.shutil.rmtree = rename_or_die, rmtree_or_die
    with staging.staging(out, force=True) as tmp:
        shutil.copytree(new, tmp, dirs_exist_ok=True)
""")


@pytest.mark.parametrize("point", ["first", "second", "discard", "mid-discard"])
def test_a_kill_anywhere_on_the_rename_fallback_path_loses_no_artifact(inputs, artifacts, tmp_path, point):
    """Kill before the first rename, between the two, before and during the old artifact's removal: --out
    loads, or it is missing and the old artifact is complete beside it; the next build, even one that
    fails on a bad checkpoint, keeps every complete artifact while --out has none, and says so."""
    ckpt, index = inputs
    out = shutil.copytree(artifacts["old"], tmp_path / "o")
    proc = subprocess.run([sys.executable, "-c", KILL_ON_FALLBACK, str(artifacts["new"]), str(out), point],
                          capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    if point == "second":
        assert not out.exists()
        (old,) = tmp_path.glob(".o.old-*/o")
        assert _max_batch(old) == 2                                          # recoverable
    else:
        assert _max_batch(out) == (2 if point == "first" else 3)
    bad = shutil.copytree(ckpt, tmp_path / "bad-ckpt")
    (bad / "config.json").write_text('{"model_type": ["qwen3"]}')
    lines = []
    with pytest.raises(ArtifactError, match="model_type"):
        build(bad, index, out, **{**QUICK, "force": True, "log": lambda *a, **k: lines.append(str(a[0]))})
    if point == "second":                                                    # both complete ones are kept
        assert len(_leftovers(tmp_path)) == 2 and _max_batch(next(tmp_path.glob(".o.old-*/o"))) == 2
        assert _max_batch(next(tmp_path.glob(".o.building-*"))) == 3
        assert sum(line.startswith("kept ") and "move it to" in line for line in lines) == 2
        shutil.move(next(tmp_path.glob(".o.old-*/o")), out)                  # what the message says to do
        assert clean_stale(out) and _leftovers(tmp_path) == []
    else:
        assert _leftovers(tmp_path) == [] and any("left by a build that was killed" in line for line in lines)
    assert _max_batch(out) in (2, 3)


def test_cleaning_keeps_a_complete_artifact_while_out_is_not_one_and_reads_names_literally(artifacts, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    out = tmp_path / "o[1]"
    kept = shutil.copytree(artifacts["old"], tmp_path / f".o[1].building-{dead}-a")
    unfinished = tmp_path / f".o[1].building-{dead}-b"
    (unfinished / "graphs").mkdir(parents=True)
    other = shutil.copytree(artifacts["old"], tmp_path / f".o1.building-{dead}-c")   # another --out's, matched by a glob
    out.mkdir()
    (out / "thesis.txt").write_text("work")                                  # --out is not an artifact
    lines = []
    assert clean_stale(out, lines.append) == [unfinished]
    assert kept.is_dir() and other.is_dir() and "kept " in lines[0] and "is not a complete artifact" in lines[0]
    shutil.rmtree(out)
    shutil.copytree(artifacts["new"], out)
    assert clean_stale(out, lines.append) == [kept] and other.is_dir()


def test_publish_puts_the_new_artifact_in_place_only_over_what_it_may_replace(artifacts, tmp_path):
    new, out = shutil.copytree(artifacts["new"], tmp_path / "new"), tmp_path / "out"
    out.mkdir()
    (out / "b").write_text("someone else's")
    for force in (False, True):
        with pytest.raises(InputError, match="appeared while this build ran"):
            publish(new, out, force=force, existed=False)
        assert (out / "b").read_text() == "someone else's"
    (out / "b").unlink()                                                     # an empty folder loses nothing
    publish(new, out, force=True, existed=False)
    assert _max_batch(out) == 3 and not new.exists() and _leftovers(tmp_path) == []


def test_what_changed_during_the_swap_is_kept_beside_out(artifacts, tmp_path):
    out = shutil.copytree(artifacts["new"], tmp_path / "o")
    container = tmp_path / ".o.old-1-x"
    replaced = shutil.copytree(artifacts["old"], container / "o")
    (replaced / "thesis.txt").write_text("work")               # written between the last check and the rename
    lines = []
    _discard(replaced, container, out, lines.append)
    (kept,) = tmp_path.glob("o.replaced-*/o")
    assert (kept / "thesis.txt").read_text() == "work" and not container.exists() and str(kept) in lines[0]


def test_cleaning_keeps_and_names_a_users_folder_named_like_a_leftover(artifacts, tmp_path):
    """Only the name matched a dead build's leftover: what a build never writes proves it is someone else's."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    out = shutil.copytree(artifacts["new"], tmp_path / "o")
    notes, draft = tmp_path / f".o.old-{dead}-notes", tmp_path / f".o.building-{dead}-x"
    (draft / "graphs").mkdir(parents=True)
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    (draft / "graphs" / "backbone.onnx").write_text("a build's")
    (draft / "draft.txt").write_text("mine")
    ours = tmp_path / f".o.old-{dead}-a"                                      # the old artifact moved aside
    shutil.copytree(artifacts["old"], ours / "o")
    lines = []
    assert clean_stale(out, lines.append) == [ours]
    assert (notes / "notes.txt").read_text() == "mine" and (draft / "draft.txt").read_text() == "mine"
    assert sum(f"kept {f}: named like a leftover of a killed build, but it holds what no build writes ({name})"
               in line for f, name in ((notes, "notes.txt"), (draft, "draft.txt")) for line in lines) == 2


def test_a_folder_appearing_between_the_fallback_renames_is_kept_and_the_old_artifact_named(artifacts, tmp_path,
                                                                                            monkeypatch):
    from nezha.export import staging as module
    new, out = shutil.copytree(artifacts["new"], tmp_path / "new"), shutil.copytree(artifacts["old"], tmp_path / "o")
    monkeypatch.setattr(module, "exchange", lambda a, b: False)               # renameat2(RENAME_EXCHANGE) missing
    rename = os.rename

    def rename_then_appear(a, b):
        rename(a, b)
        if Path(a) == out:                                                    # old moved aside: someone writes at --out
            out.mkdir()
            (out / "thesis.txt").write_text("work")
    monkeypatch.setattr(module.os, "rename", rename_then_appear)
    with pytest.raises(InputError) as e:
        publish(new, out, force=True, existed=True)
    monkeypatch.undo()
    (old,) = tmp_path.glob(".o.old-*/o")
    assert f"the previous artifact is in {old}: move it back" in str(e.value) and "as it was" not in str(e.value)
    assert (out / "thesis.txt").read_text() == "work" and _max_batch(old) == 2
