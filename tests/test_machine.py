"""Every platform a volunteer has: each platform's answers faked (psutil, cgroup files,
torch.cuda, torch.backends.mps, sys.platform, platformdirs' per-OS classes), and the
CUDA and MPS paths run for real where such a device is present."""

from __future__ import annotations

import sys
from collections import namedtuple
from pathlib import Path

import platformdirs
import platformdirs.macos
import platformdirs.unix
import platformdirs.windows
import psutil
import pytest
import torch

from nanoshard import machine
from nanoshard.config import GPTConfig
from nanoshard.engine import pick_device
from nanoshard.node import capacity
from nanoshard.node.capacity import available_memory, load_or_measure, measure_capacity

GiB = 2**30
VirtualMemory = namedtuple("VirtualMemory", "total available")
TINY = GPTConfig(block_size=64, vocab_size=96, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def eight_gib_free(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """psutil says 8 GiB are available; no cgroup limits anything (an empty cgroup root,
    this process in the root group). Returns the fake cgroup root."""
    monkeypatch.setattr(psutil, "virtual_memory", lambda: VirtualMemory(16 * GiB, 8 * GiB))
    root, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    root.mkdir()
    proc.write_text("0::/\n")
    monkeypatch.setattr(machine, "CGROUP_ROOT", root)
    monkeypatch.setattr(machine, "PROC_CGROUP", proc)
    return root


def write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)


@pytest.mark.parametrize("platform", ["linux", "darwin", "win32"])
def test_half_of_psutils_free_ram_on_every_platform(
    eight_gib_free: Path, monkeypatch: pytest.MonkeyPatch, platform: str
) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    if platform != "linux":  # no cgroups there: no /proc, no /sys/fs/cgroup
        monkeypatch.setattr(machine, "PROC_CGROUP", eight_gib_free / "absent")
        monkeypatch.setattr(machine, "CGROUP_ROOT", eight_gib_free / "absent")
    assert machine.cgroup_available() is None
    assert machine.available_ram() == 8 * GiB
    assert available_memory("cpu") == 4 * GiB


def test_a_cgroup_v2_limit_wins_over_the_hosts_free_memory(eight_gib_free: Path) -> None:
    # a container: 2 GiB limit, 1.5 GiB charged of which 0.5 GiB is reclaimable page cache
    write(
        eight_gib_free,
        memory__max=str(2 * GiB),
        memory__current=str(3 * GiB // 2),
        memory__stat=f"anon 1000\ninactive_file {GiB // 2}\nactive_file 0\n",
    )
    assert machine.cgroup_available() == GiB
    assert available_memory("cpu") == GiB // 2
    (eight_gib_free / "memory.max").write_text("max\n")  # no limit: psutil's figure
    assert machine.cgroup_available() is None
    assert available_memory("cpu") == 4 * GiB


def test_a_nested_cgroup_v2_and_its_parents_the_tightest_wins(
    eight_gib_free: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = eight_gib_free.parent / "proc-self-cgroup"
    proc.write_text("0::/user.slice/app.scope\n")
    write(eight_gib_free / "user.slice", memory__max=str(3 * GiB), memory__current=str(GiB))
    write(
        eight_gib_free / "user.slice" / "app.scope",
        memory__max="max",
        memory__current=str(GiB // 4),
    )
    assert machine.cgroup_available() == 2 * GiB
    assert machine.available_ram() == 2 * GiB


def test_a_cgroup_v1_limit_seen_from_inside_the_container(
    eight_gib_free: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Docker on cgroup v1: /proc says /docker/<id>, the container sees its group as the root
    proc = eight_gib_free.parent / "proc-self-cgroup"
    proc.write_text("12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    write(
        eight_gib_free / "memory",
        memory__limit_in_bytes=str(3 * GiB),
        memory__usage_in_bytes=str(2 * GiB),
        memory__stat=f"cache 5\ntotal_inactive_file {GiB}\n",
    )
    assert machine.cgroup_available() == 2 * GiB
    # v1's "no limit" is a huge number, not "max"
    (eight_gib_free / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert machine.cgroup_available() is None
    assert machine.available_ram() == 8 * GiB


def test_cuda_memory_comes_from_torch(
    eight_gib_free: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = []

    def mem_get_info(device: object) -> tuple[int, int]:
        asked.append(device)
        return 10 * GiB, 16 * GiB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert available_memory(torch.device("cuda", 1)) == int(10 * GiB * capacity.CUDA_FRACTION)
    assert asked == [torch.device("cuda", 1)]


def test_apple_silicon_unified_memory_is_counted_once(
    eight_gib_free: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object) -> int:
        raise AssertionError("the GPU's memory is the system's: not counted twice")

    monkeypatch.setattr(torch.cuda, "mem_get_info", never)
    if hasattr(torch, "mps"):
        monkeypatch.setattr(torch.mps, "recommended_max_memory", never, raising=False)
        monkeypatch.setattr(torch.mps, "driver_allocated_memory", never, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert available_memory("mps") == 4 * GiB == available_memory("cpu")


@pytest.mark.parametrize(
    ("cuda", "mps", "chosen"),
    [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_device_auto_picks_cuda_then_mps_then_cpu(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool, chosen: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert pick_device("auto").type == chosen
    assert pick_device(None).type == chosen
    assert pick_device("cpu").type == "cpu"  # asked for: taken as is


def test_the_capacity_measurement_runs_on_the_device_auto_picks(tmp_path: Path) -> None:
    device = pick_device("auto")
    cap = load_or_measure(TINY, device, "fp32", cache_dir=tmp_path)
    assert torch.device(cap.device).type == device.type
    assert cap.block_ms > 0 and cap.head_ms > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_capacity_on_a_real_cuda_device() -> None:
    cap = measure_capacity(TINY, "cuda", "fp32")
    assert cap.device == f"cuda:{torch.cuda.current_device()}"
    free, _ = torch.cuda.mem_get_info()
    assert 0 < cap.memory_bytes <= free


@pytest.mark.skipif(
    not torch.backends.mps.is_available(), reason="no Apple-silicon GPU (MPS) on this machine"
)
def test_capacity_on_a_real_mps_device() -> None:
    cap = measure_capacity(TINY, "mps", "fp32")
    assert cap.device == "mps" and cap.block_ms > 0
    assert 0 < cap.memory_bytes <= psutil.virtual_memory().available


def test_folders_follow_each_platform(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setattr(platformdirs, "PlatformDirs", platformdirs.unix.Unix)
    assert machine.cache_dir() == home / ".cache" / "nanoshard"
    assert machine.state_dir() == home / ".local" / "state" / "nanoshard"
    # the XDG overrides that worked before still do
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xc"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xs"))
    assert machine.cache_dir() == tmp_path / "xc" / "nanoshard"
    assert machine.state_dir() == tmp_path / "xs" / "nanoshard"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setattr(platformdirs, "PlatformDirs", platformdirs.macos.MacOS)
    assert machine.cache_dir() == home / "Library" / "Caches" / "nanoshard"
    assert machine.state_dir() == home / "Library" / "Application Support" / "nanoshard"
    local = tmp_path / "AppData" / "Local"
    # Windows' answer, as its shell would give it (the registry is not here)
    monkeypatch.setattr(platformdirs.windows, "get_win_folder", lambda csidl: str(local))
    monkeypatch.setattr(platformdirs, "PlatformDirs", platformdirs.windows.Windows)
    assert machine.cache_dir() == local / "nanoshard" / "Cache"
    assert machine.state_dir() == local / "nanoshard"
