"""What the build-safety tests share: quick build options, a tiny checkpoint and item index (made once per
session; the tests check they stay unchanged), a folder's bytes and a build's leftovers."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_catalog, tiny_model, write_index
from nezha.model.checkpoint import save_checkpoint


QUICK = dict(precision=("fp32",), exporter="torchscript", max_batch=2, max_beam=4, log=None)


def _inputs(root):
    ckpt = save_checkpoint(tiny_model(), root / "ckpt", tiny_catalog())
    return ckpt, write_index(tiny_catalog(), root / "tiny.index.json")


@pytest.fixture(scope="module")
def inputs(built_once):
    return built_once(_inputs)


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".building-" in p.name or ".old-" in p.name)
