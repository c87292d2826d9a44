"""The command line's parser into the release spec reads only options that exist."""

from __future__ import annotations

import argparse

import pytest

from pipeline.cli import spec
from pipeline.cli.main import build_parser


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    """Every option name of every command."""
    out: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _dests(sub)
        else:
            out.add(action.dest)
    return out


def test_every_optional_name_is_an_option_of_some_command() -> None:
    missing = sorted(spec.OPTIONAL - _dests(build_parser()))
    assert not missing, f"the release spec reads options no command has: {missing}"


def test_a_misspelt_name_is_an_error_not_a_default() -> None:
    with pytest.raises(KeyError, match="num_calibs"):
        spec._given(argparse.Namespace(), "num_calibs", 1024)
