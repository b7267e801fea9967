"""The data plane's cost: bytes per token per hop for each codec, and the latency a hop adds
on loopback against the local path.

    python benchmarks/hops.py             # ~5 min on 2 busy cores; writes benchmarks/results/hops.{json,md}
    python benchmarks/hops.py --quick     # one repeat, few tokens: checks the script runs

Speed (``--model``, default GPT-2 124M's shape with random weights, made once under
``.cache/bench/gpt2-124m-random``): greedy decode of ``--tokens`` tokens after a
``--prompt-tokens`` prompt,

- local: ``LocalSession`` + ``generate`` in this process with torch's default thread count,
  as ``nanoshard generate --local`` runs (and 1 thread for reference);
- chains of 1, 2 and 3 ``nanoshard-node serve`` processes on 127.0.0.1 with default flags
  (a thread per core, batching on) splitting the units evenly, driven by ``SwarmSession`` +
  ``generate`` from here; the longest chain once per codec;
- the gRPC echo floor (``echo.py``): a bare grpc.aio bidi-stream round trip of one decode
  step's activations, measured between the chain runs so both see the same load;
- the floor of a pipeline hop: the longest chain's stages in bare gRPC nodes
  (``bare_chain.py``) and in processes linked by OS pipes (``pipe_chain.py``), each token
  taken in turn by nanoshard's chain, the two floors and the local path.

Configurations run interleaved, in a rotated order, ``--repeats`` times; ms/token is the
median decode step. A chain of k nodes has k *hops*: the client->node transfer plus k-1
node->node transfers (each a request forward and its reply back). The machine is shared
and noisy, so every chain run is *paired* with the local path token by token: between two
chain steps (``generate``'s ``on_token``) this process runs the local step for the same
token, timed alike. ``overhead`` is the median over tokens of (chain step - local step),
``overhead/hop = overhead / k``. Each hop's time splits, from the traces, into compute (the stage, and the
codec's encode/decode), queue (waiting for the compute worker), handling (the node's own
Python and gRPC work outside compute) and transfer in (the previous hop's wait minus this
hop's total: serialization, loopback, gRPC; for the first hop the client's wall time minus
the hop's total, so it includes the client's own stream handling). ``overhead/hop`` minus
the echo floor is what nanoshard's own code adds to a hop above Python gRPC's round trip.

Quality (``--agree-model``, default the demo model, split as the longest chain): greedy agreement of
each codec with fp32 over ``--agree-tokens`` generated tokens (prompts in turn until that
many are compared; a generation ends at <|endoftext|> or the context), and, in process, the
largest |logit error| of each codec over every position of those sequences: the stages are
run split at the same boundaries, with the activations encoded and decoded between them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# isort: off
import nanoshard.threads  # noqa: F401  before torch: the nodes' thread policy (see there)

# isort: on
import torch
from bare_chain import BareChain, BareSession
from common import (
    GREEDY,
    PROMPTS,
    RESULTS,
    Nodes,
    Paired,
    agreement,
    cpu_ms,
    even_splits,
    machine_info,
    markdown_table,
    median,
    open_chain,
    raise_on_sigterm,
    run_chain,
    run_local,
    run_paired,
    save_results,
    speed_model,
    spread,
)
from echo import EchoServer, measure_floor
from pipe_chain import PipeChain

from nanoshard import codec as codecs
from nanoshard.checkpoint import open_checkpoint
from nanoshard.client.route import Route, route_from_addresses
from nanoshard.engine import Stage
from nanoshard.generation import Generation, LocalSession, max_length_for
from nanoshard.tokenizer import encoding_for
from nanoshard.trace import summarize_hops
from nanoshard.v1 import node_pb2 as pb

DEFINITIONS = {
    "hops": "transfers per token: client->first node plus node->node; a chain of k nodes has k",
    "ms_per_token": "median decode step (client wall time) over every repeat",
    "local_ms_per_token": "the local path's decode step, run in lockstep with the chain's",
    "overhead_ms": "median over tokens of (chain step - local step for the same token)",
    "overhead_per_hop_ms": "overhead_ms / hops",
    "echo_floor_ms": "a bare grpc.aio bidi-stream round trip of n_embd fp32 values (echo.py)",
    "held_floor_ms": "the same round trip, the echo holding each message as long as a hop "
    "computes (asleep, then answering), the hold taken out",
    "compute_ms": "the node's stage run, codec encode/decode included (trace compute_ms)",
    "queue_ms": "waiting for the node's compute worker",
    "handling_ms": "the node's own time outside compute, queue and its downstream call",
    "transfer_ms": "into this hop: the caller's wait minus this hop's total time (both ways)",
    "bytes_out_per_token": "activation payload bytes a hop sends per decode token",
    "bare": "the floor: the longest chain's stages in bare grpc.aio nodes (bare_chain.py)",
    "pipe_*": "the same stages in processes linked by OS pipes, no gRPC (pipe_chain.py)",
}
CODECS = ("fp32", "fp16", "bf16", "int8", "int8-64")
SPEED_TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom, "


@dataclass(frozen=True)
class Config:
    """One measured configuration: the local path (nodes == 0) or a chain of nodes."""

    nodes: int
    codec: str = "fp32"
    threads: int = 0  # the local path's torch threads; 0: the default (one per core)
    bare: bool = False  # the floor: bare nodes (``bare_chain.py``), not nanoshard's

    @property
    def name(self) -> str:
        if self.bare:
            return f"{self.nodes} bare nodes (the floor)"
        if self.nodes == 0:
            if not self.threads:
                return "local"
            return f"local, {self.threads} thread{'s' if self.threads > 1 else ''}"
        return f"{self.nodes} node{'s' if self.nodes > 1 else ''}, {self.codec}"


# ---- speed ------------------------------------------------------------------------------


def hop_split(gen: Generation) -> list[list[dict]]:
    """Per decode step, per hop: where the step's time went (ms) and the bytes it moved."""
    steps = []
    for traces, wall in zip(gen.hops[1:], gen.decode_ms, strict=True):
        rows = summarize_hops([traces], [wall])
        for row, t in zip(rows, traces, strict=True):
            row["handling_ms"] = max(
                t["total_ms"] - t["compute_ms"] - t["queue_ms"] - t["downstream_ms"], 0.0
            )
        steps.append(rows)
    return steps


