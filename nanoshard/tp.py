"""Tensor parallel: one stage's blocks, embedding and head split across a group of k nodes.

A stage served by a group is the same ``Stage`` with its modules replaced (``shard``), the
way gpt-fast's ``tp.py`` does it, so the model file stays the plain model. Member ``rank``
of ``size`` holds, for every block:

- attention: its ``n_head / size`` heads — their rows of ``c_attn`` (queries, keys and
  values alike) and their columns of ``c_proj`` — and a KV cache of those heads only;
- MLP: its ``1 / size`` of the hidden units — rows of ``c_fc``, columns of ``c_proj``.

Each block's two output projections give partial sums; they are summed across the group
(two all-reduces per block), then the bias is added once. LayerNorms and ``wpe`` are
replicated. Embedding and head are split by vocabulary (``VocabParallelEmbedding``): member
r holds rows ``vocab_range(vocab_size, r, size)`` of ``wte``; the lookup is a masked lookup
plus an all-reduce, and the head gives this member's slice of the logits only, which
``sampling.sample_slice`` samples from without ever gathering the full row.

What crosses the group per token, per block: 2 all-reduces of n_embd values (the hidden
state), plus one all-reduce at the embedding and a few bytes per member for sampling.

The collectives run on ``torch.distributed``, one process group per TP group
(``Collective``): NCCL when the coordinator saw every member on CUDA, else gloo (a CUDA
member of a gloo group sums through host memory). Each has a timeout: a member that dies
makes the others' collective fail at once, one that hangs makes it fail at the timeout, or
as soon as the member that waits gives the group up (``Collective.abort``).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanoshard.engine import Block, CausalSelfAttention, Stage
from nanoshard.errors import InvalidArgument

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
SIZES = (2, 4)  # group sizes placement forms (each must divide n_head)
MAX_PEERS = 8  # peers a node measures its links to, for placement to price groups with
PROBE_BYTES = 4 * 2**20  # the all-reduce a new group measures its bandwidth with ...
PROBE_BIG_ROUNDS = 3  # ... this many times
# A gloo collective waits in slices this long, so that giving its group up ends the wait:
# gloo's own abort leaves a collective already waiting to its timeout (torch 2.13).
ABORT_POLL_S = 0.1


def check_split(n_head: int, size: int) -> None:
    if size < 1 or n_head % size:
        raise InvalidArgument(f"a group of {size} cannot split {n_head} heads evenly")


def vocab_range(vocab_size: int, rank: int, size: int) -> tuple[int, int]:
    """The token ids ``[lo, hi)`` member ``rank`` of ``size`` holds: contiguous, the first
    ``vocab_size % size`` members one more."""
    base, extra = divmod(vocab_size, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def failure_reason(exc: BaseException) -> str:
    """What a failed collective or rendezvous means, in words for a volunteer: gloo's and
    the store's own text names a C++ source line and a peer's gloo port, then a paragraph
    of advice."""
    text = str(exc)
    low = text.lower()
    if any(s in low for s in ("connection reset", "connection closed", "broken pipe", "eof")):
        return "a member's connection closed (it stopped, crashed or left)"
    if "timed out" in low or "timeout" in low:
        return "a member did not answer in time (hung, asleep, cut off, or never came)"
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text)
    return text.split(". This is typically")[0].strip().splitlines()[0][:200] if text else "?"


class CollectiveError(RuntimeError):
    """A collective of the group failed: a member is gone, or did not answer in time."""


@dataclass
class CollectiveStats:
    """What the group's collectives cost this member, summed since the last ``take``."""

    ms: float = 0.0
    bytes: int = 0
    calls: int = 0


