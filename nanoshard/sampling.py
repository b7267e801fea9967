"""Sampling the next token: Gumbel-max over counter-based noise, exact on a sliced vocabulary.

The definition. With ``z = logits / temperature`` in float64:

1. the *allowed* set is the top-k filter (tokens with ``z >=`` the k-th largest ``z`` of the
   whole vocabulary) followed by the nucleus (top-p): ranking the allowed tokens by ``z``
   descending, then id ascending, a token is kept while the probability mass of the tokens
   ranked strictly above it is ``< top_p``. Tokens whose ``z`` is ``-inf`` have no mass and
   are never drawn;
2. the token is ``argmax(z_i + G_i)`` over the allowed ids, ties to the smallest id, where
   ``G_i = -log(-log U_i)`` is standard Gumbel noise and ``U_i`` is a counter-based draw, a
   pure function of ``(seed, position, i)``. Greedy (temperature 0) is ``argmax(logits)``.

The Gumbel-max trick makes 2. an exact sample from ``softmax(z)`` restricted to the allowed
set. Nothing depends on a generator's running state, so a session that is replayed,
rerouted or resumed on another node samples exactly the same tokens.

Why this definition: the LM head's vocabulary may be split across the k members of a
tensor-parallel group, each holding the logits of a contiguous id range only, and full
logits are never gathered. An argmax over a union is the argmax of the members' argmaxes,
and the noise of token ``i`` does not depend on who holds it, so each member scores its own
ids and the group exchanges one ``(score, id)`` pair. The filters need only a few global
facts: the k-th largest value (each member's top k values), the global maximum, the total
probability mass, and where the nucleus ends (rounds of each member's best candidates, in
rank order, until the prefix known to be complete holds the mass). :func:`sample_slice` is
that protocol and :func:`sample` is it for a group of one, so the local path and the sliced
path run the same code. Members branch only on parameters and gathered data, so they all
call ``gather`` the same number of times with the same shapes.

Exact whatever the split, on any machine: the noise (splitmix64 in wrapping uint64), ``exp``
and ``log`` are computed from basic IEEE operations (+ - * /, rounding, bit moves, table
look-ups: fdlibm's algorithms), which give the same bits for a number wherever it sits in
an array and on every CPU, unlike the vectorised libm kernels, whose tail elements and
instruction sets round differently. Probability mass is summed in fixed point (units of
2**-78 of the largest term), so the total is one exact integer however the vocabulary is
cut, and the nucleus boundary is decided in exact integer arithmetic against ``top_p`` (a
float32, as the wire carries it): it matches the float64 softmax to about 1e-15 relative.
Everything runs on the CPU in float64 (numpy), so logits from a GPU sample like logits
from a CPU.

Bytes gathered per member and token: greedy and plain temperature 16; top-k ``8k + 16``;
top-p ``8 + (16 + 16 * 64) + 16`` while the nucleus ends within the candidates sent in the
first round, ``16 * M`` more per further round (M doubles).
"""

from __future__ import annotations

import math
import numbers
import operator
import struct
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from nanoshard.errors import InvalidArgument

