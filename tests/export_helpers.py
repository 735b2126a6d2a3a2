"""What the export tests share: the tiny graphs' limits, a tiny public-format checkpoint (qwen3) and the
leftovers of a build that did not finish."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_catalog, tiny_model
from nezha.model.checkpoint import save_checkpoint
from nezha.runtime.manifest import Limits


LIMITS = Limits(max_history=6, max_batch=8, max_beam=16, hidden_size=32)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".building-" in p.name or ".old-" in p.name)


@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(tiny_model("qwen3"), tmp_path / "ckpt", tiny_catalog())
