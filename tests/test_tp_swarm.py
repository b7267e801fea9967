"""Tensor-parallel groups end to end: a coordinator forming groups and volunteers as real
processes on loopback; each group's members join a gloo process group on 127.0.0.1."""

from __future__ import annotations

import json
import re
import secrets
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from routes import fixed_session, led_by
from swarm import Swarm, local_tokens, nanoshard, settled, wait_until

from nanoshard.checkpoint import open_checkpoint, resolve_model, save_hf_checkpoint
from nanoshard.client import Client
from nanoshard.client.swarm import CoordinatorClient
from nanoshard.config import GPTConfig
from nanoshard.engine import init_weights
from nanoshard.generation import generate as generate_on
from nanoshard.statusview import status_json
from nanoshard.tokenizer import encoding_for
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

STEADY = ["--heartbeat-interval", "0.5", "--heartbeat-timeout", "10"]
HEARTBEAT = ["--heartbeat-interval", "0.5", "--heartbeat-timeout", "3"]


def groups_ready(client: CoordinatorClient, nodes: int, size: int) -> dict | None:
    """The status once ``nodes`` nodes serve, every one of them in a group of ``size``."""
    status = settled(status_json(client.status()), nodes)
    if status is None or not all(n["tp"]["size"] == size for n in status["nodes"]):
        return None
    return status


def generate(*args: str) -> list[int]:
    done = nanoshard("generate", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["token_ids"]


def test_a_swarm_of_tp2_groups_generates_the_local_tokens(tmp_path: Path) -> None:
    """Four volunteers, --tp 2, each with memory for about a third of the model: two groups
    of two, each serving a stage; greedy and seeded sampling through them give the tokens
    of the whole model in one process."""
    name = "tp" + secrets.token_hex(4)
    ckpt = open_checkpoint("demo")
    memory = str(int(ckpt.stage_nbytes(0, ckpt.config.n_units) * 0.35 / 0.8))
    with Swarm() as swarm:
        _, address = swarm.coordinator("--swarm", name, "--tp", "2", "--replicas", "1", *STEADY)
        for i in range(4):
            swarm.join("--swarm", name, "--coordinator", address, "--max-memory", memory,
                       "--cache-dir", str(tmp_path / f"n{i}"), "--name", f"n{i}")  # fmt: skip
        client = CoordinatorClient(address)
        status = wait_until("two TP-2 groups", lambda: groups_ready(client, 4, 2), timeout=240)
        groups = {n["tp"]["group"] for n in status["nodes"]}
        assert len(groups) == 2
        assert sorted(n["tp"]["rank"] for n in status["nodes"]) == [0, 0, 1, 1]
        assert all(u["replicas"] == 1 for u in status["units"])  # a group counts once
        route = client.route()
        assert len(route.hops) == 2 and all(len(h.addresses) == 1 for h in route.hops)

        def pinged() -> list | None:  # each measured its links to the three it may group with
            links = [n["peer_links"] for n in status_json(client.status())["nodes"]]
            return links if all(len(ls) == 3 for ls in links) else None

        links = wait_until("every node's links to its peers", pinged, timeout=120)
        assert all(p["rtt_ms"] > 0 and p["bytes_per_s"] > 0 for ls in links for p in ls)

        coordinator = ["--coordinator", address, "--check-rate", "0"]
        greedy = ["--max-new-tokens", "100", "--temperature", "0", "JULIET:"]
        assert generate(*coordinator, *greedy) == local_tokens(*greedy)
        seeded = ["--max-new-tokens", "40", "--temperature", "0.9", "--top-k", "40",
                  "--top-p", "0.95", "--seed", "11", "ROMEO:"]  # fmt: skip
        assert generate(*coordinator, *seeded) == local_tokens(*seeded)
        done = nanoshard("generate", "--json", *coordinator, *greedy)
        hops = json.loads(done.stdout)["hops"]
        assert [h["tp"] for h in hops] == [2, 2]
        assert all(h["collective_ms"] > 0 for h in hops)

        # A member takes no session of its own, and no command but from its rank 0 ...
        member = next(n for n in status["nodes"] if n["tp"]["rank"] == 1)
        with grpc.insecure_channel(member["address"]) as channel:
            stub = pb_grpc.NodeStub(channel)
            spec = pb.SessionSpec(session_id=secrets.token_bytes(16), max_length=16, codec="fp32")
            with pytest.raises(grpc.RpcError) as refused:
                stub.Open(pb.OpenRequest(spec=spec), timeout=10)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "rank 1 of a tensor-parallel group" in refused.value.details()
            forged = pb.GroupCommand(group="not-" + member["tp"]["group"], open=pb.OpenRequest())
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Group(iter([forged]), timeout=10))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert member["tp"]["group"] in refused.value.details()
        # ... and its group still serves
        assert generate(*coordinator, *greedy) == local_tokens(*greedy)


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A random GPT2LMHeadModel with GPT-2's vocabulary, saved by transformers itself."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, n_positions=160, bos_token_id=None,
        eos_token_id=None, initializer_range=0.1,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases and norms away from 0 and 1, so each one matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("hf-gpt2")
    model.save_pretrained(directory)
    return model, directory


