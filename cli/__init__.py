"""The ``nanoshard`` command: a swarm's coordinator, its status, generation, the demo, certs.

The only layer that imports the roles (client, coordinator); ``nanoshard-node`` lives with
the node (``node/cli.py``).
"""

from nanoshard.cliutil import run_loaded

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """The console script (``cli/commands.py``, loaded once Ctrl-C can end it cleanly)."""
    run_loaded(
        "nanoshard", "nanoshard.cli.commands", argv, frozenset({"coordinator", "api", "demo"})
    )
