"""Forged spot-check reports against a live open swarm: nobody is excluded on a word.

    python tests/soak/forged.py                 # 1,000 reports -> results/forged.json
    python tests/soak/forged.py --reports 200

A coordinator with its defaults and three honest nodes holding the demo model. A keyless
stranger (a plain gRPC caller) sends ``ReportCheck`` messages naming them: random ones
(well-formed, random digests, no evidence, every replica "disagreeing"), a replayed one (a
real step one node signed, with replicas said to disagree), and well-formed but false ones
(evidence whose checked output no node signed). Measured: what the coordinator answered,
its RSS before, after one report of each kind (the replayed one is settled: the arbiter
loads the stage and re-runs it, once) and after all, that no node is excluded and every one is healthy, and that a
greedy generation afterwards is the one before.
"""

from __future__ import annotations

import argparse
import random
import secrets
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the swarm helpers

from soak.common import rss_mb, save  # noqa: E402
from swarm import Swarm, settled, wait_until  # noqa: E402

from nanoshard import Client, agreement  # noqa: E402
from nanoshard.v1 import coordinator_pb2 as cpb  # noqa: E402
from nanoshard.v1 import coordinator_pb2_grpc as cpb_grpc  # noqa: E402
from nanoshard.v1 import node_pb2 as pb  # noqa: E402
from nanoshard.v1 import node_pb2_grpc as pb_grpc  # noqa: E402

PROMPT = "ROMEO:"


def signed_step(address: str, ids: list[int]) -> tuple[pb.StepReply, bytes]:
    """A real step of a node, with its output and signed trace (what a stranger can get)."""
    sid = secrets.token_bytes(16)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.NodeStub(channel)
        stub.Open(pb.OpenRequest(spec=pb.SessionSpec(session_id=sid, max_length=32,
                                                     codec="fp32")), timeout=30)  # fmt: skip
        reply = stub.Step(pb.StepRequest(session_id=sid, step_id=1, pos=0, sample=True,
                                         return_output=True, tokens=pb.Tokens(ids=ids)),
                          timeout=30)  # fmt: skip
        stub.Close(pb.CloseRequest(session_id=sid), timeout=30)
    return reply, sid


def forged(kind: int, rng: random.Random, nodes: list[str], n_units: int, real: tuple) -> Any:
    reply, sid, ids = real
    checked, *others = rng.sample(nodes, 3)
    if kind == 0:  # random: well-formed fields, random digests, no evidence
        return cpb.CheckReport(
            start=0, end=n_units, pos=rng.randrange(100), tokens=1, codec="fp32",
            input_digest=secrets.token_bytes(32), tolerance=1e-3,
            checked=cpb.CheckOpinion(address=checked, digest=secrets.token_bytes(32)),
            replicas=[cpb.CheckOpinion(address=o, error=9.0) for o in others],
        )  # fmt: skip
    output = reply.output
    if kind == 2:  # well-formed but false: an output the node never signed
        values = agreement.from_wire(output)
        output = agreement.to_wire(values + values.std())
    trace = reply.hops[0]
    evidence = cpb.CheckEvidence(
        checked_output=output, weights="fp32", checked_trace=trace, session_id=sid,
        has_token=True, token=reply.token, replica_outputs=[output],
    )  # fmt: skip
    evidence.inputs.add(pos=0, tokens=pb.Tokens(ids=ids))
    return cpb.CheckReport(
        start=0, end=n_units, pos=0, tokens=len(ids), codec="fp32",
        input_digest=agreement.input_digest([(0, ids)]), tolerance=1e-3,
        checked=cpb.CheckOpinion(address=trace.address), evidence=evidence,
        replicas=[cpb.CheckOpinion(address=next(a for a in nodes if a != trace.address),
                                   error=5.0)],
    )  # fmt: skip


def run(reports: int) -> dict:
    with Swarm() as swarm:
        coordinator, address = swarm.coordinator("--model", "demo")
        for i in range(3):
            swarm.join("--coordinator", address, "--name", f"honest-{i}")
        with Client(address, check_rate=0) as client:
            status = wait_until(
                "three nodes serving", lambda: settled(client.status(), nodes=3), timeout=120
            )
            nodes = [n["address"] for n in status["nodes"]]
            n_units = len(status["units"])
            before = client.generate(PROMPT, 32, temperature=0).token_ids
            ids = client.encode(PROMPT)
            real = (*signed_step(nodes[0], ids), ids)
            rss_before = rss_mb(coordinator.popen.pid)
            rng = random.Random(0)
            answers: Counter[str] = Counter()
            started = time.perf_counter()
            with grpc.insecure_channel(address) as channel:
                stub = cpb_grpc.CoordinatorStub(channel)
                for i in range(reports):
                    if i == 3:  # one of each kind: the replayed one had the arbiter load a stage
                        rss_warm = rss_mb(coordinator.popen.pid)
                    try:
                        stub.ReportCheck(forged(i % 3, rng, nodes, n_units, real), timeout=30)
                        answers["OK"] += 1
                    except grpc.RpcError as err:
                        answers[err.code().name] += 1
            seconds = time.perf_counter() - started
            rss_after = rss_mb(coordinator.popen.pid)
            after = client.generate(PROMPT, 32, temperature=0).token_ids
            status = client.status()
    return {
        "reports": reports,
        "seconds": round(seconds, 1),
        "answers": dict(answers),
        "excluded": [n["name"] for n in status["nodes"] if n["excluded"]],
        "healthy": sum(n["healthy"] for n in status["nodes"]),
        "coordinator_rss_mb": [round(rss_before, 1), round(rss_warm, 1), round(rss_after, 1)],
        "rss_growth_mb": round(rss_after - rss_before, 1),
        # past the first three: the arbiter's first re-run loads the stage, once, as the
        # first real dispute would
        "rss_growth_after_first_three_mb": round(rss_after - rss_warm, 1),
        "generation_unchanged": before == after,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reports", type=int, default=1000)
    args = p.parse_args()
    result = run(args.reports)
    save("forged", result)
    ok = not result["excluded"] and result["healthy"] == 3 and result["generation_unchanged"]
    sys.exit(0 if ok and result["rss_growth_after_first_three_mb"] < 20 else 1)


if __name__ == "__main__":
    main()
