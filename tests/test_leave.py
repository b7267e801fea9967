"""A volunteer's node tells its owner what it does, and leaves cleanly on Ctrl-C: one ready
line (the stage, the memory it takes, how to leave), then on SIGINT it tells the
coordinator it leaves before it exits, so the swarm drops it at once rather than after
its heartbeats time out."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest
from swarm import BIN, Swarm, settled, wait_until

from nanoshard.client import Client
from nanoshard.client.swarm import CoordinatorClient
from nanoshard.statusview import status_json

pytestmark = pytest.mark.slow

PROMPT = "KING HENRY:\n"

# A silent node is dropped only after 20 s (the coordinator places nothing for its first
# 21 s either): within the 15 s wait below, only the node's Leave can take it out.
HEARTBEAT_TIMEOUT_S = 20
SLOW_TO_DROP = ["--heartbeat-interval", "0.5", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S)]
READY = re.compile(
    r"^nanoshard-node: ready: serving units \[(\d+), (\d+)\) \(.+\) of demo on (\S+) \(cpu\); "
    r"memory: takes at most 256\.0 MiB for weights and KV caches \((\d+\.\d) MiB of weights \+ "
    r"up to (\d+\.\d) MiB of KV caches; the process holds \d+\.\d (MiB|GiB) now\); Ctrl-C "
    r"leaves the swarm$"
)


def test_ctrl_c_leaves_the_swarm_after_one_ready_line(tmp_path: Path) -> None:
    with Swarm() as swarm:
        _, address = swarm.coordinator("--replicas", "1", "--no-mdns", *SLOW_TO_DROP)
        node = swarm.join(
            "--coordinator", address, "--no-mdns", "--name", "owner-laptop",
            "--max-memory", "256M", "--cache-dir", str(tmp_path / "node"),
        )  # fmt: skip
        coordinator = CoordinatorClient(address)
        status = wait_until(
            "the node serving the whole model",
            lambda: settled(status_json(coordinator.status()), nodes=1),
            timeout=HEARTBEAT_TIMEOUT_S + 60,
        )
        assert status is not None
        (member,) = status["nodes"]
        ready = node.wait_for(READY, timeout=10)  # printed once it serves: already there
        assert [int(ready[1]), int(ready[2])] == member["stage"]
        assert ready[3] == member["address"]
        weights, kv = float(ready[4]), float(ready[5])
        assert weights > 0 and abs(weights + kv - 256.0) <= 0.2  # the promise, shared out
        assert sum(1 for line in node.lines if READY.search(line)) == 1

        node.popen.send_signal(signal.SIGINT)
        wait_until(
            "the coordinator to list no node",
            lambda: not coordinator.status().nodes,
            timeout=HEARTBEAT_TIMEOUT_S * 0.75,
        )
        assert node.wait(timeout=30) == 130  # (as Ctrl-C ends any command)
        assert "left the swarm" in node.output and "Traceback" not in node.output
        assert node.lines[-1] == "nanoshard-node: interrupted", node.output
        coordinator.close()


def test_join_help_shows_the_memory_it_would_take_here() -> None:
    done = subprocess.run(
        [str(BIN / "nanoshard-node"), "join", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    found = re.search(r"on this machine now: (\d+\.\d) (MiB|GiB) on (cpu|cuda\S*|mps)\)", text)
    assert found, text


def test_a_session_through_a_node_that_leaves_goes_on_on_its_replica(tmp_path: Path) -> None:
    """Two nodes, each holding the whole model; a greedy session runs on one, whose owner
    presses Ctrl-C: the coordinator drops it, it exits, and the session goes on on the
    other with exactly the tokens of an undisturbed run."""
    with Swarm() as swarm:
        _, address = swarm.coordinator("--replicas", "2", "--no-mdns", *SLOW_TO_DROP)
        procs = [
            swarm.join(
                "--coordinator",
                address,
                "--no-mdns",
                "--name",
                f"n{i}",
                "--max-memory",
                "256M",
                "--cache-dir",
                str(tmp_path / f"n{i}"),
            )
            for i in range(2)
        ]
        coordinator = CoordinatorClient(address)
        wait_until(
            "both nodes serving the whole model",
            lambda: settled(status_json(coordinator.status()), nodes=2, replicas=2),
            timeout=HEARTBEAT_TIMEOUT_S + 60,
        )
        by_address = {p.wait_for(READY, timeout=10)[3]: p for p in procs}
        with Client(address, check_rate=0) as client:
            reference = client.generate(PROMPT, 40, temperature=0.0)
            with client.session(temperature=0.0) as chat:
                first = chat.generate(PROMPT, 1)
                (hop,) = first.steps[0]  # one hop: the whole model
                victim = by_address[hop["address"]]
                victim.popen.send_signal(signal.SIGINT)
                wait_until(
                    "the coordinator to drop the node that left",
                    lambda: hop["address"] not in [n.address for n in coordinator.status().nodes],
                    timeout=HEARTBEAT_TIMEOUT_S * 0.75,
                )
                assert victim.wait(timeout=30) == 130  # gone: the next step cannot reach it
                # its open stream ended as it stopped, not cancelled by gRPC (which logs that)
                assert "Traceback" not in victim.output, victim.output
                rest = chat.generate("", 39)
                more = chat.generate("", 3)
        assert more.recoveries == []  # each call's recoveries are its own
        assert first.token_ids + rest.token_ids == reference.token_ids
        assert any(hop["address"] in r.detail for r in rest.recoveries), rest.recoveries
        assert [h["address"] for h in rest.steps[-1]] != [hop["address"]]
        coordinator.close()