def summarize_config(steps: list[list[dict]], n_tokens: int) -> list[dict]:
    """Median per hop over every decode step; bytes per token are totals over tokens."""
    out = []
    for i, first in enumerate(steps[0]):
        column = [s[i] for s in steps]
        row = {"units": first["units"], "codec": first["codec"]}
        for key in ("compute_ms", "queue_ms", "handling_ms", "transfer_ms"):
            row[key] = round(median([c[key] for c in column]), 3)
        for key in ("bytes_in", "bytes_out"):
            row[f"{key}_per_token"] = sum(c[key] for c in column) / n_tokens
        out.append(row)
    return out


def message_bytes(route: Route, hop: int, codec: str, n_embd: int) -> int:
    """Size of the StepRequest a node sends to ``hop`` (>= 1) for one decode token, built
    field for field as NodeService forwards it: payload plus protobuf header."""
    request = pb.StepRequest(
        session_id=bytes(16),
        step_id=100,
        pos=100,
        activations=pb.Activations(
            codec=codec, shape=[1, n_embd], payload=bytes(codecs.encoded_size((1, n_embd), codec))
        ),
        sample=True,
    )
    return request.ByteSize()


def measure_speed(
    opts: argparse.Namespace, nodes: Nodes, echo: EchoServer, stack: contextlib.ExitStack
) -> dict:
    ckpt = open_checkpoint(opts.model)
    config = ckpt.config
    if opts.prompt_tokens + opts.tokens + 1 > config.block_size:
        raise SystemExit(f"--prompt-tokens + --tokens must stay below {config.block_size}")
    enc = encoding_for(ckpt.path)
    ids = (enc.encode(SPEED_TEXT) * opts.prompt_tokens)[: opts.prompt_tokens]
    chains = [k for k in opts.chains if k <= config.n_units]
    splits = {k: even_splits(config.n_units, k) for k in chains}
    for k in chains:  # every node loads at once
        nodes.start(opts.model, splits[k])
    stage = ckpt.load_stage(0, config.n_units)
    routes = {k: route_from_addresses(nodes.chain(opts.model, splits[k])) for k in chains}
    biggest = max(chains)
    bare = stack.enter_context(BareChain(opts.model, splits[biggest]))
    pipes = stack.enter_context(PipeChain(opts.model, splits[biggest]))

    configs = [Config(0)] + ([Config(0, threads=1)] if not opts.quick else [])
    configs += [Config(k) for k in chains] + [Config(biggest, bare=True)]
    configs += [Config(biggest, c) for c in opts.codecs if c != "fp32"]

    def run(c: Config, tokens: int) -> Generation | Paired | AgainstFloor:
        if c.nodes == 0:
            return run_local(stage, ids, tokens, c.threads)
        if c.bare:
            mine = [nodes.procs[(opts.model, u, ())].popen.pid for u in splits[c.nodes]]
            theirs = [proc.pid for proc in reversed(bare.procs)]  # (started last to first)
            before = [cpu_ms(pid) for pid in mine + theirs]
            got = run_against_floor(routes[c.nodes], bare.address, pipes, stage, ids, tokens)
            used = [
                (cpu_ms(pid) - b) / (2 * tokens)
                for pid, b in zip(mine + theirs, before, strict=True)
            ]
            got.chain_cpu_ms, got.bare_cpu_ms = used[: len(mine)], used[len(mine) :]
            return got
        return run_paired(routes[c.nodes], stage, ids, tokens, c.codec)

    for c in configs:  # warm-up: first calls, channels, allocator
        run(c, min(4, opts.tokens))
    runs: dict[Config, list] = {c: [] for c in configs}
    floor: list[list[float]] = []  # the echo's round trips, one list per repeat
    held: list[list[float]] = []  # the same, the server holding each as long as a hop computes
    for r in range(opts.repeats):
        shift = r % len(configs)  # rotate the order so no configuration always runs first
        for c in configs[shift:] + configs[:shift]:
            runs[c].append(run(c, opts.tokens))
        floor.append(measure_floor(echo.address, config.n_embd, 4 * opts.tokens))
        hold = median(runs[Config(0)][-1].decode_ms) / biggest  # a hop's share of a token
        held.append(measure_floor(echo.address, config.n_embd, opts.tokens, hold))

    local_ms = [median(g.decode_ms) for g in runs[Config(0)]]
    echo_ms = median([ms for f in floor for ms in f])
    held_ms = median([ms for f in held for ms in f])
    results = []
    for c in configs:
        if c.bare:
            results.append(bare_row(c, runs[c], splits[c.nodes], echo_ms, held_ms))
            continue
        gens = [p.chain for p in runs[c]] if c.nodes else runs[c]
        # the local reference: lockstep for chains, the 1-thread local runs for local ones
        refs = [median(p.local_ms) for p in runs[c]] if c.nodes else local_ms
        per_repeat = [median(g.decode_ms) for g in gens]
        row: dict = {
            "name": c.name,
            "nodes": c.nodes,
            "hops": c.nodes,
            "codec": c.codec,
            "threads": c.threads,
            "units": [list(u) for u in splits[c.nodes]] if c.nodes else [[0, config.n_units]],
            "ms_per_token": round(median([ms for g in gens for ms in g.decode_ms]), 3),
            "ms_per_token_repeats": spread(per_repeat),
            "prefill_ms": round(median([g.prefill_ms for g in gens]), 3),
            "ratio_to_local": round(
                median([a / b for a, b in zip(per_repeat, refs, strict=True)]), 4
            ),
        }
        if c.nodes:
            paired = runs[c]
            diffs = [
                a - b for p in paired for a, b in zip(p.chain.decode_ms, p.local_ms, strict=True)
            ]
            row["local_ms_per_token"] = round(median([ms for p in paired for ms in p.local_ms]), 3)
            row["overhead_ms"] = round(median(diffs), 3)
            row["overhead_per_hop_ms"] = round(row["overhead_ms"] / c.nodes, 3)
            row["above_echo_floor_ms"] = round(row["overhead_per_hop_ms"] - echo_ms, 3)
            row["above_held_floor_ms"] = round(row["overhead_per_hop_ms"] - held_ms, 3)
            row["tokens_match_local"] = all(p.same_tokens for p in paired)
            steps = [s for g in gens for s in hop_split(g)]
            row["per_hop"] = summarize_config(steps, len(steps))
            row["compute_ms_sum"] = round(sum(h["compute_ms"] for h in row["per_hop"]), 3)
            if c.nodes > 1:
                row["message_bytes_per_token"] = message_bytes(
                    routes[c.nodes], 1, c.codec, config.n_embd
                )
        else:
            same = [
                g.token_ids == gl.token_ids for g, gl in zip(gens, runs[Config(0)], strict=True)
            ]
            row["tokens_match_local"] = all(same)
        results.append(row)
    prefill = measure_prefill(stage, routes[biggest], enc, opts)
    return {
        "model": str(ckpt.path),
        "config": config.to_dict(),
        "prefill": prefill,
        "definitions": DEFINITIONS,
        "prompt_tokens": len(ids),
        "decode_tokens": opts.tokens,
        "repeats": opts.repeats,
        "echo_floor_ms": round(echo_ms, 3),
        "echo_floor_repeats": spread([median(f) for f in floor]),
        "held_floor_ms": round(held_ms, 3),
        "held_floor_repeats": spread([median(f) for f in held]),
        "configs": results,
    }


