"""Atomic renames for swapping a finished artifact into place: Linux ``renameat2`` with RENAME_EXCHANGE
(swap two paths) and RENAME_NOREPLACE (move only where nothing is), through ctypes; where the call or the
flag is missing (another OS, a file system that cannot), the caller falls back (export/staging.py)."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2; False where the call or the flag is not available, OSError for other failures."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False                          # EINVAL / ENOSYS / EOPNOTSUPP: the file system cannot exchange
    raise OSError(err, os.strerror(err), str(b))


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (RENAME_EXCHANGE); False where that is not available."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def rename_new(a: Path, b: Path) -> bool:
    """Put ``a`` at ``b`` if nothing is there (RENAME_NOREPLACE; a plain rename where that is missing,
    which replaces at most an empty folder); False if something is."""
    try:
        if _renameat2(a, b, _RENAME_NOREPLACE):
            return True
        if os.path.lexists(b):
            return False
        os.rename(a, b)
        return True
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            return False
        raise
