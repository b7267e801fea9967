"""The HTTP gateway (``nanoshard api``): what streaming through it costs, and 32 clients.

    python benchmarks/api.py           # ~3 min; writes benchmarks/results/api.{json,md}
    python benchmarks/api.py --quick   # few tokens, 10 s of load: checks the script runs

A swarm on 127.0.0.1 as a user starts one: ``nanoshard coordinator`` and two
``nanoshard-node join`` volunteers (their defaults; only ``--max-memory`` so the model is
split into a route of two hops), serving ``--model`` (default GPT-2 124M's shape with
random weights, made once under ``.cache/bench/gpt2-124m-random``), and ``nanoshard api``
with its defaults in front of it.

1. **Streaming overhead**: the same greedy generation (``--tokens`` tokens of a prompt),
   streamed by the SDK in this process (``Client.stream``) and through the gateway
   (``POST /v1/completions`` with ``stream: true``, read as raw SSE), interleaved,
   ``--repeats`` times each. ms/token is the consumer's wall time from the first token to
   the last over the tokens between (each run's mean; the median run is reported). The
   target: the gateway's ms/token <= 1.05 x the SDK's.
2. **Load**: ``--clients`` concurrent streaming clients (the official ``openai`` package,
   ``AsyncOpenAI``) for ``--seconds`` s, each asking again as soon as its stream ends.
   Errors are counted (the target: none); per-token latency is the time between two chunks
   of one stream (p50/p99), time to first token separately.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import random
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import (
    BENCH_CACHE,
    GPT2_124M,
    PROMPTS,
    RESULTS,
    machine_info,
    markdown_table,
    median,
    raise_on_sigterm,
    random_checkpoint,
    save_results,
    spread,
)

from nanoshard import Client
from nanoshard.checkpoint import open_checkpoint
from nanoshard.cliutil import API, COORDINATOR, listening_pattern

BIN = Path(sys.executable).parent
TARGET_RATIO = 1.05


class Proc:
    def __init__(self, args: list[str]) -> None:
        self.lines: list[str] = []
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float = 300) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := pattern.search(line):
                    return m.group(1)
            if self.popen.poll() is not None:
                raise RuntimeError("\n".join(self.lines[-30:]))
            time.sleep(0.05)
        raise TimeoutError(f"no {pattern.pattern!r} in {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class BenchSwarm:
    """A coordinator, ``nodes`` volunteers and the gateway; every process stopped by PID."""

    def __init__(self, model: str, nodes: int, tmp: Path) -> None:
        self.procs: list[Proc] = []
        name = "bench-api-" + secrets.token_hex(3)
        loopback = ["--mdns-interface", "127.0.0.1"]
        coordinator = self.start(
            [
                "nanoshard",
                "coordinator",
                "--model",
                model,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--swarm",
                name,
                "--state-dir",
                str(tmp / "state"),
                *loopback,
            ]
        )
        self.address = coordinator.wait_for(listening_pattern(COORDINATOR))
        checkpoint = open_checkpoint(model)
        weights = checkpoint.stage_nbytes(0, checkpoint.config.n_units)
        memory = int(weights * 1.6 / nodes / 0.8)  # as the demo: the model must be split
        for i in range(nodes):
            self.start(
                [
                    "nanoshard-node",
                    "join",
                    "--host",
                    "127.0.0.1",
                    "--coordinator",
                    self.address,
                    "--swarm",
                    name,
                    "--name",
                    f"v{i + 1}",
                    "--max-memory",
                    str(memory),
                    "--cache-dir",
                    str(tmp / f"cache{i}"),
                    *loopback,
                ]
            )
        self.wait_covered(nodes)
        gateway = self.start(["nanoshard", "api", "--coordinator", self.address, "--port", "0"])
        self.url = gateway.wait_for(listening_pattern(API))

    def start(self, args: list[str]) -> Proc:
        proc = Proc([str(BIN / args[0]), *args[1:]])
        self.procs.append(proc)
        return proc

    def wait_covered(self, nodes: int, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        with Client(self.address) as client:
            while time.monotonic() < deadline:
                s = client.status()
                ready = [n for n in s["nodes"] if n["healthy"] and n["serving"] == n["stage"]]
                if len(ready) == nodes and all(u["replicas"] >= 1 for u in s["units"]):
                    return
                time.sleep(0.5)
        raise TimeoutError("the swarm did not cover every unit")

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


# ---- 1. streaming overhead --------------------------------------------------------------


def ms_per_token(stamps: list[float]) -> float:
    """The consumer's wall time per token after the first."""
    return (stamps[-1] - stamps[0]) * 1e3 / (len(stamps) - 1)


def sdk_run(client: Client, prompt: str, tokens: int) -> tuple[float, int]:
    stamps = [time.perf_counter() for _ in client.stream(prompt, tokens, temperature=0)]
    return ms_per_token(stamps), len(stamps)


def api_run(url: str, model: str, prompt: str, tokens: int) -> tuple[float, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=300)
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
    connection.request(
        "POST",
        "/v1/completions",
        json.dumps({**body, "stream": True}),
        {"content-type": "application/json"},
    )
    reply = connection.getresponse()
    stamps = []
    for line in reply:
        if line.startswith(b"data: {"):
            if json.loads(line[6:])["choices"][0]["finish_reason"] is None:
                stamps.append(time.perf_counter())
        elif line.startswith(b"data: [DONE]"):
            break
    connection.close()
    return ms_per_token(stamps), len(stamps)