@dataclass
class AgainstFloor:
    """The chain, the bare chain (the floor), the pipe chain (the floor without gRPC) and the
    local path, each stepped in turn for the same token: their ms per decode step, and
    whether all drew the same tokens; then the two gRPC chains alone, back to back
    (``back_*``)."""

    chain_ms: list[float]
    bare_ms: list[float]
    local_ms: list[float]
    pipe_ms: list[float]
    same_tokens: bool
    chain_compute_ms: list[float]  # the nodes' compute, summed over the hops
    bare_compute_ms: list[float]
    pipe_compute_ms: list[float]
    back_chain_ms: list[float]
    back_bare_ms: list[float]
    # CPU per token of each node process (all threads), nanoshard's and the bare ones
    chain_cpu_ms: list[float] = field(default_factory=list)
    bare_cpu_ms: list[float] = field(default_factory=list)


# chain, bare, local, pipes; bare, chain, local, pipes (token by token)
ORDERS = ((0, 1, 2, 3), (1, 0, 2, 3))


def balanced(diffs: list[float]) -> float:
    """The typical difference between the chains from per-token ones taken in ``ORDERS``:
    the mean over the orders of each order's median (the path after the local step pays a
    cost the other does not, in turn; a median over both orders would pick a side)."""
    return sum(median(diffs[k :: len(ORDERS)]) for k in range(len(ORDERS))) / len(ORDERS)


