"""Where a build writes: a staging folder beside ``--out``, swapped into place at the end. The build
never deletes what it did not write; the rules, and why, are in docs/build.md.

* An existing ``--out`` is replaced only with ``force`` and only if it is empty or provably an artifact
  (``artifact_problem``: its manifest.json parses strictly and lists every file in the folder); the
  check runs again just before the swap, so what appeared or changed meanwhile is never swapped away.
* The swap is one ``renameat2(RENAME_EXCHANGE)`` on Linux (export/rename.py); where that is missing, two renames through
  ``.<name>.old-<pid>-*/<name>``.
* Leftovers of killed builds are cleaned by the next build (``clean_stale``), which never deletes the
  last complete artifact and logs every folder it removes or keeps.
* The artifact gets the usual permissions (folders 0777, files 0666, less the umask) so that a service
  running under another user can read it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from nezha.runtime.artifact import MANIFEST, MAX_MANIFEST_BYTES, umask
from nezha.runtime.catalog import read_json
from nezha.runtime.errors import ArtifactError, InputError
from nezha.runtime.manifest import FORMAT, VERSION, Manifest
from nezha.runtime.strict import relpath

from .rename import exchange, rename_new

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHOWN = 5                          # unknown files named in a refusal
# Every file a build writes into its staging folder: graphs, tables and engines in their folders, the three
# JSON files at the top, and _write_atomic's temporary files of them (".manifest.XXXX").
_BUILD_FILE = re.compile(r"(graphs|tables|engines)/.+|(manifest|contract|validation)\.json"
                         r"|\.(manifest|contract|validation)\.[^/]+")


def check_output(out: Path, force: bool, inputs: dict[str, Path | None]) -> None:
    """Refuse an ``out`` that overlaps an input, is a link, exists without ``force``, or is not an artifact."""
    real = Path(os.path.realpath(out))
    for what, path in inputs.items():
        if path is None:
            continue
        other = Path(os.path.realpath(path))
        if real == other or real in other.parents or other in real.parents:
            raise InputError(f"--out {out} overlaps the {what} {path}: the build would replace its own input; "
                             "choose an output folder outside the inputs")
    if out.is_symlink():
        raise InputError(f"--out {out} is a symbolic link: name the real folder (the artifact is swapped into place)")
    if os.path.lexists(out):
        problem = replace_problem(out, force)
        if problem:
            raise InputError(problem)


def replace_problem(out: Path, force: bool, appeared: bool = False) -> str | None:
    """Why the existing ``out`` may not be replaced, or None: it needs ``force`` and must be an empty
    folder or provably an artifact. ``appeared``: it was not there when the build started."""
    when = " appeared while this build ran" if appeared else " exists"
    if not force:
        return f"output {out}{when}; pass --force (force=True) to replace it"
    if out.is_symlink() or not out.is_dir():
        return f"output {out}{when} and is not a folder: refusing to replace it"
    problem = artifact_problem(out)
    if problem and not _empty(out):
        return f"output {out}{when} and is not a nezha artifact this build can replace ({problem}): refusing to replace it"
    return None


def _empty(folder: Path) -> bool:
    try:
        return not any(folder.iterdir())
    except OSError:                                        # unreadable: its content is unknown
        return False


def artifact_problem(folder: Path, complete: bool = False) -> str | None:
    """None if ``folder`` is provably an artifact a build wrote: manifest.json is a regular file that
    parses strictly (the current format through Manifest.from_json; an older or newer one needs format
    nezha-artifact and a ``files`` object {path: sha256}), every other entry below the folder is a
    folder or a regular file that ``files`` lists, and (``complete``) every listed file is there.
    Otherwise a short reason naming the unknown files. Nothing is hashed: the names prove the build
    wrote the folder; ``Artifact.open`` proves its content."""
    reason, listed = _listed_files(folder)
    found, unknown = set(), []
    # an unreadable folder is unknown content, never skipped
    for root, dirs, files in os.walk(folder, onerror=lambda e: unknown.append(os.path.relpath(e.filename, folder))):
        for name in sorted(dirs + files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISREG(mode) and rel in listed:
                found.add(rel)
            elif not stat.S_ISDIR(mode):                  # unlisted files, links, FIFOs, sockets, devices
                unknown.append(rel)
    problems = [reason] if reason else []
    if unknown:
        problems.append(f"files {MANIFEST} does not list: " + ", ".join(unknown[:_SHOWN])
                        + (f" and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else ""))
    missing = sorted(set(listed) - found)
    if complete and missing and not problems:
        problems.append(f"incomplete: {missing[0]} is missing" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return "; ".join(problems) or None


def _listed_files(folder: Path) -> tuple[str | None, set[str]]:
    """(None, the paths manifest.json lists, itself included) or (why it proves nothing, empty set)."""
    manifest = folder / MANIFEST
    try:
        raw = read_json(manifest, MANIFEST, ArtifactError, MAX_MANIFEST_BYTES)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            return f"{MANIFEST} is not of format {FORMAT}", set()
        listed = raw.get("files")
        if not isinstance(listed, dict) or not all(isinstance(h, str) and _SHA256.fullmatch(h) for h in listed.values()):
            return f"{MANIFEST} has no files object of sha256 digests", set()
        for rel in listed:
            relpath(rel, f"files.{rel}")
        if raw.get("version") == VERSION:
            Manifest.from_json(raw)
    except ArtifactError as e:
        return str(e).replace(f"{MANIFEST} {manifest}", MANIFEST), set()
    return None, set(listed) | {MANIFEST}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(out: Path) -> list[tuple[Path, str]]:
    """(folder, kind) for each staging folder of ``out`` whose build process is gone. Names are matched
    as plain prefixes, never as glob patterns (an --out called ``a[1]`` must not match ``a1``)."""
    found = []
    try:
        entries = sorted(os.scandir(out.parent), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    for entry in entries:
        for kind in ("building", "old"):
            prefix = f".{out.name}.{kind}-"
            pid = entry.name[len(prefix):].split("-")[0]
            if (entry.name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid()
                    and entry.is_dir(follow_symlinks=False) and not _alive(int(pid))):
                found.append((Path(entry.path), kind))
    return found


def _not_written_by_a_build(folder: Path, kind: str, out: Path) -> list[str]:
    """What in a leftover-named ``folder`` no build writes (empty: the build may delete it). A staging
    folder holds only files a build writes (_BUILD_FILE); an aside folder only ``out``'s name, holding the
    same. A user's ``.o.old-999999-notes/notes.txt`` matches the name, never the content."""
    if kind == "old":
        others = [e.name for e in os.scandir(folder) if e.name != out.name]
        if others or not (folder / out.name).exists():
            return others
        folder = folder / out.name
    unknown = []
    for root, dirs, files in os.walk(folder, onerror=lambda e: unknown.append(os.path.relpath(e.filename, folder))):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if not _BUILD_FILE.fullmatch(rel) or not os.path.isfile(os.path.join(root, name)):
                unknown.append(rel)
    return unknown


