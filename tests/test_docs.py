"""The README and docs/ stay true: every relative link resolves, and every `nezha` / `python` command they
show parses with the real option parsers (run up to argument parsing, nothing executed)."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "data" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def shown_commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of each `nezha ...` / `python export/build.py ...` / `python -m nezha.X ...` line in the
    pages' shell blocks; continuation lines joined, comments and `&` dropped."""
    found = []
    for page in PAGES:
        for lang, block in FENCE.findall(page.read_text()):
            if lang not in ("bash", "sh", ""):
                continue
            for line in block.replace("\\\n", " ").splitlines():
                if "$(" in line or "|" in line or "<" in line:
                    continue
                try:
                    words = shlex.split(line, comments=True)
                except ValueError:
                    continue
                words = [w for w in words if w != "&"]
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):       # VAR=value prefixes
                    words = words[1:]
                if words and (words[0].endswith("/nezha") or words[0] == "nezha" or
                              re.search(r"(^|/)python3?$", words[0])):
                    found.append((page.relative_to(ROOT).as_posix(), words))
    return found


class Parsed(Exception):
    """Raised by the patched parse_args once a command line has parsed: nothing runs."""


def entry_point(words: list[str]):
    """The main(argv) function and argv of a shown command, or None for commands that are not ours."""
    if not re.search(r"python3?$", words[0]):
        return importlib.import_module("nezha.cli").main, words[1:]
    if words[1:2] == ["-m"]:
        return (importlib.import_module(words[2]).main, words[3:]) if words[2].startswith("nezha.") else None
    if words[1:2] and words[1].endswith(".py") and (ROOT / words[1]).is_file():
        module = "nezha." + words[1].removesuffix(".py").replace("/", ".")
        return importlib.import_module(module).main, words[2:]
    return None


@pytest.mark.parametrize("page,words", shown_commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v)[:80])
def test_every_shown_command_parses(page, words, monkeypatch):
    target = entry_point(words)
    if target is None:
        pytest.skip(f"not a nezha command: {' '.join(words)[:60]}")
    main, argv = target
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        original(self, args, namespace)                  # exits 2 on a bad option: the test fails
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    try:
        main(argv)
    except Parsed:
        return
    except SystemExit as e:
        pytest.fail(f"{page}: `{' '.join(words)}` does not parse (exit {e.code})")
    pytest.fail(f"{page}: `{' '.join(words)}` never reached its option parser")


def test_the_command_scan_finds_the_main_commands():
    commands = [" ".join(w) for _, w in shown_commands()]
    assert any("export/build.py" in c for c in commands) and any(" serve " in f" {c} " for c in commands)
    assert len(commands) >= 15


def _option_tables(page: Path):
    """(header cells, row cells) of each Markdown table with an 'option' and a 'default' column."""
    rows, tables = [], []
    for line in page.read_text().splitlines() + [""]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if rows and {"option", "default"} <= {c.lower() for c in rows[0]}:
            tables.append((rows[0], [r for r in rows[2:] if len(r) == len(rows[0])]))
        rows = []
    return tables


UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def test_the_serving_option_tables_name_real_flags_with_their_defaults():
    """docs/serving.md's option tables: every flag is a `nezha serve` flag, and a default the table states
    (a number, with KiB/MiB, or a word) is the one the options declare (serve/options.py)."""
    pytest.importorskip("uvicorn")
    from nezha.serve.cli import add_parsers
    sub = argparse.ArgumentParser().add_subparsers()
    add_parsers(sub)
    defaults = {a.option_strings[0]: a.default for a in sub.choices["serve"]._actions if a.option_strings}
    checked, wrong = 0, []
    for header, rows in _option_tables(ROOT / "docs" / "serving.md"):
        column = {c.lower(): i for i, c in enumerate(header)}
        for row in rows:
            flags = re.findall(r"`(--[a-z-]+)`", row[column["option"]])
            texts = [t.strip() for t in row[column["default"]].split(",")][:len(flags)] if len(flags) > 1 \
                else [row[column["default"]]]
            for flag, text in zip(flags, texts):
                if flag not in defaults:
                    wrong.append(f"{flag}: not a nezha serve flag")
                    continue
                number = re.match(r"(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB)?\b", text)
                default = defaults[flag]
                if number:
                    ok = default is not None and float(number[1]) * UNITS.get(number[2], 1) == float(default)
                else:
                    ok = default is None or text == str(default)
                checked += 1
                if not ok:
                    wrong.append(f"{flag}: the table says {text!r}, the option's default is {default!r}")
    assert wrong == [] and checked >= 12, (wrong, checked)