def run_against_floor(
    route: Route, bare_address: str, pipes: PipeChain, stage: Stage, ids: list[int], tokens: int
) -> AgainstFloor:
    """``tokens`` greedy decode steps, each token taken by nanoshard's chain, the bare chain
    (``bare_chain.py``: the same stages, nothing of nanoshard), the pipe chain
    (``pipe_chain.py``: the same again over OS pipes, no gRPC) and the local path, so that
    all see the same moments of this shared machine; then ``tokens`` more taken by the two
    gRPC chains alone, back to back, as a user's tokens come.

    The gRPC chains take turns going first (chain, bare, local, pipes; bare, chain, local,
    pipes). Whatever runs right after the local step (or after any pause: measured with a
    14 ms sleep in its place, the chain after it was 0.38-0.43 ms a hop above the floor,
    0.01-0.21 when the floor came after it) pays for it, so a fixed order would charge that
    to one chain every time; and it weighs more on the path that does more on the way
    (``balanced``). The pipes always pay it: their figure errs high, so what gRPC adds
    above them errs low. The back-to-back tokens have no such step between: each chain
    follows the other."""
    max_length = max_length_for(len(ids), 2 * tokens + 1, stage.config.block_size)

    async def main() -> AgainstFloor:
        channels, session = await open_chain(route, max_length, "fp32")
        bare = BareSession(bare_address)
        local = LocalSession(stage, GREEDY, max_length)
        ms: tuple[list[float], ...] = ([], [], [], [])
        back: tuple[list[float], list[float]] = ([], [])
        computed: tuple[list[float], list[float], list[float]] = ([], [], [])
        try:
            token = (await session.step(ids, 0)).token
            same = token == await bare.step(ids, 0) == local.step(ids, 0).token
            same = same and token == pipes.step(ids, 0)
            for i, pos in enumerate(range(len(ids), len(ids) + 2 * tokens)):
                three = i < tokens  # (all of them: then the gRPC chains alone)
                for k in ORDERS[i % len(ORDERS)]:
                    if k >= 2 and not three:
                        continue
                    t0 = time.perf_counter()
                    if k == 0:
                        result = await session.step([token], pos)
                    elif k == 1:
                        floor = await bare.step([token], pos)
                    elif k == 3:
                        piped = pipes.step([token], pos)
                    else:
                        here = local.step([token], pos).token
                    ((ms if three else back)[k]).append((time.perf_counter() - t0) * 1e3)
                if three:
                    computed[0].append(sum(h["compute_ms"] for h in result.hops))
                    computed[1].append(bare.compute_ms)
                    computed[2].append(pipes.compute_ms)
                    same = same and result.token == here == piped
                same = same and result.token == floor
                token = result.token
        finally:
            local.close()
            await bare.close()
            await session.close()
            await channels.close()
        return AgainstFloor(*ms, same, *computed, *back)

    return asyncio.run(main())


