"""Failover that loses nothing, and the SDK: a swarm of real processes on loopback,
volunteers SIGKILLed in the middle of generations."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from pathlib import Path

import pytest
from swarm import Proc, Swarm, settled, wait_until
from test_swarm import HEARTBEAT, demo_bytes

from nanoshard import AsyncClient, Client
from nanoshard.client.route import Route
from nanoshard.client.swarm import CoordinatorClient
from nanoshard.errors import NanoshardError
from nanoshard.statusview import status_json

pytestmark = pytest.mark.slow

DATA_PLANE = re.compile(r"data plane on (\S+)")
HEARTBEAT_S = float(HEARTBEAT[HEARTBEAT.index("--heartbeat-interval") + 1])
PROMPT = "KING HENRY:\n"


class FourNodes:
    """A coordinator with --replicas 2 and four volunteers that each hold about half the model."""

    def __init__(self, swarm: Swarm, tmp: Path) -> None:
        self.swarm, self.tmp = swarm, tmp
        self.name = "f" + secrets.token_hex(4)
        self.memory = str(int(demo_bytes() * 0.75 / 0.8))  # two chains of two hops fit
        _, self.address = swarm.coordinator("--swarm", self.name, "--replicas", "2", *HEARTBEAT)
        self.nodes: dict[str, Proc] = {}
        self.count = 0
        for _ in range(4):
            self.add()

    def add(self) -> None:
        self.count += 1
        proc = self.swarm.join(
            "--swarm",
            self.name,
            "--coordinator",
            self.address,
            "--max-memory",
            self.memory,
            "--cache-dir",
            str(self.tmp / f"n{self.count}"),
            "--name",
            f"n{self.count}",
        )
        self.nodes[proc.wait_for(DATA_PLANE).group(1)] = proc

    def ready(self, hop_replicas: int = 1, steady_s: float = 0.0) -> Route:
        """Wait until the four nodes are at rest (each serving the stage placement gave it,
        none still loading), every unit has two of them, and the route a client gets now
        lists ``hop_replicas`` addresses for every hop; return that route.

        With ``steady_s``, also until the inputs of routing (what each node serves, its
        open sessions and queue, as heartbeats report them) and the route have not changed
        for that long: the route a session opened next will get is then this one."""
        coordinator = CoordinatorClient(self.address)
        seen: list = [None, 0.0]  # the last state, and since when it holds

        def whole() -> Route:
            status = status_json(coordinator.status())
            stages = [(n["name"], n["stage"], n["serving"], n["healthy"]) for n in status["nodes"]]
            if not settled(status, nodes=4, replicas=2):
                raise AssertionError(f"not at rest: (name, stage, serving, healthy) {stages}")
            route = coordinator.route(peek=True)  # (asking for a session's would count it)
            hops = [(h.start, h.end, tuple(h.addresses)) for h in route.hops]
            if not all(len(addresses) >= hop_replicas for _, _, addresses in hops):
                raise AssertionError(f"a hop with fewer addresses: {hops}; stages {stages}")
            loads = sorted((n["address"], n["sessions"], n["queue"]) for n in status["nodes"])
            state, now = (stages, loads, hops), time.monotonic()
            if state != seen[0]:
                seen[:] = [state, now]
            if now - seen[1] < steady_s:
                raise AssertionError(f"changed within {steady_s} s: {state}")
            return route

        what = f"four nodes at rest and {hop_replicas} addresses for every hop of the route"
        try:
            return wait_until(what, whole, timeout=120)
        finally:
            coordinator.close()


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory):
    with Swarm() as swarm:
        yield FourNodes(swarm, tmp_path_factory.mktemp("failover"))


@pytest.mark.parametrize(
    ("hop", "sampling"),
    [
        ("first", {"temperature": 0.0}),
        ("last", {"temperature": 0.0}),
        ("last", {"temperature": 0.9, "top_k": 50, "seed": 1234}),
    ],
)
def test_a_killed_hop_costs_nothing_but_time(four: FourNodes, hop: str, sampling: dict) -> None:
    four.ready()
    with Client(four.address) as client:
        reference = client.generate(PROMPT, 200, **sampling)
        assert len(reference.token_ids) >= 100
        # The route the next session gets (routing weighs each node's open sessions, so it
        # waits until the reference's are gone from the heartbeats) has two addresses for
        # every hop ...
        route = four.ready(hop_replicas=2, steady_s=2 * HEARTBEAT_S)
        with client.session(**sampling) as chat:
            # ... and the first token shows the nodes this session runs on: the victim is one.
            first = chat.generate(PROMPT, 1)
            served = list(dict.fromkeys((h["address"], tuple(h["units"])) for h in first.steps[0]))
            assert [units for _, units in served] == [(h.start, h.end) for h in route.hops]
            assert len(route.hops) >= 2  # the first hop and the last are two nodes
            k = 0 if hop == "first" else -1
            victim_address = served[k][0]
            assert victim_address in route.hops[k].addresses and len(route.hops[k].addresses) >= 2
            victim = four.nodes.pop(victim_address)
            seen = 0

            def on_token(_token: object) -> None:
                nonlocal seen
                seen += 1
                if seen == 60:
                    victim.kill()  # SIGKILL: no goodbye, no flushing, mid-generation

            rest = chat.generate("", 199, on_token=on_token)
            # the client takes the tokens on its key with whichever head answers them now
            head_key = chat.core._session._mac
        assert head_key is not None and head_key.address != victim_address
        assert seen == len(rest.token_ids) >= 60
        assert first.token_ids + rest.token_ids == reference.token_ids
        assert rest.recoveries, "the failure should show in the timings"
        assert any(victim_address in r.detail for r in rest.recoveries), rest.recoveries
        assert victim.popen.poll() is not None
    four.add()  # back to four for the next case


def test_losing_every_replica_of_a_stage_ends_with_a_clear_error(four: FourNodes) -> None:
    four.ready()
    with Client(four.address) as client:
        # Every node holding the head, and one more: the last volunteer cannot hold the
        # whole model, so the swarm cannot heal by re-placing (as it does with two left).
        head = client.config.n_units - 1
        nodes = client.status()["nodes"]
        holders = [n["address"] for n in nodes if n["stage"] and n["stage"][1] > head]
        assert len(holders) >= 2
        others = [n["address"] for n in nodes if n["address"] not in holders]
        victims = [four.nodes.pop(a) for a in [*holders, others[0]]]
        started = time.monotonic()
        with pytest.raises(NanoshardError) as err:
            seen = []

            def on_token(_token: object) -> None:
                seen.append(1)
                if len(seen) == 20:
                    for v in victims:
                        v.kill()

            client.generate(PROMPT, 200, temperature=0.0, on_token=on_token)
        assert time.monotonic() - started < 60  # bounded retries, no hang
        message = str(err.value)
        # which units end up uncovered depends on how the swarm re-places the survivor
        assert "gave up" in message and re.search(r"no ready node serves units \[\d", message), (
            message
        )
        # ... and names what was lost first
        first = message.partition("(the first: ")[2]
        assert any(v in first for v in [*holders, others[0]]), message
    for _ in victims:
        four.add()


def test_sdk_stream_equals_generate_and_sessions_continue(four: FourNodes) -> None:
    four.ready()
    with Client(four.address) as client:
        whole = client.generate(PROMPT, 40, temperature=0.7, seed=5)
        streamed = list(client.stream(PROMPT, 40, temperature=0.7, seed=5))
        assert [t.id for t in streamed] == whole.token_ids
        assert "".join(t.text for t in streamed) == whole.text
        with client.session(temperature=0.7, seed=5) as chat:
            first = chat.generate(PROMPT, 15)
            second = chat.generate("", 25)  # continue where the first call stopped
        assert first.token_ids + second.token_ids == whole.token_ids
        stopped = client.generate(PROMPT, 40, temperature=0.7, seed=5, stop=whole.text[10:14])
        assert (
            stopped.stop_reason == "stop"
            and stopped.text == whole.text[: whole.text.index(whole.text[10:14])]
        )
        assert {"nodes", "units"} <= set(client.status())


def test_async_client(four: FourNodes) -> None:
    four.ready()

    async def main() -> tuple[list[int], list[int]]:
        async with AsyncClient(four.address) as client:
            result = await client.generate(PROMPT, 20, temperature=0.0)
            streamed = [t.id async for t in client.stream(PROMPT, 20, temperature=0.0)]
            return result.token_ids, streamed

    ids, streamed = asyncio.run(main())
    assert ids == streamed and len(ids) == 20
