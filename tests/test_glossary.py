"""The glossary: one line per printed figure, the same in --help and docs/GLOSSARY.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli.glossary import COMMAND_TERMS, TERMS
from pipeline.cli.main import build_parser, main

DOCS = Path(__file__).resolve().parent.parent / "docs" / "GLOSSARY.md"


def _flat(text: str) -> str:
    """`text` with its line wrapping undone."""
    return " ".join(text.split())


def test_every_term_is_in_the_docs_and_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    docs = DOCS.read_text(encoding="utf-8")
    for term, meaning in TERMS.items():
        assert f"- **{term}**: {meaning}\n" in docs, term
    assert main(["--help"]) == 0
    top = _flat(capsys.readouterr().out)
    for term, meaning in TERMS.items():
        assert _flat(f"{term}: {meaning}") in top, term


def test_each_command_explains_what_it_prints(capsys: pytest.CaptureFixture[str]) -> None:
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(COMMAND_TERMS) <= set(commands)
    for name, terms in COMMAND_TERMS.items():
        assert main([name, "--help"]) == 0
        text = _flat(capsys.readouterr().out)
        assert "glossary (docs/GLOSSARY.md):" in text
        for term in terms:
            assert _flat(f"{term}: {TERMS[term]}") in text, (name, term)
    # A command that prints none of these figures has no glossary.
    assert main(["export", "--help"]) == 0
    assert "glossary" not in capsys.readouterr().out