def bare_row(
    c: Config, runs: list[AgainstFloor], units: list, echo_ms: float, held_ms: float
) -> dict:
    """The floor's row, in the chains' terms (no traces: a bare node keeps none), and what
    nanoshard's chain adds to it per hop, token by token in the same runs."""

    def diffs(a: str, b: str, of: list[AgainstFloor] = runs) -> list[float]:
        return [x - y for r in of for x, y in zip(getattr(r, a), getattr(r, b), strict=True)]

    per_repeat = [median(r.bare_ms) for r in runs]
    overhead = median(diffs("bare_ms", "local_ms"))
    return {
        "name": c.name,
        "nodes": c.nodes,
        "hops": c.nodes,
        "codec": c.codec,
        "bare": True,
        "threads": 0,
        "units": [list(u) for u in units],
        "ms_per_token": round(median([ms for r in runs for ms in r.bare_ms]), 3),
        "ms_per_token_repeats": spread(per_repeat),
        "ratio_to_local": round(
            median([a / median(r.local_ms) for a, r in zip(per_repeat, runs, strict=True)]), 4
        ),
        "local_ms_per_token": round(median([ms for r in runs for ms in r.local_ms]), 3),
        "overhead_ms": round(overhead, 3),
        "overhead_per_hop_ms": round(overhead / c.nodes, 3),
        "above_echo_floor_ms": round(overhead / c.nodes - echo_ms, 3),
        "above_held_floor_ms": round(overhead / c.nodes - held_ms, 3),
        "compute_ms_sum": round(median([ms for r in runs for ms in r.bare_compute_ms]), 3),
        "tokens_match_local": all(r.same_tokens for r in runs),
        # nanoshard's chain in the same runs, token by token against the floor
        "chain_ms_per_token": round(median([ms for r in runs for ms in r.chain_ms]), 3),
        "chain_ratio_to_local": round(
            median([median(r.chain_ms) / median(r.local_ms) for r in runs]), 4
        ),
        "chain_compute_ms_sum": round(median([ms for r in runs for ms in r.chain_compute_ms]), 3),
        "chain_above_floor_per_hop_ms": round(
            median(diffs("back_chain_ms", "back_bare_ms")) / c.nodes, 3
        ),
        "chain_above_floor_per_hop_repeats": spread(
            [median(diffs("back_chain_ms", "back_bare_ms", [r])) / c.nodes for r in runs]
        ),
        # the same with the local step between tokens (the paths' turns balanced)
        "chain_above_floor_with_local_per_hop_ms": round(
            median([balanced(diffs("chain_ms", "bare_ms", [r])) for r in runs]) / c.nodes, 3
        ),
        # the same processes over OS pipes: what splitting the model costs without gRPC
        "pipe_ms_per_token": round(median([ms for r in runs for ms in r.pipe_ms]), 3),
        "pipe_ratio_to_local": round(
            median([median(r.pipe_ms) / median(r.local_ms) for r in runs]), 4
        ),
        "pipe_overhead_per_hop_ms": round(median(diffs("pipe_ms", "local_ms")) / c.nodes, 3),
        "pipe_compute_ms_sum": round(median([ms for r in runs for ms in r.pipe_compute_ms]), 3),
        "floor_above_pipes_per_hop_ms": round(median(diffs("bare_ms", "pipe_ms")) / c.nodes, 3),
        # each node's CPU per token (its threads, both chains' tokens in the same runs)
        "chain_cpu_ms_per_node": per_node([r.chain_cpu_ms for r in runs]),
        "cpu_ms_per_node": per_node([r.bare_cpu_ms for r in runs]),
    }


def per_node(repeats: list[list[float]]) -> list[float]:
    """Each node's median over the repeats of a figure per node."""
    return [round(median(v), 3) for v in zip(*repeats, strict=True)]


def measure_prefill(stage: Stage, route: Route, enc: Any, opts: argparse.Namespace) -> dict:
    """A ``--prefill-tokens`` prompt (chunks of 128, as every path sends it) to its first
    token: locally and through the longest chain, interleaved, ``--repeats`` x 2 times."""
    ids = (enc.encode(SPEED_TEXT) * opts.prefill_tokens)[: opts.prefill_tokens]
    block = stage.config.block_size
    local: list[float] = []
    chain: list[float] = []
    for r in range(2 * opts.repeats + 1):  # the first pair warms up
        pair = [
            lambda: local.append(run_local(stage, ids, 0).prefill_ms),
            lambda: chain.append(run_chain(route, ids, 0, "fp32", block).prefill_ms),
        ]
        for run in pair if r % 2 else pair[::-1]:
            run()
        if r == 0:
            local.clear()
            chain.clear()
    return {
        "prompt_tokens": len(ids),
        "nodes": len(route.hops),
        "local_ms": round(median(local), 1),
        "chain_ms": round(median(chain), 1),
        "ratio_to_local": round(median([c / lo for c, lo in zip(chain, local, strict=True)]), 4),
    }


