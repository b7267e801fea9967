"""Files several processes may write at once (the caches that clients and nodes share on
one machine): each is written whole to a temporary file of its own beside it and renamed
into place, so a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def replace_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Make ``path`` by ``write(tmp)`` (``tmp``: a new file name in the same folder, this
    writer's alone), then a rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_atomic(path: Path, data: bytes | bytearray) -> None:
    """``data`` as the whole of ``path``, written through a temporary file and a rename."""
    replace_atomic(path, lambda tmp: tmp.write_bytes(data))
