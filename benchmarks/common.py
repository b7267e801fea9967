"""Helpers the benchmarks share: the GPT-2-124M-shaped random checkpoint, node processes
on loopback (always stopped by PID), stage splits, timed generations (local, along a
route, or both in lockstep), statistics and machine facts.

Benchmarks run as scripts (``python benchmarks/NAME.py``), so this module is imported as
``common`` from the script's own folder; it never imports from ``tests/``.

Nodes start with default flags (a thread per core, batching on) and this process runs the
local path with torch's default thread count, as ``nanoshard generate --local`` does: the
benchmarks measure what users get. Each script imports ``nanoshard.threads`` before torch
so the local path waits for work as the nodes do.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoshard.checkpoint import save_hf_checkpoint
from nanoshard.client.route import Route
from nanoshard.client.session import RetryPolicy, SwarmSession
from nanoshard.cliutil import listening_pattern
from nanoshard.config import GPTConfig
from nanoshard.engine import Stage, init_weights
from nanoshard.generation import Generation, LocalSession, agenerate, generate, max_length_for
from nanoshard.hop import Channels
from nanoshard.sampling import SamplingParams
from nanoshard.tokenizer import gpt2_bpe_dir

ROOT = Path(__file__).resolve().parent.parent
BENCH_CACHE = ROOT / ".cache" / "bench"
RESULTS = Path(__file__).resolve().parent / "results"
NODE_BIN = Path(sys.executable).parent / "nanoshard-node"
LISTENING = listening_pattern()
# What every coordinator and volunteer a benchmark starts is given: its servers listen on
# loopback only, and so does its mDNS (this machine has an outside interface; the defaults,
# 0.0.0.0 and every interface, are for a LAN). No tuning: loopback is what they use anyway.
LOOPBACK = ["--host", "127.0.0.1", "--mdns-interface", "127.0.0.1"]

GPT2_124M = GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)

# Accuracy prompts for the demo model (Shakespeare), used in turn until enough positions.
PROMPTS = (
    "ROMEO:\nBut soft, what light through yonder window breaks?",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "KING RICHARD III:\nNow is the winter of our discontent",
    "HAMLET:\nTo be, or not to be, that is the question:",
    "MACBETH:\nIs this a dagger which I see before me,",
    "PORTIA:\nThe quality of mercy is not strain'd,",
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?",
    "PROSPERO:\nWe are such stuff as dreams are made on,",
    "KING LEAR:\nBlow, winds, and crack your cheeks! rage! blow!",
    "OTHELLO:\nIt is the cause, it is the cause, my soul,",
    "BRUTUS:\nThere is a tide in the affairs of men,",
    "HELENA:\nLove looks not with the eyes, but with the mind,",
)


# ---- models ---------------------------------------------------------------------------


def gpt2_tokenizer_dir(into: Path) -> Path:
    """GPT-2's BPE files under their Hugging Face names (encoder.json -> vocab.json,
    vocab.bpe -> merges.txt), copied into ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(gpt2_bpe_dir() / "encoder.json", into / "vocab.json")
    shutil.copyfile(gpt2_bpe_dir() / "vocab.bpe", into / "merges.txt")
    return into


def random_checkpoint(config: GPTConfig, directory: Path, seed: int = 0) -> Path:
    """A Hugging Face GPT-2 directory with random weights (``init_weights(config, seed)``)
    and GPT-2's tokenizer. Made once: a directory whose config.json matches is reused."""
    config_json = directory / "config.json"
    if config_json.is_file() and (directory / "model.safetensors").is_file():
        saved = json.loads(config_json.read_text())
        same = (
            saved.get("n_layer"),
            saved.get("n_head"),
            saved.get("n_embd"),
            saved.get("vocab_size"),
            saved.get("n_positions"),
        ) == (config.n_layer, config.n_head, config.n_embd, config.vocab_size, config.block_size)
        if same and (directory / "vocab.json").is_file():
            return directory
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = gpt2_tokenizer_dir(Path(tmp))
        save_hf_checkpoint(
            config, init_weights(config, seed=seed), directory, tokenizer_dir=tokenizer
        )
    return directory


