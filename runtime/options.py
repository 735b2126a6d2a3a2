"""Options declared once. A dataclass field made by ``option`` carries the option's default, its --help
text, its command-line form (argparse keywords; the flag is the field's name with dashes unless given) and
its check; ``add_arguments`` turns a dataclass into parser arguments, ``from_args`` turns parsed arguments
back into the dataclass and ``checked`` runs every field's check. The build (export/options.py) and the
server (serve/options.py) declare their options this way, so that the library's keywords, the CLI's flags,
the defaults and the checks cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

from .errors import InputError

Check = Callable[[Any, dataclasses.Field], Any]      # (value, field) -> the value to keep; raises a NezhaError


def option(default=dataclasses.MISSING, help: str | None = None, check: Check | None = None,
           when: Callable[[Any], bool] | None = None, flag: str | None = None, factory=dataclasses.MISSING,
           **argparse_keywords):
    """A dataclass field that is also a command-line option. ``check(value, field)`` returns the value to keep
    (or raises), run by ``checked`` only where ``when(options)`` holds; ``None`` passes unchecked where the
    default is None. ``factory``: a default computed when the parser is made (e.g. from the environment)."""
    metadata = {"help": help, "check": check, "when": when, "flag": flag, "argparse": argparse_keywords}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def rule(ok: Callable[[Any], bool], message: Callable[[Any, dataclasses.Field], str], error=InputError) -> Check:
    """A check that keeps the value where ``ok(value)`` and else raises ``error(message(value, field))``."""
    def check(value, f):
        if not ok(value):
            raise error(message(value, f))
        return value
    return check


def flag_of(f: dataclasses.Field) -> str:
    """The option's command-line flag: ``--max-batch`` for the field ``max_batch`` unless declared."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _options(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` declared with ``option`` (the others are the library's alone)."""
    return [f for f in dataclasses.fields(cls) if "argparse" in f.metadata]


def _default(f: dataclasses.Field):
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return list(default) if isinstance(default, tuple) else default        # argparse shows nargs defaults as lists


def add_arguments(parser, cls) -> None:
    """One argument per option of the dataclass ``cls``, in field order (``parser`` may be an argument group)."""
    for f in _options(cls):
        keywords = dict(f.metadata["argparse"])
        if f.metadata["flag"] and "action" not in keywords:          # named for the flag, not the field
            keywords.setdefault("metavar", f.metadata["flag"].lstrip("-").replace("-", "_").upper())
        parser.add_argument(flag_of(f), dest=f.name, default=_default(f), help=f.metadata["help"], **keywords)


def from_args(cls, args: argparse.Namespace, **others):
    """``cls`` from the parsed ``args`` (its options) and ``others`` (its other fields)."""
    return cls(**{f.name: getattr(args, f.name) for f in _options(cls)}, **others)


def checked(options) -> dict:
    """{field name: checked value} of every field of ``options`` whose check applies, checked in field order."""
    values = {}
    for f in dataclasses.fields(options):
        check, when, value = f.metadata.get("check"), f.metadata.get("when"), getattr(options, f.name)
        if check is None or (value is None and f.default is None) or (when is not None and not when(options)):
            continue
        values[f.name] = check(value, f)
    return values
