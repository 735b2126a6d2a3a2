"""What the hostile-artifact tests share: a real tiny artifact (fp32, built once per session) to copy and
change, its tables as .npy bytes, and a copy whose SID layout is forged."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from conftest import tampered, tiny_catalog, tiny_model, write_index
from nezha.export.build import build
from nezha.model.checkpoint import save_checkpoint
from nezha.runtime.manifest import Manifest



def _hostile(root):
    ckpt = save_checkpoint(tiny_model(), root / "ckpt", tiny_catalog())
    return build(ckpt, write_index(tiny_catalog(), root / "tiny.index.json"), root / "art", precision=("fp32",),
                 max_batch=4, max_beam=16, log=None).out


@pytest.fixture(scope="module")
def artifact(built_once):
    return built_once(_hostile)


def _npy(array, fortran=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(array) if fortran else array, allow_pickle=True)
    return buf.getvalue()


def _table(artifact, name):
    return np.load(artifact / "tables" / f"{name}.npy")


def _forged_layout(artifact, tmp_path, shift):
    """A consistent forgery: layout offsets moved by ``shift``, contract.json recomputed and re-hashed."""
    def move(raw):
        raw["layout"].update(offsets=[o + shift for o in raw["layout"]["offsets"]],
                             placeholder_start=raw["layout"]["placeholder_start"] + shift)
    raw = json.loads((artifact / "manifest.json").read_text())
    move(raw)
    return tampered(artifact, tmp_path, move, files={"contract.json": json.dumps(Manifest.from_json(raw).contract()).encode()})
