"""The sampler: Gumbel-max over counter-based noise, the same token whether the vocabulary is
whole or sliced across a group (the members run on threads, gathering in memory)."""

from __future__ import annotations

import math
import threading
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoshard import sampling
from nanoshard.errors import InvalidArgument
from nanoshard.sampling import SamplingParams, gumbel, sample, sample_slice


class Group:
    """An in-memory all_gather for k members on threads (the real group uses
    torch.distributed); it records the shape and dtype each member passed on every call."""

    def __init__(self, k: int) -> None:
        self.barrier = threading.Barrier(k, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * k
        self.calls: list[list[tuple[tuple[int, ...], torch.dtype]]] = [[] for _ in range(k)]
        self.bytes = [0] * k

    def gather(self, rank: int) -> sampling.Gather:
        def gather(t: torch.Tensor) -> list[torch.Tensor]:
            self.calls[rank].append((tuple(t.shape), t.dtype))
            self.bytes[rank] += t.numel() * t.element_size()
            self.slots[rank] = t.clone()
            self.barrier.wait()
            rows = [s for s in self.slots if s is not None]
            self.barrier.wait()  # nobody overwrites a slot before everyone has read them all
            return rows

        return gather


def sliced(
    logits: torch.Tensor, cuts: list[int], params: SamplingParams, position: int
) -> tuple[list[int], Group]:
    """Each member's answer when member r holds ids [cuts[r], cuts[r + 1])."""
    k = len(cuts) - 1
    group = Group(k)
    results: list[int | None] = [None] * k
    errors: list[BaseException] = []

    def member(rank: int) -> None:
        try:
            part = logits[cuts[rank] : cuts[rank + 1]]
            results[rank] = sample_slice(part, cuts[rank], params, position, group.gather(rank))
        except BaseException as e:
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=member, args=(r,)) for r in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [int(r) for r in results if r is not None], group


def reference(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """The definition computed directly on the whole row: filters by sorting, argmax of
    z + G over the allowed ids (the fixed-point mass and the noise are the module's)."""
    x = logits.double().numpy()
    if params.greedy:
        return int(np.argmax(x))
    allowed = allowed_set(logits, params)
    if not allowed.any():
        return 0
    z = x / params.temperature
    scores = np.where(allowed, z + gumbel(params.seed, position, 0, len(z)).numpy(), -np.inf)
    return int(np.argmax(scores))


def allowed_set(logits: torch.Tensor, params: SamplingParams) -> np.ndarray:
    """The allowed ids (a mask) by the definition, on the whole row."""
    z = logits.double().numpy() / params.temperature
    allowed = z > -np.inf
    if 0 < params.top_k <= len(z):
        allowed &= z >= np.sort(z)[::-1][params.top_k - 1]
    if params.top_p < 1.0 and allowed.any():
        ids = np.flatnonzero(allowed)
        order = ids[np.lexsort((ids, -z[ids]))]
        hi, lo = sampling._fixed(z[order] - z[order[0]])
        terms = [(int(a) << sampling._LIMB) + int(b) for a, b in zip(hi, lo, strict=True)]
        num, den = params.top_p.as_integer_ratio()
        total, before = sum(terms), 0
        allowed[:] = False
        for i, t in zip(order, terms, strict=True):
            if before * den < num * total:
                allowed[i] = True
            before += t
    return allowed


def old_support(logits: torch.Tensor, params: SamplingParams) -> tuple[set[int], set[int]]:
    """The previous sampler's filters (inverse CDF over sorted probabilities): (its support,
    the ids whose mass ranked above lies within 1e-9 of top_p, where rounding may decide).
    It ranked tokens by their rounded probability, and distinct z can round to the same one
    (0 and 1e-40): this ranks by z as the definition does, the rest is the old code."""
    z = logits.double() / params.temperature
    if 0 < params.top_k < z.numel():
        kth = torch.topk(z, params.top_k).values[-1]
        z = z.masked_fill(z < kth, -math.inf)
    order = torch.sort(z, descending=True, stable=True).indices
    probs = torch.softmax(z, dim=-1)[order]
    before = torch.cumsum(probs, dim=-1) - probs
    close = set(order[(before - params.top_p).abs() < 1e-9].tolist())
    if params.top_p < 1.0:
        probs = probs.masked_fill(before >= params.top_p, 0.0)
    return set(order[probs > 0].tolist()), close


# --- strategies ----------------------------------------------------------------------------

grid = st.sampled_from([-3.0, -1.5, -0.5, 0.0, 0.0, 0.5, 1.0, 1.0, 2.5, 4.0, -math.inf])
free = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False)


