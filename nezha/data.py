"""Moved to nezha.runtime.data (runtime/data.py); this name is kept only while open branches merge."""

from nezha.runtime.data import *  # noqa: F401,F403
from nezha.runtime.data import (  # noqa: F401
    DEFAULT_DATA,
    DataError,
    Split,
    find_pair,
    leave_one_out,
    read_interactions,
)
