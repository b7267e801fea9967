"""``nanoshard demo``: a whole swarm on this machine, shown end to end.

Starts a coordinator and N volunteer nodes as separate processes (mDNS bound to loopback,
so the nodes find the coordinator by themselves), waits until every unit is served, starts
the HTTP gateway (``nanoshard api``: OpenAI's API and the live web view) and prints its URL,
shows the status table, streams a generation through the nodes with a per-hop timing
summary, and stops every process it started, also on Ctrl-C or SIGTERM. With ``--keep`` the
swarm and the gateway stay up after the generation, for the web view and API clients, until
Ctrl-C or SIGTERM. It ends as the servers it runs do: 130 on Ctrl-C, 0 on SIGTERM.
"""

from __future__ import annotations

import contextlib
import errno
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from nanoshard.checkpoint import open_checkpoint
from nanoshard.client.sdk import Client, GenerationResult
from nanoshard.client.swarm import CoordinatorClient
from nanoshard.cliutil import API, COORDINATOR, STOP_SIGNALS, listening_pattern
from nanoshard.codec import check_codec
from nanoshard.errors import InvalidArgument, NanoshardError, Unavailable
from nanoshard.generation import STOP_NOTES
from nanoshard.sampling import SamplingParams
from nanoshard.v1 import coordinator_pb2 as cpb

from .statusview import StatusView, pack

LOOPBACK = "127.0.0.1"
STOP_TIMEOUT_S = 10.0  # a process still running this long after SIGTERM is killed


MAX_NODES = 32  # volunteer processes one demo starts, at most


@dataclass
class DemoConfig:
    nodes: int = 3
    prompt: str = "ROMEO:\n"
    model: str = "demo"
    max_new_tokens: int = 120
    temperature: float = 0.8
    top_k: int = 40
    seed: int = 0
    codec: str = "fp32"
    timeout: float = 180.0  # seconds to wait for the swarm to form
    api_port: int = 8000  # the gateway's (another free one if taken; 0: any free)
    keep: bool = False  # keep the swarm and the gateway up after the generation, until stopped


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the demo is as Ctrl-C raises KeyboardInterrupt (a subclass: what
    stops on Ctrl-C stops on it too)."""


def terminate(*_: object) -> None:
    """The demo's SIGTERM handler. Only the first counts: a second one would cut short the
    stopping of the processes it started."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


class Processes:
    """Child processes, each logging to a file; all stopped by PID at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the child
        # Ctrl-C and SIGTERM wait until the child is on the list (else one started just then
        # runs on: in a session of its own, it never sees the signal either). The mask
        # outlives exec: the child takes them again as it starts (``run_cli``), not in a
        # ``preexec_fn``, which would make Python fork() beside this process's live gRPC
        # channels (whose fork handlers crashed a child now and then: "api exited with -6").
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            popen = subprocess.Popen(
                [sys.executable, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches us only
            )
            self.children.append((name, popen))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return popen

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def check(self, spare: Collection[str] = ()) -> None:
        """Raise if a child has ended, other than those named in ``spare``."""
        for name, code in self.ended().items():
            if name not in spare:
                tail = "\n".join(self.log(name).splitlines()[-5:])
                raise NanoshardError(f"{name} exited with {code}:\n{tail}")

    def ended(self) -> dict[str, int]:
        """The children that have ended, and their exit codes."""
        return {name: code for name, p in self.children if (code := p.poll()) is not None}

    def stop(self) -> list[str]:
        """Stop every child (SIGTERM: a node leaves the swarm); those that did not stop
        within ``STOP_TIMEOUT_S`` are killed, and named."""
        for _, popen in reversed(self.children):
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        killed = []
        for name, popen in self.children:
            try:
                popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
                killed.append(name)
        return killed


def wait_for_address(procs: Processes, name: str, who: str, timeout: float) -> str:
    """The address in ``name``'s listening line (printed by ``who``), once it is there."""
    pattern = listening_pattern(who)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m := pattern.search(procs.log(name)):
            return m.group(1)
        procs.check()
        time.sleep(0.1)
    raise Unavailable(f"{name} did not start within {timeout:.0f} s")


def check_config(config: DemoConfig) -> None:
    """Refuse a bad setting before anything starts (not after the swarm formed)."""
    if not 1 <= config.nodes <= MAX_NODES:
        raise InvalidArgument(f"--nodes must be 1 to {MAX_NODES} (each is a process)")
    if config.max_new_tokens < 1:
        raise InvalidArgument(f"--max-new-tokens must be at least 1, got {config.max_new_tokens}")
    SamplingParams(temperature=config.temperature, top_k=config.top_k, seed=config.seed)
    check_codec(config.codec)