@st.composite
def rows(draw: st.DrawFn) -> torch.Tensor:
    n = draw(st.integers(1, 160))
    values = draw(st.lists(st.one_of(grid, free), min_size=n, max_size=n))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.float64]))
    return torch.tensor(values, dtype=dtype)


@st.composite
def params(draw: st.DrawFn, vocab: int) -> SamplingParams:
    mode = draw(st.sampled_from(["greedy", "temperature", "top_k", "top_p", "both"]))
    temperature = 0.0 if mode == "greedy" else draw(st.floats(0.1, 3.0))
    top_k = draw(st.integers(1, vocab + 3)) if mode in ("top_k", "both") else 0
    top_p = draw(st.floats(0.01, 0.999)) if mode in ("top_p", "both") else 1.0
    seed = draw(st.integers(-(2**63), 2**63 - 1))
    return SamplingParams(temperature, top_k, top_p, seed)


@st.composite
def cases(draw: st.DrawFn) -> tuple[torch.Tensor, list[int], SamplingParams, int]:
    logits = draw(rows())
    n = len(logits)
    k = draw(st.integers(1, 4))
    inner = sorted(draw(st.lists(st.integers(0, n), min_size=k - 1, max_size=k - 1)))
    return logits, [0, *inner, n], draw(params(n)), draw(st.integers(0, 10**6))


def check_case(logits: torch.Tensor, cuts: list[int], p: SamplingParams, position: int) -> None:
    whole = sample(logits, p, position)
    assert whole == reference(logits, p, position)
    got, group = sliced(logits, cuts, p, position)
    assert got == [whole] * (len(cuts) - 1)
    assert all(calls == group.calls[0] for calls in group.calls)


# --- the sliced protocol -------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_every_member_draws_the_whole_rows_token(case) -> None:
    check_case(*case)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_rounds_pruning_and_chunks_change_nothing(case) -> None:
    """Tiny rounds (top-k and nucleus over many rounds), pruning on every candidate set and
    tiny chunks: the same tokens as the definition."""
    small = {"_FIRST_ROUND": 1, "_TOPK_ROUND": 2, "_SMALL": 0, "_CHUNK": 16}
    with mock.patch.multiple(sampling, **small):
        check_case(*case)


def test_uneven_gpt2_splits() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(50257, generator=gen) * 2.5
    logits[torch.randint(0, 50257, (20,), generator=gen)] += 9.0  # a few likely tokens
    logits[::997] = -math.inf
    modes = [
        SamplingParams(0.0),
        SamplingParams(0.8, seed=3),
        SamplingParams(0.8, top_k=50, seed=4),
        SamplingParams(0.8, top_p=0.9, seed=5),
        SamplingParams(1.5, top_p=0.95, seed=6),  # a wide nucleus: several rounds
        SamplingParams(0.7, top_k=2000, top_p=0.5, seed=7),  # k above one round
    ]
    for cuts in ([0, 25129, 50257], [0, 12565, 25130, 37694, 50257], [0, 1, 50256, 50257]):
        for p in modes:
            for position in (0, 977):
                got, group = sliced(logits, cuts, p, position)
                assert got == [sample(logits, p, position)] * (len(cuts) - 1)
                assert all(calls == group.calls[0] for calls in group.calls)
    assert sample(logits, modes[0], 0) == int(logits.argmax())