def overhead(swarm: BenchSwarm, model: str, tokens: int, repeats: int) -> dict:
    sdk, api = [], []
    with Client(swarm.address) as client:
        # the same tokens both ways: a prompt whose greedy text has no <|endoftext|> early
        prompt = PROMPTS[0]
        sdk_run(client, prompt, 8)
        api_run(swarm.url, model, prompt, 8)  # warm-up: channels, routes, caches
        for r in range(repeats):
            pair = [("sdk", sdk), ("api", api)]
            for kind, out in pair if r % 2 == 0 else reversed(pair):
                ms, n = (
                    sdk_run(client, prompt, tokens)
                    if kind == "sdk"
                    else api_run(swarm.url, model, prompt, tokens)
                )
                out.append(ms)
                print(f"  {kind} run {r + 1}: {n} tokens, {ms:.2f} ms/token", flush=True)
    ratio = median(api) / median(sdk)
    return {
        "tokens": tokens,
        "repeats": repeats,
        "sdk_ms_per_token": round(median(sdk), 3),
        "sdk_spread": spread(sdk),
        "api_ms_per_token": round(median(api), 3),
        "api_spread": spread(api),
        "ratio": round(ratio, 4),
        "target": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
    }


# ---- 2. many clients ------------------------------------------------------------------


async def load(url: str, model: str, clients: int, seconds: float, tokens: int) -> dict:
    from openai import AsyncOpenAI

    api = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    intervals: list[float] = []
    first: list[float] = []
    errors: list[str] = []
    done = [0, 0]  # streams, tokens
    deadline = time.perf_counter() + seconds

    async def one_client(k: int) -> None:
        rng = random.Random(k)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            last = None
            try:
                stream = await api.completions.create(
                    model=model,
                    prompt=PROMPTS[k % len(PROMPTS)],
                    max_tokens=tokens,
                    temperature=0.8,
                    seed=rng.randrange(2**31),
                    stream=True,
                )
                async for chunk in stream:
                    if not chunk.choices or chunk.choices[0].finish_reason is not None:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        first.append(now - started)
                    else:
                        intervals.append(now - last)
                    last = now
                    done[1] += 1
                done[0] += 1
            except Exception as exc:  # counted: the target is none
                errors.append(f"{type(exc).__name__}: {exc}"[:300])

    started = time.perf_counter()
    await asyncio.gather(*(one_client(k) for k in range(clients)))
    wall = time.perf_counter() - started
    await api.close()

    def pct(values: list[float], q: float) -> float | None:
        if len(values) < 2:
            return None
        return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1e3, 2)

    return {
        "clients": clients,
        "seconds": round(wall, 1),
        "max_tokens": tokens,
        "streams": done[0],
        "tokens": done[1],
        "tokens_per_s": round(done[1] / wall, 1),
        "errors": len(errors),
        "first_errors": errors[:5],
        "token_ms_p50": pct(intervals, 50),
        "token_ms_p99": pct(intervals, 99),
        "first_token_ms_p50": pct(first, 50),
        "first_token_ms_p99": pct(first, 99),
    }


def render(result: dict) -> str:
    o, lo = result["overhead"], result["load"]
    lines = [
        "# The HTTP gateway (`python benchmarks/api.py`)",
        "",
        f"Model {result['model']}, a route of {result['nodes']} hops on 127.0.0.1; "
        f"{result['machine']['cores']} cores ({result['machine']['cpu']}), load average "
        f"{result['machine']['load_average_start']} at the start.",
        "",
        f"## Streaming overhead ({o['tokens']} greedy tokens, {o['repeats']} runs each, interleaved)",
        "",
        markdown_table(
            ["path", "ms/token (median run)", "[min, max]"],
            [
                ["SDK `Client.stream`", o["sdk_ms_per_token"], o["sdk_spread"]],
                ["`/v1/completions` stream", o["api_ms_per_token"], o["api_spread"]],
            ],
        ),
        "",
        f"Ratio {o['ratio']} (target <= {o['target']}: {'met' if o['met'] else 'NOT met'}).",
        "",
        f"## {lo['clients']} concurrent streaming clients for {lo['seconds']} s",
        "",
        markdown_table(
            [
                "streams",
                "tokens",
                "tokens/s",
                "errors",
                "token ms p50",
                "token ms p99",
                "first token ms p50",
                "first token ms p99",
            ],
            [
                [
                    lo["streams"],
                    lo["tokens"],
                    lo["tokens_per_s"],
                    lo["errors"],
                    lo["token_ms_p50"],
                    lo["token_ms_p99"],
                    lo["first_token_ms_p50"],
                    lo["first_token_ms_p99"],
                ]
            ],
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: GPT-2 124M's shape)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--load-tokens", type=int, default=32, help="max_tokens of each stream")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:  # a check that the script runs (its figures to a temporary folder, unless
        args.tokens, args.repeats, args.seconds = 20, 2, 10.0  # --out says where)
        if args.out == RESULTS:
            args.out = Path(tempfile.mkdtemp(prefix="bench-api-quick-"))
    raise_on_sigterm()
    started = time.perf_counter()
    model = args.model or str(random_checkpoint(GPT2_124M, BENCH_CACHE / "gpt2-124m-random"))
    result = {"model": args.model or "gpt2-124m-random", "nodes": args.nodes}
    result["machine"] = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        swarm = BenchSwarm(model, args.nodes, Path(tmp))
        try:
            with Client(swarm.address) as client:
                name = client.core.model_name
            print("streaming overhead", flush=True)
            result["overhead"] = overhead(swarm, name, args.tokens, args.repeats)
            print(f"{args.clients} clients for {args.seconds:.0f} s", flush=True)
            result["load"] = asyncio.run(
                load(swarm.url, name, args.clients, args.seconds, args.load_tokens)
            )
        finally:
            swarm.close()
    save_results(result, started, args.out, "api", render)


if __name__ == "__main__":
    main()
