"""Files that several processes write at once (the tokenizer files clients fetch into one
cache folder, a node's weight cache): a reader sees a whole file, never half of one."""

from __future__ import annotations

import threading
from pathlib import Path

from nanoshard.files import write_atomic

SIZE = 1 << 20


def test_a_reader_never_sees_half_a_file_that_others_are_writing(tmp_path: Path) -> None:
    path = tmp_path / "vocab.json"
    seen: list[bytes] = []

    def write(i: int) -> None:
        for _ in range(20):
            write_atomic(path, bytes([i]) * SIZE)

    writers = [threading.Thread(target=write, args=(i,)) for i in range(1, 4)]
    for w in writers:
        w.start()
    while any(w.is_alive() for w in writers):
        if path.exists():
            data = path.read_bytes()
            seen.append(data[:1])
            assert len(data) == SIZE and data == data[:1] * SIZE
    for w in writers:
        w.join()
    assert seen, "the reader read nothing while the writers wrote"
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temporary file left