def test_a_tp2_group_gives_transformers_greedy_tokens(
    hf_gpt2: tuple[Any, Path], tmp_path: Path
) -> None:
    """A coordinator serving a Hugging Face checkpoint with --tp 2 and two volunteers: one
    group of two (heads, MLP and vocabulary split) gives transformers' own greedy tokens."""
    model, directory = hf_gpt2
    name = "tp" + secrets.token_hex(4)
    prompt, n_new = [5, 17, 99, 3, 42, 8, 64, 1], 100
    with torch.inference_mode():
        reference = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    with Swarm() as swarm:
        _, address = swarm.coordinator(
            "--model", str(directory), "--swarm", name, "--tp", "2", "--replicas", "1", *STEADY
        )
        for i in range(2):
            swarm.join("--swarm", name, "--coordinator", address,
                       "--cache-dir", str(tmp_path / f"n{i}"), "--name", f"n{i}")  # fmt: skip
        client = CoordinatorClient(address)
        wait_until("a TP-2 group", lambda: groups_ready(client, 2, 2), timeout=240)
        with Client(address, check_rate=0) as sdk:
            result = sdk.generate(prompt, n_new, temperature=0.0)
        client.close()
    assert result.steps[-1][0]["tp"] == 2  # through the group
    assert result.token_ids == reference
    assert len(set(reference)) > 5  # a real sequence, not one token repeated


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_lost_member_costs_nothing_but_time(tmp_path: Path, fault: str) -> None:
    """Two TP-2 groups, each serving the whole model (replicas of each other): a member of
    the group a session runs on is killed (SIGKILL) or hangs (SIGSTOP: its collectives never
    answer) mid-generation; the session goes on on the other group, replayed, with the same
    tokens, and the coordinator re-forms the swarm."""
    name = "tp" + secrets.token_hex(4)
    with Swarm() as swarm:
        _, address = swarm.coordinator("--swarm", name, "--tp", "2", "--replicas", "2", *HEARTBEAT)
        join = ["--swarm", name, "--coordinator", address]
        procs = [
            swarm.join(*join, "--cache-dir", str(tmp_path / f"n{i}"), "--name", f"n{i}")
            for i in range(4)
        ]
        client = CoordinatorClient(address)
        status = wait_until("two TP-2 groups", lambda: groups_ready(client, 4, 2), timeout=240)
        route = wait_until(
            "a route with both groups", lambda: (r := client.route()).hops[0].addresses[1:] and r
        )
        assert len(route.hops) == 1 and len(route.hops[0].addresses) == 2
        sampling = {"temperature": 0.9, "top_k": 50, "seed": 5}
        with Client(address, check_rate=0) as sdk:
            reference = sdk.generate("JULIET:", 120, **sampling)
            with sdk.session(**sampling) as chat:
                first = chat.generate("JULIET:", 1)
                rank0 = first.steps[0][0]["address"]
                group = next(n["tp"]["group"] for n in status["nodes"] if n["address"] == rank0)
                member = next(
                    n for n in status["nodes"] if n["tp"]["group"] == group and n["tp"]["rank"] == 1
                )
                victim = procs[int(member["name"].removeprefix("n"))]
                seen = 0

                def on_token(_token: object) -> None:
                    nonlocal seen
                    seen += 1
                    if seen == 30:  # mid-generation
                        victim.popen.send_signal(
                            signal.SIGKILL if fault == "kill" else signal.SIGSTOP
                        )

                rest = chat.generate("", 119, on_token=on_token)
        assert seen == len(rest.token_ids) >= 30
        assert first.token_ids + rest.token_ids == reference.token_ids
        assert rest.recoveries, "the failure should show in the timings"
        # A hung member costs at most its group's collective deadline (20 s), never a hang.
        assert all(r.ms < 60_000 for r in rest.recoveries)

        # the three nodes left are placed again: none of them still in the broken group
        def reformed() -> dict | None:  # (--tp 2 leaves the odd node idle: not "healthy")
            s = status_json(client.status())
            nodes = s["nodes"]
            if len(nodes) != 3 or any(n["serving"] != n["stage"] for n in nodes):
                return None
            if group in {n["tp"]["group"] for n in nodes}:
                return None
            return s if all(u["replicas"] >= 1 for u in s["units"]) else None

        wait_until("the broken group dissolved", reformed, timeout=120)
        victim.popen.send_signal(signal.SIGCONT)  # (a hung volunteer that wakes up joins again)


