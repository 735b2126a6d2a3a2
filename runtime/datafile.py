"""Reading a data file (an item index, interactions, a config) as text: plain or gzipped, regular files only,
bounded in size, and checked against a SHA256SUMS file beside it when there is one."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import zlib
from pathlib import Path

CHECKSUMS = "SHA256SUMS"
MAX_TEXT_BYTES = 1 << 30          # 1 GiB, after decompression: a gzip bomb stops here, not in the OOM killer
MAX_CHECKSUMS_BYTES = 1 << 20
_SUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](\S(?:.*\S)?)$")     # sha256sum's text and binary modes


def regular_file(path: str | Path, what: str, error: type[Exception]) -> os.stat_result:
    """``path``'s stat if it is a regular file (a link to one is fine), else ``error``: a folder, FIFO or
    device is refused from its stat, never opened (opening a FIFO waits for a writer)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        raise error(f"{what} {path} is {kind}, not a regular file")
    return st


def read_regular_file(path: str | Path, what: str, error: type[Exception], max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file (see ``regular_file``), at most ``max_bytes``."""
    st = regular_file(path, what, error)
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(f"{what} {path} is {st.st_size} bytes; at most {max_bytes} are read")
    try:
        # O_NONBLOCK: a FIFO put there after the stat is not waited on; fstat then refuses it
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise error(f"{what} {path} changed into something that is not a regular file while read")
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{what} {path} cannot be read: {e.strerror}") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise error(f"{what} {path} grew past {max_bytes} bytes while read")
    return data


def _gunzip(raw: bytes, path: Path, what: str, error: type[Exception], limit: int) -> bytes:
    """Every gzip member of ``raw``, refusing more than ``limit`` bytes of output."""
    out, rest = [], raw
    try:
        while rest:
            z = zlib.decompressobj(wbits=31)
            out.append(z.decompress(rest, limit + 1 - sum(map(len, out))))
            if sum(map(len, out)) > limit or z.unconsumed_tail:
                raise error(f"{what} {path} expands to more than {limit} bytes")
            if not z.eof:
                raise error(f"{what} {path} is not a readable gzip file: it ends inside a compressed stream")
            rest = z.unused_data.lstrip(b"\0")       # zero padding after the last member, as gzip -d allows
    except zlib.error as e:
        raise error(f"{what} {path} is not a readable gzip file: {e}") from None
    return b"".join(out)


def checksums(folder: Path, error: type[Exception]) -> dict[str, str]:
    """{file name: lower-case sha256} from ``folder``/SHA256SUMS ({} without one). Every non-empty line must be
    ``<64 hex>  <name>`` (or `` *<name>``); a name listed twice with two sums is refused."""
    sums = folder / CHECKSUMS
    if not sums.exists() and not sums.is_symlink():
        return {}
    text = read_regular_file(sums, "checksum file", error, MAX_CHECKSUMS_BYTES).decode("utf-8", errors="replace")
    table: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _SUM_LINE.match(line.rstrip("\r"))
        if match is None:
            raise error(f"checksum file {sums} line {number}: expected '<64 hex digits>  <file name>' "
                        f"(sha256sum's format), got {line[:80]!r}")
        digest, name = match.group(1).lower(), match.group(2)
        if table.setdefault(name, digest) != digest:
            raise error(f"checksum file {sums} line {number}: {name} is listed twice with different sums")
    return table


def read_bytes(path: str | Path, what: str, error: type[Exception], max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``path``, gunzipped if it ends in .gz (both at most ``max_bytes``, default
    MAX_TEXT_BYTES). Where the folder's SHA256SUMS lists the file (as stored, or its uncompressed name), the
    bytes must match: a damaged or edited copy is refused."""
    path, limit = Path(path), max_bytes or MAX_TEXT_BYTES
    raw = read_regular_file(path, what, error, limit)
    data = _gunzip(raw, path, what, error, limit) if path.suffix == ".gz" else raw
    expected = checksums(path.parent, error)
    for name, content in ((path.name, raw), (path.name.removesuffix(".gz"), data)):
        if name in expected and hashlib.sha256(content).hexdigest() != expected[name]:
            raise error(f"{what} {path}: sha256 of {'its content' if content is data else 'the file'} differs "
                        f"from {path.parent / CHECKSUMS} (a damaged or edited copy); restore it or remove "
                        "its line from that file")
    return data


def read_text(path: str | Path, what: str, error: type[Exception]) -> str:
    """``read_bytes`` as UTF-8 text."""
    try:
        return read_bytes(path, what, error).decode()
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text: {e}") from None