def codec_bytes(speed: dict, names: tuple[str, ...]) -> list[dict]:
    """Bytes per token per node->node hop, as the traces of the biggest chain counted them."""
    n_embd = speed["config"]["n_embd"]
    chain = {
        r["codec"]: r
        for r in speed["configs"]
        if r["nodes"] == max(r["nodes"] for r in speed["configs"]) and not r.get("bare")
    }
    out = []
    for name in names:
        row = chain.get(name)
        if row is None or len(row["per_hop"]) < 2:
            continue
        sent = [h["bytes_out_per_token"] for h in row["per_hop"][:-1]]
        out.append(
            {
                "codec": name,
                "bytes_per_token_per_hop": int(sent[0]) if sent[0].is_integer() else sent[0],
                "all_hops_equal": all(s == sent[0] for s in sent),
                "expected": codecs.encoded_size((1, n_embd), name),
                "ratio_to_fp32": round(sent[0] / (4 * n_embd), 4),
                "message_bytes_per_token": row.get("message_bytes_per_token"),
                "ms_per_token": row["ms_per_token"],
                "compute_ms_sum": row["compute_ms_sum"],
            }
        )
    return out


# ---- quality ----------------------------------------------------------------------------


@torch.inference_mode()
def logits_through(stages: list[Stage], ids: list[int], codec: str) -> torch.Tensor:
    """All-position logits of ``ids`` through ``stages``, activations passed by ``codec``."""
    x: torch.Tensor = torch.tensor(ids, dtype=torch.long)
    for i, stage in enumerate(stages):
        if i:
            x = codecs.decode(codecs.encode(x, codec), tuple(x.shape), codec)
        x = stage(x, all_logits=True)
    return x


