"""Waits between retries: one helper for every retry loop."""

from __future__ import annotations

from collections.abc import Iterator


def backoff_delays(first_s: float, max_s: float) -> Iterator[float]:
    """``first_s``, then doubling, capped at ``max_s``, forever."""
    delay = first_s
    while True:
        yield delay
        delay = min(2 * delay, max_s)
