"""``--trust-pickle``: checkpoints that hold Python objects besides tensors (an old
train.py's config) load only when asked, on the coordinator and ``generate --local``; the
refusal names the flag."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from swarm import BIN, Swarm

from nanoshard.checkpoint import save_nanogpt_checkpoint
from nanoshard.cli import main
from nanoshard.config import GPTConfig
from nanoshard.engine import init_weights

# GPT-2's vocabulary, so that a nanoGPT file (no tokenizer of its own) encodes prompts
CONFIG = GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
ARGS = ["--temperature", "0", "--max-new-tokens", "8", "--json", "ROMEO:"]


def checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    """The same weights twice: a clean ckpt.pt, and one holding an argparse.Namespace."""
    weights = init_weights(CONFIG, seed=5)
    clean, pickled = tmp_path / "clean" / "ckpt.pt", tmp_path / "pickled" / "ckpt.pt"
    save_nanogpt_checkpoint(CONFIG, weights, clean)
    raw = torch.load(clean, weights_only=True)
    raw["config"] = argparse.Namespace(learning_rate=6e-4)  # what weights_only refuses
    pickled.parent.mkdir()
    torch.save(raw, pickled)
    return clean, pickled


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit.value.code or 0), out, err


def test_generate_local_refuses_a_pickle_naming_the_flag_and_loads_it_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean, pickled = checkpoints(tmp_path)
    code, _, err = run(["generate", "--local", "--model", str(pickled), *ARGS], capsys)
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(
        f"nanoshard: error: {pickled}: holds a Python object (argparse.Namespace)"
    )
    assert "pass --trust-pickle" in err
    code, out, _ = run(
        ["generate", "--local", "--trust-pickle", "--model", str(pickled), *ARGS], capsys
    )
    assert code == 0
    code, reference, _ = run(["generate", "--local", "--model", str(clean), *ARGS], capsys)
    assert code == 0
    assert json.loads(out)["token_ids"] == json.loads(reference)["token_ids"]
    assert len(json.loads(out)["token_ids"]) == 8


def test_the_help_says_the_risk() -> None:
    for argv in (["coordinator", "--help"], ["generate", "--help"]):
        done = subprocess.run([str(BIN / "nanoshard"), *argv], capture_output=True, text=True)
        text = " ".join(done.stdout.split())
        assert "--trust-pickle" in text and "RISK: unpickling runs code from the file" in text


@pytest.mark.slow
def test_the_coordinator_loads_a_pickle_only_with_the_flag(tmp_path: Path) -> None:
    _, pickled = checkpoints(tmp_path)
    with Swarm() as swarm:
        refused = swarm.start(
            [str(BIN / "nanoshard"), "coordinator", "--model", str(pickled), "--host",
             "127.0.0.1", "--port", "0", "--no-mdns", "--state-dir", swarm.state]
        )  # fmt: skip
        assert refused.popen.wait(timeout=120) == 1
        refused.wait_for(re.compile("error"), timeout=5)  # its reader has the last line
        (line,) = [x for x in refused.lines if "error" in x]
        assert line.startswith(f"nanoshard: error: {pickled}: holds a Python object")
        assert "pass --trust-pickle" in line and "Traceback" not in refused.output
        _, address = swarm.coordinator("--model", str(pickled), "--trust-pickle", "--no-mdns")
        assert address.startswith("127.0.0.1:")  # listening: the model loaded
