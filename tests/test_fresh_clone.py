"""A fresh machine is not this workspace: the demo works from the project's own files alone, and the data it
carries is checked on every read."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BEAUTY_INDEX, BEAUTY_INTER
from nezha.runtime.catalog import Catalog
from nezha.runtime.data import DEFAULT_DATA, find_pair, read_interactions
from nezha.runtime.errors import ArtifactError, InputError

ROOT = Path(__file__).resolve().parents[1]


def clone_of_this_tree(dest: Path) -> Path:
    """The files git would hand a new user (tracked and new unignored files, as they are now), copied into
    ``dest``, with a virtual environment whose packages come from this one (no download) and whose nezha
    package is the copy's own (an editable install of the copy)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    venv = dest / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "zz_parent_env.pth").write_text(next(p for p in sys.path if p.endswith("site-packages")) + "\n")
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "-e", str(dest)], check=True, capture_output=True)
    stamp = subprocess.run("cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1", shell=True, cwd=dest,
                           capture_output=True, text=True, check=True).stdout.strip()
    (venv / f".installed-{stamp}").touch()             # `make` sees its environment as made
    return dest


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("git") is None, reason="needs make and git")
def test_make_demo_works_from_a_clone_with_nothing_beside_it(tmp_path):
    clone = clone_of_this_tree(tmp_path / "lonely")
    assert not (clone.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("NEZHA_DATA", "PYTHONPATH")}
    run = subprocess.run(["make", "demo"], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    ranked = re.findall(r"^\s+\d+\s+item (\d+)\s+score (-?[\d.]+)$", run.stdout, re.M)
    assert len(ranked) == 10, run.stdout[-2000:]
    check = ("import json; from nezha.runtime import Recommender; import nezha.runtime.data as d; "
             "r = Recommender.load('artifacts/demo').recommend([[12, 55, 102]], k=10)[0]; "
             "print(json.dumps([d.DEFAULT_DATA.as_posix(), [i for i, _ in r]]))")
    out = subprocess.run([clone / ".venv" / "bin" / "python", "-c", check], cwd=clone, env=env, capture_output=True,
                         text=True, check=True).stdout
    data, items = __import__("json").loads(out)
    assert data == (clone / "data" / "beauty").as_posix()      # the copy's own data, not this tree's
    assert [int(i) for i, _ in ranked] == items


def test_the_carried_data_is_the_beauty_data_and_complete():
    assert DEFAULT_DATA == ROOT / "data" / "beauty" or "NEZHA_DATA" in os.environ
    assert (BEAUTY_INDEX.name, BEAUTY_INTER.name) == ("Beauty.index.json.gz", "Beauty.inter.json.gz")
    catalog = Catalog.from_index_json(BEAUTY_INDEX)
    assert catalog.item_codes.shape == (12101, 4)
    users = read_interactions(BEAUTY_INTER)
    assert len(users) == 22363 and sum(map(len, users.values())) == 198502


def _copy_data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(ROOT / "data" / "beauty", folder)
    return folder


def test_a_damaged_or_edited_data_file_is_refused(tmp_path):
    folder = _copy_data(tmp_path)
    index = folder / "Beauty.index.json.gz"
    edited = gzip.decompress(index.read_bytes()).replace(b'"<a_183>"', b'"<a_184>"', 1)
    index.write_bytes(gzip.compress(edited))
    with pytest.raises(ArtifactError, match="sha256 of its content differs"):
        Catalog.from_index_json(find_pair(folder)[0])
    inter = folder / "Beauty.inter.json.gz"
    inter.write_bytes(inter.read_bytes()[:1000])
    with pytest.raises(InputError, match="not a readable gzip file"):
        read_interactions(find_pair(folder)[1])
    inter.unlink()
    os.mkfifo(inter)                                   # never opened: reading a FIFO would wait forever
    with pytest.raises(InputError, match="not a regular file"):
        read_interactions(inter)


def test_plain_json_data_reads_the_same_and_nezha_data_points_elsewhere(tmp_path):
    folder = _copy_data(tmp_path)
    for gz in folder.glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    assert read_interactions(find_pair(folder)[1]) == read_interactions(BEAUTY_INTER)
    env = dict(os.environ, NEZHA_DATA=str(folder))
    shown = subprocess.run([sys.executable, "-c", "from nezha.runtime.data import DEFAULT_DATA; print(DEFAULT_DATA)"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert shown == str(folder)


def test_nothing_refers_to_the_workspace_beside_the_clone():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    hits = [name for name in listed if (ROOT / name).is_file() and name != "tests/test_fresh_clone.py"
            and b"../shared" in (ROOT / name).read_bytes()]
    assert hits == []


def test_no_tracked_file_is_a_symbolic_link():
    """A link committed from one workspace (a worktree's link to the main checkout's downloads) points
    nowhere, or at itself, in a clone: setup_ort.sh then fails on a fresh machine."""
    staged = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert [line.split("\t")[1] for line in staged.splitlines() if line.startswith("120000 ")] == []
