"""The admin API's gate, shared by both engines: off unless a token is configured, a constant-time bearer
check, JSON bodies only, and reloads that may name only artifacts under one root folder.

Why each: an admin route that anyone reaching the port can call lets them swap the model; a
``text/plain`` or form POST is a "simple" cross-site request that a web page in a browser on the same
machine can send without a CORS preflight, so only ``application/json`` is taken (and a bearer header
cannot be set cross-site without a preflight either); a path the request names freely could load any
folder on the machine, and the error messages would tell whether it exists. The anchor is Triton's
``--allow-http``/restricted-API flags and its model-repository-only loads (``--model-control-mode=explicit``
loads models only from ``--model-repository``)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import stat
from pathlib import Path

from nezha.runtime.errors import AccessDenied, InputError, NezhaError, RequestRefused

from . import protocol as P

log = logging.getLogger("nezha.serve")
TOKEN_ENV = "NEZHA_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16


def token_digest(token: str) -> str:
    """sha256 of a token: what the server keeps (and hands to Ray's replicas), never the token itself."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def read_token(path: Path | None, environ=os.environ) -> str | None:
    """The admin token from ``path`` (first line, whitespace stripped) or else $NEZHA_ADMIN_TOKEN; None: admin off.
    Raises OSError for an unreadable file and ValueError for one that is not a regular text file, or a token
    that is not printable ASCII or too short to guess at."""
    if path is not None:
        token, where = _token_file(Path(path)), str(path)
    elif environ.get(TOKEN_ENV):
        token, where = environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if not (token.isascii() and token.isprintable()):      # headers arrive as Latin-1: it could never match
        raise ValueError(f"the admin token in {where} must be printable ASCII characters")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the admin token in {where} has {len(token)} characters; at least {MIN_TOKEN_CHARS} "
                         f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def _token_file(path: Path) -> str:
    """The first line of a token file. stat() first, and only a regular file is opened: open() of a FIFO
    blocks until a writer comes (a server hung at startup)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"--admin-token-file {path} is not a regular file")
        with open(path, "rb") as f:
            line = f.readline(4096)
    except OSError as e:
        raise OSError(f"--admin-token-file {path}: {e.strerror}") from None
    try:
        return line.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"--admin-token-file {path} is not a text file (not UTF-8)") from None


def check_token(headers: dict, digest: str) -> None:
    """401 without a bearer token, 403 with a wrong one or from a browser page (an Origin header). The token
    is compared as a sha256 digest with hmac.compare_digest: the time taken depends neither on where the
    first wrong character is nor on the given token's length."""
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise AccessDenied(401, "admin requests need 'Authorization: Bearer <token>' (--admin-token-file)")
    if not hmac.compare_digest(token_digest(given.strip()), digest):
        raise AccessDenied(403, "wrong admin token")
    if "origin" in headers:
        raise AccessDenied(403, "admin requests from a browser page (an Origin header) are refused")


def check_json(headers: dict) -> None:
    """415 unless the body is declared JSON (checked after the method: a GET with the token is a 405)."""
    media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise RequestRefused(415, f"admin requests must be Content-Type: application/json, got {media_type or 'none'!r}")


def artifact_root(path: str | Path) -> Path:
    """The folder reloads may load from, resolved once (links followed) at startup: a link under it that is
    changed later cannot widen it."""
    root = Path(os.path.realpath(path))
    if not root.is_dir():
        raise ValueError(f"--artifact-root {path} is not a folder")
    return root


def artifact_under(root: Path | None, name: str) -> Path:
    """A reload's ``artifact`` -> the resolved folder, which must lie under ``root`` after every link is
    followed (a relative name is taken relative to ``root``, like a model name in Triton's repository). Every
    refusal of a path outside says the same, whether or not the path exists, and echoes only what was sent."""
    shown = repr(name[:80])
    if root is None:
        raise AccessDenied(403, f"reload of {shown} refused: naming an artifact needs --artifact-root on the server "
                          f"(without it, a reload loads the served artifact again)")
    if "\0" in name:
        raise InputError("an artifact folder path must not contain a NUL character")
    try:
        os.fsencode(name)
    except UnicodeEncodeError:                            # a lone surrogate ("\ud800" is valid JSON): no file name
        raise InputError(f"reload of {shown} refused: an artifact folder path must be valid Unicode") from None
    resolved = Path(os.path.realpath(root / name))        # never raises: a link loop stays unresolved in the path
    if resolved != root and root not in resolved.parents:
        raise AccessDenied(403, f"reload of {shown} refused: artifacts are loaded only from under the server's "
                          f"--artifact-root")
    try:
        if resolved.is_dir():
            return resolved
    except OSError as e:                                  # a name or component too long (ENAMETOOLONG)
        raise InputError(f"reload of {shown} refused: {e.strerror}") from None
    raise InputError(f"reload refused: no artifact folder {shown} under the artifact root")


def reload_artifact(body: bytes, limit: int) -> str | None:
    """A /admin/reload body (empty, or {"artifact": "path"}) -> the path it names (None: the served one)."""
    obj = P.check_fields(P.parse_json(body, limit) if body.strip() else {}, ("artifact",), "/admin/reload body")
    if "artifact" in obj and not isinstance(obj["artifact"], str):
        raise InputError("/admin/reload body: 'artifact' must be a path string")
    return obj.get("artifact")


async def swap(service, artifact: str | Path | None = None):
    """Load ``artifact`` (default: the service's current one again), verify it and swap it in for the served
    model -> the new LoadedModel. Requests already admitted finish on the model they started with; a bad
    artifact is a 400 naming the version still served, one reload at a time (409)."""
    from .model import load_model

    if service.reload_lock.locked():
        raise RequestRefused(409, "a reload is already in progress")
    async with service.reload_lock:
        path = Path(artifact) if artifact is not None else service.artifact
        try:
            new = await asyncio.to_thread(load_model, path, service.load_options)
        except NezhaError as e:
            service.metrics.reloads.labels("refused").inc()
            raise InputError(f"reload refused, still serving version {service.model.version}: {e}") from None
        old, service.model, service.artifact = service.model, new, path
        service.metrics.reloads.labels("swapped").inc()
        log.info("reloaded: version %s -> %s", old.version if old else None, new.version)
        if old is not None:
            old.retire()
        return new
