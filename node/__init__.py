"""A volunteer node: ``nanoshard-node`` (``cli.py``) and the roles it plays."""

import os
import sys

from nanoshard.cliutil import run_loaded

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """The console script (``node/cli.py``, loaded once Ctrl-C can end it cleanly)."""
    # torch's C++ warnings (a group's rendezvous polling for a member that died: two lines
    # each with socket details) would reach a volunteer's terminal beside the node's own
    # account of it; -v keeps them. Read once, when torch loads: set before it does.
    if not {"-v", "--verbose"} & set(sys.argv[1:] if argv is None else argv):
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    run_loaded("nanoshard-node", "nanoshard.node.cli", argv)