def test_bytes_gathered_per_token() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(50257, generator=gen) * 2.5
    logits[torch.randint(0, 50257, (10,), generator=gen)] += 12.0  # a peaked row
    cuts = [0, 25129, 50257]

    def cost(p: SamplingParams) -> tuple[int, int]:
        _, group = sliced(logits, cuts, p, 11)
        assert group.bytes[0] == group.bytes[1]
        return len(group.calls[0]), group.bytes[0]

    assert cost(SamplingParams(0.0)) == (1, 16)
    assert cost(SamplingParams(0.8)) == (1, 16)
    assert cost(SamplingParams(0.8, top_k=50)) == (2, 8 * 50 + 16)
    assert cost(SamplingParams(0.8, top_p=0.9)) == (3, 8 + (16 + 16 * 64) + 16)


# --- the definition ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(rows(), st.data())
def test_the_allowed_set_is_the_old_filters(logits: torch.Tensor, data: st.DataObject) -> None:
    """Top-k then top-p as the previous sampler had them: its support, up to ids whose mass
    ranked above lies within 1e-9 of top_p (float sums and fixed point round differently)."""
    p = data.draw(params(len(logits)).filter(lambda p: not p.greedy))
    if not torch.isfinite(logits).any():
        return
    mine = set(np.flatnonzero(allowed_set(logits, p)).tolist())
    old, close = old_support(logits, p)
    assert mine ^ old <= close
    candidates = sampling._candidates(
        logits.double().numpy() / p.temperature, 0, p, sampling._alone
    )
    finite = torch.isfinite(logits).numpy()
    protocol = np.flatnonzero(finite) if candidates is None else candidates
    assert set(protocol.tolist()) == mine


def test_draws_follow_softmax() -> None:
    """Token frequencies over many positions match softmax(z) on the allowed set."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -math.inf, 1.0, -2.0, 0.25])
    n = 6000
    for p in (
        SamplingParams(0.9, seed=1),
        SamplingParams(1.3, top_k=4, seed=2),
        SamplingParams(0.7, top_p=0.8, seed=3),
    ):
        allowed = torch.from_numpy(allowed_set(logits, p))
        probs = torch.softmax((logits / p.temperature).masked_fill(~allowed, -math.inf), -1)
        counts = torch.bincount(
            torch.tensor([sample(logits, p, i) for i in range(n)]), minlength=10
        )
        assert counts[~allowed].sum() == 0
        expected = probs[allowed] * n
        chi2 = float(((counts[allowed] - expected) ** 2 / expected).sum())
        dof = int(allowed.sum()) - 1
        assert chi2 < dof + 8 * math.sqrt(2 * dof) + 5, (p, chi2)


def test_pruned_draws_follow_softmax() -> None:
    """A longer row (the pruning pass scores only a few tokens exactly): frequencies of ten
    groups of tokens of equal total probability match."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(400, generator=gen) * 1.5
    p = SamplingParams(1.0, seed=9)
    probs = torch.softmax(logits.double(), -1)
    group = (torch.cumsum(probs, 0) * 10).clamp(max=9.999).long()  # 10 bins by cumulative mass
    expected = torch.bincount(group, weights=probs, minlength=10) * 4000
    draws = torch.tensor([sample(logits, p, i) for i in range(4000)])
    counts = torch.bincount(group[draws], minlength=10).double()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 9 + 8 * math.sqrt(18) + 5, chi2