Gather = Callable[[torch.Tensor], list[torch.Tensor]]
"""The group's all_gather: every member calls it together with a tensor of the same shape
and dtype, and gets every member's tensor in rank order. Alone: ``lambda t: [t]``."""

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1 keeps all
    seed: int = 0

    def __post_init__(self) -> None:
        # Types first, so a caller's str or None is a one-line error, not a TypeError below.
        object.__setattr__(self, "temperature", real("temperature", self.temperature))
        object.__setattr__(self, "top_k", integer("top_k", self.top_k))
        object.__setattr__(self, "top_p", real("top_p", self.top_p))
        object.__setattr__(self, "seed", integer("seed", self.seed))
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise InvalidArgument(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        # The wire carries them as float32: round here too, so this process and every node
        # divide by the very same number (and sample the same tokens from a seed).
        top_p = float32(self.top_p)
        if top_p == 0.0:
            raise InvalidArgument(f"top_p {self.top_p} is below float32's range: use >= 1e-38")
        object.__setattr__(self, "temperature", float32(self.temperature))
        object.__setattr__(self, "top_p", top_p)
        if not -(2**63) <= self.seed < 2**63:
            raise InvalidArgument(
                f"seed must be a signed 64-bit integer (-2**63 to 2**63 - 1), got {self.seed}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def integer(name: str, value: object) -> int:
    """``value`` as an int if it is one (numpy's and torch's integers too, never a bool or a
    float: 2.5 tokens is a mistake, not 2), else InvalidArgument naming the argument."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise InvalidArgument(f"{name} must be an integer, got {value!r:.40}")


def real(name: str, value: object) -> float:
    """``value`` as a float if it is a real number (not a bool, a str or None), else
    InvalidArgument naming the argument. Its range is the caller's to check."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgument(f"{name} must be a number, got {value!r:.40}")
    return float(value)


def float32(x: float) -> float:
    """``x`` rounded to the nearest float32, as the wire carries it."""
    return struct.unpack("f", struct.pack("f", x))[0]


def sample(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Pick the token at ``position`` from a row of logits ``(vocab,)``: the whole vocabulary."""
    if params.greedy:  # what _greedy picks, without a float64 copy of the row: the first
        return int(torch.argmax(logits.reshape(-1)))  # largest (ties to the smallest id)
    return sample_slice(logits, 0, params, position, _alone)


def sample_slice(
    logits: torch.Tensor, offset: int, params: SamplingParams, position: int, gather: Gather
) -> int:
    """Pick the token at ``position`` when this member holds the logits of token ids
    ``[offset, offset + len(logits))`` only. Every member of the group calls it with the same
    ``params`` and ``position`` and its own slice; all of them return the same token id, the
    one :func:`sample` returns for the whole row. Logits must not be NaN or ``+inf``."""
    x = logits.detach().to("cpu", torch.float64).reshape(-1).numpy()
    if params.greedy:
        return _greedy(x, offset, gather)
    z = x / params.temperature
    candidates = _candidates(z, offset, params, gather)
    return _pick(z, candidates, offset, _key(params.seed, position), gather)


def gumbel(seed: int, position: int, start: int, stop: int) -> torch.Tensor:
    """The noise ``G`` (float64) of token ids ``[start, stop)``: a pure function of
    ``(seed, position, id)``, the same bits whatever range it is asked for."""
    if not 0 <= start <= stop:
        raise InvalidArgument(f"need 0 <= start <= stop, got [{start}, {stop})")
    return torch.from_numpy(_noise(_bits(_key(seed, position), start, stop)))


# --- the protocol -----------------------------------------------------------------------

_CHUNK = 16000  # elements per pass over a long slice: under 128 KiB, so no fresh mmap per array
_FIRST_ROUND = 64  # nucleus candidates each member sends first; the count doubles per round
_TOPK_ROUND = 1024  # top-k values sent in one round; a larger k takes rounds of this size
_SMALL = 512  # candidate sets up to this size are scored without the pruning pass
_LIMB = 39  # fixed-point mass: e**x ~ (high * 2**39 + low) * 2**-78, high and low < 2**39


def _alone(t: torch.Tensor) -> list[torch.Tensor]:
    return [t]


def _greedy(x: Array, offset: int, gather: Gather) -> int:
    """Argmax of the logits, ties to the smallest id: one ``(max, id)`` pair per member."""
    if len(x) == 0:
        return _winner(gather(_pair(-math.inf, -1)))
    i = int(np.argmax(x))
    return _winner(gather(_pair(float(x[i]), offset + i)))


def _candidates(z: Array, offset: int, params: SamplingParams, gather: Gather) -> Array | None:
    """This member's allowed ids (local indices, ascending), or None for all of its ids."""
    kth, top = -math.inf, None
    if params.top_k > 0:
        kth, top = _kth_largest(z, params.top_k, gather)
    allowed = np.flatnonzero(z >= kth) if kth > -math.inf else None
    if params.top_p >= 1.0:
        return allowed
    if top is None:
        top = _global_max(z, gather)
    if top == -math.inf:  # no token has any mass, anywhere
        return np.empty(0, dtype=np.int64)
    first = min(_FIRST_ROUND, params.top_k) if params.top_k > 0 else _FIRST_ROUND
    return _nucleus(z, allowed, offset, top, params.top_p, first, gather)


def _kth_largest(z: Array, k: int, gather: Gather) -> tuple[float, float]:
    """(the k-th largest finite z of the whole vocabulary or -inf if there are fewer than k,
    the largest finite z or -inf). Each member sends its next M values, descending, padded
    with -inf; a member whose M values are all finite may hold more, none above its last."""
    size = min(k, _TOPK_ROUND)
    sent, received = 0, []
    mine = _descending(z, size)
    while True:
        if sent + size > len(mine) and len(mine) < len(z):
            mine = _descending(z, 4 * (sent + size))
        chunk = np.full(size, -np.inf)
        part = mine[sent : sent + size]
        chunk[: len(part)] = part
        rows = [r.numpy() for r in gather(torch.from_numpy(chunk))]
        lasts = [float(r[-1]) for r in rows if r[-1] > -np.inf]
        received += [r[r > -np.inf] for r in rows]
        values = np.concatenate(received)
        top = float(values.max()) if len(values) else -math.inf
        if len(values) >= k:
            kth = float(np.partition(values, len(values) - k)[len(values) - k])
            # Values above every truncated member's last are complete; equal ones suffice too:
            # k values >= kth exist and the truncated members hold none above their last.
            if not lasts or kth >= max(lasts):
                return kth, top
        elif not lasts:
            return -math.inf, top
        sent += size
        size *= 2


def _descending(z: Array, count: int) -> Array:
    """The ``count`` largest values of ``z``, descending."""
    n = len(z)
    top = z if count >= n else np.partition(z, n - count)[n - count :]
    return np.sort(top)[::-1]


def _global_max(z: Array, gather: Gather) -> float:
    mine = float(z.max()) if len(z) else -math.inf
    return max(float(r[0]) for r in gather(torch.tensor([mine], dtype=torch.float64)))


def _nucleus(
    z: Array,
    allowed: Array | None,
    offset: int,
    top: float,
    top_p: float,
    first: int,
    gather: Gather,
) -> Array:
    """The allowed ids (local, ascending) inside the nucleus. ``top`` is the largest allowed z.

    Round 1 gathers each member's mass and its first M candidates in rank order (z descending,
    id ascending); every round after gathers the next ones, twice as many. A member that sent
    M may hold more, all ranked after the last it sent, so the merged candidates ranked at or
    before every such member's last are the exact head of the global ranking; the nucleus ends
    at the first of them where the mass so far reaches ``top_p`` of the total. A round is a set
    (receivers sort), and tied values weigh the same, so nobody sorts ids."""
    za = z if allowed is None else z[allowed]
    n = len(za)
    num, den = top_p.as_integer_ratio()
    hi, lo = _mass(za, top)
    size, sent = first, 0
    pool = np.flatnonzero(_first(za, 4 * size))  # positions of the head of the local ranking
    before = np.zeros(len(pool), dtype=bool)  # which of them were sent
    total = None
    merged_z: list[Array] = []
    merged_id: list[Array] = []
    while True:
        if sent + size > len(pool) and len(pool) < n:
            pool = np.flatnonzero(_first(za, 4 * (sent + size)))
            before = _first(za[pool], sent)
        upto = _first(za[pool], sent + size)
        part = pool[upto & ~before]
        before = upto
        head = 2 if total is None else 0
        payload = np.empty(head + 2 * size, dtype=np.int64)
        if head:
            payload[:2] = (hi, lo)
        values = payload[head : head + size]
        values[:] = _NEG_INF_BITS
        values[: len(part)] = za[part].view(np.int64)
        payload[head + size :] = -1
        ids = part if allowed is None else allowed[part]
        payload[head + size : head + size + len(part)] = ids + offset
        rows = [r.numpy() for r in gather(torch.from_numpy(payload))]
        if total is None:
            total = sum((int(r[0]) << _LIMB) + int(r[1]) for r in rows)
        lasts = []
        for r in rows:
            rz, rid = r[head : head + size].view(np.float64), r[head + size :]
            if rid[-1] >= 0:  # a full round: this member may hold more, ranked after its last
                low = rz.min()
                lasts.append((float(low), int(rid[rz == low].max())))
            real = rid >= 0
            merged_z.append(rz[real])
            merged_id.append(rid[real])
        mz, mid = np.concatenate(merged_z), np.concatenate(merged_id)
        if lasts:
            fz, fid = min(lasts, key=lambda e: (-e[0], e[1]))  # the earliest ranked last
            complete = (mz > fz) | ((mz == fz) & (mid <= fid))
            mz, mid = mz[complete], mid[complete]
        head_z = np.sort(mz)[::-1]
        end = _reaching(head_z - top, den, num * total)
        if end < len(head_z):
            bz = float(head_z[end])
            tied = np.sort(mid[mz == bz])  # the boundary is one of these, by rank
            bid = int(tied[end - int(np.count_nonzero(head_z > bz))])
            break
        if not lasts:  # cannot happen: the whole ranking holds the whole mass
            raise AssertionError("nucleus boundary not found in the complete ranking")
        sent += size
        size *= 2
    tied = np.flatnonzero(za == bz)
    local = tied if allowed is None else allowed[tied]
    keep = np.sort(np.concatenate([np.flatnonzero(za > bz), tied[local + offset <= bid]]))
    return keep if allowed is None else allowed[keep]


def _reaching(x: Array, den: int, need: int) -> int:
    """The first index where the fixed-point mass of ``x[:index + 1]``, times ``den``, reaches
    ``need`` (``len(x)`` if none does)."""
    t_hi, t_lo = _fixed(x)
    c_hi = np.cumsum(t_hi.astype(np.int64)).tolist()
    c_lo = np.cumsum(t_lo.astype(np.int64)).tolist()
    return bisect_left(
        range(len(x)), True, key=lambda j: ((c_hi[j] << _LIMB) + c_lo[j]) * den >= need
    )


def _first(z: Array, count: int) -> Array:
    """A mask of the first ``count`` entries of ``z`` ranked by value descending, then
    position ascending."""
    n = len(z)
    if count >= n:
        return np.ones(n, dtype=bool)
    if count <= 0:
        return np.zeros(n, dtype=bool)
    v = np.partition(z, n - count)[n - count]
    chosen = z > v
    tied = np.flatnonzero(z == v)[: count - int(np.count_nonzero(chosen))]
    chosen[tied] = True
    return chosen


def _mass(z: Array, top: float) -> tuple[int, int]:
    """The fixed-point mass of ``z`` as (sum of high parts, sum of low parts): exact integers."""
    hi = lo = 0
    for start in range(0, len(z), _CHUNK):
        t_hi, t_lo = _fixed(z[start : start + _CHUNK] - top)
        # Integers up to 2**39 each, under 2**14 of them: float64 sums them exactly.
        hi += int(t_hi.sum())
        lo += int(t_lo.sum())
    return hi, lo


def _pick(z: Array, candidates: Array | None, offset: int, key: int, gather: Gather) -> int:
    """Argmax of z + G over the candidates of every member: one ``(score, id)`` per member."""
    zc = z if candidates is None else z[candidates]
    score, best = _best(zc, candidates, offset, key)
    return _winner(gather(_pair(score, best)))


def _best(z: Array, local: Array | None, offset: int, key: int) -> tuple[float, int]:
    """(max of z + G, its id; the smallest id on ties) over this member's candidates, or
    (-inf, -1) if none has mass. ``local``: the candidates' local indices, None for 0..n-1.

    A long slice is bounded first (:func:`_bound`): a token whose z plus its noise's bound is
    below a score already known cannot win, and only the few others are scored exactly."""
    n = len(z)
    if n <= _SMALL:
        pos = np.arange(n)
    else:
        bounds, arg, bound_max = [], -1, -math.inf
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            if local is None:
                u = _bits(key, start + offset, stop + offset)
            else:
                u = _bits(key, local[start:stop] + offset)
            w = z[start:stop] - _bound(u)
            j = int(np.argmax(w))
            if w[j] > bound_max:
                arg, bound_max = start + j, float(w[j])
            bounds.append(w)
        if bound_max == -math.inf:
            return -math.inf, -1
        # A lower bound of one token's score, from libm: only the pruning cut depends on it.
        draw = int(_bits(key, np.array([arg if local is None else local[arg]]) + offset)[0])
        known = float(z[arg]) - math.log(-math.log((draw + 0.5) * 2.0**-52))
        if math.isfinite(known):
            cut = known - _BOUND - (1e-9 + 1e-12 * abs(known))  # rounding margin
            pos = np.concatenate(
                [
                    s + np.flatnonzero(w >= cut)
                    for s, w in zip(range(0, n, _CHUNK), bounds, strict=True)
                ]
            )
        else:
            pos = np.arange(n)
    if len(pos) == 0:
        return -math.inf, -1
    ids = (pos if local is None else local[pos]) + offset
    scores = z[pos] + _noise(_bits(key, ids))
    j = int(np.argmax(scores))  # the first maximum: ids ascend
    if scores[j] == -math.inf:
        return -math.inf, -1
    return float(scores[j]), int(ids[j])


def _pair(score: float, token: int) -> torch.Tensor:
    return torch.tensor([score, float(token)], dtype=torch.float64)


def _winner(rows: list[torch.Tensor]) -> int:
    """The id of the largest score among the members' ``(score, id)``, the smallest id on
    ties; id -1 means no candidate. 0 when no member has one (every logit is -inf)."""
    best_score, best_id = -math.inf, -1
    for row in rows:
        score, token = float(row[0]), int(row[1])
        if token < 0:
            continue
        if best_id < 0 or score > best_score or (score == best_score and token < best_id):
            best_score, best_id = score, token
    return max(best_id, 0)


# --- the noise: splitmix64 on (seed, position, id), Gumbel from IEEE operations ----------

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_DOMAIN = 0x6E616E6F73686172  # "nanoshar"
_LN2 = math.log(2.0)
_NEG_INF_BITS = int(np.array([-np.inf]).view(np.int64)[0])
_BOUND = _LN2 * 1075  # see _bound


def _mix64(x: int) -> int:
    """splitmix64's finalizer on a Python int (exact 64-bit arithmetic)."""
    x = ((x ^ (x >> 30)) * _MIX1) & _M64
    x = ((x ^ (x >> 27)) * _MIX2) & _M64
    return x ^ (x >> 31)


def _key(seed: int, position: int) -> int:
    """The 64-bit key of one (seed, position)."""
    return _mix64((_mix64((seed ^ _DOMAIN) & _M64) + (position & _M64) * _GOLDEN) & _M64)


def _bits(key: int, ids: Array | int, stop: int | None = None) -> Array:
    """52 random bits per token id (an array, or the range ``[ids, stop)``): splitmix64's
    output number ``id + 1`` from state ``key``. numpy's uint64 wraps on overflow and shifts
    logically, exactly as the algorithm wants."""
    if isinstance(ids, int):
        x = np.arange(ids + 1, (ids if stop is None else stop) + 1, dtype=np.uint64)
    else:
        x = ids.astype(np.uint64)
        x += np.uint64(1)
    x *= np.uint64(_GOLDEN)
    x += np.uint64(key)
    t = x >> np.uint64(30)
    x ^= t
    x *= np.uint64(_MIX1)
    np.right_shift(x, np.uint64(27), out=t)
    x ^= t
    x *= np.uint64(_MIX2)
    np.right_shift(x, np.uint64(31), out=t)
    x ^= t
    x >>= np.uint64(12)
    return x


def _noise(u: Array) -> Array:
    """G = -log(-log U) with U = (u + 0.5) / 2**52 in (0, 1): G is in [-3.6, 36.7]."""
    uniform = (u.view(np.int64).astype(np.float64) + 0.5) * 2.0**-52  # exact
    return -_log(-_log(uniform))


def _bound(u: Array) -> Array:
    """``_BOUND`` minus an upper bound of each draw's G. With D = 2**52 - 1 - u, 1 - U is
    (D + 0.5) / 2**52, so G = -log(-log U) < -log(1 - U) < ln 2 (52 - log2 D) if D >= 1, and
    the float64 bits of D read as an integer, over 2**52, minus 1023, are at most log2 D
    (exponent plus mantissa fraction m <= log2(1 + m)): G < ln 2 (1075 - bits(D) / 2**52).
    D = 0 has bits 0, and G < 53 ln 2 < 1075 ln 2."""
    d = (u ^ np.uint64((1 << 52) - 1)).view(np.int64).astype(np.float64)
    bits = d.view(np.int64).astype(np.float64)
    bits *= _LN2 * 2.0**-52
    return bits


# fdlibm's e_log.c and e_exp.c (Sun Microsystems, 1993), one code path each for every input.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_LG = (
    6.666666666666735130e-01,
    3.999999999940941908e-01,
    2.857142874366239149e-01,
    2.222219843214978396e-01,
    1.818357216161805012e-01,
    1.531383769920937332e-01,
    1.479819860511658591e-01,
)
_INV_LN2 = 1.44269504088896338700e00
_P = (
    1.66666666666666019037e-01,
    -2.77777777770155933842e-03,
    6.61375632143793436117e-05,
    -1.65339022054652515390e-06,
    4.13813679705723846039e-08,
)
_SQRT_HALF = 0.7071067811865476


def _log(x: Array) -> Array:
    """Natural log of positive normal float64s (fdlibm's, < 1 ulp), from IEEE operations."""
    m, e = np.frexp(x)  # x = m 2**e, m in [0.5, 1)
    small = m < _SQRT_HALF
    f = np.where(small, m + m, m) - 1.0  # exact: the mantissa in [sqrt(1/2), sqrt(2)), minus 1
    dk = (e - small).astype(np.float64)
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (_LG[1] + w * (_LG[3] + w * _LG[5]))
    t2 = z * (_LG[0] + w * (_LG[2] + w * (_LG[4] + w * _LG[6])))
    r = t2 + t1
    hfsq = 0.5 * f * f
    return dk * _LN2_HI - ((hfsq - (s * (hfsq + r) + dk * _LN2_LO)) - f)


def _exp(x: Array) -> Array:
    """e**x for float64 ``x`` in [-708, 709] (fdlibm's, < 1 ulp), from IEEE operations."""
    k = np.rint(x * _INV_LN2)
    hi = x - k * _LN2_HI
    lo = k * _LN2_LO
    r = hi - lo
    t = r * r
    c = r - t * (_P[0] + t * (_P[1] + t * (_P[2] + t * (_P[3] + t * _P[4]))))
    y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi)
    return y * ((k.astype(np.int64) + 1023) << 52).view(np.float64)  # times 2**k, exactly


# e**x for x <= 0 in 1/256 steps: e**(-i/256) * 2**39 for i in [0, 64 * 256].
_STEPS = _exp(-np.arange(64 * 256 + 1, dtype=np.float64) / 256.0) * 2.0**_LIMB
# e**(-r/256) for r in [0, 1): Taylor to degree 5 (error below 2**-60).
_TAYLOR = tuple((-1) ** k / (math.factorial(k) * 256.0**k) for k in range(6))


def _fixed(x: Array) -> tuple[Array, Array]:
    """e**x for ``x <= 0`` in units of 2**-78, as two float64 integers up to 2**39 (high,
    low): ``e**x ~ high * 2**-39 + low * 2**-78``, 0 below e**-64. A table of e**(-i/256)
    and a polynomial for the rest; both deterministic, within 3 ulps of e**x."""
    y = np.maximum(x, -64.0)
    y *= -256.0
    i = np.floor(y)
    y -= i  # exact: the fraction of a float
    t = _STEPS.take(i.astype(np.int64))
    p = y * _TAYLOR[5]
    for c in _TAYLOR[4:0:-1]:
        p += c
        p *= y
    p += 1.0
    t *= p
    high = np.floor(t)
    t -= high
    t *= 2.0**_LIMB
    np.rint(t, out=t)
    return high, t