def measure_quality(opts: argparse.Namespace, nodes: Nodes) -> dict:
    ckpt = open_checkpoint(opts.agree_model)
    config = ckpt.config
    enc = encoding_for(ckpt.path)
    eot = enc.eot_token if "<|endoftext|>" in enc.special_tokens_set else None
    splits = even_splits(config.n_units, min(max(opts.chains), config.n_units))
    route = route_from_addresses(nodes.chain(opts.agree_model, splits))
    sequences: dict[str, list[list[int]]] = {c: [] for c in opts.codecs}
    prompts: list[list[int]] = []
    compared = 0
    for text in PROMPTS:
        if compared >= opts.agree_tokens:
            break
        ids = enc.encode(text)[: config.block_size // 2]
        tokens = min(opts.agree_tokens - compared, config.block_size - len(ids))
        for name in opts.codecs:  # fp32 first
            gen = run_chain(route, ids, tokens - 1, name, config.block_size, eot)
            # <|endoftext|> is a greedy choice too: compare it, then the next prompt starts
            ended = [eot] if eot is not None and gen.stop_reason == "eot" else []
            sequences[name].append(gen.token_ids + ended)
        prompts.append(ids)
        compared += len(sequences["fp32"][-1])

    stages = [ckpt.load_stage(a, b) for a, b in splits]
    texts = [(p + s)[: config.block_size] for p, s in zip(prompts, sequences["fp32"], strict=True)]
    reference = [logits_through(stages, t, "fp32") for t in texts]
    rows = []
    for name in opts.codecs:
        errors, top1, positions = 0.0, 0, 0
        for t, ref in zip(texts, reference, strict=True):
            logits = logits_through(stages, t, name)
            errors = max(errors, float((logits - ref).abs().max()))
            top1 += int((logits.argmax(-1) == ref.argmax(-1)).sum())
            positions += len(t)
        rows.append(
            {
                "codec": name,
                **agreement(sequences["fp32"], sequences[name]),
                "max_abs_logit_error": errors,
                "teacher_forced_top1": round(top1 / positions, 4),
                "positions": positions,
            }
        )
    return {
        "model": opts.agree_model,
        "path": str(ckpt.path),
        "config": config.to_dict(),
        "units": [list(u) for u in splits],
        "prompts": len(prompts),
        "max_abs_logit": round(max(float(r.abs().max()) for r in reference), 3),
        "codecs": rows,
    }


# ---- report ---------------------------------------------------------------------------


def render_markdown(result: dict) -> str:
    m, speed, quality = result["machine"], result["speed"], result["quality"]
    cfg, qcfg, q = speed["config"], quality["config"], quality["codecs"]
    k = max(r["nodes"] for r in speed["configs"])

    def units(stages: list) -> str:
        return " ".join(f"{a}:{b}" for a, b in stages)

    def ms(value: float) -> str:
        return f"{value:.2f}"

    out = [
        "# Hops: bytes and latency per hop\n",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, default flags (a torch thread "
        f"per core, {m['omp_wait_policy']} OpenMP waits; nodes batch) unless noted, "
        f"{m['date']}; load average {m['load_average_start']} at start, "
        f"{m['load_average_end']} at end (a shared machine: read ratios, not absolutes).\n",
        f"Speed model: {cfg['n_layer']} layers, {cfg['n_head']} heads, {cfg['n_embd']} wide, "
        f"vocab {cfg['vocab_size']} (random weights); greedy, {speed['prompt_tokens']}-token "
        f"prompt, {speed['decode_tokens']} decode tokens, median step over "
        f"{speed['repeats']} interleaved repeats. hops = client->node + node->node transfers "
        "= nodes. Each chain run is paired token by token with the local path (the local step for "
        "the same token runs between two chain steps): local (paired) is that step's median, "
        "overhead the median of (chain step - local step).\n",
    ]

    def paired(r: dict, key: str) -> str:
        return ms(r[key]) if r["nodes"] and r[key] is not None else "-"

    rows = [
        [r["name"], r["hops"], units(r["units"]), ms(r["ms_per_token"]),
         "-".join(ms(v) for v in r["ms_per_token_repeats"]), paired(r, "local_ms_per_token"),
         f"{r['ratio_to_local']:.3f}", paired(r, "overhead_ms"),
         paired(r, "overhead_per_hop_ms"), paired(r, "above_echo_floor_ms"),
         paired(r, "above_held_floor_ms"), paired(r, "compute_ms_sum"), "yes" if r["tokens_match_local"] else "no"]
        for r in speed["configs"]
        if r["codec"] == "fp32"
    ]  # fmt: skip
    header = (
        "path|hops|units|ms/token|repeats|local (paired) ms|x local|overhead ms|"
        "overhead/hop ms|above echo floor ms|above held floor ms|compute ms (sum)|tokens = local"
    )
    out += [markdown_table(header.split("|"), rows), ""]
    out.append(
        f"\ngRPC echo floor (a bare grpc.aio bidi-stream round trip of {cfg['n_embd']} fp32 "
        f"values, `echo.py`, between the chain runs): {ms(speed['echo_floor_ms'])} ms "
        f"(per repeat {speed['echo_floor_repeats']}); held as long as a hop computes (the "
        f"local ms/token / nodes; the hold taken out): {ms(speed['held_floor_ms'])} ms (per "
        f"repeat {speed['held_floor_repeats']}).\n"
    )
    for r in speed["configs"]:
        if r.get("bare"):
            out.append(
                f"\nThe floor of a pipeline hop ({r['name']}, `bare_chain.py`: the same "
                "stages, each computed in its gRPC handler, raw bytes, nothing of nanoshard), "
                "each token taken by nanoshard's chain, the bare chain and the local path in "
                f"turn: the chain {ms(r['chain_ms_per_token'])} ms/token "
                f"({r['chain_ratio_to_local']:.3f} x local), the floor "
                f"{ms(r['ms_per_token'])} ({r['ratio_to_local']:.3f} x local). Then the two "
                "chains alone, each token taken by both, back to back: **nanoshard above the "
                f"floor: {ms(r['chain_above_floor_per_hop_ms'])} ms per hop** (per repeat "
                f"{r['chain_above_floor_per_hop_repeats']}; "
                f"{ms(r['chain_above_floor_with_local_per_hop_ms'])} with the local step "
                "between tokens, which charges what follows it). The nodes' compute, summed: "
                f"the chain {ms(r['chain_compute_ms_sum'])} ms, the floor "
                f"{ms(r['compute_ms_sum'])}. Each node's CPU per token (all its threads, "
                "`/proc`; prefill included): the chain's "
                f"{', '.join(ms(v) for v in r['chain_cpu_ms_per_node'])} ms, the floor's "
                f"{', '.join(ms(v) for v in r['cpu_ms_per_node'])}.\n"
            )
            out.append(
                "\nBelow that floor, the same stages in the same number of processes linked "
                "by OS pipes (`pipe_chain.py`: blocking reads, no gRPC, no event loop, the "
                "token straight back to the caller), taking each token in the same turns: "
                f"{ms(r['pipe_ms_per_token'])} ms/token ({r['pipe_ratio_to_local']:.3f} x "
                f"local, {ms(r['pipe_overhead_per_hop_ms'])} ms a hop; compute summed "
                f"{ms(r['pipe_compute_ms_sum'])} ms). Splitting the model across processes on "
                "this machine costs that much by itself; **Python gRPC costs "
                f"{ms(r['floor_above_pipes_per_hop_ms'])} ms a hop more** (the bare chain "
                "against the pipes, token by token).\n"
            )
    pre = speed["prefill"]
    out.append(
        f"\nPrefill of a {pre['prompt_tokens']}-token prompt to its first token: local "
        f"{pre['local_ms']} ms, {pre['nodes']} nodes {pre['chain_ms']} ms, "
        f"x local {pre['ratio_to_local']:.3f} (median of paired runs).\n"
    )
    out.append("\nWhere each hop's time goes (median ms per decode token):\n")
    rows = [
        [r["name"], i + 1, units([h["units"]]), ms(h["transfer_ms"]), ms(h["handling_ms"]),
         ms(h["queue_ms"]), ms(h["compute_ms"]), int(h["bytes_out_per_token"])]
        for r in speed["configs"]
        if r["nodes"] and r["codec"] == "fp32" and not r.get("bare")
        for i, h in enumerate(r["per_hop"])
    ]  # fmt: skip
    header = "chain|hop|units|transfer in|handling|queue|compute|bytes out/token"
    out += [markdown_table(header.split("|"), rows), ""]
    out.append(
        f"\nCodecs. Bytes and ms/token: the {k}-node speed chain (n_embd {cfg['n_embd']}). "
        f"Quality: {quality['model']} ({qcfg['n_layer']} layers, {qcfg['n_embd']} wide, "
        f"context {qcfg['block_size']}) as the chain {units(quality['units'])}, "
        f"{quality['prompts']} prompts; greedy agreement with fp32 position by position "
        "(identical prefix: tokens before the first difference); logit error and teacher-forced "
        f"top-1 in process over {q[0]['positions']} positions (largest fp32 |logit| "
        f"{quality['max_abs_logit']}).\n"
    )
    by_name = {c["codec"]: c for c in result["codecs"]}
    rows = []
    for c in q:
        b = by_name.get(c["codec"], {})
        rows.append(
            [c["codec"], b.get("bytes_per_token_per_hop", "-"), f"{b['ratio_to_fp32']:.4f}" if b else "-",
             b.get("message_bytes_per_token", "-"), b.get("ms_per_token", "-"),
             f"{c['agree']}/{c['compared']}", f"{c['identical_prefix']}/{c['compared']}",
             f"{c['max_abs_logit_error']:.3g}", f"{c['teacher_forced_top1']:.4f}"]
        )  # fmt: skip
    header = (
        f"codec|bytes/token/hop|x fp32|message bytes|{k}-node ms/token|greedy agreement|"
        "identical prefix|max logit error|top-1 (forced)"
    )
    out += [markdown_table(header.split("|"), rows), ""]
    out.append(f"\nRuntime {m['runtime_s']} s. Command: `python benchmarks/hops.py`.\n")
    return "\n".join(out)


# ---- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, help="decode tokens per run (default 64; quick 8)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default 32)")
    p.add_argument("--prefill-tokens", type=int, help="prefill prompt (default 512; quick 64)")
    p.add_argument("--repeats", type=int, help="interleaved repeats (default 3; quick 1)")
    p.add_argument(
        "--quick", action="store_true", help="fewer repeats and tokens, no 1-thread local"
    )
    p.add_argument("--model", help="speed model (default: random GPT-2 124M, made once)")
    p.add_argument("--agree-model", default="demo", help="quality model (default: demo)")
    p.add_argument("--agree-tokens", type=int, help="greedy tokens compared (512; quick 64)")
    p.add_argument("--chains", default="1,2,3", help="chain lengths (default 1,2,3)")
    p.add_argument("--codecs", default=",".join(CODECS), help="codecs (fp32 always included)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for hops.json and hops.md")
    opts = p.parse_args(argv)
    quick = opts.quick
    opts.tokens = opts.tokens or (8 if quick else 64)
    opts.prefill_tokens = opts.prefill_tokens or (64 if quick else 512)
    opts.repeats = opts.repeats or (1 if quick else 3)
    opts.agree_tokens = opts.agree_tokens or (64 if quick else 512)
    opts.chains = sorted({int(k) for k in opts.chains.split(",")})
    names = [codecs.check_codec(c) for c in opts.codecs.split(",")]
    opts.codecs = ("fp32", *[c for c in names if c != "fp32"])
    opts.model = speed_model(opts.model)
    return opts


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    raise_on_sigterm()
    started = time.perf_counter()
    result: dict = {"machine": machine_info()}
    with contextlib.ExitStack() as stack:  # every process is stopped, by its PID
        nodes = stack.enter_context(Nodes())
        echo = stack.enter_context(EchoServer())
        result["speed"] = measure_speed(opts, nodes, echo, stack)
        result["quality"] = measure_quality(opts, nodes)
    result["codecs"] = codec_bytes(result["speed"], opts.codecs)
    return save_results(result, started, opts.out, "hops", render_markdown)


if __name__ == "__main__":
    main()