class Collective:
    """The collectives of one TP group: a ``torch.distributed`` process group of its own
    (not the process-wide default group, so a node can leave one group and join another).

    ``all_reduce`` and ``all_gather`` block the calling thread (a node's compute worker)
    and raise ``RuntimeError`` if a member is gone or does not answer within ``timeout_s``.
    """

    def __init__(
        self, pg: Any, rank: int, size: int, group: str, device: torch.device | None = None
    ) -> None:
        self.pg, self.rank, self.size, self.group = pg, rank, size, group
        self.device = device or torch.device("cpu")  # where the collectives' tensors live
        self.stats = CollectiveStats()
        self._lock = threading.Lock()
        self.aborted = ""  # why the group was given up ("" while it serves)
        self._waiting_since = 0.0  # when the collective waiting now began (0: none waits)
        # NCCL's wait only orders the device's stream: there, abort is the process group's.
        self._sliced = isinstance(pg, dist.ProcessGroupGloo)

    @classmethod
    def form(
        cls,
        group: str,
        rank: int,
        size: int,
        store: dist.Store,
        host: str,
        timeout_s: float,
        backend: str = "gloo",
        device: torch.device | str = "cpu",
    ) -> Collective:
        """Join the group's process group through ``store`` (hosted by rank 0): gloo bound
        to ``host`` (the member's own data-plane address, never every interface), or NCCL
        on ``device`` (a CUDA device). Blocks until every member has joined or
        ``timeout_s`` passes."""
        timeout = datetime.timedelta(seconds=timeout_s)
        prefixed = dist.PrefixStore(f"nanoshard/{group}/", store)
        device = torch.device(device)
        if backend == "nccl":
            if device.type != "cuda" or not dist.is_nccl_available():
                raise InvalidArgument(f"group {group}: NCCL needs a CUDA device, not {device}")
            torch.cuda.set_device(device)
            nccl = cast(Any, dist).ProcessGroupNCCL  # not in torch's stubs
            options = nccl.Options()
            options._timeout = timeout
            return cls(nccl(prefixed, rank, size, options), rank, size, group, device)
        if backend != "gloo":
            raise InvalidArgument(f"group {group}: backend {backend[:20]!r} is not gloo or nccl")
        options = cast(Any, dist.ProcessGroupGloo)._Options()  # not in torch's stubs
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        options._timeout = timeout
        pg = dist.ProcessGroupGloo(prefixed, rank, size, options)
        return cls(pg, rank, size, group)  # its tensors cross through host memory

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` across the group, in place (and return it)."""
        started = time.perf_counter()
        work = t.to(self.device, torch.float32).contiguous()  # (t itself where it can be)
        self._wait(self.pg.allreduce([work]))
        if work is not t:
            t.copy_(work)
        self._count(started, work.nbytes)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every member's ``t`` (same shape and dtype on all), in rank order."""
        started = time.perf_counter()
        t = t.to(self.device).contiguous()
        out = [torch.empty_like(t) for _ in range(self.size)]
        self._wait(self.pg.allgather([out], [t]))
        self._count(started, t.nbytes)
        return out

    def probe(self, n_embd: int, rounds: int = 20) -> tuple[float, float]:
        """Measure the group's links, every member at once (right after forming, before any
        step): the median ms of an all-reduce of ``n_embd`` fp32 values back to back, and
        the all-reduce bandwidth in bytes/s (what a 4 MiB all-reduce moves over its time,
        latency included: on one host the latency is most of it, and a difference of two
        such figures is noise)."""
        small = torch.zeros(n_embd, device=self.device)
        big = torch.zeros(PROBE_BYTES // 4, device=self.device)
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            self._wait(self.pg.allreduce([small]))
            times.append(time.perf_counter() - started)
        latency = statistics.median(times)
        started = time.perf_counter()
        for _ in range(PROBE_BIG_ROUNDS):
            self._wait(self.pg.allreduce([big]))
        per_call = (time.perf_counter() - started) / PROBE_BIG_ROUNDS
        moved = 2 * (self.size - 1) / self.size * big.nbytes  # a ring all-reduce's traffic
        return latency * 1e3, moved / per_call

    def abort(self, why: str = "it was given up") -> None:
        """Fail every collective of this member, waiting (within ``ABORT_POLL_S``) or to
        come: the group is over, for ``why``."""
        self.aborted = self.aborted or why
        try:
            self.pg.abort()
        except RuntimeError as exc:
            log.debug("aborting group %s: %s", self.group, exc)

    def waiting_s(self) -> float:
        """How long the collective waiting now has waited (0: none waits). A healthy group's
        take milliseconds; one that waits for seconds waits for a partner gone or hung."""
        since = self._waiting_since
        return time.monotonic() - since if since else 0.0

    def _wait(self, work: dist.Work) -> None:
        self._waiting_since = time.monotonic()
        try:
            if not self._sliced:
                work.wait()
                return
            while not self.aborted:
                with contextlib.suppress(RuntimeError):  # (the slice's end, or its failure)
                    if work.wait(datetime.timedelta(seconds=ABORT_POLL_S)):
                        return
                if work.is_completed():
                    work.wait()  # its own failure, raised again
                    return
        except RuntimeError as exc:  # gloo: a peer closed the connection, or the timeout
            log.info("group %s: a collective failed: %s", self.group, exc)  # (gloo's own words)
            raise CollectiveError(
                f"tensor-parallel group {self.group}: {failure_reason(exc)}"
            ) from None
        finally:
            self._waiting_since = 0.0
        raise CollectiveError(f"tensor-parallel group {self.group}: {self.aborted}")

    def _count(self, started: float, nbytes: int) -> None:
        with self._lock:
            self.stats.ms += (time.perf_counter() - started) * 1e3
            self.stats.bytes += nbytes
            self.stats.calls += 1

    def take(self) -> CollectiveStats:
        """The stats since the last call, reset."""
        with self._lock:
            stats, self.stats = self.stats, CollectiveStats()
        return stats


@dataclass
class Shard:
    """Where a stage's member sits in its group."""

    rank: int
    size: int
    collective: Collective = field(repr=False)

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return self.collective.all_gather(t)


def gather_vocab(shard: Shard, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The whole vocabulary's logits from every member's slice (rows ``(T, slice)`` ->
    ``(T, vocab_size)``): what a spot-check compares. Sampling never needs it."""
    widest = vocab_range(vocab_size, 0, shard.size)[1]  # rank 0's slice is the widest
    padded = F.pad(logits.float(), (0, widest - logits.shape[-1]))
    parts = shard.gather(padded.contiguous())
    ranges = [vocab_range(vocab_size, r, shard.size) for r in range(shard.size)]
    return torch.cat([p[..., : hi - lo] for p, (lo, hi) in zip(parts, ranges, strict=True)], -1)


class RowParallel(nn.Module):
    """A Linear layer whose input features are split across the group: this member's
    partial product, summed across the group, plus the bias once."""

    def __init__(self, linear: nn.Linear, lo: int, hi: int, collective: Collective) -> None:
        super().__init__()
        self.linear = nn.Linear(hi - lo, linear.out_features, bias=False)
        self.linear.weight = nn.Parameter(linear.weight.detach()[:, lo:hi].clone())
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.collective = collective

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.collective.all_reduce(self.linear(x).contiguous())
        return y if self.bias is None else y + self.bias


def column_slice(linear: nn.Linear, rows: list[tuple[int, int]]) -> nn.Linear:
    """A Linear layer computing only these output features (row ranges of the weight)."""
    weight = torch.cat([linear.weight.detach()[lo:hi] for lo, hi in rows])
    out = nn.Linear(linear.in_features, weight.shape[0], bias=linear.bias is not None)
    out.weight = nn.Parameter(weight.clone())
    if linear.bias is not None:
        out.bias = nn.Parameter(torch.cat([linear.bias.detach()[lo:hi] for lo, hi in rows]))
    return out


class VocabParallelEmbedding(nn.Module):
    """Rows ``[lo, hi)`` of the tied ``wte``: a lookup of ids outside them gives zeros and
    the group's all-reduce fills them in; ``project`` gives this slice of the logits."""

    def __init__(self, embedding: nn.Embedding, lo: int, hi: int, collective: Collective):
        super().__init__()
        self.weight = nn.Parameter(embedding.weight.detach()[lo:hi].clone())
        self.lo, self.hi = lo, hi
        self.collective = collective

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.lo) & (ids < self.hi)
        local = (ids - self.lo).clamp(0, self.hi - self.lo - 1)
        rows = F.embedding(local, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return self.collective.all_reduce(rows.contiguous())

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def shard(stage: Stage, collective: Collective) -> Stage:
    """``stage`` (full fp32 weights, not yet packed or quantized) as member
    ``collective.rank`` of a group of ``collective.size``: in place, and returned."""
    rank, size = collective.rank, collective.size
    config = stage.config
    check_split(config.n_head, size)
    if stage.shard is not None:
        raise ValueError("this stage is already sharded")
    width = config.n_embd // size  # this member's heads' share of the model's width
    lo, hi = rank * width, (rank + 1) * width
    hidden = 4 * config.n_embd // size
    blocks = cast(nn.ModuleDict, stage.transformer["h"])
    for name in list(blocks):
        block = cast(Block, blocks[name])
        attn = cast(CausalSelfAttention, block.attn)
        C = config.n_embd
        attn.c_attn = column_slice(
            attn.c_attn, [(lo, hi), (C + lo, C + hi), (2 * C + lo, 2 * C + hi)]
        )
        attn.c_proj = RowParallel(attn.c_proj, lo, hi, collective)  # type: ignore[assignment]
        attn.n_head = config.n_head // size
        mlp = block.mlp
        h_lo = rank * hidden
        mlp.c_fc = column_slice(mlp.c_fc, [(h_lo, h_lo + hidden)])
        mlp.c_proj = RowParallel(mlp.c_proj, h_lo, h_lo + hidden, collective)  # type: ignore[assignment]
    if "wte" in stage.transformer:
        v_lo, v_hi = vocab_range(config.vocab_size, rank, size)
        wte = cast(nn.Embedding, stage.transformer["wte"])
        stage.transformer["wte"] = VocabParallelEmbedding(wte, v_lo, v_hi, collective)
        stage.vocab = (v_lo, v_hi)
    stage.heads = config.n_head // size
    stage.shard = Shard(rank, size, collective)
    return stage
