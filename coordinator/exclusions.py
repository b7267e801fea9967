"""Exclusions that last, and can be reviewed: kept in SQLite (the standard library's) in
the coordinator's state folder, so that a restarted coordinator still keeps out a node it
caught lying, by its id (its key) and its address, until the exclusion expires
(``--exclude-hours``, 24 by default). The registry keeps the exclusions in force in
memory; this file is only their record. Times here are wall-clock (seconds since the Unix
epoch), as a restart needs them.
"""

from __future__ import annotations

import datetime
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nanoshard.errors import FailedPrecondition

SCHEMA = """
CREATE TABLE IF NOT EXISTS exclusions (
    node_id TEXT NOT NULL,
    address TEXT NOT NULL,
    reason TEXT NOT NULL,
    since REAL NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (node_id, address)
)
"""


@dataclass(frozen=True)
class Exclusion:
    node_id: str
    address: str
    reason: str
    since: float
    until: float

    def describe(self) -> str:
        """The reason, with since when and until when (UTC)."""
        return f"{self.reason} (since {_utc(self.since)}, until {_utc(self.until)})"


class ExclusionStore:
    """The record of exclusions, in ``path`` (":memory:" keeps it for this process only)."""

    def __init__(
        self, path: Path | str, ttl_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        folder = Path(path).parent
        if path != ":memory:" and folder.exists() and not folder.is_dir():
            raise FailedPrecondition(
                f"cannot keep exclusions in {folder}: it is a file, not a folder (--state-dir)"
            )
        try:
            if path != ":memory:":
                folder.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path))
            self.db.execute(SCHEMA)
            self.db.commit()
        except (OSError, sqlite3.Error) as exc:
            raise FailedPrecondition(f"cannot keep exclusions in {path}: {exc}") from None
        self.ttl_s = ttl_s
        self.clock = clock

    def add(self, node_id: str, address: str, reason: str) -> Exclusion:
        now = self.clock()
        exclusion = Exclusion(node_id, address, reason, now, now + self.ttl_s)
        self.db.execute(
            "INSERT OR REPLACE INTO exclusions VALUES (?, ?, ?, ?, ?)",
            (node_id, address, reason, exclusion.since, exclusion.until),
        )
        self.db.commit()
        return exclusion

    def active(self) -> list[Exclusion]:
        """The exclusions in force now (expired ones are deleted)."""
        now = self.clock()
        self.db.execute("DELETE FROM exclusions WHERE until <= ?", (now,))
        self.db.commit()
        rows = self.db.execute("SELECT * FROM exclusions ORDER BY since").fetchall()
        return [Exclusion(*row) for row in rows]

    def close(self) -> None:
        self.db.close()


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
