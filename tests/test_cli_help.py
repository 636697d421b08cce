"""Every ``maskscale`` command's help, word for word, against a stored copy.

Why: the command line is the interface users script against. Moving code between modules
(e.g. ``eval/`` into its rooms) must not change a command, an option, a default or a help
line; this test walks the whole parser tree -- ``maskscale --help`` and every subcommand's,
nested ones included -- and compares the text with ``tests/assets/cli_help.txt``.

A deliberate change to the interface regenerates the copy (and the diff shows it in review)::

    MASKSCALE_UPDATE_HELP=1 python -m pytest tests/test_cli_help.py
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.cli import build_parser

STORED = Path(__file__).resolve().parent / "assets" / "cli_help.txt"
WIDTH = "100"
"""argparse wraps to the terminal width (COLUMNS); fixed so the copy does not depend on it."""


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.extend(action.choices.items())
    return out


def help_pages(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[str, str]:
    """{"maskscale eval ppl": its --help text, ...} for the parser and all below it."""
    pages = {" ".join(("maskscale", *path)): parser.format_help()}
    for name, child in _subparsers(parser):
        pages.update(help_pages(child, (*path, name)))
    return pages


def render(pages: dict[str, str]) -> str:
    return "".join(f"===== {name} --help\n{text}\n" for name, text in pages.items())


def test_help_of_every_command_matches_the_stored_copy(monkeypatch):
    monkeypatch.setenv("COLUMNS", WIDTH)
    text = render(help_pages(build_parser()))
    if os.environ.get("MASKSCALE_UPDATE_HELP") == "1":
        STORED.parent.mkdir(exist_ok=True)
        STORED.write_text(text)
    stored = STORED.read_text()
    if text != stored:
        import difflib

        diff = difflib.unified_diff(
            stored.splitlines(), text.splitlines(), "stored", "now", lineterm="", n=1
        )
        raise AssertionError(
            "maskscale's help changed (rerun with MASKSCALE_UPDATE_HELP=1 if intended):\n"
            + "\n".join(list(diff)[:80])
        )


def test_the_walk_reaches_nested_commands(monkeypatch):
    monkeypatch.setenv("COLUMNS", WIDTH)
    pages = help_pages(build_parser())
    for name in ("maskscale", "maskscale eval ppl", "maskscale sweep fit", "maskscale demo"):
        assert name in pages
    assert len(pages) > 20
