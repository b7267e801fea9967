"""The machine a process runs on, whatever its platform: free memory and where files go.

Memory a node may count on:

- **system RAM**: ``psutil.virtual_memory().available`` (Linux, macOS, Windows), and inside
  a container no more than its cgroup leaves: ``memory.max`` (cgroup v2) or
  ``memory.limit_in_bytes`` (v1) less what the group uses, page cache it can drop not
  counted (psutil reads the host's figures, not the container's);
- **CUDA**: the device's free memory as torch reports it (``torch.cuda.mem_get_info``);
- **Apple silicon (MPS)**: the GPU shares system RAM, so that memory is counted once, as
  system RAM, never as system RAM plus a device's.

Folders come from ``platformdirs``: ``~/.cache/nanoshard`` and ``~/.local/state/nanoshard``
on Linux (``XDG_CACHE_HOME`` / ``XDG_STATE_HOME`` honoured), ``~/Library/Caches/nanoshard``
and ``~/Library/Application Support/nanoshard`` on macOS, ``%LOCALAPPDATA%\\nanoshard``
on Windows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs
import psutil

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

APP = "nanoshard"
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a huge page-aligned number


def cache_dir() -> Path:
    """Where a node keeps weights, measurements and its key; clients their tokenizers."""
    return platformdirs.user_cache_path(APP, appauthor=False)


def state_dir() -> Path:
    """Where a coordinator keeps what must outlive it (its exclusions)."""
    return platformdirs.user_state_path(APP, appauthor=False)


def available_ram() -> int:
    """Bytes of RAM this process can still take: the system's available memory, or less
    when a cgroup (a container) limits it."""
    available = int(psutil.virtual_memory().available)
    limited = cgroup_available()
    return available if limited is None else min(available, limited)


def cgroup_available(root: Path | None = None, proc_cgroup: Path | None = None) -> int | None:
    """What the memory cgroups of this process leave free (a limit less its group's usage,
    less the inactive page cache it can reclaim; the tightest of its group and the groups
    above it), or None where no limit is set."""
    root = CGROUP_ROOT if root is None else root
    v2, v1 = _cgroup_paths(PROC_CGROUP if proc_cgroup is None else proc_cgroup)
    found: list[int] = []
    # v2: one hierarchy at the root; v1: the memory controller's folder.
    groups = [
        (folder, "memory.max", "memory.current", "inactive_file")
        for folder in _groups(root, v2, "memory.max")
    ] + [
        (folder, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        for folder in _groups(root / "memory", v1, "memory.limit_in_bytes")
    ]
    for folder, limit_file, usage_file, inactive in groups:
        limit = _read_int(folder / limit_file)
        if limit is None or limit >= UNLIMITED:
            continue
        usage = _read_int(folder / usage_file) or 0
        usage -= min(usage, _stat(folder / "memory.stat", inactive))
        found.append(max(0, limit - usage))
    return min(found) if found else None


def _cgroup_paths(proc_cgroup: Path) -> tuple[str, str]:
    """This process's cgroup v2 path and v1 memory-controller path ("" when unknown)."""
    v2 = v1 = ""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _groups(root: Path, own: str, name: str) -> list[Path]:
    """The folders holding ``name`` from this process's own group up to the root (a
    container sees its own group as the root)."""
    folder, found = root / own.strip("/"), []
    while True:
        if (folder / name).is_file():
            found.append(folder)
        if folder == root or root not in folder.parents:
            return found
        folder = folder.parent


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cuda_free(device: torch.device) -> int:
    """Free bytes on a CUDA device, as torch reports them."""
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
