"""Tensor parallel against the pipeline, on this machine, with the cost model beside.

    python benchmarks/tp.py                  # 124M, 355M, 774M: ~15 min; --quick: 124M, few tokens
    python benchmarks/tp.py --shapes 124m    # one shape

For GPT-2's shapes (random weights, made once under ``.cache/bench``), greedy decode through:

- ``local``: the whole model in this process (``generate --local``'s path);
- ``pipeline 2``: a coordinator with ``--tp off`` and two ``nanoshard-node join``, each
  holding about half the units (``--max-memory``): two hops;
- ``TP-2``: a coordinator with ``--tp 2`` and two joins: one group of two serving every
  unit, each member with half of every block's heads and MLP and half the vocabulary
  (embedding and head vocabulary-parallel): one hop.

For each: ms/token (median decode step, the SDK's clock), weight bytes per node, bytes per
token per node (activations in and out, plus what the node sent into the group's
collectives), and the coordinator's cost model (``coordinator/groups.py``: each node's
block and head times, measured as it starts, with an empty cache and no other node busy)
next to the measurement, twice for a group: priced with the link the group's members
measured and reported (``predicted``: the formation probe and the live per-collective
figure, read from the coordinator *before* the run it predicts, after a warm-up) and with
the model's link constants (``LINK``: what a group whose members never pinged each other
is priced with).

Then the head alone: GPT-2's tied head (50257 x n_embd) on one process against the same
head split across two processes of a gloo group, each computing its half of the logits and
drawing the greedy token together (``sampling.sample_slice``: a few bytes, never the row).

GPT-2 1.5B has 25 heads: no group of 2 or 4 can split them, so it has no TP row.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# isort: off
import nanoshard.threads  # noqa: F401  before torch: the nodes' thread policy (see there)

# isort: on
import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import (
    BENCH_CACHE,
    LOOPBACK,
    PROMPTS,
    RESULTS,
    machine_info,
    markdown_table,
    median,
    random_checkpoint,
    save_results,
    spread,
)
from user_chain import Swarm, wait_served

from nanoshard import rpc
from nanoshard.checkpoint import open_checkpoint
from nanoshard.client import Client
from nanoshard.client.swarm import CoordinatorClient
from nanoshard.config import GPTConfig
from nanoshard.coordinator.groups import LINK, Link, LinkReport, group_capacity, measured_link
from nanoshard.coordinator.placement import NodeCapacity, stage_bytes, stage_ms, unit_costs
from nanoshard.coordinator.routing import HOP_OVERHEAD_MS
from nanoshard.generation import LocalSession, generate
from nanoshard.sampling import SamplingParams, sample, sample_slice
from nanoshard.statusview import status_json
from nanoshard.tokenizer import encoding_for
from nanoshard.tp import Collective, vocab_range

BIN = Path(sys.executable).parent
SHAPES = {
    "124m": GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768),
    "355m": GPTConfig(block_size=1024, vocab_size=50257, n_layer=24, n_head=16, n_embd=1024),
    "774m": GPTConfig(block_size=1024, vocab_size=50257, n_layer=36, n_head=20, n_embd=1280),
    "1.5b": GPTConfig(block_size=1024, vocab_size=50257, n_layer=48, n_head=25, n_embd=1600),
}
GREEDY = SamplingParams(temperature=0.0)
HEARTBEAT_S = 2.5  # the coordinator's default heartbeat interval, and a margin


# ---- swarms -------------------------------------------------------------------------------


@contextlib.contextmanager
def swarm_of_two(model: Path, tp: str, memory: int | None) -> Iterator[str]:
    """A coordinator (``--tp tp``) and two volunteers; yields once the route is whole."""
    swarm = Swarm()
    # Each node measures its capacity afresh (an empty cache folder; its weights are read from
    # ``model``): the cost model's inputs are taken under this run's load, not a past one's.
    caches = tempfile.TemporaryDirectory(prefix="nanoshard-tp-")
    try:
        coordinator_args = [str(BIN / "nanoshard"), "coordinator", "--model", str(model)]
        coordinator_args += ["--port", "0", "--tp", tp, "--replicas", "1", *LOOPBACK]
        swarm.start("coordinator", coordinator_args)
        address = swarm.wait_listening("coordinator")
        client = CoordinatorClient(address)
        for i in range(2):
            args = [str(BIN / "nanoshard-node"), "join", "--coordinator", address]
            args += ["--model", str(model), "--cache-dir", f"{caches.name}/{i}", *LOOPBACK]
            args += ["--max-memory", str(memory)] if memory else []
            swarm.start(f"node{i}", args)
            # One at a time: a node measures its speed on a machine no other node is busy on
            # (two volunteers are two machines; here they share this one's cores).
            settle(client, i + 1)
        client.close()
        wait_served(address, hops=1 if tp == "2" else 2, timeout_s=900)
        if tp == "2":  # the one hop must be the group (not one node holding everything)
            client = CoordinatorClient(address)
            deadline = time.monotonic() + 300
            while not all(n["tp"]["size"] == 2 for n in status_json(client.status())["nodes"]):
                if time.monotonic() > deadline:
                    raise TimeoutError("the two nodes never formed a group")
                time.sleep(0.5)
            client.close()
        yield address
    finally:
        swarm.close()
        caches.cleanup()


def settle(client: CoordinatorClient, count: int, timeout_s: float = 900) -> None:
    """Until ``count`` nodes joined and each serves what it was assigned (or idles)."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = status_json(client.status())["nodes"]
        if len(nodes) >= count and all(n["stage"] in (None, n["serving"]) for n in nodes):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} nodes never joined and loaded their stages")
        time.sleep(0.5)