def test_a_group_without_a_spare_re_forms_with_the_volunteer_who_comes(tmp_path: Path) -> None:
    """The only group: two volunteers, each too small for the demo model alone. Rank 1 is
    killed mid-generation and a third volunteer joins. Rank 0 is not grouped again with
    the dead member (it sat 20 s in a rendezvous nobody came to, and the newcomer waited
    behind it past the client's 20 s wait for a route) but with the newcomer, and the
    generation goes on with the tokens of a run without the loss. Default heartbeats and
    timeouts: what a user gets."""
    name = "tp" + secrets.token_hex(4)
    with Swarm() as swarm:
        _, address = swarm.coordinator("--swarm", name)

        def volunteer(i: int) -> Any:
            return swarm.join("--swarm", name, "--coordinator", address, "--max-memory", "5M",
                              "--cache-dir", str(tmp_path / f"n{i}"), "--name", f"n{i}")  # fmt: skip

        procs = [volunteer(0), volunteer(1)]
        client = CoordinatorClient(address)
        status = wait_until("one TP-2 group", lambda: groups_ready(client, 2, 2), timeout=240)
        rank1 = next(n for n in status["nodes"] if n["tp"]["rank"] == 1)
        victim = procs[int(rank1["name"].removeprefix("n"))]
        with Client(address, check_rate=0) as sdk:
            reference = sdk.generate("ROMEO:", 120, temperature=0.0)
            seen = 0

            def on_token(_token: object) -> None:
                nonlocal seen
                seen += 1
                if seen == 20:
                    victim.popen.send_signal(signal.SIGKILL)
                    volunteer(2)

            result = sdk.generate("ROMEO:", 120, temperature=0.0, on_token=on_token)
        client.close()
    assert result.token_ids == reference.token_ids
    assert [r.kind for r in result.recoveries] == ["reroute"], result.recoveries
    assert "a member's connection closed" in result.recoveries[0].detail, result.recoveries
    # (about 4 s here: the newcomer's start; grouped with the dead member, rank 0 first
    # waited out its 20 s rendezvous)
    assert result.recoveries[0].ms < 15_000, result.recoveries


