"""Models by Hugging Face hub id, offline: a local hub cache in the layout huggingface_hub
reads (blobs, snapshots/<commit>, refs/main) holds a tiny random GPT-2, and
``HF_HUB_OFFLINE=1`` with ``HF_HUB_CACHE`` pointing at it stands for a machine that
downloaded it once."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from swarm import Swarm, nanoshard, settled, wait_until

from nanoshard import hub
from nanoshard.checkpoint import open_checkpoint, resolve_model, save_hf_checkpoint
from nanoshard.client import Client
from nanoshard.client.swarm import CoordinatorClient
from nanoshard.config import GPTConfig
from nanoshard.coordinator.model import ModelStore
from nanoshard.engine import init_weights
from nanoshard.errors import CheckpointError
from nanoshard.statusview import status_json

REPO = "nanoshard-test/tiny-gpt2"
STEADY = ["--heartbeat-interval", "0.5", "--heartbeat-timeout", "10"]


@pytest.fixture
def hub_model(tmp_path: Path) -> Path:
    """A tiny random GPT-2 as a Hugging Face directory (safetensors), with the demo model's
    tokenizer so that prompts encode within its vocabulary."""
    config = GPTConfig(block_size=64, vocab_size=4097, n_layer=3, n_head=2, n_embd=32)
    directory = tmp_path / "tiny-gpt2"
    save_hf_checkpoint(
        config, init_weights(config, seed=3), directory, tokenizer_dir=resolve_model("demo")
    )
    return directory


@pytest.fixture
def hub_cache(tmp_path: Path, hub_model: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``hub_model`` in a hub cache as ``REPO`` at main; offline, in this process and in
    every process it starts."""
    cache = tmp_path / "hf-cache"
    hub.add_to_cache(hub_model, REPO, cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # the library reads its environment once, at import: this process has imported it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_the_fixture_cache_is_what_huggingface_hub_reads(hub_cache: Path) -> None:
    info = huggingface_hub.scan_cache_dir(hub_cache)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    (revision,) = repo.revisions
    assert revision.refs == frozenset({"main"})
    files = {f.file_name for f in revision.files}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= files


def test_a_hub_id_resolves_offline_to_its_snapshot(hub_cache: Path, hub_model: Path) -> None:
    folder = resolve_model(REPO)
    assert folder.parent.parent == hub_cache / "models--nanoshard-test--tiny-gpt2"
    assert hub.repo_of(folder) == REPO
    by_id, by_path = open_checkpoint(REPO), open_checkpoint(hub_model)
    assert by_id.config == by_path.config
    names = by_path.tensor_names()
    for name, t in by_id.read(names).items():
        assert torch.equal(t, by_path.read([name])[name]), name
    # the coordinator names the model by its id, and hashes it to the same manifest
    store, same = ModelStore.open(REPO), ModelStore.open(hub_model)
    assert store.name == REPO and same.name == "tiny-gpt2"
    assert store.model_id == same.model_id
    assert store.vocab_json == same.vocab_json and store.vocab_json
    # a revision: the commit itself, or a ref
    commit = folder.name
    assert resolve_model(REPO, revision=commit) == folder
    assert resolve_model(REPO, revision="main") == folder


def test_what_the_offline_cache_lacks_is_one_clear_error(hub_cache: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        resolve_model("nanoshard-test/not-there")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("nanoshard-test/not-there: not in the Hugging Face cache")
    assert str(hub_cache) in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(CheckpointError, match="revision 'v9'"):
        resolve_model(REPO, revision="v9")
    with pytest.raises(Exception, match="--revision is for a Hugging Face hub id"):
        resolve_model(str(hub_cache), revision="main")
    # and from the command line: one line, no traceback
    done = nanoshard("generate", "--local", "--model", "gpt2", "hello")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"nanoshard: error: gpt2: not in the Hugging Face cache ({hub_cache}) and HF_HUB_OFFLINE "
        "is set: download it once online, or point HF_HUB_CACHE/HF_HOME at a cache holding it"
    ]


def test_a_path_wins_over_a_hub_id_and_paths_are_not_hub_ids(
    hub_cache: Path, hub_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(hub_model.parent)
    assert resolve_model("tiny-gpt2") == Path("tiny-gpt2")  # a folder here, not the hub's
    for spec in ("gpt2", "openai-community/gpt2", "distilgpt2", "gpt2-medium"):
        assert hub.looks_like_repo_id(spec), spec
    for spec in ("out/ckpt.pt", "./gpt2", "/models/gpt2", "a/b/c", "../gpt2", "model.bin"):
        assert not hub.looks_like_repo_id(spec), spec
    with pytest.raises(CheckpointError, match="no such file or directory"):
        open_checkpoint("out/ckpt.pt")


@pytest.mark.slow
def test_a_coordinator_started_with_a_hub_id_serves_what_the_path_serves(
    hub_cache: Path, hub_model: Path, tmp_path: Path
) -> None:
    """Two swarms side by side, one coordinator given the id, one the path, a node each:
    the same model id, the same greedy tokens."""
    tokens, model_ids = {}, {}
    with Swarm() as swarm:
        addresses = {}
        for name, model in (("id", REPO), ("path", str(hub_model))):
            _, addresses[name] = swarm.coordinator(
                "--model", model, "--replicas", "1", "--no-mdns", "--swarm", name, *STEADY
            )
            swarm.join(
                "--coordinator",
                addresses[name],
                "--no-mdns",
                "--swarm",
                name,
                "--max-memory",
                "256M",
                "--cache-dir",
                str(tmp_path / f"node-{name}"),
            )
        for name, address in addresses.items():
            coordinator = CoordinatorClient(address)
            status = wait_until(
                f"the {name} swarm serving every unit",
                lambda c=coordinator: settled(status_json(c.status()), nodes=1),
            )
            assert status is not None
            card = coordinator.card()
            model_ids[name] = card.model_id
            assert card.name == (REPO if name == "id" else "tiny-gpt2")
            coordinator.close()
            with Client(address) as client:
                result = client.generate("ROMEO:", max_new_tokens=20, temperature=0)
            tokens[name] = result.token_ids
    assert model_ids["id"] == model_ids["path"]
    assert tokens["id"] == tokens["path"] and len(tokens["id"]) == 20
    # and the local path, given the id, agrees too
    done = nanoshard(
        "generate", "--local", "--model", REPO, "--temperature", "0", "--max-new-tokens", "20",
        "--json", "ROMEO:",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["token_ids"] == tokens["id"]