def through(address: str, ids: list[int], tokens: int) -> dict:
    """Greedy ``tokens`` through the swarm: ms/token, and per node what crossed it."""
    with Client(address, check_rate=0) as client:
        client.generate(ids, 8, temperature=0.0)  # warm-up: channels, first calls ...
        time.sleep(HEARTBEAT_S)  # ... and a group's live link, reported in a heartbeat
        status = status_json(CoordinatorClient(address).status())  # the model's inputs
        result = client.generate(ids, tokens, temperature=0.0)
    per_node: dict[str, dict] = {}
    collective = [sum(h.get("collective_ms", 0.0) for h in step) for step in result.steps[1:]]
    compute = [sum(h["compute_ms"] for h in step) for step in result.steps[1:]]
    for step in result.steps[1:]:  # decode steps only
        for h in step:
            row = per_node.setdefault(h["address"], {"bytes": 0, "steps": 0, "units": h["units"]})
            row["bytes"] += h["bytes_in"] + h["bytes_out"] + h.get("collective_bytes", 0)
            row["steps"] += 1
    return {
        "ms_per_token": median(result.token_ms),
        "compute_ms": median(compute),
        "collective_ms": median(collective),
        "token_ids": result.token_ids,
        "bytes_per_token_per_node": max(r["bytes"] / r["steps"] for r in per_node.values()),
        "nodes": status["nodes"],
    }


def capacities(nodes: list[dict]) -> list[NodeCapacity]:
    return [
        NodeCapacity(
            node_id=n["name"],
            memory_bytes=10**12,
            block_ms=n["block_ms"],
            head_ms=n["head_ms"],
            host=rpc.host_of(n["address"]),
        )
        for n in nodes
    ]


def predicted_pipeline(config: GPTConfig, nodes: list[dict]) -> float:
    units = unit_costs(config)
    total = 0.0
    for node, cap in zip(nodes, capacities(nodes), strict=True):
        start, end = node["stage"]
        total += stage_ms(units, cap, start, end) + HOP_OVERHEAD_MS
    return total


def group_link(nodes: list[dict]) -> Link:
    """The group's link as its members reported it to the coordinator."""
    return measured_link(LinkReport(**n["tp"]["link"]) for n in nodes if n["tp"]["size"] > 1)


def predicted_group(config: GPTConfig, nodes: list[dict], link: Link = LINK) -> float:
    units = unit_costs(config)
    group = group_capacity(capacities(nodes), 4 * config.n_embd, link)
    return stage_ms(units, group, 0, config.n_units) + HOP_OVERHEAD_MS


# ---- the head alone ------------------------------------------------------------------------


