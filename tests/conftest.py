"""Shared fixtures: tiny NEZHA checkpoints made on the fly (a few hundred KB), one per architecture."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

# Ray reads this when it is imported (by whichever test module imports it first): every Ray node the tests
# start stays on 127.0.0.1 instead of the machine's interface address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

try:
    import nezha.runtime  # noqa: F401
except ImportError as e:         # the folders import as nezha.*: only the editable install maps them
    pytest.exit(f"nezha-deploy is not installed in this Python ({e}): run `make test`, or "
                "pip install -e '.[export,dev]' and then python -m pytest", returncode=4)

from nezha.runtime.catalog import Catalog
from nezha.runtime.data import DEFAULT_DATA, find_pair
from nezha.runtime.encoding import SidLayout

DATA = DEFAULT_DATA                               # the Beauty data the project carries (data/beauty)
BEAUTY_INDEX, BEAUTY_INTER = find_pair(DATA)
TINY_CODES = (8, 6, 5)


def tiny_layout() -> SidLayout:
    offsets = tuple(2 + sum(TINY_CODES[:i]) for i in range(len(TINY_CODES)))
    return SidLayout(TINY_CODES, offsets, placeholder_start=offsets[-1] + TINY_CODES[-1])


def tiny_catalog(n_items: int = 70, seed: int = 0) -> Catalog:
    """Random 3-level SIDs; items 0 and 1 share a SID (collisions exist in real data)."""
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, c, n_items) for c in TINY_CODES], axis=1)
    codes[1] = codes[0]
    return Catalog(np.arange(100, 100 + n_items), codes)


def tiny_model(architecture: str = "qwen3", seed: int = 0, use_mtp: bool = True):
    import torch

    from nezha.model.checkpoint import make_config
    from nezha.model.nezha import NezhaModel

    torch.manual_seed(seed)
    model = NezhaModel(make_config(tiny_layout(), architecture, hidden_size=32, num_layers=2, num_heads=4,
                                   num_kv_heads=2, use_mtp=use_mtp))
    with torch.no_grad():                      # larger head weights: sharper, less tie-prone scores
        for p in model.parameters():
            p.mul_(3.0 if p.ndim == 2 else 1.0)
    return model.eval()


@pytest.fixture
def catalog() -> Catalog:
    return tiny_catalog()


@pytest.fixture(params=["qwen3", "qwen2", "llama"])
def architecture(request) -> str:
    return request.param


@pytest.fixture
def make_checkpoint(tmp_path):
    """make_checkpoint(architecture='qwen3') -> folder of a tiny checkpoint in the public format (+ ava_sid)."""
    from nezha.model.checkpoint import save_checkpoint

    def make(architecture: str = "qwen3", seed: int = 0, name: str | None = None) -> Path:
        return save_checkpoint(tiny_model(architecture, seed), tmp_path / (name or f"ckpt-{architecture}-{seed}"),
                               tiny_catalog())
    return make


def tiny_histories(catalog: Catalog, n: int = 6, seed: int = 1) -> list[list[int]]:
    """Mixed lengths 1..9, from the catalog's items."""
    rng = np.random.default_rng(seed)
    return [rng.choice(catalog.item_ids, size=int(rng.integers(1, 10))).tolist() for _ in range(n)]


def write_index(catalog: Catalog, path: Path) -> Path:
    """The catalog as a LETTER-style *.index.json (item id -> ['<a_N>', '<b_N>', ...])."""
    return catalog.to_index_json(path)


def tiny_artifact(root: Path, precision=("fp32",), max_batch: int = 4, max_beam: int = 16) -> Path:
    """root/art: the tiny checkpoint (public format, saved to root/ckpt) built with --index, ONNX graphs only."""
    from nezha.export.build import build
    from nezha.model.checkpoint import save_checkpoint
    ckpt = save_checkpoint(tiny_model(), root / "ckpt", tiny_catalog())
    build(ckpt, write_index(tiny_catalog(), root / "tiny.index.json"), root / "art", precision=precision,
          backend=("onnxruntime",), max_batch=max_batch, max_beam=max_beam, log=None)
    return root / "art"


def tampered(artifact, tmp_path, edit=None, files=None, rehash=True):
    """A copy of ``artifact`` with ``files`` {path: bytes} replaced (re-hashed if ``rehash``) and the
    manifest JSON passed through ``edit``."""
    out = tmp_path / "art"
    shutil.copytree(artifact, out, symlinks=True)
    raw = json.loads((out / "manifest.json").read_text())
    for rel, data in (files or {}).items():
        (out / rel).write_bytes(data)
        if rehash:
            raw["files"][rel] = hashlib.sha256(data).hexdigest()
    if edit:
        edit(raw)
    (out / "manifest.json").write_text(json.dumps(raw))
    return out


def corrupted(artifact, tmp_path, rel):
    """A copy of ``artifact`` (tmp_path / "bad") whose file ``rel`` has its last byte changed, sha256 not updated."""
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    with open(bad / rel, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x7f")
    return bad


# ---- built once per session, shared by several test files; read-only (a test that changes one copies it first) ----

@pytest.fixture(scope="session")
def built_once(tmp_path_factory):
    """built_once(make) -> make(a fresh folder), run once per session for each function ``make``: the
    artifacts that several test files of one topic read (their helper modules define ``make``)."""
    cache = {}

    def get(make):
        if make not in cache:
            cache[make] = make(tmp_path_factory.mktemp(make.__name__.strip("_")))
        return cache[make]
    return get


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """The served artifacts of the serve tests (serve_fixtures._build, seeds 0 and 1): (first, second)."""
    from serve_fixtures import _build
    root = tmp_path_factory.mktemp("serve")
    return _build(root, 0), _build(root, 1)


@pytest.fixture(scope="session")
def library(artifacts):
    """The library's own answers on ``artifacts[0]``, what every served answer is compared with."""
    from nezha.runtime import Recommender
    with Recommender.load(artifacts[0], threads=1) as rec:
        yield rec