def test_noise_is_standard_gumbel_and_split_free() -> None:
    g = gumbel(7, 3, 0, 200_000).double()
    assert abs(g.mean().item() - 0.5772156649) < 0.01
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03
    u = torch.exp(-torch.exp(-g))  # back to the uniforms
    hist = torch.histc(u, bins=20, min=0.0, max=1.0)
    assert ((hist - 10_000).abs() < 600).all()
    for start, stop in [(0, 1), (5, 17), (123, 50_257), (199_999, 200_000), (40, 40)]:
        assert torch.equal(gumbel(7, 3, start, stop), g[start:stop])
    assert not torch.equal(gumbel(7, 4, 0, 100), g[:100])
    assert not torch.equal(gumbel(8, 3, 0, 100), g[:100])
    with pytest.raises(InvalidArgument):
        gumbel(7, 3, 5, 4)


def test_the_hash_is_splitmix64() -> None:
    """numpy's uint64 arithmetic gives splitmix64 exactly (wrapping, logical shifts)."""
    key = sampling._key(-12345, 678)
    ids = [0, 1, 2, 50_256, 2**31 - 1, 2**40 + 3]
    got = sampling._bits(key, np.array(ids, dtype=np.int64)).tolist()
    m64 = (1 << 64) - 1
    expected = []
    for i in ids:
        x = (key + (i + 1) * 0x9E3779B97F4A7C15) & m64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m64
        expected.append((x ^ (x >> 31)) >> 12)
    assert got == expected


def test_the_pruning_bound_holds() -> None:
    """Every draw's G is below the bound the pruning pass uses by more than the cut's margin
    (1e-9): the closest is about 1.5e-8, near U = 1 with 2**52 - 1 - u a power of two."""
    top = (1 << 52) - 1
    edge = [0, 1, 2, top - 2, top - 1, top] + [top - (1 << i) for i in range(52)]
    rng = np.random.default_rng(3)
    u = np.concatenate([np.array(edge, dtype=np.uint64), rng.integers(0, top, 100_000, np.uint64)])
    assert (sampling._noise(u) < sampling._BOUND - sampling._bound(u) - 1e-9).all()


def test_log_and_exp_are_accurate() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.random(20_000), 1 - rng.random(2000) * 1e-12, rng.random(2000) * 40])
    x = x[x > 0]
    ulps = np.abs(sampling._log(x).view(np.int64) - np.log(x).view(np.int64))
    assert ulps.max() <= 2
    y = -rng.random(20_000) * 64
    ulps = np.abs(sampling._exp(y).view(np.int64) - np.exp(y).view(np.int64))
    assert ulps.max() <= 2


def test_seed_and_position_decide_the_token() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(1.0, seed=42)
    draws = [sample(logits, p, pos) for pos in range(100)]
    assert draws == [sample(logits, p, pos) for pos in range(100)]
    assert len(set(draws)) > 20
    other = [sample(logits, SamplingParams(1.0, seed=43), pos) for pos in range(100)]
    assert other != draws
    # the same row in other dtypes and layouts: the same values, the same tokens
    halves = logits.half()
    for same in (halves.float(), halves.double(), halves.unsqueeze(0)):
        assert [sample(same, p, i) for i in range(20)] == [sample(halves, p, i) for i in range(20)]
    with torch.inference_mode():
        assert sample(logits.clone(), p, 7) == draws[7]


def test_degenerate_rows() -> None:
    p = SamplingParams(0.8, top_k=3, top_p=0.5)
    assert sample(torch.full((5,), -math.inf), p, 0) == 0
    assert sample(torch.full((5,), -math.inf), SamplingParams(0.0), 0) == 0
    assert sample(torch.tensor([-math.inf, 1.0, -math.inf]), p, 0) == 1
    assert sample(torch.tensor([3.0, 3.0, 3.0]), SamplingParams(0.0), 0) == 0  # ties: smallest id
    assert sample(torch.tensor([1.0, 5.0, 5.0]), SamplingParams(1e-30), 0) in (1, 2)
    got, _ = sliced(torch.tensor([-math.inf, -math.inf, 2.0]), [0, 2, 2, 3], p, 4)
    assert got == [2, 2, 2]
