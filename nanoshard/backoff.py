"""Waiting between retries: exponential backoff, the one schedule every retry loop uses."""

from __future__ import annotations

from collections.abc import Iterator


def backoff_delays(first_s: float, max_s: float) -> Iterator[float]:
    """Seconds to wait before each retry: ``first_s``, then doubling, capped at ``max_s``,
    forever (the caller decides when to give up)."""
    delay = first_s
    while True:
        yield delay
        delay = min(delay * 2, max_s)
