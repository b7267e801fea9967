"""A whole swarm across a simulated LAN: the coordinator on one host, a node on each of
three others, every process in its own network namespace behind one bridge. The nodes
are given no coordinator address: they find it by mDNS across the bridge. Then a greedy
generation through them must equal the single-process reference token for token.

Needs root and iproute2 (skipped otherwise); all traffic stays inside namespaces this test
makes, and the harness (scripts/netlab.py) removes them and every process started through
it, also when the test fails. The hosts share the machine's host name (plain
``ip netns exec``): nothing in nanoshard may depend on host names being distinct.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from netns import SimulatedLan, unavailable
from swarm import wait_until

from nanoshard.checkpoint import open_checkpoint
from nanoshard.cliutil import COORDINATOR, listening_pattern

pytestmark = [pytest.mark.netns, pytest.mark.slow]

_REASON = unavailable()

BIN = Path(sys.executable).parent
HEARTBEAT = ["--heartbeat-interval", "0.5", "--heartbeat-timeout", "3"]
LISTENING = listening_pattern(COORDINATOR)
NODES = 3  # on hosts 1..3; host 0 runs the coordinator and the client


def _start(lan: SimulatedLan, host: int, log: Path, argv: list[str]) -> subprocess.Popen[Any]:
    """Start ``argv`` on ``host`` through the harness (so it is always stopped), output to ``log``."""
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        return lan.popen(host, argv, stdout=out, stderr=subprocess.STDOUT, text=True)


def _wait_for_line(
    log: Path, proc: subprocess.Popen[Any], pattern: re.Pattern[str], timeout: float
) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m := pattern.search(log.read_text()):
            return m
        if proc.poll() is not None:
            raise AssertionError(f"{log.stem} exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"{log.stem} did not print {pattern.pattern!r}:\n{log.read_text()}")


def _covered(status: dict[str, Any]) -> bool:
    healthy = [n for n in status["nodes"] if n["healthy"] and n["serving"] == n["stage"]]
    return len(healthy) == NODES == len(status["nodes"]) and all(
        u["replicas"] >= 1 for u in status["units"]
    )


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
def test_nodes_on_separate_hosts_find_the_coordinator_by_mdns_and_generate(tmp_path: Path) -> None:
    swarm = "lan-" + secrets.token_hex(4)
    checkpoint = open_checkpoint("demo")
    n_units = checkpoint.config.n_units
    # The demo's sizing for three nodes: each may hold about half the model, and a split
    # model weighs more than the whole (embed and head both hold the token embedding), so
    # two nodes cannot cover it: every node is needed.
    memory = int(checkpoint.stage_nbytes(0, n_units) * 1.6 / NODES / 0.8)
    prompt = ["--temperature", "0", "--max-new-tokens", "40", "--json", "JULIET:"]
    t0 = time.monotonic()
    with SimulatedLan(hosts=NODES + 1) as lan:
        addr = [h.address for h in lan.hosts]
        # The single-process reference needs no network: it runs while the swarm forms.
        local = _start(
            lan, 0, tmp_path / "local.log", [str(BIN / "nanoshard"), "generate", "--local", *prompt]
        )
        coord_log = tmp_path / "coordinator.log"
        coord = _start(
            lan, 0, coord_log,
            [str(BIN / "nanoshard"), "coordinator", "--model", "demo", "--host", addr[0],
             "--port", "0", "--mdns-interface", addr[0], "--swarm", swarm,
             "--replicas", "1", "--state-dir", str(tmp_path / "state"), *HEARTBEAT],
        )  # fmt: skip
        coordinator = _wait_for_line(coord_log, coord, LISTENING, timeout=60).group(1)
        assert coordinator.startswith(addr[0] + ":"), coordinator

        nodes = {}
        for i in range(1, NODES + 1):
            log = tmp_path / f"n{i}.log"
            nodes[i] = (log, _start(
                lan, i, log,
                [str(BIN / "nanoshard-node"), "join", "--host", addr[i], "--mdns-interface",
                 addr[i], "--swarm", swarm, "--max-memory", str(memory),
                 "--cache-dir", str(tmp_path / f"cache{i}"), "--name", f"n{i}", "--threads", "1"],
            ))  # fmt: skip
        for log, proc in nodes.values():
            _wait_for_line(log, proc, re.compile(r"serving units"), timeout=60)
            # no address was given: the node found the coordinator across the bridge
            assert "found coordinator coordinator-" in log.read_text()
            assert f" at {coordinator}" in log.read_text(), log.read_text()
        formed_s = time.monotonic() - t0

        # Coverage as a user on host 1 sees it (placement may still move a stage or two).
        def covered_from_host_1() -> dict[str, Any]:
            done = lan.run(
                1, [str(BIN / "nanoshard"), "status", "--coordinator", coordinator, "--json"]
            )
            assert done.returncode == 0, done.stderr
            status = json.loads(done.stdout)
            assert _covered(status), json.dumps(status, indent=1)
            return status

        status = wait_until(
            "every node serving its stage, seen from host 1", covered_from_host_1, 90
        )
        by_name = {n["name"]: n for n in status["nodes"]}
        assert set(by_name) == {f"n{i}" for i in nodes}
        for i in nodes:  # each node listens and is reached on its own host's address
            assert by_name[f"n{i}"]["address"].rsplit(":", 1)[0] == addr[i]
        stages = sorted(tuple(n["stage"]) for n in status["nodes"])
        assert len(stages) == NODES and stages[0][0] == 0 and stages[-1][1] == n_units
        assert all(a[1] == b[0] for a, b in itertools.pairwise(stages)), stages

        # A generation from host 0 (which serves nothing): every hop crosses the bridge.
        routed = lan.run(
            0, [str(BIN / "nanoshard"), "generate", "--coordinator", coordinator, *prompt],
            timeout=60,
        )  # fmt: skip
        assert routed.returncode == 0, routed.stderr
        out = json.loads(routed.stdout)
        assert local.wait(timeout=60) == 0, (tmp_path / "local.log").read_text()
        reference = json.loads((tmp_path / "local.log").read_text().splitlines()[-1])
        assert len(reference["token_ids"]) >= 10  # (40 unless the model ends its text)
        assert out["token_ids"] == reference["token_ids"]

        hops = sorted(out["hops"], key=lambda h: h["units"][0])
        assert [tuple(h["units"]) for h in hops] == stages
        hop_hosts = {h["address"].rsplit(":", 1)[0] for h in hops}
        assert hop_hosts == {addr[i] for i in nodes}  # three hosts, three namespaces
        assert {h["node"] for h in hops} == {f"n{i}" for i in nodes}
        assert all(h["steps"] >= len(out["token_ids"]) for h in hops)  # every step, every hop
        generated_s = time.monotonic() - t0
        procs = [local, coord, *(p for _, p in nodes.values())]
        print(f"swarm formed in {formed_s:.1f} s, generated by {generated_s:.1f} s")

    # The harness stopped every process and removed every namespace.
    assert all(p.poll() is not None for p in procs)
    assert lan.suffix not in _namespaces()
