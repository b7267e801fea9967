"""The benchmark scripts end to end on a tiny model, so the measurements cannot rot."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanoshard.checkpoint import save_hf_checkpoint
from nanoshard.config import GPTConfig
from nanoshard.engine import init_weights
from nanoshard.tokenizer import gpt2_bpe_dir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TINY = GPTConfig(block_size=64, vocab_size=50257, n_layer=4, n_head=2, n_embd=32)
CODECS = ("fp32", "fp16", "bf16", "int8", "int8-64")


def expected_bytes(codec: str, n: int) -> int:
    """Payload bytes for n values, from the wire layout (independent of nanoshard.codec)."""
    if codec.startswith("int8"):  # one bf16 scale per block of 32 (int8) or 64 values
        block = 64 if codec == "int8-64" else 32
        return n + 2 * math.ceil(n / block)
    return n * (4 if codec == "fp32" else 2)


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bench-tiny")
    tokenizer = tmp_path_factory.mktemp("gpt2-tokenizer")
    shutil.copy(gpt2_bpe_dir() / "encoder.json", tokenizer / "vocab.json")
    shutil.copy(gpt2_bpe_dir() / "vocab.bpe", tokenizer / "merges.txt")
    save_hf_checkpoint(TINY, init_weights(TINY, seed=5), directory, tokenizer_dir=tokenizer)
    return directory


def test_hops_benchmark_runs(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    script = ROOT / "benchmarks" / "hops.py"
    args = [
        "--quick", "--chains=2", "--tokens=3", "--prompt-tokens=8", "--agree-tokens=20",
        "--prefill-tokens=40",
        f"--model={tiny_model}", f"--agree-model={tiny_model}", f"--out={out}",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert processes_mentioning(str(tiny_model)) == []  # every node was stopped

    result = json.loads((out / "hops.json").read_text())
    assert set(result) >= {"machine", "speed", "quality", "codecs"}
    assert set(result["machine"]) >= {"cpu", "cores", "torch", "threads", "date"}
    assert result["machine"]["threads"] == 0  # the nodes' default
    assert result["machine"]["omp_wait_policy"] == "PASSIVE"  # the nodes' thread policy
    assert result["speed"]["echo_floor_ms"] > 0

    rows = result["speed"]["configs"]
    configs = {(c["nodes"], c["codec"]): c for c in rows if not c.get("bare")}
    assert set(configs) == {(0, "fp32")} | {(2, c) for c in CODECS}
    for c in rows:
        assert c["ms_per_token"] > 0 and c["ratio_to_local"] > 0
    (bare,) = [c for c in rows if c.get("bare")]  # the floor: bare nodes, the same stages
    assert bare["nodes"] == 2 and bare["units"] == [[0, 3], [3, 6]]
    assert bare["tokens_match_local"]  # the chain, the bare chain and the local path agree
    assert bare["compute_ms_sum"] > 0 and bare["chain_compute_ms_sum"] > 0
    assert "chain_above_floor_per_hop_ms" in bare
    # the same stages over OS pipes, in the same turns: they agreed on every token too
    assert bare["pipe_ms_per_token"] > 0 and bare["pipe_compute_ms_sum"] > 0
    assert "floor_above_pipes_per_hop_ms" in bare
    # each node's CPU per token, both chains (/proc counts in ticks: a few tokens of a tiny
    # model may take less than one on some node, never on all of them)
    cpu = bare["chain_cpu_ms_per_node"] + bare["cpu_ms_per_node"]
    assert len(cpu) == 4 and min(cpu) >= 0 and sum(cpu) > 0
    chain = configs[(2, "fp32")]
    assert chain["tokens_match_local"]  # fp32 is lossless: the chain is the local path
    assert chain["local_ms_per_token"] > 0  # the paired local steps ran
    assert [h["units"] for h in chain["per_hop"]] == [[0, 3], [3, 6]]
    assert chain["per_hop"][-1]["bytes_out_per_token"] == 0  # the head sends a token id
    assert chain["overhead_per_hop_ms"] == pytest.approx(chain["overhead_ms"] / 2, abs=1e-3)
    floor = result["speed"]["echo_floor_ms"]
    assert chain["above_echo_floor_ms"] == pytest.approx(
        chain["overhead_per_hop_ms"] - floor, abs=2e-3
    )

    by_codec = {c["codec"]: c for c in result["codecs"]}
    assert set(by_codec) == set(CODECS)
    for name, row in by_codec.items():
        assert row["bytes_per_token_per_hop"] == expected_bytes(name, TINY.n_embd), name
        assert row["all_hops_equal"]
        assert row["ratio_to_fp32"] == pytest.approx(
            expected_bytes(name, TINY.n_embd) / (4 * TINY.n_embd), abs=1e-4
        )
        assert row["message_bytes_per_token"] > row["bytes_per_token_per_hop"]

    quality = {c["codec"]: c for c in result["quality"]["codecs"]}
    fp32 = quality["fp32"]
    assert fp32["compared"] >= 20 and fp32["agree"] == fp32["compared"]
    assert fp32["max_abs_logit_error"] == 0.0 and fp32["teacher_forced_top1"] == 1.0
    for name in CODECS[1:]:
        assert 0 < quality[name]["max_abs_logit_error"] < 1.0, name
        assert quality[name]["compared"] == fp32["compared"]

    prefill = result["speed"]["prefill"]
    assert prefill["prompt_tokens"] == 40 and prefill["nodes"] == 2
    assert prefill["local_ms"] > 0 and prefill["ratio_to_local"] > 0

    markdown = (out / "hops.md").read_text()
    assert "| codec | bytes/token/hop |" in markdown
    assert markdown in done.stdout


def test_concurrency_benchmark_runs(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    script = ROOT / "benchmarks" / "concurrency.py"
    args = ["--quick", "--sessions=3", "--tokens=3", "--prompt-tokens=4", f"--model={tiny_model}"]
    done = subprocess.run(
        [sys.executable, str(script), *args, f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert processes_mentioning(str(tiny_model)) == []  # every node was stopped

    result = json.loads((out / "concurrency.json").read_text())["concurrency"]
    rows = {(c["batch"], c["sessions"]): c for c in result["configs"]}
    assert set(rows) == {(1, 1), (1, 3), (16, 1), (16, 3)}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
    assert rows[(1, 3)]["mean_batch"] == 1.0  # with --batch 1 every step runs alone
    assert rows[(1, 3)]["same_tokens"] == 3  # the unbatched chain is deterministic
    assert rows[(16, 3)]["same_tokens"] == 3  # batched steps equal unbatched ones
    ceiling = result["ceiling"]  # the same sessions, one batched forward each step, here
    assert ceiling["tokens_per_s"] > 0 and ceiling["same_tokens"] == ceiling["sessions_run"] == 3
    share = rows[(16, 3)]["tokens_per_s"] / ceiling["tokens_per_s"]
    assert rows[(16, 3)]["of_ceiling"] == pytest.approx(share, abs=0.01)
    assert (out / "concurrency.md").read_text() in done.stdout


def run_script(name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_engine_benchmark_runs(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    run_script("engine", "--quick", f"--model={tiny_model}", "--agree-tokens=24", f"--out={out}")
    result = json.loads((out / "engine.json").read_text())
    peers = {r["name"]: r for r in result["peers"]["rows"]}
    assert set(peers) >= {"nanoshard", "transformers", "nanoGPT-style no cache, long context"}
    assert all(r["ms_per_token"] > 0 and r["ratio"] > 0 for r in peers.values())
    assert peers["nanoshard"]["ratio"] == 1.0
    speed = {r["weights"]: r for r in result["weights_speed"]["rows"]}
    assert set(speed) == {"fp32", "bf16", "int8"}
    assert speed["int8"]["weight_mb"] < speed["bf16"]["weight_mb"] < speed["fp32"]["weight_mb"]
    quality = {r["weights"]: r for r in result["weights_quality"]["rows"]}
    assert quality["fp32"]["teacher_forced_top1"] == 1.0
    assert quality["fp32"]["max_abs_logit_error"] == 0.0
    assert quality["int8"]["positions"] >= 24


def test_floors_benchmark_runs(tiny_model: Path, tmp_path: Path) -> None:
    """Every floor (loopback TCP, Unix sockets, a direct answer, OS pipes) draws the local
    path's tokens, and no bare node or socket is left behind."""
    out = tmp_path / "results"
    run_script("floors", "--quick", "--tokens=4", f"--model={tiny_model}", f"--out={out}")
    assert processes_mentioning(str(tiny_model)) == []
    floors = json.loads((out / "floors.json").read_text())["floors"]
    assert floors["tokens_equal"]
    assert [r["path"] for r in floors["rows"]] == ["local", "tcp", "unix", "direct", "pipes"]
    assert all(r["ms_per_token"] > 0 for r in floors["rows"])
    assert "Floors" in (out / "floors.md").read_text()


