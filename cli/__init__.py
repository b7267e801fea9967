"""The ``nanoshard`` command: a swarm's coordinator, its status, generation, the demo, certs.

The only layer that imports the roles (client, coordinator); ``nanoshard-node`` lives with
the node (``node/cli.py``).
"""

from .commands import main

__all__ = ["main"]
