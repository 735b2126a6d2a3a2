"""What the calibration tests share: the tiny graphs' history limit and an interactions file."""

from __future__ import annotations

import json
from pathlib import Path


MAX_HISTORY = 10


def write_interactions(path: Path, users: dict) -> Path:
    path.write_text(json.dumps(users))
    return path
