"""A nanoshard swarm across a simulated LAN on this one machine.

    sudo .venv/bin/python scripts/lan_demo.py [--hosts 4] [--prompt TEXT] [--max-new-tokens N]

Builds a LAN out of Linux network namespaces (scripts/netlab.py: one bridge, one namespace
per host, private 10.77.X.0/24 addresses that exist only inside those namespaces; each
host also gets its own host name through ``unshare --uts``). Then, like people on one
office network would:

1. host0 starts a coordinator, advertised by mDNS on host0's address only;
2. every other host starts ``nanoshard-node join`` with no coordinator address: it finds
   the coordinator by mDNS across the bridge, fetches its stage's weights from it and
   serves them (each node gets memory for about half the model, so it must be split);
3. host1 shows ``nanoshard status`` (finding the coordinator by mDNS too);
4. host0, which serves no units, streams a generation through the nodes, so every hop
   crosses the bridge; the per-hop lines name the node (``hostname:port``) and its units,
   and a table maps each node to its host and address.

Every process and namespace is removed at the end, also on an error or Ctrl-C. Needs root
and iproute2; nothing is added to the root namespace and no packet leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from netlab import SimulatedLan, unavailable
from rich.console import Console
from rich.table import Table

from nanoshard.cliutil import COORDINATOR, listening_pattern

BIN = Path(sys.executable).parent
LISTENING = listening_pattern(COORDINATOR)


def refusal() -> str | None:
    """One line saying why the demo cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are a Linux feature"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing: apt-get install -y iproute2"
    if os.geteuid() != 0:
        return "network namespaces need root: sudo .venv/bin/python scripts/lan_demo.py"
    return unavailable()


def own_hostnames_work() -> bool:
    """``unshare --uts`` can be missing or forbidden (some containers): then the hosts share
    this machine's name, which nanoshard does not mind (node names just repeat it)."""
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "--uts", "--", "true"], capture_output=True)
    return done.returncode == 0


class LanSwarm:
    """The processes of the demo, each logging to a file, started through the LAN harness
    (which stops whatever is left when the LAN closes)."""

    def __init__(self, lan: SimulatedLan, logs: Path, console: Console) -> None:
        self.lan = lan
        self.logs = logs
        self.console = console
        self.procs: dict[str, tuple[int, subprocess.Popen[Any]]] = {}

    def label(self, host: int) -> str:
        h = self.lan.hosts[host]
        return h.hostname or f"host{host}"

    def show(self, host: int, argv: list[str]) -> None:
        """Print a command as the person on that host would type it."""
        words = [Path(argv[0]).name, *argv[1:]]
        self.console.print(f"[cyan]{self.label(host)}$[/] {shlex.join(words)}", highlight=False)

    def start(self, name: str, host: int, argv: list[str]) -> subprocess.Popen[Any]:
        self.show(host, argv)
        with (self.logs / f"{name}.log").open("w") as out:
            proc = self.lan.popen(
                host,
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the demo only; it stops them in order
            )
        self.procs[name] = (host, proc)
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def check(self) -> None:
        for name, (_, proc) in self.procs.items():
            if proc.poll() is not None:
                tail = "\n".join(self.log(name).splitlines()[-8:])
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def wait_for(self, name: str, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := pattern.search(self.log(name)):
                return m
            self.check()
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not print {pattern.pattern!r} within {timeout:.0f} s")

    def stop(self, names: list[str], timeout: float = 10.0) -> None:
        """SIGTERM, then wait: nodes say goodbye on mDNS and leave the swarm cleanly."""
        for name in names:
            if self.procs[name][1].poll() is None:
                self.procs[name][1].terminate()
        deadline = time.monotonic() + timeout
        for name in names:
            proc = self.procs[name][1]
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def status_json(swarm: LanSwarm, host: int, coordinator: str) -> dict[str, Any] | None:
    done = swarm.lan.run(
        host, [str(BIN / "nanoshard"), "status", "--coordinator", coordinator, "--json"]
    )
    return json.loads(done.stdout) if done.returncode == 0 else None


def covered(status: dict[str, Any] | None, nodes: int) -> bool:
    if status is None:
        return False
    ready = [n for n in status["nodes"] if n["healthy"] and n["serving"] == n["stage"]]
    return len(ready) == nodes and all(u["replicas"] >= 1 for u in status["units"])


def run(args: argparse.Namespace, console: Console) -> int:
    from nanoshard.checkpoint import open_checkpoint  # imports torch: not before the checks

    checkpoint = open_checkpoint("demo")
    n_nodes = args.hosts - 1
    model_bytes = checkpoint.stage_nbytes(0, checkpoint.config.n_units)
    # nanoshard demo's sizing: a node may hold a bit more than its share (embed and head
    # both need the token embedding), never the whole model, so the model must be split.
    memory = int(model_bytes * 1.6 / n_nodes / 0.8)  # placement fills 80 % with weights
    swarm_name = "lan-" + secrets.token_hex(3)
    hostnames = own_hostnames_work()

    console.rule("[bold]building a simulated LAN")
    t0 = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="nanoshard-lan-") as tmp,
        SimulatedLan(hosts=args.hosts, own_hostnames=hostnames) as lan,
    ):
        swarm = LanSwarm(lan, Path(tmp), console)
        layout = Table(title=f"{lan.subnet}.0/{lan.prefix_len}, bridge br0 in {lan.bridge_ns}")
        for col in ("host", "address", "network namespace", "runs"):
            layout.add_column(col)
        for h in lan.hosts:
            runs = "coordinator, then the client" if h.index == 0 else "a node"
            layout.add_row(swarm.label(h.index), h.address, h.netns, runs)
        console.print(layout)
        if not hostnames:
            console.print("[yellow]unshare --uts is unavailable: the hosts share one host name")
        console.print(
            f"[dim]built in {time.monotonic() - t0:.1f} s; logs in {tmp} (removed at the end)[/]"
        )
        try:
            code = run_swarm(args, swarm, memory, model_bytes, swarm_name, n_nodes)
        except KeyboardInterrupt:
            console.print("\n[yellow]interrupted[/]")
            code = 130
        finally:
            console.rule("[bold]tearing down")
            nodes = [name for name in swarm.procs if name.startswith("node")]
            swarm.stop(nodes[::-1])
            swarm.stop([name for name in swarm.procs if name not in nodes])
            console.print(f"stopped {len(swarm.procs)} processes; removing the namespaces")
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    if lan.suffix in left:
        console.print(f"[red]namespaces *-{lan.suffix} are left over: ip netns del them")
        return 1
    console.print(f"the LAN is gone (total {time.monotonic() - t0:.1f} s)")
    return code