def run_demo(config: DemoConfig, console: Console) -> int:
    check_config(config)
    checkpoint = open_checkpoint(config.model)
    model_bytes = checkpoint.stage_nbytes(0, checkpoint.config.n_units)
    # Each node may hold a bit more than its share (embed and head both need the token
    # embedding, so a split model weighs more than the whole), so the model must be split.
    share = model_bytes * 1.6 / config.nodes if config.nodes > 1 else model_bytes * 2
    memory = int(share / 0.8)  # placement fills 80 % of a node's memory with weights
    swarm = "demo-" + secrets.token_hex(3)
    signal.signal(signal.SIGTERM, terminate)  # stop the processes, as Ctrl-C does
    # Ctrl-C too where the demo started ignoring it (a shell's background job): Python then
    # installs no handler of its own, and the servers, which install theirs, would stop.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="nanoshard-demo-") as tmp:
        procs = Processes(Path(tmp))
        try:
            console.print(
                f"[bold]starting a coordinator and {config.nodes} nodes[/] (logs in {tmp})"
            )
            procs.start(
                "coordinator",
                [
                    "-m",
                    "nanoshard.cli",
                    "coordinator",
                    "--model",
                    config.model,
                    "--host",
                    LOOPBACK,
                    "--port",
                    "0",
                    "--mdns-interface",
                    LOOPBACK,
                    "--swarm",
                    swarm,
                    "--replicas",
                    "1",
                    "--heartbeat-interval",
                    "0.5",
                    "--heartbeat-timeout",
                    "3",
                ],
            )
            address = wait_for_address(procs, "coordinator", COORDINATOR, config.timeout)
            for i in range(config.nodes):
                procs.start(
                    f"node{i + 1}",
                    [
                        "-m",
                        "nanoshard.node.cli",
                        "join",
                        "--host",
                        LOOPBACK,
                        "--mdns-interface",
                        LOOPBACK,
                        "--swarm",
                        swarm,
                        "--name",
                        f"node{i + 1}",
                        "--max-memory",
                        str(memory),
                        "--cache-dir",
                        str(Path(tmp) / f"cache{i + 1}"),
                    ],
                )
            coordinator = CoordinatorClient(address)
            with console.status("waiting until every unit is served…"):
                status = wait_for_coverage(coordinator, procs, config.nodes, config.timeout)
            url = start_gateway(procs, address, config)
            console.print(f"[bold]web view:[/] {url}")  # (a line each: URLs are not wrapped)
            console.print(f"[bold]OpenAI API:[/] {url}/v1 (model {status.model_name!r})")
            console.print(StatusView(status))

            console.rule("generation")
            console.print(config.prompt, end="", style="bold")
            with Client(address, codec=config.codec) as client:
                result = client.generate(
                    config.prompt,
                    config.max_new_tokens,
                    temperature=config.temperature,
                    top_k=config.top_k,
                    seed=config.seed,
                    on_token=lambda t: console.print(t.text, end="", highlight=False),
                )
            console.print()
            console.rule()
            print_hops(console, result)
            coordinator.close()
            if config.keep:
                console.print(f"the swarm keeps running: open {url} (Ctrl-C stops it)")
                keep_running(procs, console)
            else:
                console.print("[dim]nanoshard demo --keep keeps the swarm and the web view up[/]")
            return 0
        except Terminated:
            return 0  # (a server's clean stop, once the finally has stopped every process)
        finally:
            with console.status("stopping the swarm…"):
                killed = procs.stop()
            if killed:
                console.print(
                    f"[yellow]killed {', '.join(killed)}: not stopped {STOP_TIMEOUT_S:g} s after "
                    "SIGTERM[/]"
                )
            console.print("[dim]all demo processes stopped[/]")


def free_port(host: str, port: int) -> int:
    """``port`` if nothing listens on it, else 0 (any free port)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            return 0
    return port


def start_gateway(procs: Processes, coordinator: str, config: DemoConfig) -> str:
    """``nanoshard api`` for the demo's swarm; its URL once it answers."""
    port = free_port(LOOPBACK, config.api_port) if config.api_port else 0
    procs.start(
        "api",
        ["-m", "nanoshard.cli", "api", "--coordinator", coordinator, "--host", LOOPBACK,
         "--port", str(port)],
    )  # fmt: skip
    return wait_for_address(procs, "api", API, config.timeout)


def keep_running(procs: Processes, console: Console) -> None:
    """Until Ctrl-C or SIGTERM, or the coordinator or the gateway ends. A node that ends (a
    user killing one, to see the swarm go on without it) is said, and the rest go on."""
    nodes = {name for name, _ in procs.children if name.startswith("node")}
    said: set[str] = set()
    while True:
        procs.check(spare=nodes)
        for name, code in procs.ended().items():
            if name not in said:
                said.add(name)
                console.print(f"[yellow]{name} exited with {code}[/]: the swarm goes on without it")
        time.sleep(0.5)


def wait_for_coverage(
    coordinator: CoordinatorClient, procs: Processes, nodes: int, timeout: float
) -> cpb.SwarmStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check()
        with contextlib.suppress(NanoshardError):
            status = coordinator.status()
            healthy = [n for n in status.nodes if n.healthy]
            if len(healthy) == nodes and all(u.replicas >= 1 for u in status.units):
                return status
        time.sleep(0.3)
    raise Unavailable(f"the swarm did not cover every unit within {timeout:.0f} s")


def print_hops(console: Console, result: GenerationResult) -> None:
    table = Table(title="who ran what (all steps)")
    for col in ("node", "units", "steps", "compute ms", "queue ms", "transfer ms", "bytes out"):
        table.add_column(col, justify="left" if col in ("node", "units") else "right")
    for r in result.hops:
        table.add_row(
            r["node"],
            f"[{r['units'][0]}, {r['units'][1]})",
            str(r["steps"]),
            f"{r['compute_ms']:.1f}",
            f"{r['queue_ms']:.1f}",
            f"{r['transfer_ms']:.1f}",
            f"{r['bytes_out']:,}",
        )
    console.print(table)
    phrases = [
        f"{len(result.token_ids)} tokens ({STOP_NOTES[result.stop_reason]});",
        f"time to first token {result.ttft_ms:.0f} ms,",
        f"then {result.mean_token_ms:.1f} ms/token",
    ]
    console.print(pack([Text(p) for p in phrases], console.width))