def test_a_group_whose_member_slows_down_is_routed_around_then_given_a_spare(
    tmp_path: Path,
) -> None:
    """Two TP-2 groups serving the whole model (replicas of each other); one member computes
    10 times slower than it measured at start (``slow:10:0``: its owner took the machine
    back). A greedy generation through its group gives the local tokens. Then the member's
    live speed ratio shows its slowness and its partner's does not (the partner waits for
    it in their collectives, which is not its own time); the coordinator counts the member
    slowed, and new routes take the other group. A spare volunteer that comes then takes
    the member's place, and the swarm gives the local tokens again."""
    name = "tp" + secrets.token_hex(4)
    greedy = ["--max-new-tokens", "60", "--temperature", "0", "JULIET:"]
    with Swarm() as swarm:
        coordinator, address = swarm.coordinator(
            "--swarm", name, "--tp", "2", "--replicas", "2", *STEADY
        )

        def volunteer(i: int, env: dict[str, str] | None = None) -> None:
            swarm.join("--swarm", name, "--coordinator", address, "--name", f"n{i}",
                       "--cache-dir", str(tmp_path / f"n{i}"), env=env)  # fmt: skip

        volunteer(0, {"NANOSHARD_FAULT": "slow:10:0"})
        for i in range(1, 4):
            volunteer(i)
        client = CoordinatorClient(address)
        status = wait_until("two TP-2 groups", lambda: groups_ready(client, 4, 2), timeout=240)
        group = next(n["tp"]["group"] for n in status["nodes"] if n["name"] == "n0")
        members = {n["tp"]["rank"]: n for n in status["nodes"] if n["tp"]["group"] == group}
        partner = next(n["name"] for n in members.values() if n["name"] != "n0")
        slowed = members[0]["address"]  # (the group's address: its rank 0's)
        ckpt = open_checkpoint("demo")
        enc = encoding_for(ckpt.path)
        local = local_tokens(*greedy)

        def through(rank0: str) -> list[int]:
            """A greedy generation along a route led by the group at ``rank0`` (its other
            groups are replicas only: a session moves on no failure but the group's)."""
            route = wait_until(f"a route naming {rank0}", lambda: led_by(client.route(), rank0))
            session = fixed_session(route, 256)
            try:
                return generate_on(session, enc.encode("JULIET:"), 60,
                                   block_size=ckpt.config.block_size, eot_id=enc.eot_token
                                   ).token_ids  # fmt: skip
            finally:
                session.close()

        assert through(slowed) == local

        def ratios() -> dict[str, float] | None:
            live = {
                n["name"]: n["live"]["speed_ratio"] for n in status_json(client.status())["nodes"]
            }
            return live if live.get("n0") and live.get(partner) else None

        live = wait_until("both members' live speed", ratios, timeout=30)
        assert live["n0"] >= 3 * live[partner], live
        # the coordinator counts n0 slowed (against its partner), and so its group: new
        # routes take the other one (peeked: they count on no node)
        coordinator.wait_for(re.compile(r"placement now counts node n0 at \d"), timeout=30)
        assert all(client.route(peek=True).hops[0].addresses[0] != slowed for _ in range(5))
        assert not re.search(rf"counts node {partner} at", coordinator.output)

        volunteer(4)  # a spare: placed at once, in n0's place

        def spared() -> list[dict] | None:  # the spare and n0's partner serving, grouped
            nodes = {n["name"]: n for n in status_json(client.status())["nodes"]}
            if len(nodes) < 5 or nodes["n0"]["stage"]:
                return None
            pair = [nodes["n4"], nodes[partner]]
            if any(not n["stage"] or n["serving"] != n["stage"] for n in pair):
                return None
            return pair if pair[0]["tp"]["group"] == pair[1]["tp"]["group"] != "" else None

        pair = wait_until("the spare in the slowed member's place", spared, timeout=120)
        assert through(next(n["address"] for n in pair if n["tp"]["rank"] == 0)) == local


def test_a_volunteer_waiting_for_its_group_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    """A volunteer grouped with one that never comes to the group's rendezvous (stopped,
    though the coordinator still counts it) stops on SIGTERM within seconds, cleanly: it
    leaves the swarm and ends 0. (It once waited for the thread forming the group, blocked
    in torch's rendezvous for up to 300 s: `nanoshard demo` killed such a node 10 s after
    its SIGTERM when the coordinator regrouped the last nodes as the others left.)"""
    name = "tp" + secrets.token_hex(4)
    with Swarm() as swarm:
        # Counted alive for 20 s after its last heartbeat: time for the other to start and
        # be grouped with it (the coordinator's first placement waits as long, too).
        _, address = swarm.coordinator(
            "--swarm", name, "--heartbeat-interval", "0.5", "--heartbeat-timeout", "20"
        )

        def volunteer(i: int) -> Any:
            return swarm.join("--swarm", name, "--coordinator", address, "--max-memory", "5M",
                              "--cache-dir", str(tmp_path / f"n{i}"), "--name", f"n{i}")  # fmt: skip

        absent = volunteer(0)
        absent.wait_for(re.compile(r"ready: serving units"), timeout=180)
        absent.popen.send_signal(signal.SIGSTOP)  # alive to the coordinator, gone to its group
        waiting = volunteer(1)
        waiting.wait_for(re.compile(r"forming tensor-parallel group .* of 2"), timeout=120)
        waiting.popen.send_signal(signal.SIGTERM)
        assert waiting.wait(timeout=30) == 0, waiting.output
        assert "left the swarm" in waiting.output, waiting.output