def run_swarm(
    args: argparse.Namespace,
    swarm: LanSwarm,
    memory: int,
    model_bytes: int,
    swarm_name: str,
    n_nodes: int,
) -> int:
    lan, console = swarm.lan, swarm.console
    addr = [h.address for h in lan.hosts]

    console.rule(f"[bold]host0 starts a coordinator (swarm {swarm_name!r})")
    t0 = time.monotonic()
    swarm.start(
        "coordinator",
        0,
        [str(BIN / "nanoshard"), "coordinator", "--model", "demo", "--host", addr[0],
         "--port", "7960", "--mdns-interface", addr[0], "--swarm", swarm_name,
         "--replicas", "1", "--heartbeat-interval", "0.5", "--heartbeat-timeout", "3"],
    )  # fmt: skip
    coordinator = swarm.wait_for("coordinator", LISTENING, timeout=60).group(1)
    console.print(f"listening on {coordinator}, advertised by mDNS ({time.monotonic() - t0:.1f} s)")

    console.rule(f"[bold]{n_nodes} hosts join, finding the coordinator by mDNS")
    console.print(
        f"[dim]the model's weights are {model_bytes / 2**20:.1f} MiB; each node may use "
        f"{memory / 2**20:.1f} MiB, so the model must be split[/]"
    )
    for i in range(1, n_nodes + 1):
        swarm.start(
            f"node{i}",
            i,
            [str(BIN / "nanoshard-node"), "join", "--host", addr[i], "--mdns-interface",
             addr[i], "--swarm", swarm_name, "--max-memory", str(memory),
             "--cache-dir", str(swarm.logs / f"cache{i}"), "--threads", "1"],
        )  # fmt: skip
    found = re.compile(r"found coordinator (\S+) at (\S+)")
    serving = re.compile(r"serving units \[(\d+), (\d+)\) on (\S+)")
    for i in range(1, n_nodes + 1):
        m = swarm.wait_for(f"node{i}", found, timeout=60)
        console.print(f"{swarm.label(i)}: found coordinator {m.group(1)} at {m.group(2)}")
    deadline = time.monotonic() + args.timeout
    status = None
    with console.status("waiting until every unit is served…"):
        while not covered(status, n_nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the swarm did not cover the model in {args.timeout:.0f} s")
            swarm.check()
            if all(serving.search(swarm.log(f"node{i}")) for i in range(1, n_nodes + 1)):
                status = status_json(swarm, 1, coordinator)
            time.sleep(0.5)
    console.print(f"every unit served after {time.monotonic() - t0:.1f} s")

    console.rule("[bold]host1 asks for the status (coordinator found by mDNS)")
    argv = [str(BIN / "nanoshard"), "status", "--mdns-interface", addr[1]]
    swarm.show(1, argv)
    lan.run(1, argv, capture_output=False, timeout=60)

    console.rule("[bold]host0 generates through the swarm (coordinator found by mDNS)")
    argv = [str(BIN / "nanoshard"), "generate", "--mdns-interface", addr[0],
            "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
            "--top-k", "40",
            args.prompt]  # fmt: skip
    swarm.show(0, argv)
    # stdout and stderr are the terminal's: the text streams, then the per-hop lines follow.
    client = lan.popen(0, argv, start_new_session=True)
    if client.wait(timeout=300) != 0:
        raise RuntimeError(f"the generation failed (exit {client.returncode})")

    hosts_by_address = {h.address: h for h in lan.hosts}
    status = status_json(swarm, 1, coordinator)
    table = Table(title="where each node runs, and which units it served")
    for col in ("node", "host", "network namespace", "address", "units"):
        table.add_column(col)
    for n in sorted(status["nodes"] if status else [], key=lambda n: n["stage"] or [0]):
        host = hosts_by_address[n["address"].rsplit(":", 1)[0]]
        units = f"[{n['stage'][0]}, {n['stage'][1]})" if n["stage"] else "idle"
        table.add_row(n["name"], swarm.label(host.index), host.netns, n["address"], units)
    console.print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=4, help="hosts on the LAN, >= 3 (default 4)")
    parser.add_argument("--prompt", default="ROMEO:\n", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=120)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--timeout", type=float, default=120, help="seconds to form the swarm")
    args = parser.parse_args(argv)
    if args.hosts < 3:
        parser.error("--hosts must be at least 3: a coordinator and two nodes")
    reason = refusal()
    if reason:
        print(f"lan_demo: {reason}", file=sys.stderr)
        return 2
    console = Console()
    try:
        return run(args, console)
    except RuntimeError as exc:  # a process failed or the LAN could not be built
        console.print(f"[bold red]lan_demo: {exc}")
        return 1
    except KeyboardInterrupt:  # while the LAN was being built or removed
        console.print("\n[yellow]lan_demo: interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
