"""Roles do not import roles: the import graph reads core <- node / coordinator / client <- cli,
and the HTTP gateway (``api``) is a client of the swarm: core, client <- api <- cli.

Every module of every folder pyproject maps into the ``nanoshard`` namespace is parsed (not
imported), and each of its imports, also those inside functions and relative ones, is
resolved to the folder (layer) that holds it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"][
    "setuptools"
]["package-dir"]

CORE = "nanoshard"
ROLES = ("nanoshard.node", "nanoshard.coordinator", "nanoshard.client")
CLI = "nanoshard.cli"
API = "nanoshard.api"
# Each layer may import itself and the core; the gateway also the client (the SDK); the CLI
# every role and the gateway.
ALLOWED: dict[str, set[str]] = {
    CORE: set(),
    **{r: set() for r in ROLES},
    API: {"nanoshard.client"},
    CLI: {*ROLES, API},
}
# ``from nanoshard import Client`` is the SDK's front door: the package's __init__ resolves it
# lazily (PEP 562), so importing the core never loads the client. The one edge allowed.
FRONT_DOOR = {("nanoshard", "nanoshard.client")}


def layer_of(module: str) -> str | None:
    """The package (one folder) that holds ``module``; None outside nanoshard."""
    if module != CORE and not module.startswith(CORE + "."):
        return None
    return max((p for p in PACKAGE_DIRS if module == p or module.startswith(p + ".")), key=len)


def is_module(name: str) -> bool:
    layer = layer_of(name)
    if layer is None:
        return False
    path = ROOT / PACKAGE_DIRS[layer] / name[len(layer) :].lstrip(".").replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """The absolute names of the modules ``module`` imports (``from a import b``: ``a.b`` when
    that is a module of ours, else ``a``)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if is_module(sub) else base)
    return found


def modules() -> list[tuple[str, str, bool]]:
    """(module name, source, is a package) of every module in the namespace's folders."""
    out = []
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            name = ".".join([package, *parts[:-1]] if is_package else [package, *parts])
            out.append((name, path.read_text(), is_package))
    return out


def forbidden_edges(mods: list[tuple[str, str, bool]]) -> list[str]:
    bad = []
    for name, source, is_package in mods:
        own = layer_of(name)
        assert own is not None
        for target in sorted(imports_of(source, name, is_package)):
            other = layer_of(target)
            if other in (None, CORE, own) or other in ALLOWED[own] or (name, other) in FRONT_DOOR:
                continue
            bad.append(f"{name} ({own}) imports {target} ({other})")
    return bad


def test_every_folder_is_a_known_layer() -> None:
    assert set(PACKAGE_DIRS) == {CORE, *ROLES, API, CLI}


def test_roles_import_only_the_core_and_only_the_cli_imports_roles() -> None:
    assert forbidden_edges(modules()) == []


@pytest.mark.parametrize(
    ("module", "line", "edge"),
    [
        ("nanoshard.generation", "from nanoshard.client.sdk import Client", "nanoshard.client"),
        ("nanoshard.engine", "from nanoshard import coordinator", "nanoshard.coordinator"),
        ("nanoshard.node.weights", "from ..coordinator import model", "nanoshard.coordinator"),
        ("nanoshard.client.swarm", "import nanoshard.node.weights", "nanoshard.node"),
        ("nanoshard.coordinator.server", "def f():\n    from nanoshard.cli import main", CLI),
        ("nanoshard.api.app", "from nanoshard.node.server import serve", "nanoshard.node"),
        ("nanoshard.client.sdk", "from nanoshard.api import app", API),
    ],
)
def test_the_check_sees_a_forbidden_import(module: str, line: str, edge: str) -> None:
    """The check can fail: each import, in ``module``, is caught (absolute, relative,
    function-local, and ``from package import module``)."""
    bad = forbidden_edges([(module, line + "\n", False)])
    assert len(bad) == 1 and bad[0].endswith(f"({edge})"), bad


def test_the_cli_may_import_every_role() -> None:
    lines = "\n".join(f"import {r}" for r in (*ROLES, API))
    assert forbidden_edges([(f"{CLI}.commands", lines, False)]) == []