def test_join_benchmark_runs(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    run_script("join", "--joiners=2", f"--model={tiny_model}", f"--out={out}")
    assert processes_mentioning(str(tiny_model)) == []
    joins = json.loads((out / "join.json").read_text())["joins"]
    assert [j["joiner"] for j in joins] == [1, 2]
    for j in joins:
        assert 0 < j["seconds"] < 120 and j["fetched_bytes"] > 0
        assert j["units"][1] > j["units"][0]
        assert set(j["phases"]) == {"start_and_capacity", "join_and_assign", "fetch_and_load"}


def test_hub_benchmark_runs(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    cache = tmp_path / "hub-cache"
    run_script("hub", "--quick", f"--model={tiny_model}", f"--hub-cache={cache}", f"--out={out}")
    assert processes_mentioning(str(tiny_model)) == []
    result = json.loads((out / "hub.json").read_text())
    assert len(result["runs"]["hub id"]) == len(result["runs"]["path"]) == 1
    assert result["ratio"] > 0 and len(result["resolve_s"]) == 1
    assert (cache / "models--nanoshard-bench--gpt2-124m" / "refs" / "main").is_file()


def test_volunteer_memory_benchmark_runs(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    run_script(
        "volunteer_memory",
        "--quick",
        "--no-fill",
        "--prompt-chars=20",
        f"--model={tiny_model}",
        f"--out={out}",
    )
    assert processes_mentioning(str(tiny_model)) == []
    r = json.loads((out / "volunteer_memory.json").read_text())
    assert len(r["tokens_each"]) == 2 and all(1 <= n <= 16 for n in r["tokens_each"])
    assert 0 < r["weights"] < r["held_when_ready"] < r["promised"]
    assert r["kv_budget"] > 0 and r["peak_rss"] >= r["idle_rss"] > 0
