"""The error table (nezha.runtime.errors, docs/errors.md): every NezhaError subclass in the package is one of
its classes, each with an exit code, HTTP and gRPC status and kind; the docs list exactly those; the CLI
exits and the server answers with them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from nezha.runtime import errors as E
from nezha.runtime.cli import guarded

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ["nezha", "runtime", "export", "serve", "bench", "calibration", "model"]
TABLE_NAMES = {c.__name__ for c in E.TABLE}
KINDS = {"bad_request", "internal", "unavailable", "overloaded", "deadline", "too_large", "not_found",
         "unauthorized", "forbidden", "method", "request_timeout", "conflict", "media_type", "client_gone"}
GRPC_CODES = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
              "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}


def error_classes_defined() -> list[str]:
    """'path: Class' for every class in the package's modules that derives, by any chain of names, from
    NezhaError (a static walk: modules needing TensorRT, Ray or a GPU are read too)."""
    classes = []
    for folder in PACKAGE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "third_party" not in path.parts:
                tree = ast.parse(path.read_text())
                classes += [(f"{path.relative_to(ROOT)}: {n.name}", n.name,
                             [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in n.bases])
                            for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    family, grown = {"NezhaError"}, True
    while grown:                                  # subclasses of subclasses, whatever module they live in
        before = len(family)
        family |= {name for _, name, bases in classes if family & set(bases)}
        grown = len(family) > before
    return sorted(where for where, name, bases in classes if family & set(bases))


def test_every_nezha_error_in_the_package_is_a_table_class():
    defined = error_classes_defined()
    assert defined == sorted(f"runtime/errors.py: {n}" for n in TABLE_NAMES), defined
    assert len(E.TABLE) <= 12
    assert {c.__name__ for c in E.NezhaError.__subclasses__()} == TABLE_NAMES     # and nothing at run time


def statuses(cls) -> list[tuple[int, str, str]]:
    """(HTTP status, gRPC status, kind) of every instance a class can have."""
    if "STATUSES" in vars(cls):
        return [(s, grpc, kind) for s, (grpc, kind, _) in cls.STATUSES.items()]
    return [(cls.http_status, cls.grpc_status, cls.kind)]


@pytest.mark.parametrize("cls", E.TABLE, ids=lambda c: c.__name__)
def test_each_class_has_an_exit_code_http_and_grpc_status_and_kind(cls):
    assert type(cls.exit_code) is int and cls.exit_code in (1, 2, 3)
    for http, grpc, kind in statuses(cls):
        assert 400 <= http <= 599 and grpc in GRPC_CODES and kind in KINDS, (http, grpc, kind)
    if "STATUSES" in vars(cls):                 # instances carry their status, its headers with it
        for status in cls.STATUSES:
            e = cls(status, "why")
            assert (e.http_status, e.grpc_status, e.kind, str(e)) == (status, *cls.STATUSES[status][:2], "why")


def doc_rows() -> list[tuple[str, str, str, str, str]]:
    """(class, exit, HTTP, gRPC, kind) of each row of docs/errors.md's table; a continuation row (empty
    class cell) belongs to the class above it."""
    rows, cls, exit_code = [], None, None
    for line in (ROOT / "docs" / "errors.md").read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or not re.fullmatch(r"\d{3}", cells[3]):
            continue
        cls, exit_code = (cells[0], cells[2]) if cells[0] else (cls, exit_code)
        rows.append((cls, exit_code, cells[3], cells[4], cells[5]))
    return rows


def test_the_docs_table_lists_exactly_the_classes_with_their_codes():
    want = [(c.__name__, str(c.exit_code), str(http), grpc, kind) for c in E.TABLE for http, grpc, kind in statuses(c)]
    assert doc_rows() == want


@pytest.mark.parametrize("cls", E.TABLE, ids=lambda c: c.__name__)
def test_a_cli_prints_one_line_and_exits_with_the_class_code(cls, capsys):
    error = cls(*statuses(cls)[0][:1], "what went wrong") if "STATUSES" in vars(cls) else cls("what went wrong")

    def run():
        raise error
    assert guarded("demo", run) == cls.exit_code
    assert capsys.readouterr().err == "nezha demo: error: what went wrong\n"


@pytest.mark.parametrize("cls", E.TABLE, ids=lambda c: c.__name__)
def test_a_server_tells_the_class_status_and_hides_its_own_faults(cls, caplog):
    S = pytest.importorskip("nezha.serve.errors")
    error = cls(*statuses(cls)[-1][:1], "secret detail") if "STATUSES" in vars(cls) else cls("secret detail")
    told = S.refusal(error, "POST /v1/recommend")
    if error.http_status == 500:                # the server's fault: logged, answered without the details
        assert (told.http_status, told.kind, str(told)) == (500, "internal", S.INTERNAL)
        assert "secret detail" in caplog.text
    else:
        assert told is error
    bug = S.refusal(KeyError("secret"), "POST /v1/recommend")
    assert (bug.http_status, bug.grpc_status, str(bug)) == (500, "INTERNAL", S.INTERNAL)
