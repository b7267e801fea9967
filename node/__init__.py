"""A volunteer node: ``nanoshard-node`` (``cli.py``) and the roles it plays."""

from nanoshard.cliutil import run_loaded

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """The console script (``node/cli.py``, loaded once Ctrl-C can end it cleanly)."""
    run_loaded("nanoshard-node", "nanoshard.node.cli", argv, frozenset({"join", "serve"}))
