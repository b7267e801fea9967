"""The thread policy of every nanoshard process that runs torch: a thread per core (torch's
default), and threads that sleep as soon as they wait (``OMP_WAIT_POLICY=PASSIVE``).

Why. torch's OpenMP threads (libgomp in the PyPI wheels; MKL and oneDNN run on them too)
spin after each parallel region by default, so a process that has just computed keeps
every core busy for a while doing nothing. Several nodes on one machine then steal each
other's cores: in a pipeline only one node computes at a time for a session, but the others
still spin; and a parallel region whose second thread has been parked by the OS waits for
it. Measured on this project's 2-core machine (``benchmarks/threads.py``, README "Threads"):
a 3-node chain plus its client decoded at 407 ms/token with torch's defaults, 58 ms with
passive waits (the local path: 57.5), 73 ms with one passive thread per node; 8 concurrent
sessions got 2.6, 40 and 21 tokens/s. Passive waiting did not cost a lone process anything
measurable either (a small parallel op back to back: 40 µs passive, 46-65 µs spinning), so a
node keeps a thread per core and can use the cores that are free when it is alone.

OpenMP reads its wait policy once, when torch loads it, so this module sets it when it is
imported: import it before torch (``nanoshard-node`` does so first thing). A value already
in the environment wins, and importing it after torch changes nothing (``configured``
says whether it took effect).
"""

from __future__ import annotations

import os
import sys

# libgomp (PyPI torch) reads OMP_WAIT_POLICY; Intel's OpenMP (some conda builds) reads
# KMP_BLOCKTIME (ms a thread spins before sleeping) and ignores the other.
WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def configure() -> bool:
    """Set the wait policy for this process unless the environment already says; False if
    torch was imported first (too late to take effect)."""
    for name, value in WAIT_POLICY.items():
        os.environ.setdefault(name, value)
    return "torch" not in sys.modules


configured = configure()
