"""Garbage against every RPC: a node and a coordinator must answer each malformed message with
a gRPC status, stay up, keep their memory, and still generate afterwards.

    python tests/soak/fuzz.py                 # 10,000 messages per method (~10 min here)
    python tests/soak/fuzz.py --per-method 300

Each method of ``nanoshard.v1.Node`` (Open, Steps, Step, Close, Info) and of
``nanoshard.v1.Coordinator`` (Join, Heartbeat, Leave, GetRoute, GetStatus, GetModelCard,
FetchTensors) gets, in turn: random bytes; and messages built field by field from the
method's own descriptor with hostile values (empty, huge and boundary integers, NaN and
infinite floats, long and binary strings, routes to ports where nothing listens, thousands
of repeated entries, activations whose shape, codec and payload disagree, the ids of real
open sessions at wrong positions). Every call has a deadline; a call that ends without a
status, or a server that dies, fails the run. RSS (VmRSS) of both servers is read before,
right after, and once more after the node's periodic memory release (aborted calls leave
reference cycles that hold their requests until Python's cycle collector runs); a greedy generation through the node is compared with the local path at the end.
Results go to ``tests/soak/results/fuzz.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
from google.protobuf.descriptor import FieldDescriptor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the swarm helpers

from soak.common import rss_mb, save  # noqa: E402
from swarm import Proc, Swarm, nanoshard  # noqa: E402

from nanoshard.v1 import coordinator_pb2 as cpb  # noqa: E402
from nanoshard.v1 import node_pb2 as pb  # noqa: E402

NODE = {
    "Open": pb.OpenRequest,
    "Steps": pb.StepRequest,
    "Step": pb.StepRequest,
    "Close": pb.CloseRequest,
    "Info": pb.InfoRequest,
    "Outputs": pb.OutputsRequest,
}
COORDINATOR = {
    "Join": cpb.JoinRequest,
    "Heartbeat": cpb.HeartbeatRequest,
    "Leave": cpb.LeaveRequest,
    "GetRoute": cpb.RouteRequest,
    "GetStatus": cpb.StatusRequest,
    "GetModelCard": cpb.ModelCardRequest,
    "FetchTensors": cpb.FetchRequest,
    "ReportCheck": cpb.CheckReport,
}
RELEASE_S = 6.0  # a node hands freed memory back to the OS every 5 s (node/service.py)
STREAMS = {"Steps": "stream_stream", "FetchTensors": "unary_stream"}
NASTY_INTS = [0, 1, 2, 7, 8, 127, 128, 255, 256, 1023, 1024, 4097, 65535, 2**31 - 1, 2**32 - 1]
NASTY_FLOATS = [0.0, -0.0, -1.0, 1e-45, 1e38, float("nan"), float("inf"), float("-inf")]
NASTY_STRINGS = ["", "fp32", "int8", "bf16", "int9", "127.0.0.1:1", "[::1]:1", "x" * 300,
                 "\x00\xff", "🙂" * 50, "127.0.0.1:99999", "transformer.wte.weight"]  # fmt: skip


class Garbage:
    """Hostile messages for a descriptor; ``sessions`` are real open session ids, used
    sometimes so steps reach past the first checks."""

    def __init__(self, rng: random.Random, sessions: list[bytes]) -> None:
        self.rng = rng
        self.sessions = sessions

    def value(self, field: FieldDescriptor, depth: int) -> object:
        r = self.rng
        t = field.type
        if t == FieldDescriptor.TYPE_MESSAGE:
            return self.message(field.message_type._concrete_class, depth + 1)
        if t == FieldDescriptor.TYPE_BOOL:
            return r.random() < 0.5
        if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            return r.choice([*NASTY_FLOATS, r.uniform(-10, 10)])
        if t == FieldDescriptor.TYPE_STRING:
            return r.choice([*NASTY_STRINGS, secrets.token_hex(r.randint(0, 40))])
        if t == FieldDescriptor.TYPE_BYTES:
            if field.name == "session_id" and self.sessions and r.random() < 0.5:
                return r.choice(self.sessions)
            return r.randbytes(r.choice([0, 1, 15, 16, 17, 64, 1024, 3072, 100_000]))
        if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32):
            return r.choice([-(2**31), -1, 0, 1, 2**31 - 1, r.randint(-(10**9), 10**9)])
        return r.choice([*NASTY_INTS, r.randint(0, 2**32 - 1)])  # unsigned

    def message(self, cls: type, depth: int = 0) -> object:
        msg = cls()
        r = self.rng
        if depth > 3:
            return msg
        fields = list(cls.DESCRIPTOR.fields)
        r.shuffle(fields)
        for field in fields:
            if r.random() < 0.3:
                continue  # left unset
            if field.is_repeated:
                n = r.choice([0, 1, 2, 3, 9, 100, 5000])
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    for _ in range(min(n, 20)):
                        getattr(msg, field.name).add().CopyFrom(self.value(field, depth))
                else:
                    getattr(msg, field.name).extend(self.value(field, depth) for _ in range(n))
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, field.name).CopyFrom(self.value(field, depth))
            else:
                with contextlib.suppress(ValueError, TypeError):  # out of the field's range
                    setattr(msg, field.name, self.value(field, depth))
        return msg

    def payload(self, cls: type) -> bytes:
        if self.rng.random() < 0.3:
            return self.rng.randbytes(self.rng.choice([0, 1, 5, 64, 4096]))
        return self.message(cls).SerializeToString()  # type: ignore[attr-defined]


def call_once(channel: grpc.Channel, path: str, kind: str, payload: bytes) -> str:
    """One call; the status code it ended with ("OK" included). A hang is a failure."""
    try:
        if kind == "stream_stream":
            list(getattr(channel, kind)(path)(iter([payload, payload]), timeout=20))
        elif kind == "unary_stream":
            for _ in getattr(channel, kind)(path)(payload, timeout=20):
                pass
        else:
            channel.unary_unary(path)(payload, timeout=20)
    except grpc.RpcError as err:
        code = err.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise AssertionError(f"{path} did not answer within 20 s") from None
        return code.name
    return "OK"


def fuzz(
    address: str,
    service: str,
    methods: dict[str, type],
    per_method: int,
    rng: random.Random,
    sessions: list[bytes],
    alive: Callable[[], bool],
) -> dict[str, dict[str, int]]:
    garbage = Garbage(rng, sessions)
    codes: dict[str, dict[str, int]] = {}
    with grpc.insecure_channel(address) as channel:
        for method, cls in methods.items():
            path = f"/nanoshard.v1.{service}/{method}"
            kind = STREAMS.get(method, "unary_unary")
            seen: Counter[str] = Counter()
            for i in range(per_method):
                seen[call_once(channel, path, kind, garbage.payload(cls))] += 1
                if i % 500 == 499 and not alive():
                    raise AssertionError(f"the {service} died fuzzing {method}")
            codes[method] = dict(seen)
            if not alive():
                raise AssertionError(f"the {service} died fuzzing {method}")
    return codes


def open_sessions(address: str, n: int) -> list[bytes]:
    ids = []
    with grpc.insecure_channel(address) as channel:
        stub = channel.unary_unary("/nanoshard.v1.Node/Open")
        for _ in range(n):
            spec = pb.SessionSpec(session_id=secrets.token_bytes(16), max_length=64, codec="fp32")
            stub(pb.OpenRequest(spec=spec).SerializeToString(), timeout=10)
            ids.append(spec.session_id)
    return ids


def generate_json(*args: str) -> list[int]:
    done = nanoshard("generate", *args, "--temperature", "0", "--max-new-tokens", "20", "--json",
                     "ROMEO:")  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(done.stderr)
    return json.loads(done.stdout)["token_ids"]


def run(per_method: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    with Swarm() as swarm:
        coordinator_proc, coordinator = swarm.coordinator("--no-mdns")
        (node,) = swarm.chain("demo", ["0:8"], "--session-ttl", "30")
        node_proc: Proc = swarm.procs[-1]
        pids = {"node": node_proc.popen.pid, "coordinator": coordinator_proc.popen.pid}
        sessions = open_sessions(node, 8)
        generate_json("--route", node)  # warm: first-call allocations are not growth
        before = {name: rss_mb(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        results = {
            "node": fuzz(node, "Node", NODE, per_method, rng, sessions,
                         lambda: node_proc.popen.poll() is None),
            "coordinator": fuzz(coordinator, "Coordinator", COORDINATOR, per_method, rng, [],
                                lambda: coordinator_proc.popen.poll() is None),
        }  # fmt: skip
        seconds = time.perf_counter() - started
        right_after = {name: rss_mb(pid) for name, pid in pids.items()}
        time.sleep(RELEASE_S)  # one round of the node's periodic memory release
        after = {name: rss_mb(pid) for name, pid in pids.items()}
        same = generate_json("--route", node) == generate_json("--local")
    return {
        "per_method": per_method,
        "messages": per_method * (len(NODE) + len(COORDINATOR)),
        "seconds": round(seconds, 1),
        "codes": results,
        "rss_mb_before": before,
        "rss_mb_right_after": right_after,
        "rss_mb_after": after,
        "rss_growth_mb": {k: round(after[k] - before[k], 1) for k in pids},
        "generation_after_equals_local": same,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-method", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    result = run(args.per_method, args.seed)
    save("fuzz", result)


if __name__ == "__main__":
    main()
