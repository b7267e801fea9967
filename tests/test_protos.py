"""The generated wire code is what `make protos` makes from protos/ today."""

from __future__ import annotations

import re
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


# ---- values that comments list, against the code's constants ---------------------------

FIELD = re.compile(r"^\s*(?:repeated\s+|optional\s+)?[\w.]+\s+(\w+)\s*=\s*\d+\s*;")
LIST = re.compile(r"(\S+(?: \([^)]*\))?(?: \| \S+(?: \([^)]*\))?)+)")


def field_comments(proto: Path) -> dict[str, str]:
    """``Message.field`` -> its comment: the ``//`` lines right above it and its trailing one."""
    comments: dict[str, str] = {}
    messages: list[tuple[str, int]] = []  # (name, brace depth inside it), nested messages too
    above: list[str] = []
    depth = 0
    for line in proto.read_text().splitlines():
        code, _, trailing = line.partition("//")
        stripped = code.strip()
        if not stripped:
            above = [*above, trailing.strip()] if trailing else []
            continue
        if m := re.match(r"(?:message|enum)\s+(\w+)", stripped):
            messages.append((m.group(1), depth + 1))
        elif messages and (f := FIELD.match(code)):
            name = ".".join(n for n, _ in messages) + "." + f.group(1)
            comments[name] = " ".join([*above, trailing.strip()]).strip()
        depth += stripped.count("{") - stripped.count("}")
        while messages and depth < messages[-1][1]:
            messages.pop()
        above = []
    return comments


def listed(comment: str) -> set[str]:
    """The values of an ``a | b | c (= d)`` list in a comment: each item, and each alias
    written ``(= name)`` beside one; other remarks in parentheses are not values."""
    lists = LIST.findall(comment)
    assert len(lists) == 1, f"expected one 'a | b | c' list in: {comment!r}"
    values = set()
    for item in lists[0].split(" | "):
        name, _, remark = item.partition(" (")
        values.add(name.strip())
        values.update(re.findall(r"=\s*([\w-]+)", remark))
    return values


def test_field_comments_are_read_as_written() -> None:
    comments = field_comments(ROOT / "protos" / "nanoshard" / "v1" / "node.proto")
    assert comments["Hop.start"] == "first unit of the hop"
    assert "enter a stage part-way" in comments["Hop.addresses"]  # the lines above it
    assert listed("x: a | b (= c) | d (a remark)") == {"a", "b", "c", "d"}


def test_values_listed_in_proto_comments_are_the_codes() -> None:
    """Where a comment lists the values a field takes, they are exactly the values the code
    knows: a codec or a weights dtype added to the code must be added to the comment."""
    from nanoshard.codec import CODECS
    from nanoshard.config import GPTConfig, unit_name
    from nanoshard.engine import DTYPES
    from nanoshard.rpc import KV_LENGTH_KEY, MAX_REPLICAS_PER_HOP

    protos = ROOT / "protos" / "nanoshard" / "v1"
    node = field_comments(protos / "node.proto")
    coordinator = field_comments(protos / "coordinator.proto")
    expected = {
        ("node", "SessionSpec.codec"): set(CODECS),
        ("node", "NodeInfo.dtype"): set(DTYPES),
        ("coordinator", "Capacity.dtype"): set(DTYPES),
        ("coordinator", "CheckEvidence.weights"): set(DTYPES),
    }
    for (file, field), values in expected.items():
        comment = (node if file == "node" else coordinator)[field]
        assert listed(comment) == values, f"{file}.proto {field}: {comment!r} vs {sorted(values)}"
    # every comment with such a list is one of those checked above
    for file, comments in (("node", node), ("coordinator", coordinator)):
        for field, comment in comments.items():
            if LIST.search(comment):
                assert (file, field) in expected, f"{file}.proto {field} lists values: check them"

    # names and keys the comments quote
    config = GPTConfig(n_layer=4)
    names = re.findall(r'"([^"]+)"', coordinator["UnitCoverage.name"])
    assert names == [
        unit_name(config, 0),
        unit_name(config, 4),
        unit_name(config, config.head_unit),
    ]
    assert f'"{KV_LENGTH_KEY}"' in (protos / "node.proto").read_text()
    assert f"1 to {MAX_REPLICAS_PER_HOP} of them" in node["Hop.addresses"]
