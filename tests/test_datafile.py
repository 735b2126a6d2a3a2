"""Data files are read strictly: regular files only, gzip bounded, SHA256SUMS parsed strictly and checked."""

from __future__ import annotations

import gzip
import hashlib
import os

import pytest

import nezha.runtime.datafile as datafile
from nezha.runtime.data import find_pair
from nezha.runtime.datafile import read_text
from nezha.runtime.errors import InputError

TEXT = '{"u1": [1, 2, 3]}'


def folder_with(tmp_path, sums: str | None = None, name: str = "x.inter.json.gz", content: bytes | None = None):
    (tmp_path / name).write_bytes(content if content is not None else gzip.compress(TEXT.encode()))
    if sums is not None:
        (tmp_path / "SHA256SUMS").write_text(sums)
    return tmp_path / name


def sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def test_sums_in_any_case_and_of_the_stored_or_the_uncompressed_file_are_checked(tmp_path):
    path = folder_with(tmp_path, f"{sha(TEXT).upper()}  x.inter.json\n{sha(b'no')} *x.inter.json.gz\n")
    with pytest.raises(InputError, match="sha256 of the file differs"):     # the .gz line is checked too
        read_text(path, "interactions file", InputError)
    (tmp_path / "SHA256SUMS").write_text(f"{sha(TEXT).upper()}  x.inter.json\r\n{sha(path.read_bytes())} *x.inter.json.gz\n")
    assert read_text(path, "interactions file", InputError) == TEXT


@pytest.mark.parametrize("sums,message", [
    ("zz  x.inter.json\n", "line 1: expected '<64 hex digits>  <file name>'"),
    ("SHA256 (x.inter.json) = " + "0" * 64 + "\n", "line 1: expected"),            # BSD --tag format
    (f"{'0' * 64}  x.inter.json\n{'1' * 64}  x.inter.json\n", "listed twice with different sums"),
])
def test_a_malformed_checksum_file_is_refused_naming_the_line(tmp_path, sums, message):
    with pytest.raises(InputError, match=message):
        read_text(folder_with(tmp_path, sums), "interactions file", InputError)


def test_a_checksum_file_that_is_not_a_regular_file_is_refused(tmp_path):
    path = folder_with(tmp_path)
    os.mkfifo(tmp_path / "SHA256SUMS")                # never opened: a FIFO would block
    with pytest.raises(InputError, match="SHA256SUMS is a FIFO, not a regular file"):
        read_text(path, "interactions file", InputError)


def test_a_gzip_bomb_stops_at_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(datafile, "MAX_TEXT_BYTES", 10_000)
    path = folder_with(tmp_path, content=gzip.compress(b" " * 1_000_000))
    with pytest.raises(InputError, match="expands to more than 10000 bytes"):
        read_text(path, "interactions file", InputError)


def test_gzip_members_and_zero_padding_read_as_gzip_does_truncation_does_not(tmp_path):
    two = gzip.compress(TEXT[:5].encode()) + gzip.compress(TEXT[5:].encode()) + b"\0" * 8
    assert read_text(folder_with(tmp_path, content=two), "f", InputError) == TEXT
    with pytest.raises(InputError, match="ends inside a compressed stream"):
        read_text(folder_with(tmp_path, content=two[:-20]), "f", InputError)


def test_unreadable_paths_are_one_clear_error(tmp_path):
    loop = tmp_path / "a.inter.json"
    loop.symlink_to(loop)
    with pytest.raises(InputError, match="cannot be read|does not exist"):
        read_text(loop, "interactions file", InputError)
    with pytest.raises(InputError, match="cannot be read: File name too long"):
        read_text(tmp_path / ("n" * 300), "interactions file", InputError)
    with pytest.raises(InputError, match="not UTF-8"):
        read_text(folder_with(tmp_path, name="b.json", content=b"\xff\xfe{}"), "f", InputError)
    with pytest.raises(InputError, match="is not a folder"):
        find_pair(tmp_path / "b.json")