def test_auto_forms_a_group_for_a_unit_no_node_can_hold(tmp_path: Path) -> None:
    """--tp auto (the default): volunteers whose memory holds the head but not the embedding
    unit; placement groups nodes for it, and the swarm gives --local's tokens."""
    name = "tp" + secrets.token_hex(4)
    ckpt = open_checkpoint("demo")
    units = [ckpt.stage_nbytes(u, u + 1) for u in range(ckpt.config.n_units)]
    assert units[0] == max(units)
    weights = (units[0] + units[-1]) / 2  # under the embedding unit, over the head
    with Swarm() as swarm:
        _, address = swarm.coordinator("--swarm", name, "--replicas", "1", *STEADY)
        for i in range(5):
            swarm.join("--swarm", name, "--coordinator", address, "--max-memory",
                       str(int(weights / 0.8)), "--cache-dir", str(tmp_path / f"n{i}"))  # fmt: skip
        client = CoordinatorClient(address)

        def covered_by_a_group() -> dict | None:
            s = settled(status_json(client.status()), 5)
            return s if s and any(n["tp"]["size"] > 1 for n in s["nodes"]) else None

        status = wait_until("a group covering the embedding", covered_by_a_group, timeout=240)
        embed = [n for n in status["nodes"] if n["stage"] and n["stage"][0] == 0]
        assert embed and all(n["tp"]["size"] > 1 for n in embed)
        greedy = ["--max-new-tokens", "60", "--temperature", "0", "JULIET:"]
        assert generate("--coordinator", address, "--check-rate", "0", *greedy) == local_tokens(
            *greedy
        )


# A model whose blocks outweigh the rest (the demo's 4096-token BPE, 512 wide): a block
# 12.6 MB, the embedding 8.4 MB, the head (tied) 8.4 MB.
WIDE = GPTConfig(block_size=64, vocab_size=4096, n_layer=2, n_head=4, n_embd=512)


def test_volunteers_each_smaller_than_one_block_serve_the_model(tmp_path: Path) -> None:
    """Four volunteers, none with memory for a single block: `--tp auto` (the default)
    groups them, every node serves its share, and the swarm gives --local's tokens."""
    model = tmp_path / "wide"
    demo = resolve_model("demo")  # (its tokenizer)
    save_hf_checkpoint(WIDE, init_weights(WIDE, seed=5), model, tokenizer_dir=demo)
    ckpt = open_checkpoint(str(model))
    block = ckpt.stage_nbytes(1, 2)
    assert block == max(ckpt.stage_nbytes(u, u + 1) for u in range(WIDE.n_units))
    weights = int(block * 0.9)  # what placement fills with weights: 80 % of --max-memory
    name = "tp" + secrets.token_hex(4)
    with Swarm() as swarm:
        _, address = swarm.coordinator(
            "--model", str(model), "--swarm", name, "--replicas", "1", *STEADY
        )
        for i in range(4):
            swarm.join("--swarm", name, "--coordinator", address, "--max-memory",
                       str(int(weights / 0.8)), "--cache-dir", str(tmp_path / f"n{i}"))  # fmt: skip
        client = CoordinatorClient(address)

        def served() -> dict | None:
            return settled(status_json(client.status()), 4)

        status = wait_until("the model served by groups", served, timeout=240)
        assert all(n["memory_bytes"] * 0.8 < block for n in status["nodes"])
        assert all(n["tp"]["size"] > 1 and n["stage"] for n in status["nodes"])
        greedy = ["--max-new-tokens", "40", "--temperature", "0", "JULIET:"]
        swarm_tokens = generate("--coordinator", address, "--check-rate", "0", *greedy)
        assert swarm_tokens == local_tokens("--model", str(model), *greedy)
