"""Weights over the control plane: the coordinator's manifest and FetchTensors, the node's
content-addressed cache and checks, against a real gRPC server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
import torch

from nanoshard import rpc, tokenizer
from nanoshard.checkpoint import open_checkpoint, save_hf_checkpoint, save_nanogpt_checkpoint
from nanoshard.config import GPTConfig, stage_tensor_names
from nanoshard.coordinator.model import ModelStore, fetch_tensors
from nanoshard.engine import Stage, init_weights
from nanoshard.errors import CheckpointError
from nanoshard.modelcard import CHUNK_BYTES, check_card
from nanoshard.node.weights import (
    FetchStats,
    fetch_stage,
    read_index,
    rich_progress,
    tensor_path,
    verify_local_stage,
)
from nanoshard.v1 import coordinator_pb2 as pb
from nanoshard.v1 import coordinator_pb2_grpc as pb_grpc

# ---- a minimal coordinator: GetModelCard + FetchTensors ---------------------------------


def coordinator_handler(store: ModelStore) -> grpc.GenericRpcHandler:
    async def get_card(request: pb.ModelCardRequest, context: Any) -> pb.ModelCard:
        return store.card()

    def fetch(request: pb.FetchRequest, context: Any) -> AsyncIterator[pb.TensorChunk]:
        return fetch_tensors(store, request, context)

    return rpc.strict_service(
        "nanoshard.v1.Coordinator",
        {
            "GetModelCard": ("unary", get_card, pb.ModelCardRequest),
            "FetchTensors": ("server_stream", fetch, pb.FetchRequest),
        },
    )


@contextlib.asynccontextmanager
async def serving(store: ModelStore) -> AsyncIterator[pb_grpc.CoordinatorStub]:
    server = grpc.aio.server(options=rpc.server_options())
    server.add_generic_rpc_handlers((coordinator_handler(store),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=rpc.channel_options())
    try:
        yield pb_grpc.CoordinatorStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


async def fetch_via_grpc(
    store: ModelStore, start: int, end: int, cache: Path, progress: Any = None
) -> tuple[dict[str, torch.Tensor], FetchStats]:
    async with serving(store) as stub:
        card = await stub.GetModelCard(pb.ModelCardRequest())
        stats = FetchStats()
        tensors, fetched = await fetch_stage(stub, card, start, end, cache, progress, stats=stats)
    assert fetched == stats.fetched_bytes
    return tensors, stats


class NoNetwork:
    """A stub that fails the test if the node calls the coordinator at all."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the node called {name} although everything was cached")


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def cache_is_clean(cache: Path) -> None:
    """Every cached tensor file holds exactly the bytes its name promises."""
    for path in (cache / "tensors").iterdir():
        assert not path.name.endswith(".tmp"), path
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, path


def nbytes(store: ModelStore, start: int, end: int) -> int:
    return store.checkpoint.stage_nbytes(start, end)


@pytest.fixture
def store(tiny_hf_dir: Path) -> ModelStore:
    return ModelStore.open(tiny_hf_dir)


# ---- the coordinator's side -------------------------------------------------------------


def test_model_id_is_stable_format_free_and_follows_the_weights(
    tmp_path, tiny_hf_dir, tiny_nanogpt_ckpt, tiny_config, tiny_weights
):
    a, b = ModelStore.open(tiny_hf_dir), ModelStore.open(tiny_hf_dir)
    assert a.model_id == b.model_id and len(a.model_id) == 64
    assert a.card() == b.card()
    # The same tensors as a nanoGPT ckpt.pt: the same model, under another name.
    nano = ModelStore.open(tiny_nanogpt_ckpt)
    assert nano.model_id == a.model_id
    assert (a.name, nano.name) == ("tiny-hf", "tiny-nanogpt")
    # One element of one tensor changed: another model.
    other = {k: v.clone() for k, v in tiny_weights.items()}
    other["transformer.h.2.mlp.c_fc.bias"][0] += 1e-3
    save_hf_checkpoint(tiny_config, other, tmp_path / "other")
    assert ModelStore.open(tmp_path / "other").model_id != a.model_id
    # Same weights in fp16: another model too (the manifest names the stored dtype).
    save_hf_checkpoint(tiny_config, tiny_weights, tmp_path / "half", dtype=torch.float16)
    assert ModelStore.open(tmp_path / "half").model_id != a.model_id


