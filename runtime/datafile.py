"""Reading a data file (an item index, interactions, a config) as text: plain or gzipped, regular files only,
bounded in size, and checked against a SHA256SUMS file beside it when there is one."""

from __future__ import annotations

import hashlib
import re
import zlib
from pathlib import Path

CHECKSUMS = "SHA256SUMS"
MAX_TEXT_BYTES = 1 << 30          # 1 GiB of text, after decompression: a gzip bomb stops here, not in the OOM killer
MAX_CHECKSUMS_BYTES = 1 << 20
_SUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](\S(?:.*\S)?)$")     # sha256sum's text and binary modes


def _read_regular(path: Path, what: str, error: type[Exception], limit: int) -> bytes:
    """The bytes of ``path`` (at most ``limit``), refusing anything but a regular file before opening it."""
    try:
        if not path.is_file():                       # a FIFO would block the read, a folder fail it
            raise error(f"{what} {path} {'is not a regular file' if path.exists() else 'does not exist'}")
        if path.stat().st_size > limit:
            raise error(f"{what} {path} is larger than {limit} bytes")
        return path.read_bytes()
    except OSError as e:                              # link loops, names too long, permissions
        raise error(f"{what} {path} cannot be read: {e.strerror or e}") from None


def _gunzip(raw: bytes, path: Path, what: str, error: type[Exception]) -> bytes:
    """Every gzip member of ``raw``, refusing more than MAX_TEXT_BYTES of output."""
    out, rest = [], raw
    try:
        while rest:
            z = zlib.decompressobj(wbits=31)
            out.append(z.decompress(rest, MAX_TEXT_BYTES + 1 - sum(map(len, out))))
            if sum(map(len, out)) > MAX_TEXT_BYTES or z.unconsumed_tail:
                raise error(f"{what} {path} expands to more than {MAX_TEXT_BYTES} bytes")
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
    text = _read_regular(sums, "checksum file", error, MAX_CHECKSUMS_BYTES).decode("utf-8", errors="replace")
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


def read_text(path: str | Path, what: str, error: type[Exception]) -> str:
    """The UTF-8 text of ``path``, gunzipped if it ends in .gz. Where the folder's SHA256SUMS lists the file
    (as stored, or its uncompressed name), the bytes must match: a damaged or edited copy is refused."""
    path = Path(path)
    raw = _read_regular(path, what, error, MAX_TEXT_BYTES)
    data = _gunzip(raw, path, what, error) if path.suffix == ".gz" else raw
    expected = checksums(path.parent, error)
    for name, content in ((path.name, raw), (path.name.removesuffix(".gz"), data)):
        if name in expected and hashlib.sha256(content).hexdigest() != expected[name]:
            raise error(f"{what} {path}: sha256 of {'its content' if content is data else 'the file'} differs "
                        f"from {path.parent / CHECKSUMS} (a damaged or edited copy); restore it or remove "
                        "its line from that file")
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text: {e}") from None
