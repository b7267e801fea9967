"""A fresh volunteer with no flags: the memory it promises against its RSS under load.

    python benchmarks/volunteer_memory.py           # ~1 min; results/volunteer_memory.{json,md}
    python benchmarks/volunteer_memory.py --quick   # 2 sessions, 16 tokens

A coordinator serves GPT-2 124M's shape (random weights, made once under ``.cache/bench``)
on loopback; one ``nanoshard-node join --coordinator ... --no-mdns --cache-dir EMPTY``
joins with no memory flag (nor --threads), so it promises its default share of this
machine, as measured on the real machine (nothing faked): half of the RAM free when it
starts, for the whole process: what it holds once its stage is loaded (runtime, weights)
comes first, the rest goes to KV caches. Its ready line says the figures. Then
``--sessions`` clients generate at once, each a long prompt and ``--tokens`` new tokens,
while this process samples the node's RSS (psutil) every 50 ms; then (unless
``--no-fill``) sessions of the model's whole context are opened until the node refuses one
(each writes its KV memory when it opens: the budget is then full) and four of them
generate. Target: its peak RSS is at most what it promised.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import tempfile
import threading
import time
from pathlib import Path

import psutil
from common import (
    BENCH_CACHE,
    GPT2_124M,
    PROMPTS,
    RESULTS,
    machine_info,
    markdown_table,
    raise_on_sigterm,
    random_checkpoint,
    save_results,
)
from join import BIN, LISTENING, Child

from nanoshard.client import Client

SIZE = r"(\d+\.\d) (MiB|GiB)"
READY = re.compile(
    rf"ready: serving units \[(\d+), (\d+)\).*takes at most {SIZE} \({SIZE} now, {SIZE} of it "
    rf"weights; up to {SIZE} more for KV caches\)"
)


def size(number: str, unit: str) -> int:
    return int(float(number) * (2**30 if unit == "GiB" else 2**20))


class RssSampler:
    """The peak RSS of a process, sampled every ``every`` seconds on a thread."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.samples += 1
            self._stop.wait(every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def load(address: str, sessions: int, tokens: int, prompt_chars: int) -> list[int]:
    """``sessions`` generations at once, one client each; the tokens each produced."""
    counts = [0] * sessions
    errors: list[BaseException] = []

    def one(i: int) -> None:
        prompt = ("\n\n".join(PROMPTS[i % len(PROMPTS) :] + PROMPTS))[:prompt_chars]
        try:
            with Client(address, check_rate=0) as client:
                result = client.generate(prompt, max_new_tokens=tokens, temperature=0.8, seed=i)
            counts[i] = len(result.token_ids)
        except BaseException as e:  # reported below, in this thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return counts


def fill(address: str, tokens: int, prompt_chars: int) -> tuple[int, str, list[int]]:
    """Open sessions of the model's whole context (each reserves its KV memory, written
    with zeros, when it opens) until the node refuses one; then generate on four of them
    at once while all are held. The sessions held, the refusal, the tokens generated."""
    from nanoshard.errors import NanoshardError

    held, refusal = [], ""
    with Client(address, check_rate=0) as client, contextlib.ExitStack() as stack:
        while True:
            try:
                held.append(stack.enter_context(client.session(seed=len(held))))
            except NanoshardError as e:
                refusal = str(e)
                break
            if len(held) > 10_000:
                raise RuntimeError("the node never refused a session: no KV budget?")
        counts = [0] * min(4, len(held))

        def one(i: int) -> None:
            prompt = ("\n\n".join(PROMPTS[i:] + PROMPTS))[:prompt_chars]
            counts[i] = len(held[i].generate(prompt, max_new_tokens=tokens).token_ids)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(counts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return len(held), refusal, counts


def measure(opts: argparse.Namespace) -> dict:
    model = opts.model or str(random_checkpoint(GPT2_124M, BENCH_CACHE / "gpt2-124m-random"))
    free_at_start = psutil.virtual_memory().available
    with tempfile.TemporaryDirectory() as tmp:
        coordinator = Child(
            [str(BIN / "nanoshard"), "coordinator", "--model", model, "--host", "127.0.0.1",
             "--port", "0", "--no-mdns", "--replicas", "1", "--state-dir", tmp]
        )  # fmt: skip
        node = None
        try:
            address = coordinator.wait_for(LISTENING, 180)[1].group(1)
            node = Child(
                [str(BIN / "nanoshard-node"), "join", "--coordinator", address, "--host",
                 "127.0.0.1", "--no-mdns", "--cache-dir", str(Path(tmp) / "node")]
            )  # fmt: skip
            _, ready = node.wait_for(READY, 300)
            idle_rss = psutil.Process(node.popen.pid).memory_info().rss
            started = time.perf_counter()
            with RssSampler(node.popen.pid) as sampler:
                counts = load(address, opts.sessions, opts.tokens, opts.prompt_chars)
            seconds = time.perf_counter() - started
            filled = None
            if opts.fill:
                with RssSampler(node.popen.pid) as full:
                    held, refusal, fill_counts = fill(address, 16, opts.prompt_chars)
                filled = {
                    "sessions_held": held,
                    "refusal": refusal,
                    "tokens_each": fill_counts,
                    "peak_rss": full.peak,
                    "rss_samples": full.samples,
                }
            ready_line = next(line for _, line in node.lines if READY.search(line))
        finally:
            for child in (node, coordinator):
                if child is not None:
                    child.stop()
    promised = size(ready[3], ready[4])
    peak = max(sampler.peak, filled["peak_rss"] if filled else 0)
    return {
        "model": model,
        "free_ram_at_start": free_at_start,
        "ready_line": ready_line,
        "units": [int(ready[1]), int(ready[2])],
        "promised": promised,
        "held_when_ready": size(ready[5], ready[6]),
        "weights": size(ready[7], ready[8]),
        "kv_budget": size(ready[9], ready[10]),
        "idle_rss": idle_rss,
        "peak_rss": sampler.peak,
        "rss_samples": sampler.samples,
        "sessions": opts.sessions,
        "tokens_each": counts,
        "load_seconds": round(seconds, 1),
        "filled": filled,
        "peak_over_promise": round(peak / promised, 4),
        "met": peak <= promised,
    }


def render_markdown(r: dict) -> str:
    m = r["machine"]

    def gib(n: int) -> str:
        return f"{n / 2**30:.2f} GiB"

    rows = [
        ["RAM free when the node started (psutil)", gib(r["free_ram_at_start"])],
        ["promised (default share, no flags)", gib(r["promised"])],
        ["… held once ready (runtime, weights as loaded)", gib(r["held_when_ready"])],
        ["… of which the stage's weights", gib(r["weights"])],
        ["… KV caches at most (the rest, less 64 MiB for a step's buffers)", gib(r["kv_budget"])],
        ["RSS once ready, idle", gib(r["idle_rss"])],
        [
            f"peak RSS under load ({r['sessions']} sessions, {sum(r['tokens_each'])} tokens "
            f"in {r['load_seconds']} s; {r['rss_samples']} samples)",
            gib(r["peak_rss"]),
        ],
    ]
    f = r["filled"]
    if f:
        rows.append(
            [
                f"peak RSS with the KV budget full ({f['sessions_held']} sessions of the whole "
                f"context held, 4 generating {sum(f['tokens_each'])} tokens)",
                gib(f["peak_rss"]),
            ]
        )
    rows.append(["peak RSS / promised", f"{r['peak_over_promise']:.3f}"])
    return (
        "# A fresh volunteer's memory: promised against RSS under load\n\n"
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}, load "
        f"{m['load_average_start']} -> {m['load_average_end']}. GPT-2 124M shape, "
        f"units {r['units'][0]}:{r['units'][1]}.\n\n"
        + markdown_table(["", ""], rows)
        + f"\n\nTarget (peak RSS ≤ promised): {'met' if r['met'] else 'missed'}.\n\n"
        f"Its ready line: `{r['ready_line'].strip()}`\n"
        + (f"\nThe session it refused: {f['refusal']}\n" if f else "")
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 sessions of 16 tokens")
    p.add_argument("--sessions", type=int, default=None, help="concurrent sessions (default 8)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens each (default 128)")
    p.add_argument("--prompt-chars", type=int, default=1500, help="prompt length, characters")
    p.add_argument(
        "--no-fill",
        dest="fill",
        action="store_false",
        help="skip filling the KV budget (sessions of the whole context until one is refused)",
    )
    p.add_argument("--model", help="a Hugging Face GPT-2 directory (default: random 124M)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    opts = p.parse_args(argv)
    opts.sessions = opts.sessions or (2 if opts.quick else 8)
    opts.tokens = opts.tokens or (16 if opts.quick else 128)
    raise_on_sigterm()
    started = time.perf_counter()
    result: dict = {"machine": machine_info()}
    result.update(measure(opts))
    return save_results(result, started, opts.out, "volunteer_memory", render_markdown)


if __name__ == "__main__":
    main()
