"""The generated wire code is what `make protos` makes from protos/ today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "protogen.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted((tmp_path / "nanoshard" / "v1").glob("*_pb2*.py*"))
    assert fresh, "protoc generated nothing"
    for path in fresh:
        committed = ROOT / "nanoshard" / "v1" / path.name
        assert committed.is_file(), f"{committed} is missing: run `make protos`"
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `make protos`"


def test_every_field_is_documented() -> None:
    """The .proto files are the documentation of the wire: each field carries a comment."""
    for proto in (ROOT / "protos").rglob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_field = (
                stripped.endswith(";")
                and "=" in stripped
                and not stripped.startswith(("//", "syntax", "package", "option"))
            )
            if is_field and "//" not in stripped:
                above = lines[i - 1].strip()
                assert above.startswith("//"), f"{proto.name}:{i + 1} has no comment: {stripped}"
