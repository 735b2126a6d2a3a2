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

import hashlib
import hmac
import os
from pathlib import Path

from . import protocol as P

TOKEN_ENV = "NEZHA_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16


def token_digest(token: str) -> str:
    """sha256 of a token: what the server keeps (and hands to Ray's replicas), never the token itself."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def read_token(path: Path | None, environ=os.environ) -> str | None:
    """The admin token from ``path`` (first line, whitespace stripped) or else $NEZHA_ADMIN_TOKEN; None: admin off.
    Raises OSError for an unreadable file and ValueError for a token too short to guess at."""
    if path is not None:
        with open(path, encoding="utf-8") as f:
            token = f.readline(4096).strip()
        where = str(path)
    elif environ.get(TOKEN_ENV):
        token, where = environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the admin token in {where} has {len(token)} characters; at least {MIN_TOKEN_CHARS} "
                         f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def check_request(headers: dict, digest: str) -> None:
    """401 without a bearer token, 403 with a wrong one or from a browser page (an Origin header), 415 unless
    the body is declared JSON. The token is compared as a sha256 digest with hmac.compare_digest: the time
    taken depends neither on where the first wrong character is nor on the given token's length."""
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise P.Unauthorized("admin requests need 'Authorization: Bearer <token>' (--admin-token-file)")
    if not hmac.compare_digest(token_digest(given.strip()), digest):
        raise P.Forbidden("wrong admin token")
    if "origin" in headers:
        raise P.Forbidden("admin requests from a browser page (an Origin header) are refused")
    media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise P.UnsupportedMediaType(f"admin requests must be Content-Type: application/json, got {media_type or 'none'!r}")


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
        raise P.Forbidden(f"reload of {shown} refused: naming an artifact needs --artifact-root on the server "
                          f"(without it, a reload loads the served artifact again)")
    if "\0" in name:
        raise P.BadRequest("an artifact folder path must not contain a NUL character")
    resolved = Path(os.path.realpath(root / name))        # never raises: a link loop stays unresolved in the path
    if resolved != root and root not in resolved.parents:
        raise P.Forbidden(f"reload of {shown} refused: artifacts are loaded only from under the server's "
                          f"--artifact-root")
    if resolved.is_dir():
        return resolved
    raise P.BadRequest(f"reload refused: no artifact folder {shown} under the artifact root")
