"""The README's commands, timed from outside as a user meets them.

A coordinator and three volunteers, each started with nothing but ``--max-memory 320M`` (so
each holds about a third of a GPT-2 124M-shape model: three hops), and ``nanoshard generate
--temperature 0``, timed as whole processes:

    python benchmarks/user_chain.py            # ~4 min here; --quick for a smoke run

ms/token = (wall(N + 1 tokens) - wall(1 token)) / N, so process start-up, loading and the
prefill cancel out, for each of:

- ``swarm``: ``nanoshard generate`` through the swarm, spot-checks off (``--check-rate 0``);
- ``swarm, checks``: the same at the default spot-check rate;
- ``local``: ``nanoshard generate --local`` (the whole model in one process, default threads);
- ``transformers``: Hugging Face ``GPT2LMHeadModel.generate`` (KV cache, greedy) on the same
  weights, default threads.

The runs are interleaved and repeated; the medians are compared side by side. Nothing gets
a tuning flag: the nodes pick their thread policy themselves, as they do for a user. mDNS is
bound to loopback (the coordinator's address is given to the joiners too, so no multicast
leaves this machine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from common import (
    BENCH_CACHE,
    GPT2_124M,
    LOOPBACK,
    PROMPTS,
    RESULTS,
    machine_info,
    markdown_table,
    median,
    random_checkpoint,
    save_results,
    spread,
    stop_processes,
)

from nanoshard.client.swarm import CoordinatorClient
from nanoshard.cliutil import listening_pattern
from nanoshard.errors import NanoshardError

BIN = Path(sys.executable).parent
LISTENING = listening_pattern()
HF_RUN = """
import sys, torch
from transformers import GPT2LMHeadModel, GPT2TokenizerFast
path, n = sys.argv[1], int(sys.argv[2])
model = GPT2LMHeadModel.from_pretrained(path).eval()
ids = GPT2TokenizerFast.from_pretrained(path)(sys.argv[3], return_tensors="pt").input_ids
with torch.inference_mode():
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
"""


class Swarm:
    """A coordinator and volunteers as child processes, stopped by PID when done."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.logs = Path(tempfile.mkdtemp(prefix="user-chain-"))

    def start(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        environ = {**os.environ, **env} if env else None
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True, env=environ)
        self.procs.append(proc)
        return proc

    def wait_listening(self, name: str, timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        log = self.logs / f"{name}.log"
        while time.monotonic() < deadline:
            if found := LISTENING.search(log.read_text()):
                return found.group(1)
            time.sleep(0.1)
        raise TimeoutError(f"{name} did not start:\n{log.read_text()}")

    def close(self) -> None:
        stop_processes(self.procs, timeout_s=15.0)


@contextlib.contextmanager
def swarm_of_three(model: Path) -> Iterator[str]:
    swarm = Swarm()
    try:
        swarm.start(
            "coordinator",
            [
                str(BIN / "nanoshard"),
                "coordinator",
                "--model",
                str(model),
                "--port",
                "0",
                *LOOPBACK,
            ],
        )
        coordinator = swarm.wait_listening("coordinator")
        for i in range(3):
            swarm.start(
                f"node{i}",
                [
                    str(BIN / "nanoshard-node"),
                    "join",
                    "--coordinator",
                    coordinator,
                    "--max-memory",
                    "320M",
                    "--model",
                    str(model),
                    *LOOPBACK,
                ],
            )
        wait_served(coordinator, hops=3)
        yield coordinator
    finally:
        swarm.close()


def wait_served(coordinator: str, hops: int, timeout_s: float = 300) -> None:
    """Until the route the coordinator hands a new session covers every unit in ``hops``."""
    client = CoordinatorClient(coordinator)
    deadline = time.monotonic() + timeout_s
    last: object = None
    try:
        while time.monotonic() < deadline:
            try:
                last = client.route()
                if len(last.hops) == hops:  # type: ignore[attr-defined]
                    return
            except NanoshardError as exc:  # not every unit is served yet
                last = exc
            time.sleep(0.5)
    finally:
        client.close()
    raise TimeoutError(f"the swarm never served every unit in {hops} hops: {last}")


def wall_s(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def ms_per_token(command: Callable[[int], list[str]], n: int) -> float:
    """(wall(n + 1 tokens) - wall(1 token)) / n of ``command(tokens)``."""
    one = wall_s(command(1))
    many = wall_s(command(n + 1))
    return (many - one) * 1e3 / n


def measure(opts: argparse.Namespace) -> dict:
    model = random_checkpoint(GPT2_124M, BENCH_CACHE / "gpt2-124m-random")
    prompt = PROMPTS[0]
    samples: dict[str, list[float]] = {}
    with swarm_of_three(model) as coordinator:
        gen = [str(BIN / "nanoshard"), "generate", "--temperature", "0", "--json", prompt]
        swarm = [*gen, "--coordinator", coordinator]
        commands: dict[str, Callable[[int], list[str]]] = {
            "swarm": lambda n: [*swarm, "--check-rate", "0", "--max-new-tokens", str(n)],
            "swarm, checks": lambda n: [*swarm, "--max-new-tokens", str(n)],
            "local": lambda n: [*gen, "--local", "--model", str(model), "--max-new-tokens", str(n)],
            "transformers": lambda n: [sys.executable, "-c", HF_RUN, str(model), str(n), prompt],
        }
        for _ in range(opts.repeats):
            for name, command in commands.items():
                ms = ms_per_token(command, opts.tokens)
                samples.setdefault(name, []).append(ms)
                print(f"{name}: {ms:.1f} ms/token", flush=True)
    local, hf = median(samples["local"]), median(samples["transformers"])
    rows = []
    for name, values in samples.items():
        m = median(values)
        rows.append(
            {
                "name": name,
                "ms_per_token": round(m, 2),
                "samples": spread(values),
                "vs_local": round(m / local, 3),
                "vs_transformers": round(m / hf, 3),
            }
        )
    return {"tokens": opts.tokens, "repeats": opts.repeats, "rows": rows}


def render(result: dict) -> str:
    rows = [
        [r["name"], r["ms_per_token"], r["vs_local"], r["vs_transformers"], r["samples"]]
        for r in result["rows"]
    ]
    return (
        "# A user's three-hop swarm (`benchmarks/user_chain.py`)\n\n"
        f"Wall clock of `nanoshard generate` processes, {result['tokens']} decode tokens, "
        f"median of {result['repeats']}.\n\n"
        + markdown_table(["run", "ms/token", "× local", "× transformers", "samples"], rows)
        + "\n"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=200, help="decode tokens per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few tokens, once")
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.tokens, opts.repeats = 20, 1
    os.environ.pop("NANOSHARD_SWARM_KEY", None)
    started = time.perf_counter()
    result = {"machine": machine_info(0), **measure(opts)}
    return save_results(result, started, opts.out, "user_chain", render)


if __name__ == "__main__":
    main()