def head_member(rank: int, size: int, port: int, n_embd: int, reps: int, out: Any) -> None:
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False)
        collective = Collective.form("head", rank, size, store, "127.0.0.1", 60.0)
        gen = torch.Generator().manual_seed(0)
        wte = torch.randn(50257, n_embd, generator=gen)
        lo, hi = vocab_range(50257, rank, size)
        part = wte[lo:hi].contiguous()
        del wte
        x = torch.randn(1, n_embd, generator=gen)
        times, sent = [], 0
        with torch.inference_mode():
            for i in range(reps + 5):
                collective.all_reduce(torch.zeros(1))  # start together
                collective.take()
                t0 = time.perf_counter()
                logits = F.linear(x, part)[0]
                sample_slice(logits, lo, GREEDY, i, collective.all_gather)
                times.append((time.perf_counter() - t0) * 1e3)
                sent = collective.take().bytes
        out.put((rank, times[5:], sent))
    except BaseException as exc:
        out.put((rank, repr(exc), 0))


def head_alone(n_embd: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    wte = torch.randn(50257, n_embd, generator=gen)
    x = torch.randn(1, n_embd, generator=gen)
    times = []
    with torch.inference_mode():
        for i in range(reps + 5):
            t0 = time.perf_counter()
            sample(F.linear(x, wte)[0], GREEDY, i)
            times.append((time.perf_counter() - t0) * 1e3)
    del wte
    ctx = mp.get_context("spawn")
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    out = ctx.Queue()
    procs = [
        ctx.Process(target=head_member, args=(r, 2, store.port, n_embd, reps, out))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    got = dict((r, (t, b)) for r, t, b in (out.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(timeout=30)
    if any(isinstance(t, str) for t, _ in got.values()):
        raise RuntimeError(f"a head member failed: {got}")
    split = [max(a, b) for a, b in zip(got[0][0], got[1][0], strict=True)]  # the slower
    return {
        "n_embd": n_embd,
        "unsliced_ms": round(statistics.median(times[5:]), 3),
        "tp2_ms": round(statistics.median(split), 3),
        "merge_bytes_per_token": got[0][1],
    }


# ---- the run -------------------------------------------------------------------------------


def measure_shape(name: str, config: GPTConfig, opts: argparse.Namespace) -> dict:
    model = random_checkpoint(config, BENCH_CACHE / f"gpt2-{name}-random")
    ckpt = open_checkpoint(str(model))
    ids = encoding_for(model).encode(PROMPTS[0])
    total = ckpt.stage_nbytes(0, config.n_units)
    stage = ckpt.load_stage(0, config.n_units)
    rows: dict[str, list[dict]] = {"local": [], "pipeline 2": [], "TP-2": []}
    local_tokens: list[int] = []
    for _ in range(opts.repeats):
        session = LocalSession(stage, GREEDY, len(ids) + opts.tokens + 8)
        gen = generate(session, ids, opts.tokens, block_size=config.block_size)
        session.close()
        local_tokens = gen.token_ids
        rows["local"].append({"ms_per_token": median(gen.decode_ms)})
    del stage
    memory = int(total * 0.6 / 0.8) + 64 * 2**20  # about half the units each, plus KV
    with swarm_of_two(model, "off", memory) as address:
        for _ in range(opts.repeats):
            r = through(address, ids, opts.tokens)
            r["predicted_ms"] = predicted_pipeline(config, r["nodes"])
            rows["pipeline 2"].append(r)
    if config.n_head % 2 == 0:
        with swarm_of_two(model, "2", None) as address:
            for _ in range(opts.repeats):
                r = through(address, ids, opts.tokens)
                link = group_link(r["nodes"])
                r["link"] = {"latency_ms": link.latency_ms, "bytes_per_s": link.bytes_per_s}
                r["predicted_ms"] = predicted_group(config, r["nodes"], link)
                r["predicted_constants_ms"] = predicted_group(config, r["nodes"])
                rows["TP-2"].append(r)
    units = unit_costs(config)
    out = []
    for kind, runs in rows.items():
        if not runs:
            out.append({"shape": name, "path": kind, "skipped": f"{config.n_head} heads"})
            continue
        ms = median([r["ms_per_token"] for r in runs])
        row: dict = {"shape": name, "path": kind, "ms_per_token": round(ms, 2)}
        row["repeats"] = spread([r["ms_per_token"] for r in runs])
        if kind != "local":
            row["compute_ms"] = round(median([r["compute_ms"] for r in runs]), 2)
            row["collective_ms"] = round(median([r["collective_ms"] for r in runs]), 2)
        if kind == "local":
            row["weight_bytes_per_node"] = total
            row["bytes_per_token_per_node"] = 0
        else:
            last = runs[-1]
            row["tokens_equal_local"] = all(r["token_ids"] == local_tokens for r in runs)
            row["bytes_per_token_per_node"] = round(last["bytes_per_token_per_node"])
            size = 2 if kind == "TP-2" else 1
            row["weight_bytes_per_node"] = max(
                stage_bytes(units, *n["stage"], size) for n in last["nodes"] if n["stage"]
            )
            predicted = median([r["predicted_ms"] for r in runs])
            row["predicted_ms"] = round(predicted, 2)
            row["prediction_error"] = round(predicted / ms - 1, 3)
            if kind == "TP-2":
                constants = median([r["predicted_constants_ms"] for r in runs])
                row["predicted_constants_ms"] = round(constants, 2)
                row["constants_error"] = round(constants / ms - 1, 3)
                row["measured_link_ms"] = round(median([r["link"]["latency_ms"] for r in runs]), 2)
        out.append(row)
    return {"shape": name, "config": config.to_dict(), "rows": out}


def render(result: dict) -> str:
    table = []
    for shape in result["shapes"]:
        for r in shape["rows"]:
            if "skipped" in r:
                table.append([r["shape"], r["path"], f"- ({r['skipped']})", *[""] * 7])
                continue
            table.append([
                r["shape"], r["path"], r["ms_per_token"], r.get("predicted_ms", "-"),
                f"{r['prediction_error']:+.0%}" if "prediction_error" in r else "-",
                (f"{r['predicted_constants_ms']} ({r['constants_error']:+.0%})"
                 if "predicted_constants_ms" in r else "-"),
                f"{r['weight_bytes_per_node'] / 2**20:.0f} MiB", r["bytes_per_token_per_node"],
                {True: "yes", False: "no"}.get(r.get("tokens_equal_local"), "-"),
            ])  # fmt: skip
    head = result["head"]
    header = ["shape", "path", "ms/token", "predicted", "error", "with LINK constants"]
    header += ["weights/node"]
    header += ["bytes/token/node", "tokens = local"]
    return (
        "# Tensor parallel against the pipeline (`benchmarks/tp.py`)\n\n"
        f"{result['tokens']} greedy decode tokens, median step, {result['repeats']} repeats; "
        "random weights; every process on this machine's 2 cores. A group is predicted with "
        "the link its members measured (a collective's live cost, "
        + ", ".join(
            f"{r['shape']} {r['measured_link_ms']} ms"
            for shape in result["shapes"]
            for r in shape["rows"]
            if "measured_link_ms" in r
        )
        + ") and with the model's constants (LINK, for a group not yet formed: "
        f"{LINK.latency_ms} ms).\n\n"
        + markdown_table(header, table)
        + f"\n\nThe head alone (50257 x {head['n_embd']}, greedy): unsliced "
        f"{head['unsliced_ms']} ms, split across a TP-2 group {head['tp2_ms']} ms (the slower "
        f"member), {head['merge_bytes_per_token']} bytes per member per token to draw the "
        "token together.\n"
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="124m,355m,774m", help="of " + ",".join(SHAPES))
    p.add_argument("--tokens", type=int, default=24, help="decode tokens per run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="124M, 8 tokens, once")
    p.add_argument("--out", type=Path, default=RESULTS)
    opts = p.parse_args(argv)
    if opts.quick:
        opts.shapes, opts.tokens, opts.repeats = "124m", 8, 1
    os.environ.pop("NANOSHARD_SWARM_KEY", None)
    started = time.perf_counter()
    result: dict = {"machine": machine_info(0), "tokens": opts.tokens, "repeats": opts.repeats}
    result["shapes"] = [measure_shape(s, SHAPES[s], opts) for s in opts.shapes.split(",")]
    result["head"] = head_alone(768, 20 if opts.quick else 100)
    return save_results(result, started, opts.out, "tp", render)


if __name__ == "__main__":
    main()
