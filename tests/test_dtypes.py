"""One list of weight dtypes, ``nanoshard.engine.DTYPES``: every table keyed by a weights
dtype and every ``--dtype`` flag covers exactly it."""

from __future__ import annotations

import argparse

import pytest

from nanoshard.agreement import WEIGHT_SLACK
from nanoshard.cli.commands import build_parser as nanoshard_parser
from nanoshard.coordinator.registry import WEIGHT_BYTES
from nanoshard.engine import DTYPES
from nanoshard.node.cli import build_parser as node_parser


def dtype_choices(parser: argparse.ArgumentParser, command: str) -> list[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flag = next(a for a in sub.choices[command]._actions if "--dtype" in a.option_strings)
    assert flag.choices is not None
    return list(flag.choices)


@pytest.mark.parametrize(
    "table", [WEIGHT_BYTES, WEIGHT_SLACK], ids=["registry.WEIGHT_BYTES", "agreement.WEIGHT_SLACK"]
)
def test_tables_by_dtype_cover_every_dtype(table: dict[str, float]) -> None:
    assert set(table) == set(DTYPES)


@pytest.mark.parametrize(
    ("parser", "command"),
    [(nanoshard_parser, "generate"), (node_parser, "serve"), (node_parser, "join")],
)
def test_dtype_flags_offer_every_dtype(parser, command: str) -> None:  # type: ignore[no-untyped-def]
    assert dtype_choices(parser(), command) == list(DTYPES)
