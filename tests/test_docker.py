"""The container matches the package: there is no Docker daemon here to build it, so the
Dockerfile and compose file are checked against pyproject and the CLIs instead."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tomllib
import yaml

from nanoshard.cli.commands import build_parser as nanoshard_parser
from nanoshard.node.cli import build_parser as node_parser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instruction(name: str) -> list[str]:
    """Each ``name`` instruction's arguments, its continued lines joined."""
    lines = DOCKERFILE.replace("\\\n", " ").splitlines()
    return [line.split(None, 1)[1] for line in lines if line.startswith(name + " ")]


def test_the_image_installs_the_package_from_its_folders() -> None:
    copied = {src for line in instruction("COPY") for src in line.split()[:-1]}
    package_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= {c.strip("./") for c in copied}, (package_dirs, copied)
    assert "pyproject.toml" in copied
    assert any("pip install ." in r for r in instruction("RUN"))


def test_the_image_pins_the_torch_the_makefile_pins() -> None:
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"TORCH := torch==(\S+)", makefile).group(1)
    assert f"ARG TORCH_VERSION={pinned}" in DOCKERFILE
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in DOCKERFILE  # CPU by default


def test_the_entry_point_is_a_console_script_and_its_command_parses() -> None:
    entrypoint = json.loads(instruction("ENTRYPOINT")[0])
    command = json.loads(instruction("CMD")[0])
    assert entrypoint == ["nanoshard-node"]
    assert (
        PYPROJECT["project"]["scripts"]["nanoshard-node"] == "nanoshard.node:main"
    )  # loads cli.py
    assert node_parser().parse_args(command).command == "join"


@pytest.mark.parametrize("service", ["coordinator", "node"])
def test_compose_services_run_real_commands(service: str) -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    spec = compose["services"][service]
    assert spec["network_mode"] == "host"  # mDNS
    entry = spec.get("entrypoint", json.loads(instruction("ENTRYPOINT")[0]))
    parser = {"nanoshard": nanoshard_parser, "nanoshard-node": node_parser}[entry[0]]()
    args = parser.parse_args(spec["command"])
    assert args.command in ("coordinator", "join")


def test_the_cache_volume_is_the_volunteers_folder() -> None:
    """Docker makes a volume's mount point root's unless the image has the folder: the node,
    which runs as the volunteer, could not write its key there."""
    (volume,) = instruction("VOLUME")
    (folder,) = json.loads(volume)
    (user,) = instruction("USER")
    setup = " ".join(instruction("RUN"))
    assert f"mkdir -p {folder}" in setup
    assert re.search(rf"chown -R {user}: {re.escape(str(Path(folder).parent))}\b", setup), setup
    assert DOCKERFILE.index("chown") < DOCKERFILE.index("USER ")
