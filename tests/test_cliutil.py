"""What both command-line tools share: the backoff schedule, the "listening on" line, sizes,
a signal while a tool loads."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nanoshard.backoff import backoff_delays
from nanoshard.cliutil import (
    COORDINATOR,
    NODE,
    STOP_SIGNALS,
    listening_line,
    listening_pattern,
    parse_size,
)


def test_backoff_doubles_from_the_first_delay_up_to_the_cap_and_stays_there() -> None:
    assert list(itertools.islice(backoff_delays(0.5, 10.0), 8)) == [
        0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0,
    ]  # fmt: skip
    assert list(itertools.islice(backoff_delays(3.0, 2.0), 3)) == [3.0, 2.0, 2.0]


@pytest.mark.parametrize("address", ["127.0.0.1:7960", "[::1]:50051", "10.0.0.7:1"])
def test_the_listening_line_is_found_by_its_pattern(address: str) -> None:
    for who in (COORDINATOR, NODE):
        output = f"some log line\n{listening_line(who, address)}\nanother line"
        assert listening_pattern(who).search(output).group(1) == address  # type: ignore[union-attr]
        assert listening_pattern().search(output).group(1) == address  # type: ignore[union-attr]
    node_only = listening_line(NODE, address)
    assert listening_pattern(COORDINATOR).search(node_only) is None
    assert listening_pattern(NODE).search(listening_line(COORDINATOR, address)) is None


@pytest.mark.parametrize(
    ("text", "size"),
    [("512M", 512 << 20), ("2G", 2 << 30), ("1.5GiB", 3 << 29), ("1000000", 10**6), ("4 kb", 4096)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "2X", "-1G", "1.2.3"])
def test_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def run_tool(folder: Path, module: str, args: list[str]) -> subprocess.CompletedProcess:
    """``run_loaded`` of ``module`` (a file in ``folder``) with ``args``, in a process of
    its own ("serve" is its server command)."""
    run = (
        "from nanoshard.cliutil import run_loaded; "
        f"run_loaded('tool', '{module}', {args!r}, frozenset({{'serve'}}))"
    )
    return subprocess.run(
        [sys.executable, "-c", run], cwd=folder, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("sig", "command", "code", "word"),
    [
        (signal.SIGINT, "ask", 130, "interrupted"),
        (signal.SIGTERM, "ask", 143, "terminated"),
        (signal.SIGINT, "serve", 130, "interrupted"),
        (signal.SIGTERM, "serve", 0, "terminated"),  # (how a server is meant to be stopped)
    ],
    ids=["ctrl-c", "sigterm", "ctrl-c-server", "sigterm-server"],
)
def test_a_signal_while_a_tool_loads_is_one_line(
    tmp_path: Path, sig: signal.Signals, command: str, code: int, word: str
) -> None:
    """Ctrl-C or SIGTERM while a tool still imports its modules (torch: a second or two)
    ends it, once the import is over, with one line and 130 or 143 (a server's SIGTERM:
    0, as later): not a traceback from inside an import, nor, for SIGTERM, an end without
    a word, and never the command itself. (The module signals its own process as it
    loads.)"""
    (tmp_path / "loading.py").write_text(
        f"import os, time\nos.kill(os.getpid(), {int(sig)})\ntime.sleep(0.5)\n"
        "def main(argv):\n    time.sleep(60)\n"
    )
    done = run_tool(tmp_path, "loading", ["-v", command])
    assert (done.returncode, done.stderr) == (code, f"tool: {word}\n")


@pytest.mark.parametrize(("command", "code"), [("status", 143), ("serve", 0)])
def test_a_sigterm_once_loaded_and_before_the_command_takes_it_is_one_line(
    tmp_path: Path, command: str, code: int
) -> None:
    """Between a tool's import and its own signal handling (a server's event loop), a
    SIGTERM ended it by the signal, without a word: now as while it loads (a server, the
    way it is meant to be stopped: 0)."""
    (tmp_path / "loaded.py").write_text(
        "import os, signal, time\n"
        "from nanoshard.cliutil import run_cli\n"
        "def main(argv):\n"
        "    run_cli('tool', lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30)))\n"
    )
    done = run_tool(tmp_path, "loaded", [command])
    assert (done.returncode, done.stderr) == (code, "tool: terminated\n")


@pytest.mark.parametrize(
    ("sig", "command", "code", "word"),
    [
        (signal.SIGTERM, "status", 143, "terminated"),
        (signal.SIGTERM, "serve", 0, "terminated"),
        (signal.SIGINT, "serve", 130, "interrupted"),
    ],
)
def test_a_signal_a_library_swallows_as_the_tool_loads_still_ends_it(
    tmp_path: Path, sig: signal.Signals, command: str, code: int, word: str
) -> None:
    """torch's C init imports numpy and drops any error of it: a SIGTERM in a node's
    first half-second was lost 1 time in 10 (the node served on). The module here
    swallows what its own signal raises, as that import does."""
    (tmp_path / "swallowing.py").write_text(
        "import os, signal, time\n"
        "try:\n"
        f"    os.kill(os.getpid(), {int(sig)})\n"
        "    time.sleep(0.5)\n"
        "except BaseException:\n"
        "    pass\n"
        "def main(argv):\n"
        "    time.sleep(60)\n"
    )
    done = run_tool(tmp_path, "swallowing", [command])
    assert (done.returncode, done.stderr) == (code, f"tool: {word}\n")


def test_a_command_started_with_its_stop_signals_blocked_takes_them() -> None:
    """The demo blocks Ctrl-C and SIGTERM while it starts a child (the mask outlives
    exec) and leaves the unblocking to the child, so that Python need not fork() beside
    its live gRPC channels (a preexec_fn forces fork(), and gRPC's fork handlers crashed
    such children now and then)."""
    run = (
        "import signal; from nanoshard.cliutil import run_cli; "
        "run_cli('tool', lambda: print(*sorted(int(s) for s in "
        "signal.pthread_sigmask(signal.SIG_BLOCK, []))))"
    )
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", run], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    still = {int(n) for n in out.split()}  # the signals still blocked, by number
    assert not still & {int(s) for s in STOP_SIGNALS}, out