def speed_model(model: str | None) -> str:
    """The checkpoint a benchmark was given, else its speed model: GPT-2 124M's shape with
    random weights (``random_checkpoint``, made once)."""
    return model or str(random_checkpoint(GPT2_124M, BENCH_CACHE / "gpt2-124m-random"))


def even_splits(n_units: int, n_stages: int) -> list[tuple[int, int]]:
    """``n_units`` cut into ``n_stages`` contiguous stages as even as units allow
    (14 units, 3 stages -> 0:5, 5:10, 10:14)."""
    if not 1 <= n_stages <= n_units:
        raise ValueError(f"cannot cut {n_units} units into {n_stages} stages")
    cuts = [-(-i * n_units // n_stages) for i in range(n_stages + 1)]  # ceil: bigger stages first
    return list(itertools.pairwise(cuts))


# ---- node processes -------------------------------------------------------------------


def stop_processes(procs: Sequence[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """SIGTERM every child still running (by its PID), all at once; SIGKILL those not gone
    ``timeout_s`` later."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)


class NodeProcess:
    """One ``nanoshard-node serve`` child; its output is collected so a failure can show it."""

    def __init__(
        self,
        model: str,
        units: tuple[int, int],
        extra: Sequence[str] = (),
    ) -> None:
        self.model, self.units = model, units
        self.args = [
            str(NODE_BIN),
            "serve",
            "--model",
            model,
            "--units",
            f"{units[0]}:{units[1]}",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *extra,  # more ``serve`` flags: only for a reference row (--batch 1), never a target
        ]
        self.lines: list[str] = []
        self.popen = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address = ""

    def _read(self) -> None:
        if self.popen.stdout is not None:
            for line in self.popen.stdout:
                self.lines.append(line.rstrip("\n"))

    def wait_listening(self, timeout_s: float = 180.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := LISTENING.search(line):
                    self.address = m.group(1)
                    return self.address
            if self.popen.poll() is not None:
                time.sleep(0.2)  # let the reader catch the last lines
                raise RuntimeError(
                    f"node {self.units} exited with {self.popen.returncode}:\n"
                    + "\n".join(self.lines[-30:])
                )
            time.sleep(0.05)
        raise TimeoutError(f"node {self.units} did not start in {timeout_s:.0f} s")

    def terminate(self) -> None:
        """SIGTERM this child by its PID (it drains its server for up to 2 s)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM this child, SIGKILL it if it has not gone in 10 s."""
        stop_processes([self.popen])


class Nodes:
    """Every node process a benchmark started; ``close`` stops each one by PID.

    ``chain`` starts one node per stage and reuses a node already serving the same model
    and units with the same extra flags, so two measurements over the same split share
    processes.
    """

    def __init__(self) -> None:
        self.procs: dict[tuple[str, tuple[int, int], tuple[str, ...]], NodeProcess] = {}

    def start(
        self, model: str, splits: Sequence[tuple[int, int]], extra: Sequence[str] = ()
    ) -> None:
        """Start the missing nodes of ``splits`` without waiting (they load in parallel)."""
        for units in splits:
            if (model, units, tuple(extra)) not in self.procs:
                self.procs[(model, units, tuple(extra))] = NodeProcess(model, units, extra)

    def chain(
        self, model: str, splits: Sequence[tuple[int, int]], extra: Sequence[str] = ()
    ) -> list[str]:
        """The addresses of nodes serving ``splits`` of ``model`` (started with the ``serve``
        flags ``extra``), in order."""
        self.start(model, splits, extra)
        return [self.procs[(model, units, tuple(extra))].wait_listening() for units in splits]

    def close(self) -> None:
        # all at once: each drains for up to 2 s
        stop_processes([proc.popen for proc in self.procs.values()])
        self.procs.clear()

    def __enter__(self) -> Nodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def raise_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so ``finally`` blocks stop the nodes as on Ctrl-C."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# ---- timed generations ----------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0)


def run_local(stage: Stage, ids: list[int], tokens: int, threads: int = 0) -> Generation:
    """``tokens`` greedy decode steps (plus the prefill) in this process, with ``threads``
    torch threads (0: the process's own count, torch's default unless a script set it)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    block_size = stage.config.block_size
    session = LocalSession(stage, GREEDY, max_length_for(len(ids), tokens + 1, block_size))
    try:
        return generate(session, ids, tokens + 1, block_size=block_size)
    finally:
        session.close()
        torch.set_num_threads(before)


async def open_chain(route: Route, max_length: int, codec: str) -> tuple[Channels, SwarmSession]:
    channels = Channels()
    session = SwarmSession(
        channels, route, GREEDY, max_length, codec, retry=RetryPolicy(attempts=0)
    )
    await session.open()
    return channels, session


def run_chain(
    route: Route, ids: list[int], tokens: int, codec: str, block_size: int, eot: int | None = None
) -> Generation:
    """``tokens`` decode steps (plus the prefill) along ``route``; stops early only at ``eot``."""
    max_length = max_length_for(len(ids), tokens + 1, block_size)

    async def main() -> Generation:
        channels, session = await open_chain(route, max_length, codec)
        try:
            return await agenerate(session, ids, tokens + 1, block_size=block_size, eot_id=eot)
        finally:
            await session.close()
            await channels.close()

    return asyncio.run(main())


@dataclass
class Paired:
    """A chain run with the local path stepped in lockstep on the same tokens."""

    chain: Generation
    local_ms: list[float]  # local decode step k ran just before the chain's step k
    same_tokens: bool  # the local path predicted every token the chain produced


def run_paired(route: Route, stage: Stage, ids: list[int], tokens: int, codec: str) -> Paired:
    """``tokens`` greedy decode steps along ``route``; between two of them (``on_token``),
    the local path takes its step for the same token, so both see the same machine load."""
    block_size = stage.config.block_size
    local = LocalSession(stage, GREEDY, max_length_for(len(ids), tokens + 1, block_size))
    expected = [local.step(ids, 0).token]
    local_ms: list[float] = []

    def lockstep(token: int) -> None:
        if len(local_ms) == tokens:
            return  # the chain's last token: it takes no further step
        pos = len(ids) + len(local_ms)
        t0 = time.perf_counter()
        result = local.step([token], pos)
        local_ms.append((time.perf_counter() - t0) * 1e3)
        expected.append(result.token)

    max_length = max_length_for(len(ids), tokens + 1, block_size)

    async def main() -> Generation:
        channels, session = await open_chain(route, max_length, codec)
        try:
            return await agenerate(
                session, ids, tokens + 1, block_size=block_size, on_token=lockstep
            )
        finally:
            await session.close()
            await channels.close()

    try:
        gen = asyncio.run(main())
    finally:
        local.close()
    return Paired(gen, local_ms, gen.token_ids == expected[: len(gen.token_ids)])


# ---- statistics and machine facts -----------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float]) -> list[float]:
    """[min, max] of per-repeat values, to show how noisy the machine was."""
    return [round(min(values), 3), round(max(values), 3)] if values else []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_ms(pid: int) -> float:
    """CPU time a process has used so far, all its threads, user and system (``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1e3 / os.sysconf("SC_CLK_TCK")


def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def machine_info(threads: int = 0) -> dict:
    """Facts of the machine and this process; ``threads`` is the nodes' --threads (0: the
    default, one per core)."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: spinning)"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
    }


def save_results(
    result: dict, started: float, out: Path, name: str, render: Callable[[dict], str]
) -> dict:
    """Finish ``result`` (the machine's load now, the runtime since ``started``), write it as
    ``out/NAME.json`` and, through ``render``, ``out/NAME.md``; print the Markdown."""
    result["machine"]["load_average_end"] = load_average()
    result["machine"]["runtime_s"] = round(time.perf_counter() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = render(result)
    (out / f"{name}.md").write_text(markdown)
    sys.stdout.write(markdown)
    return result


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Position by position against fp32's greedy tokens; and how long each stayed equal."""
    compared = sum(len(a) for a in reference)
    same = sum(
        x == y for a, b in zip(reference, other, strict=True) for x, y in zip(a, b, strict=False)
    )
    prefix = 0
    for a, b in zip(reference, other, strict=True):
        n = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        prefix += n
    return {
        "compared": compared,
        "agree": same,
        "agreement": round(same / compared, 4) if compared else None,
        "identical_prefix": prefix,
        "sequences_identical": sum(a == b for a, b in zip(reference, other, strict=True)),
    }
