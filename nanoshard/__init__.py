"""nanoshard: pool volunteer machines into one GPT.

``from nanoshard import Client`` is the SDK (see ``client/``); the engine, codecs, wire and
tokenizer live in this package; ``nanoshard.node`` and ``nanoshard.coordinator`` are the two
server roles.
"""

from __future__ import annotations

# Every nanoshard process (CLI, coordinator, node, SDK user) takes the thread policy of
# nanoshard/threads.py: OpenMP threads that sleep when they wait, set before torch loads.
from nanoshard import threads as _threads  # noqa: F401

PROTOCOL_VERSION = 5  # of the wire (protos/nanoshard/v1); peers of another version are refused (2: routes bound at Open; 3: tensor-parallel groups; 4: node keys, signed steps; 5: shadow checks by steps of chunks, signed replay material, suggested check rates)

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``from nanoshard import Client`` without importing the client for every user of the core."""
    if name in ("Client", "AsyncClient"):
        from nanoshard import client

        return getattr(client, name)
    raise AttributeError(f"module 'nanoshard' has no attribute {name!r}")
