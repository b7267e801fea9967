"""Join time: a fresh volunteer, from process start to serving its stage.

    python benchmarks/join.py           # ~1 min; writes benchmarks/results/join.{json,md}
    python benchmarks/join.py --quick   # one joiner

A coordinator (``nanoshard coordinator``, mDNS off) serves GPT-2 124M's shape (random
weights saved as a Hugging Face checkpoint, made once under ``.cache/bench``) on loopback.
Then ``--joiners`` nodes join one after another, each a new ``nanoshard-node join
--coordinator ...`` process with an empty cache folder (so it measures its capacity and
fetches every byte of its stage from the coordinator). The time of each is wall time from
``Popen`` to the node's line "serving units [a, b)"; its phases come from when its log
lines appear: process start, imports and the capacity measurement; join and assignment;
the stage fetched and loaded. The first joiner meets a coordinator that has just started,
which waits a heartbeat timeout for nodes it may have had before it places anything (so a
restart moves nothing); the later ones join the swarm as it runs.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import (
    BENCH_CACHE,
    GPT2_124M,
    RESULTS,
    machine_info,
    markdown_table,
    raise_on_sigterm,
    random_checkpoint,
    save_results,
)

from nanoshard.cliutil import listening_pattern

BIN = Path(sys.executable).parent
LISTENING = listening_pattern()
SERVING = re.compile(r"serving units \[(\d+), (\d+)\)")
# Log lines that end each phase (the first line matching each, in this order).
PHASES = (
    ("start_and_capacity", re.compile(r"capacity on ")),
    ("join_and_assign", re.compile(r"assigned units")),
    ("fetch_and_load", SERVING),
)


class Child:
    """A child process whose output lines are kept with the time each arrived."""

    def __init__(self, args: list[str]) -> None:
        self.started = time.perf_counter()
        self.lines: list[tuple[float, str]] = []
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append((time.perf_counter() - self.started, line.rstrip("\n")))

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float) -> tuple[float, re.Match[str]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if m := pattern.search(line):
                    return at, m
            if self.popen.poll() is not None:
                time.sleep(0.2)
                tail = "\n".join(line for _, line in self.lines[-20:])
                raise RuntimeError(f"exited with {self.popen.returncode}:\n{tail}")
            time.sleep(0.02)
        raise TimeoutError(f"no line matching {pattern.pattern!r} in {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after 10 s."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


def join_once(coordinator: str, cache_dir: Path, timeout_s: float) -> tuple[dict, Child]:
    node = Child(
        [
            str(BIN / "nanoshard-node"),
            "join",
            "--coordinator",
            coordinator,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-mdns",
            "--cache-dir",
            str(cache_dir),
        ]
    )
    try:
        total, match = node.wait_for(SERVING, timeout_s)
        phases, last = {}, 0.0
        for name, pattern in PHASES:
            at = node.wait_for(pattern, 1)[0]
            phases[name] = round(at - last, 2)
            last = at
        return {
            "seconds": round(total, 2),
            "units": [int(match.group(1)), int(match.group(2))],
            "phases": phases,
            "fetched_bytes": sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file()),
        }, node
    except BaseException:
        node.stop()
        raise


def measure(opts: argparse.Namespace) -> dict:
    model = opts.model or str(random_checkpoint(GPT2_124M, BENCH_CACHE / "gpt2-124m-random"))
    coordinator = Child(
        [
            str(BIN / "nanoshard"),
            "coordinator",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-mdns",
        ]
    )
    nodes: list[Child] = []
    rows = []
    try:
        address = coordinator.wait_for(LISTENING, 180)[1].group(1)
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(opts.joiners):
                row, node = join_once(address, Path(tmp) / f"node{i}", opts.timeout)
                nodes.append(node)
                rows.append({"joiner": i + 1, **row})
    finally:
        for child in [*nodes, coordinator]:
            child.stop()
    return {"model": model, "joins": rows}


def render_markdown(result: dict) -> str:
    m = result["machine"]
    rows = [
        [
            f"{r['joiner']}" + (" (fresh coordinator)" if r["joiner"] == 1 else ""),
            f"{r['units'][0]}:{r['units'][1]}",
            round(r["fetched_bytes"] / 2**20, 1),
            r["seconds"],
            r["phases"]["start_and_capacity"],
            r["phases"]["join_and_assign"],
            r["phases"]["fetch_and_load"],
        ]
        for r in result["joins"]
    ]
    header = [
        "joiner",
        "units",
        "MB fetched",
        "s to serving",
        "start, imports, capacity",
        "join + assign",
        "fetch + load",
    ]
    return (
        "# Join time\n\n"
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}, load "
        f"{m['load_average_start']} -> {m['load_average_end']}. GPT-2 124M shape, empty cache "
        "each, the coordinator on loopback.\n\n" + markdown_table(header, rows) + "\n"
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one joiner")
    p.add_argument("--joiners", type=int, default=None, help="nodes joining in turn (default 3)")
    p.add_argument("--model", help="default: random GPT-2 124M, made once")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a join may take")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for join.json and join.md")
    opts = p.parse_args(argv)
    opts.joiners = opts.joiners or (1 if opts.quick else 3)
    raise_on_sigterm()
    started = time.perf_counter()
    result: dict = {"machine": machine_info()}
    result.update(measure(opts))
    return save_results(result, started, opts.out, "join", render_markdown)


if __name__ == "__main__":
    main()