def test_card_carries_config_manifest_and_checks_out(store, tiny_config):
    card = store.card()
    assert GPTConfig.from_dict(json.loads(card.config_json)) == tiny_config
    assert [u.unit for u in card.units] == list(range(tiny_config.n_units))
    assert card.vocab_json == b"" and card.merges_txt == b""  # the standard gpt2 encoding
    assert store.nbytes == store.checkpoint.stage_nbytes(0, tiny_config.n_units)
    head = card.units[tiny_config.head_unit]
    assert head.tensors[-1] == card.units[0].tensors[0]  # tied wte: same entry, same hash
    info = check_card(card)
    assert info.model_id == store.model_id and info.config == tiny_config
    # A card whose manifest does not hash to its model_id is refused.
    bad = pb.ModelCard()
    bad.CopyFrom(card)
    bad.units[2].tensors[0].sha256 = "0" * 64
    with pytest.raises(CheckpointError, match="not the hash of its manifest"):
        check_card(bad)
    bad.CopyFrom(card)
    bad.units[1].tensors[0].shape[0] += 1
    with pytest.raises(CheckpointError, match="shape"):
        check_card(bad)


def _write_byte_vocab(directory: Path) -> None:
    """The smallest valid GPT-2 style tokenizer: the 256 bytes and no merges."""
    decoder = tokenizer._byte_decoder()
    vocab = {ch: b for ch, b in decoder.items()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def test_card_ships_the_models_tokenizer_files(tmp_path, tiny_config, tiny_weights):
    _write_byte_vocab(tmp_path / "tok")
    save_hf_checkpoint(tiny_config, tiny_weights, tmp_path / "m", tokenizer_dir=tmp_path / "tok")
    card = ModelStore.open(tmp_path / "m").card()
    assert card.vocab_json == (tmp_path / "tok" / "vocab.json").read_bytes()
    assert card.merges_txt == (tmp_path / "tok" / "merges.txt").read_bytes()
    (tmp_path / "m" / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match=r"vocab\.json but not"):
        ModelStore.open(tmp_path / "m")
    (tmp_path / "m" / "merges.txt").write_text("#version: 0.2\nx y\n")
    with pytest.raises(CheckpointError, match="broken tokenizer"):
        ModelStore.open(tmp_path / "m")


def test_a_missing_model_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        ModelStore.open(tmp_path / "nope")


def test_fetch_streams_canonical_bytes_in_bounded_chunks(tmp_path):
    # wte is 2 MiB here: three chunks, the last one partial.
    config = GPTConfig(block_size=16, vocab_size=8200, n_layer=1, n_head=2, n_embd=64)
    save_hf_checkpoint(config, init_weights(config), tmp_path / "wide")
    store = ModelStore.open(tmp_path / "wide")
    names = ["transformer.wte.weight", "transformer.ln_f.bias"]

    async def collect() -> list[pb.TensorChunk]:
        return [c async for c in fetch_tensors(store, pb.FetchRequest(names=names))]

    chunks = asyncio.run(collect())
    assert [c.name for c in chunks] == [names[0]] * 3 + [names[1]]
    assert all(0 < len(c.data) <= CHUNK_BYTES for c in chunks)
    for name in names:
        parts = [c for c in chunks if c.name == name]
        data = b"".join(c.data for c in parts)
        assert [c.offset for c in parts] == [
            sum(len(p.data) for p in parts[:i]) for i in range(len(parts))
        ]
        assert all(c.total == len(data) for c in parts)
        assert hashlib.sha256(data).hexdigest() == store.entries[name].sha256
    # ...and the node puts multi-chunk tensors back together.
    tensors, stats = asyncio.run(fetch_via_grpc(store, 0, 1, tmp_path / "cache"))
    assert_same(tensors, store.checkpoint.read_stage(0, 1))
    assert stats.fetched_bytes == nbytes(store, 0, 1)


@pytest.mark.parametrize(
    "names, message",
    [
        (["transformer.h.9.attn.c_attn.weight"], "no tensor 'transformer.h.9.attn.c_attn.weight'"),
        (["transformer.wpe.weight", "transformer.wpe.weight"], "twice"),
        ([], "names no tensor"),
        ([f"x{i}" for i in range(1000)], "names 1000 tensors"),
    ],
)
def test_bad_fetch_requests_are_invalid_argument(store, names, message):
    async def call() -> grpc.aio.AioRpcError:
        async with serving(store) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.FetchTensors(pb.FetchRequest(names=names)):
                    pass
            return err.value

    err = asyncio.run(call())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()


# ---- the node's side --------------------------------------------------------------------


def test_fetch_stage_gets_only_its_units_then_serves_from_the_cache(tmp_path, store, tiny_config):
    cache = tmp_path / "cache"
    seen: list[tuple[int, int]] = []
    tensors, stats = asyncio.run(
        fetch_via_grpc(store, 1, 3, cache, lambda d, t: seen.append((d, t)))
    )
    want = store.checkpoint.read_stage(1, 3)
    assert_same(tensors, want)
    assert stats.fetched_bytes == nbytes(store, 1, 3) < store.nbytes
    assert stats.fetched_tensors == len(want) and stats.cached_tensors == 0
    assert seen[0] == (0, nbytes(store, 1, 3)) and seen[-1] == (nbytes(store, 1, 3),) * 2
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    Stage.from_tensors(tiny_config, 1, 3, tensors)  # ready to serve
    cache_is_clean(cache)
    index = read_index(cache, store.model_id)
    assert index["tensors"]["transformer.h.0.attn.c_attn.weight"]["sha256"] == (
        store.entries["transformer.h.0.attn.c_attn.weight"].sha256
    )
    assert msgpack.unpackb((cache / "models" / f"{store.model_id}.msgpack").read_bytes())

    # Again: nothing over the network (the stub would fail the test if called).
    stats = FetchStats()
    again, fetched = asyncio.run(fetch_stage(NoNetwork(), store.card(), 1, 3, cache, stats=stats))
    assert_same(again, want)
    assert fetched == 0 and stats.cached_bytes == nbytes(store, 1, 3)

    # embed, then head: the head's wte is embed's (same hash), so only ln_f travels.
    _, stats = asyncio.run(fetch_via_grpc(store, 0, 1, cache))
    assert stats.fetched_bytes == nbytes(store, 0, 1)
    head = tiny_config.head_unit
    tensors, stats = asyncio.run(fetch_via_grpc(store, head, head + 1, cache))
    assert_same(tensors, store.checkpoint.read_stage(head, head + 1))
    wte = store.checkpoint.read(["transformer.wte.weight"])["transformer.wte.weight"]
    assert stats.fetched_bytes == nbytes(store, head, head + 1) - wte.nbytes


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_cache_file_is_noticed_and_fetched_again(tmp_path, store, damage):
    cache = tmp_path / "cache"
    asyncio.run(fetch_via_grpc(store, 1, 2, cache))
    name = "transformer.h.0.mlp.c_fc.weight"
    path = tensor_path(cache, store.entries[name].sha256)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[100] ^= 0x01
    else:
        data = data[:-4]
    path.write_bytes(bytes(data))
    tensors, stats = asyncio.run(fetch_via_grpc(store, 1, 2, cache))
    assert_same(tensors, store.checkpoint.read_stage(1, 2))
    assert stats.cached_tensors == len(tensors) - 1  # the rest was read from the cache
    assert stats.fetched_tensors == 1 and stats.fetched_bytes == tensors[name].nbytes
    cache_is_clean(cache)


class LyingStore(ModelStore):
    """A coordinator whose bytes are not its manifest's (one byte flipped, or a row cut)."""

    def __init__(self, honest: ModelStore, victim: str, cut: bool) -> None:
        super().__init__(honest.checkpoint, honest.name, honest.units)
        self.victim, self.cut = victim, cut

    def read(self, name: str) -> torch.Tensor:
        t = super().read(name)
        if name != self.victim:
            return t
        if self.cut:
            return t[:-1].clone()
        raw = t.clone().view(torch.uint8).view(-1)
        raw[7] ^= 0x10
        return raw.view(t.dtype).view(t.shape)


@pytest.mark.parametrize("cut", [False, True])
def test_a_lying_coordinator_is_refused_and_nothing_bad_is_cached(tmp_path, store, cut):
    victim = "transformer.h.1.attn.c_proj.weight"
    liar = LyingStore(store, victim, cut)
    assert liar.model_id == store.model_id  # it advertises the honest manifest
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        asyncio.run(fetch_via_grpc(liar, 1, 4, cache))
    assert not tensor_path(cache, store.entries[victim].sha256).exists()
    if (cache / "tensors").exists():
        cache_is_clean(cache)  # tensors verified before the bad one may stay: they are right
    assert read_index(cache, store.model_id) == {}  # the stage was not completed


def test_a_node_with_its_own_checkpoint_verifies_it_against_the_card(
    tmp_path, store, tiny_nanogpt_ckpt, tiny_config, tiny_weights
):
    local = open_checkpoint(tiny_nanogpt_ckpt)  # another format, the same model
    tensors = verify_local_stage(local, store.card(), 2, 5)
    assert_same(tensors, store.checkpoint.read_stage(2, 5))
    other = {k: v.clone() for k, v in tiny_weights.items()}
    other["transformer.h.1.ln_2.weight"][3] = 0.5
    save_nanogpt_checkpoint(tiny_config, other, tmp_path / "other" / "ckpt.pt")
    mismatch = open_checkpoint(tmp_path / "other" / "ckpt.pt")
    verify_local_stage(mismatch, store.card(), 3, 5)  # its units [3, 5) are the swarm's
    with pytest.raises(CheckpointError, match=r"not the swarm's model.*h\.1\.ln_2\.weight"):
        verify_local_stage(mismatch, store.card(), 1, 3)
    wider = GPTConfig(block_size=64, vocab_size=96, n_layer=3, n_head=2, n_embd=48)
    save_nanogpt_checkpoint(wider, init_weights(wider), tmp_path / "wide" / "ckpt.pt")
    with pytest.raises(CheckpointError, match="config"):
        verify_local_stage(open_checkpoint(tmp_path / "wide" / "ckpt.pt"), store.card(), 0, 1)


def test_stage_tensor_names_are_what_is_fetched(tmp_path, store, tiny_config):
    tensors, _ = asyncio.run(fetch_via_grpc(store, 2, 5, tmp_path / "cache"))
    assert list(tensors) == stage_tensor_names(tiny_config, 2, 5)


def test_rich_progress_is_a_callback_that_closes_itself():
    bar = rich_progress("units [1, 3)")
    bar(0, 0)  # everything cached: no bar at all
    assert bar._bar is None
    bar(0, 1000)
    bar(600, 1000)
    assert bar._bar is not None and bar._bar.tasks[0].completed == 600
    bar(1000, 1000)
    assert bar._bar is None  # done: the bar is gone without a `with`
    with rich_progress() as other:
        other(1, 10)
    assert other._bar is None


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon in /proc")
def test_a_stage_comes_as_its_cache_files_pages_not_the_nodes_memory(tmp_path):
    """Fetched or read from the cache, a stage's tensors are its files' pages (copy-on-write
    maps, which the kernel may drop and read again): a tensor-parallel member that slices
    them keeps its share as its own memory, never the whole stage."""
    config = GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=8, n_embd=1024)
    save_hf_checkpoint(config, init_weights(config, seed=0), tmp_path / "model")
    store = ModelStore.open(tmp_path / "model")
    cache, stage_bytes = tmp_path / "cache", nbytes(store, 1, 3)  # two 50 MB blocks
    asyncio.run(fetch_via_grpc(store, 1, 3, cache))  # (the coordinator here is this process)
    before = rss_anon_bytes()
    tensors, _ = asyncio.run(fetch_stage(NoNetwork(), store.card(), 1, 3, cache))
    assert rss_anon_bytes() - before < stage_bytes / 4
    assert_same(tensors, store.checkpoint.read_stage(1, 3))
