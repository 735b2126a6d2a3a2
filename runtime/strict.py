"""Strict readers for the manifest's JSON: each returns a typed value or raises ArtifactError naming the
key path of what it rejects (``graphs.fp32.head_1.dynamic.beams``)."""

from __future__ import annotations

from dataclasses import fields

from .errors import ArtifactError


def fail(path: str, message: str):
    raise ArtifactError(f"manifest.json: {path + ': ' if path else ''}{message}")


def exact_keys(value, path: str, keys: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        fail(path, f"expected an object, got {type(value).__name__}")
    missing, unknown = [k for k in keys if k not in value], sorted(set(value) - set(keys))
    if missing:
        fail(f"{path}.{missing[0]}" if path else missing[0], "missing")
    if unknown:
        fail(f"{path}.{unknown[0]}" if path else unknown[0], f"unknown key; allowed: {', '.join(keys)}")
    return value


INT64_MAX = 2**63 - 1      # the C++ reader's integers are int64: a larger one is refused by both readers


def integer(value, path: str, lo: int = 0) -> int:
    if type(value) is not int or not lo <= value <= INT64_MAX:
        fail(path, f"expected an integer in {lo}..2^63-1, got {value!r}")
    return value


def string(value, path: str, allowed: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or (allowed is not None and value not in allowed):
        fail(path, f"expected {'one of ' + ', '.join(allowed) if allowed else 'a string'}, got {value!r}")
    return value


def array(value, path: str) -> list:
    if not isinstance(value, list):
        fail(path, f"expected a list, got {type(value).__name__}")
    return value


def obj(value, path: str) -> dict:
    if not isinstance(value, dict):
        fail(path, f"expected an object, got {type(value).__name__}")
    return value


def relpath(value, path: str) -> str:
    """A relative POSIX path that cannot leave its folder lexically (symlinks are the loader's check)."""
    p = string(value, path)
    if not p or p.startswith("/") or "\\" in p or "\0" in p or any(s in ("", ".", "..") for s in p.split("/")):
        fail(path, f"{p!r} is not a plain relative path inside the artifact (no '/', '..', '.', '\\' prefixes)")
    return p


def typed(cls, value, path: str, **parsers):
    """A frozen dataclass from an object with exactly its field names; ``parsers[name](value, path)``."""
    names = tuple(f.name for f in fields(cls))
    raw = exact_keys(value, path, names)
    return cls(**{n: parsers[n](raw[n], f"{path}.{n}" if path else n) for n in names})


def strings(value, path: str, keys: tuple[str, ...], nullable: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> dict:
    """An object of exactly ``keys`` + ``extra`` whose ``keys`` are strings (or null if ``nullable``);
    the ``extra`` keys are the caller's to check."""
    raw = exact_keys(value, path, keys + extra)
    for k in keys:
        if not (raw[k] is None and k in nullable):
            string(raw[k], f"{path}.{k}")
    return raw


def show(value) -> str:
    """A tuple of tensors or a dict of ranges as it reads in the JSON, for error messages."""
    if isinstance(value, tuple) and value and hasattr(value[0], "dtype"):
        return str([f"{t.name} {t.dtype} {list(t.shape)}" for t in value])
    return str({k: list(v) for k, v in value.items()} if isinstance(value, dict) else value)