def clean_stale(out: Path, log=None) -> list[Path]:
    """Remove what killed builds of ``out`` left beside it, except the last complete artifact and anything
    no build writes; returns the folders removed. A complete artifact left there (the old one renamed
    aside, or a new one not yet moved) is removed only while ``out`` is itself a complete artifact;
    otherwise it is kept and logged. A folder named like a leftover that holds other files is kept and named."""
    say = log or (lambda *a, **k: None)
    out_complete = out.is_dir() and not out.is_symlink() and artifact_problem(out, complete=True) is None
    removed = []
    for folder, kind in _stale(out):
        unknown = _not_written_by_a_build(folder, kind, out)
        if unknown:
            say(f"kept {folder}: named like a leftover of a killed build, but it holds what no build writes ("
                + ", ".join(unknown[:_SHOWN]) + (f" and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else "")
                + "); delete it yourself if it is not yours")
            continue
        artifact = folder if kind == "building" else folder / out.name
        complete = artifact.is_dir() and artifact_problem(artifact, complete=True) is None
        if complete and not out_complete:
            say(f"kept {artifact}: a complete artifact a killed build left, and {out} is "
                f"{'not a complete artifact' if os.path.lexists(out) else 'missing'}: move it to {out} to use it, "
                "or delete it")
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        say(f"removed {folder.name}, left by a build that was killed"
            + (f" (a complete artifact; {out.name} holds a complete one)" if complete else ""))
    return removed


def _discard(replaced: Path, container: Path, out: Path, log) -> None:
    """Delete ``container``, which holds ``replaced`` (what was at ``out`` before the swap), after checking
    once more that it is an artifact or empty; anything else (changed during the swap) is kept beside
    ``out`` and logged. Never raises: the new artifact is in place."""
    say = log or (lambda *a, **k: None)
    try:
        if artifact_problem(replaced) is None or _empty(replaced):
            shutil.rmtree(container, ignore_errors=True)
            return
        kept = Path(tempfile.mkdtemp(prefix=f"{out.name}.replaced-", dir=out.parent))
        os.rename(replaced, kept / out.name)
        shutil.rmtree(container, ignore_errors=True)
        say(f"{out} changed while the build replaced it; what was there is kept in {kept / out.name}")
    except OSError as e:
        say(f"the previous content of {out} is left in {container} ({e.strerror or e})")


def publish(tmp: Path, out: Path, force: bool, existed: bool, log=None) -> None:
    """Put the finished staging folder ``tmp`` at ``out``, or raise InputError leaving ``out`` as it was
    (``existed``: ``out`` was there when the build started). On return ``tmp`` is gone."""
    try:
        if not os.path.lexists(out) and rename_new(tmp, out):
            return
        problem = replace_problem(out, force, appeared=not existed)
        if problem:
            raise InputError(problem + "; the new artifact was not kept")
        if exchange(tmp, out):
            _discard(tmp, tmp, out, log)                  # tmp now holds what was at out
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.rename(out, old / out.name)
        try:
            os.rename(tmp, out)
        except OSError as e:
            try:
                os.rename(old / out.name, out)             # put the old artifact back before failing
            except OSError:                                # something took its place at out meanwhile
                raise InputError(f"cannot move the new artifact to {out}: {e.strerror or e}; something appeared "
                                 f"there while the build replaced it, and the previous artifact is in "
                                 f"{old / out.name}: move it back to use it") from None
            old.rmdir()
            raise
    except OSError as e:
        raise InputError(f"cannot move the new artifact to {out}: {e.strerror or e}; {out} is as it was") from None
    _discard(old / out.name, old, out, log)


def publishable(folder: Path) -> None:
    """Folders 0777 and files 0666, less the umask (tempfile makes 0700 / 0600)."""
    mask = umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


@contextmanager
def staging(out: Path, force: bool = False, log=None):
    """Yield an empty staging folder beside ``out``; on success put it at ``out`` (``publish``), on any
    failure remove it. Fails early if ``out``'s folder is not writable."""
    existed = os.path.lexists(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out, log)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise InputError(f"cannot write the artifact beside {out}: {e.strerror or e} ({e.filename or out.parent})") from None
    try:
        yield tmp
        publishable(tmp)
        publish(tmp, out, force, existed, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)             # publish raises only before any swap
        raise
