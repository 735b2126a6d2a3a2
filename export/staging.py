"""Where a build writes: a staging folder beside ``--out``, swapped into place atomically at the end.

* ``--out`` may not be, contain or lie inside an input (checkpoint, index, data): a forced rebuild
  would delete it. An existing ``--out`` is replaced only with ``force`` and only if it is an artifact
  (it has a manifest.json) or empty: a user's other folder is never deleted.
* The swap of a forced rebuild is one ``renameat2(RENAME_EXCHANGE)`` on Linux: at every instant
  ``--out`` is either the old artifact or the new one, even if the build is killed. Where the call is
  missing (other systems, some file systems) the old artifact is renamed aside first and a kill in
  that window leaves it in ``.<name>.old-<pid>-*`` beside ``--out``, which the next build cleans.
* Staging folders of killed builds (``.<name>.building-<pid>-*``, ``.<name>.old-<pid>-*``) are removed
  by the next build when their process is gone; a live build's are left alone.
* The artifact gets the usual permissions (folders 0777, files 0666, less the umask) so that a service
  running under another user can read it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from nezha.runtime.errors import NezhaError

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


class BuildError(NezhaError, ValueError):
    """A build that cannot start or finish: bad arguments, existing or unwritable output."""


def check_output(out: Path, force: bool, inputs: dict[str, Path | None]) -> None:
    """Refuse an ``out`` that overlaps an input, exists without ``force``, or is not an artifact."""
    real = Path(os.path.realpath(out))
    for what, path in inputs.items():
        if path is None:
            continue
        other = Path(os.path.realpath(path))
        if real == other or real in other.parents or other in real.parents:
            raise BuildError(f"--out {out} overlaps the {what} {path}: the build would replace its own input; "
                             "choose an output folder outside the inputs")
    if out.is_symlink():
        raise BuildError(f"--out {out} is a symbolic link: name the real folder (the artifact is swapped into place)")
    if not out.exists():
        return
    if not force:
        raise BuildError(f"output {out} exists; pass --force (force=True) to replace it")
    if not out.is_dir():
        raise BuildError(f"output {out} exists and is not a folder")
    if any(out.iterdir()) and not _is_artifact(out):
        raise BuildError(f"output {out} is a non-empty folder that is not a nezha artifact (no manifest.json of "
                         "format nezha-artifact): refusing to replace it")


def _is_artifact(folder: Path) -> bool:
    """A folder whose manifest.json says it is a nezha artifact (of any version: old ones may be rebuilt)."""
    try:
        with open(folder / "manifest.json", "rb") as f:
            head = json.loads(f.read(64 << 20))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(head, dict) and head.get("format") == "nezha-artifact"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove the staging folders of earlier builds of ``out`` whose process is gone; returns them."""
    removed = []
    for kind in ("building", "old"):
        for p in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = p.name[len(f".{out.name}.{kind}-"):].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


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


def rename_new(a: Path, b: Path, force: bool) -> None:
    """Put ``a`` at ``b``, which did not exist when the build started: RENAME_NOREPLACE, so a ``b`` that
    another build made meanwhile is never replaced without ``force``."""
    try:
        done = _renameat2(a, b, _RENAME_NOREPLACE)
    except FileExistsError:
        done = False
        if not force:
            raise BuildError(f"output {b} appeared while this build ran (another build?); pass --force to "
                             "replace it") from None
    if not done:
        if b.exists() and not force:
            raise BuildError(f"output {b} appeared while this build ran (another build?); pass --force to replace it")
        if not b.exists() or not exchange(a, b):
            os.rename(a, b)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publishable(folder: Path) -> None:
    """Folders 0777 and files 0666, less the umask (tempfile makes 0700 / 0600)."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


@contextmanager
def staging(out: Path, force: bool = False, log=None):
    """Yield an empty staging folder beside ``out``; on success put it at ``out`` (atomically replacing
    an old artifact), on any failure remove it. Fails early if ``out``'s folder is not writable."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for p in clean_stale(out):
            if log:
                log(f"removed {p.name}, left by a build that was killed")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise BuildError(f"cannot write the artifact beside {out}: {e.strerror or e} ({e.filename or out.parent})") from None
    try:
        yield tmp
        publishable(tmp)
        if not out.exists():
            rename_new(tmp, out, force)
        elif exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)              # tmp now holds the old artifact
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
