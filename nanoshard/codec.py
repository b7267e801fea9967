"""Activation codecs: how the activations a hop sends become the ``payload`` bytes of a
message, and back. Pure functions, no I/O. The message header carries the ``codec`` name
and the ``shape``; the payload is nothing but the bytes below (no header, no alignment).

Wire layouts. n = prod(shape) values, flattened in row-major (C) order; every multi-byte
number is little-endian whatever the host's byte order.

    codec     payload                                                size in bytes
    fp32      n x float32 (IEEE 754 binary32)                        4n
    fp16      n x float16 (IEEE 754 binary16)                        2n
    bf16      n x bfloat16 (the upper 16 bits of a binary32)         2n
    int8-B    ceil(n/B) x bfloat16 scale, then n x int8 value        2*ceil(n/B) + n

``int8`` is ``int8-32``; ``int8-64`` uses blocks of 64. For int8-B the flat values are cut
into blocks of B; the last block is *partial* (it holds the n - B*(ceil(n/B)-1) values that
remain; nothing is padded on the wire). Block k with m_k = max|x| over the block has scale
s_k = m_k / 127 *rounded up* to bfloat16: the smallest bfloat16 value with 127 * s_k >= m_k
(exactly, not just in float32), 0 for an all-zero block. Each value is
q = round_half_even(x / s_k) in float32 (x / 1 for an all-zero block), clamped to
[-127, 127]; rounding up makes |x / s_k| <= 127, so the clamp never bites and -128 never
occurs. Decoding gives s_k * q, which is exact in float32 (8 + 7 significant bits).
Example, shape (1, 768) int8: 24 scales (48 bytes) then 768 values = 816 bytes,
(1 + 2/32)/4 = 0.265625 of fp32 (int8-64: 12 scales, 792 bytes, (1 + 2/64)/4 = 0.2578).

Why bfloat16 scales: they have float32's exponent range (no overflow, subnormal scales
down to 2^-133, so any block the encoder accepts gets a nonzero scale), and their 8
significant bits cost at most 2^-7 of extra step once rounded up. The 2 bytes they save
pay for blocks twice as fine at the same size; an outlier then widens the step of 32
values instead of 64. (fp16 scales would overflow above max|x| = 8.3e6.)

Error bounds, per element, for the inputs the encoder accepts (fp32, fp16 or bf16 tensors,
finite, within the codec's range) decoded to float32 (see :func:`max_abs_error_bound`,
which the tests check):

    fp32     0: bitwise lossless, including -0.0 and subnormals.
    fp16     max(|x| * 2^-11, 2^-25)     (round to nearest; 2^-25 is half the subnormal step)
    bf16     max(|x| * 2^-8,  2^-134)
    int8-B   m_k / 254 * (1 + 2^-7) * (1 + 2^-14) + 2^-133     for x in block k

Derivation of the int8 bound: with t = x / s_k, float32 division gives t' within half an
ulp of t, and |t| <= 127 puts that within 2^-18; so |q - t| <= 1/2 + 2^-18 and, the
product s_k * q being exact, |s_k * q - x| <= s_k * (1/2 + 2^-18). Rounding up to bf16
adds at most one bf16 step: s_k <= m_k/127 * (1 + 2^-7), or m_k/127 + 2^-133 where the
scale is a bf16 subnormal. (1 + 2^-14) covers 2^-17 and float32 rounding in computing the
bound; 2^-133 the subnormal scales. The bound is reached, to within 2^-14, by a value
halfway between two steps in a block whose m_k/127 lies just above a power of two. int8
turns -0.0 into +0.0. (Exactness assumes IEEE float32 with subnormals, torch's default;
``torch.set_flush_denormal(True)`` only matters for blocks with max|x| < 1.5e-36.)

Non-finite values. A NaN or inf is never a valid activation, so :func:`encode` refuses
them, and values the codec cannot hold (|x| > 65504 for fp16, > 3.39e38 for bf16,
>= 2^126 for int8) rather than sending inf or clipping silently past the bound: pick a
wider codec. :func:`decode` rejects NaN/inf values, int8 scales that are NaN, inf,
negative (even -0.0: the encoder never sends a sign bit) or above 2^120, int8 value -128,
and a result that overflows the requested dtype.

Remote input. The payload, shape and codec name come from a peer that may be broken or
malicious: :func:`decode` validates all of them and raises only
:class:`~nanoshard.errors.InvalidArgument`, with a message saying what was wrong.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F

from nanoshard.errors import InvalidArgument

MAX_ELEMENTS = 64 * 2**20  # default bound on prod(shape) for a decoded payload (256 MiB fp32)
MAX_RANK = 8
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT8_BLOCKS = (32, 64)
INT8_DEFAULT_BLOCK = 32
INT8_MAX_ABS = 2.0**126  # encoder limit: every rounded-up scale is then < 2^120
INT8_MAX_SCALE = 2.0**120  # decoder limit: 127 * scale stays finite in float32
_INT8_MAX_SCALE_BITS = 0x7B80  # INT8_MAX_SCALE as bfloat16 bits


@dataclass(frozen=True)
class Codec:
    """One codec: ``kind`` is fp32/fp16/bf16/int8, ``block`` the int8 block size (else 0)."""

    name: str
    kind: str
    block: int = 0

    @property
    def wire_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.kind, torch.int8
        )

    def n_blocks(self, n: int) -> int:
        return -(-n // self.block) if self.block else 0

    def nbytes(self, n: int) -> int:
        """Payload size for n values."""
        if self.kind == "int8":
            return 2 * self.n_blocks(n) + n
        return n * (4 if self.kind == "fp32" else 2)


def _specs() -> dict[str, Codec]:
    specs = {k: Codec(k, k) for k in ("fp32", "fp16", "bf16")}
    specs["int8"] = Codec("int8", "int8", INT8_DEFAULT_BLOCK)
    for b in INT8_BLOCKS:
        specs[f"int8-{b}"] = Codec(f"int8-{b}", "int8", b)
    return specs


_SPECS = MappingProxyType(_specs())
CODECS: tuple[str, ...] = tuple(_SPECS)


def parse_codec(name: object) -> Codec:
    """The codec called ``name``; raises InvalidArgument naming the valid ones."""
    spec = _SPECS.get(name) if isinstance(name, str) else None
    if spec is None:
        shown = repr(name)[:40]  # a peer's garbage name may be huge
        raise InvalidArgument(f"unknown codec {shown}; valid codecs: {', '.join(CODECS)}")
    return spec


def check_codec(name: object) -> str:
    """``name`` if it is a valid codec name, else InvalidArgument listing the valid ones."""
    return parse_codec(name).name


def check_shape(shape: object, max_elements: int = MAX_ELEMENTS) -> tuple[int, ...]:
    """A peer's shape as a tuple of ints: 1..MAX_RANK dims, each >= 1, product bounded."""
    try:  # a list, tuple, torch.Size or protobuf repeated field: anything with len and iter
        if isinstance(shape, (str, bytes, bytearray)):
            raise TypeError
        rank = len(shape)  # type: ignore[arg-type]
        dims = list(shape) if rank <= MAX_RANK else []  # type: ignore[call-overload]
    except TypeError:
        raise InvalidArgument(f"shape must be a list of ints, got {type(shape).__name__}") from None
    if not 1 <= rank <= MAX_RANK:
        raise InvalidArgument(f"shape must have 1 to {MAX_RANK} dims, got {rank}")
    out: list[int] = []
    n = 1
    for d in dims:
        try:
            if isinstance(d, bool):
                raise TypeError
            d = operator.index(d)
        except TypeError:
            raise InvalidArgument(f"shape dims must be ints, got {d!r:.40}") from None
        if d < 1:
            raise InvalidArgument(f"shape dims must be positive, got {d} in shape {dims}")
        n *= d
        if n > max_elements:
            raise InvalidArgument(f"shape {dims} has more than max_elements={max_elements} values")
        out.append(d)
    return tuple(out)


def encoded_size(shape: Sequence[int], codec: str, max_elements: int = MAX_ELEMENTS) -> int:
    """Exact payload size in bytes of a tensor of ``shape`` under ``codec``."""
    return parse_codec(codec).nbytes(math.prod(check_shape(shape, max_elements)))


# ---------------------------------------------------------------------------- encode


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``. On the CPU, for fp32 and fp16, numpy's (a step's 768
    values: 2.1 µs against 3.9 for three torch calls); elsewhere min and max, which
    propagate NaN, in one fused pass (~20x faster than ``torch.isfinite(t).all()``)."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float16):
        return bool(np.isfinite(t.numpy()).all())
    lo, hi = torch.aminmax(t)
    return all(math.isfinite(v) for v in torch.stack((lo, hi)).tolist())


def _le_bytes(t: torch.Tensor) -> bytes:
    """A contiguous CPU tensor's values as little-endian bytes."""
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship its bits
        t = t.view(torch.int16)
    a = t.numpy()
    return a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def _check_tensor(x: object) -> torch.Tensor:
    # float64 is refused: "fp32 is lossless" would not hold for it, and stages never make it.
    if not isinstance(x, torch.Tensor) or x.dtype not in INPUT_DTYPES:
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidArgument(f"encode needs a float32, float16 or bfloat16 tensor, got {kind}")
    if not 1 <= x.dim() <= MAX_RANK or x.numel() == 0:
        raise InvalidArgument(
            f"encode needs 1 to {MAX_RANK} dims and at least one value, got shape {tuple(x.shape)}"
        )
    return x.detach()


def encode(x: torch.Tensor, codec: str) -> bytes:
    """``x`` (fp32, fp16 or bf16, any device, 1 to MAX_RANK dims) as ``codec`` payload bytes.

    The caller sends ``tuple(x.shape)`` separately. Raises InvalidArgument for NaN/inf
    values and for values the codec cannot hold (see the module docstring)."""
    spec = parse_codec(codec)
    x = _check_tensor(x)
    if spec.kind == "int8":
        return _encode_int8(x, spec.block)
    # Convert on x's own device first, so a GPU sends half the bytes to the CPU for fp16/bf16.
    wire = x.to(spec.wire_dtype)
    if not _all_finite(wire):
        if not _all_finite(x):
            raise InvalidArgument("activations contain NaN or inf; refusing to encode them")
        top = float(x.abs().max())
        raise InvalidArgument(
            f"activation magnitude {top:.4g} overflows codec {spec.name}; use a wider codec "
            "(bf16 or fp32)"
        )
    return _le_bytes(wire.cpu().contiguous())


def _blocked(flat: torch.Tensor, n_blocks: int, block: int) -> torch.Tensor:
    """``flat`` as (n_blocks, block), the last block zero-padded. Zeros leave each block's
    max|x| unchanged, and the padded values are cut again before they reach the wire."""
    pad = n_blocks * block - flat.numel()
    return (F.pad(flat, (0, pad)) if pad else flat).view(n_blocks, block)


def int8_scales(absmax: np.ndarray) -> np.ndarray:
    """The bfloat16 bits (uint16) of each block's scale: ``absmax / 127`` rounded up, i.e.
    the smallest bf16 value s with 127 * s >= absmax exactly (0 for absmax 0).

    ``absmax``: float32 array, >= 0, < INT8_MAX_ABS. Works on the bits, in numpy: a few
    dozen values per token, where numpy's per-call cost is a tenth of torch's."""
    # A positive float's bits order like the float: keeping the upper 16 bits and adding
    # one if any lower bit is set is rounding up to bf16 (0 stays 0).
    up = ((absmax / np.float32(127)).view(np.int32) + 0xFFFF) >> 16
    # absmax / 127 was itself rounded to float32, and where the quotient is subnormal
    # (absmax < 1.5e-36) that can land below it on a bf16 value: then one bf16 step more.
    # 127 * s is exact in float32 (8 + 7 significant bits), so the test is exact.
    up += (up << 16).view(np.float32) * np.float32(127) < absmax
    return up.astype(np.uint16)


def _bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) as float32 values, exactly: the same bits, 16 zeros below."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _encode_int8(x: torch.Tensor, block: int) -> bytes:
    flat = x.to(torch.float32).reshape(-1)
    n = flat.numel()
    n_blocks = -(-n // block)
    blocks = _blocked(flat, n_blocks, block)
    absmax = blocks.abs().amax(dim=1).cpu().numpy()  # small: n / block values
    top = float(absmax.max())  # NaN propagates through max, so this also catches NaN/inf
    if not top < INT8_MAX_ABS:
        if not math.isfinite(top):
            raise InvalidArgument("activations contain NaN or inf; refusing to encode them")
        raise InvalidArgument(
            f"activation magnitude {top:.4g} is beyond int8's range (< 2^126); use fp32"
        )
    scale = int8_scales(absmax)
    # Quantise with the scale as sent, so the decoder's s * q is what was meant. Only an
    # all-zero block has scale 0: divide its values by 1 instead, they round to 0.
    divisor = _bf16_bits_to_float(scale)
    divisor[scale == 0] = 1.0
    safe = torch.from_numpy(divisor).to(flat.device)
    q = torch.div(blocks, safe[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return scale.astype("<u2").tobytes() + _le_bytes(q.reshape(-1)[:n].cpu())


# ---------------------------------------------------------------------------- decode


def _as_buffer(payload: object) -> memoryview:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"payload must be bytes, got {type(payload).__name__}")
    view = memoryview(payload)
    if not view.c_contiguous:
        raise InvalidArgument("payload memoryview must be contiguous")
    return view.cast("B")


def _from_le(buf: memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A writable CPU tensor (a copy) of little-endian ``buf`` read as ``dtype``."""
    np_code = {
        torch.float32: "<f4",
        torch.float16: "<f2",
        torch.bfloat16: "<i2",
        torch.int8: "i1",
    }[dtype]
    a = np.frombuffer(buf, dtype=np.dtype(np_code))
    # The copy makes it writable and native-endian (torch refuses read-only arrays).
    t = torch.from_numpy(a.astype(a.dtype.newbyteorder("="), copy=True))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def decode(
    payload: bytes | bytearray | memoryview,
    shape: Sequence[int],
    codec: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    max_elements: int = MAX_ELEMENTS,
) -> torch.Tensor:
    """A peer's ``payload`` back as a tensor of ``shape``, ``dtype`` on ``device``.

    Validates everything (codec name, shape, exact byte length, scales, values, finiteness
    of the result) and raises only InvalidArgument, saying what was wrong."""
    spec = parse_codec(codec)
    dims = check_shape(shape, max_elements)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgument(f"decode needs a float dtype, got {dtype}")
    buf = _as_buffer(payload)
    n = math.prod(dims)
    expected = spec.nbytes(n)
    if buf.nbytes != expected:
        raise InvalidArgument(
            f"{spec.name} payload for shape {list(dims)} must be {expected} bytes, got {buf.nbytes}"
        )
    if spec.kind == "int8":
        out = _decode_int8(buf, n, spec.block, dtype, torch.device(device))
    else:
        out = _from_le(buf, spec.wire_dtype).to(device=device, dtype=dtype)
    # int8 with scales <= 2^120 always decodes to finite fp32: skip that pass.
    proven_finite = spec.kind == "int8" and dtype in (torch.float32, torch.float64)
    if not proven_finite and not _all_finite(out):
        if spec.kind != "int8" and not _all_finite(_from_le(buf, spec.wire_dtype)):
            raise InvalidArgument(f"{spec.name} payload contains NaN or inf values")
        raise InvalidArgument(f"{spec.name} payload values overflow dtype {dtype}")
    return out.view(dims)


def _decode_int8(
    buf: memoryview, n: int, block: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    n_blocks = -(-n // block)
    bits = np.frombuffer(buf[: 2 * n_blocks], dtype="<u2")
    # Non-negative floats order like their bits, and as uint16 a set sign bit (negative,
    # -0.0), inf and NaN all lie above 2^120's bits: one max rejects every bad scale. With
    # scales <= 2^120 every decoded fp32 is finite.
    if int(bits.max()) > _INT8_MAX_SCALE_BITS:
        k = int(np.argmax(bits > _INT8_MAX_SCALE_BITS))
        raise InvalidArgument(
            f"int8 scale {k} is {float(_bf16_bits_to_float(bits[k : k + 1])[0])!r} "
            f"(bf16 bits {int(bits[k]):#06x}); scales must be +0.0 or positive, finite "
            "and <= 2^120"
        )
    scale = _bf16_bits_to_float(bits)
    q = _from_le(buf[2 * n_blocks :], torch.int8)
    if int(q.min()) == -128:
        raise InvalidArgument("int8 value -128 is not produced by the encoder (range is ±127)")
    s, q = torch.from_numpy(scale).to(device), q.to(device)
    values = _blocked(q, n_blocks, block).to(torch.float32).mul_(s[:, None])
    values = values.view(-1)[:n]
    return values.to(dtype)


# ---------------------------------------------------------------------------- bounds


def max_abs_error_bound(x: torch.Tensor, codec: str) -> torch.Tensor:
    """Per-element bound on |decode(encode(x)) - x| (float32, x's shape and device).

    Holds for every input :func:`encode` accepts; the formulas are in the module docstring."""
    spec = parse_codec(codec)
    a = _check_tensor(x).to(torch.float32).abs()
    if spec.kind == "fp32":
        return torch.zeros_like(a)
    if spec.kind == "fp16":
        return torch.clamp(a * 2.0**-11, min=2.0**-25)
    if spec.kind == "bf16":
        return torch.clamp(a * 2.0**-8, min=2.0**-134)
    flat = a.reshape(-1)
    n, block = flat.numel(), spec.block
    n_blocks = -(-n // block)
    absmax = _blocked(flat, n_blocks, block).amax(dim=1)
    # Half a step of the rounded-up scale; the constants are derived in the module docstring.
    bound = absmax / 254.0 * ((1.0 + 2.0**-7) * (1.0 + 2.0**-14)) + 2.0**-133
    return bound.repeat_interleave(block)[:n].view(a.shape)


def cut_rows(payload: bytes, shape: Sequence[int], codec: str, skip: int) -> bytes:
    """The payload of a (rows, width) matrix without its first ``skip`` rows, as the same
    bytes the whole payload carried where the layout allows it (a refill must be bit for
    bit): fp32/fp16/bf16 always, int8-B when B divides the width (blocks never straddle
    rows). Otherwise the rows are re-encoded, exact to within the codec's bound only.
    ``payload`` is this process's own (already validated) bytes."""
    rows, width = shape
    spec = parse_codec(codec)
    n, keep = rows * width, (rows - skip) * width
    if spec.kind != "int8":
        size = spec.nbytes(n) // n
        out = payload[skip * width * size :]
    elif width % spec.block == 0:  # cut scales and values alike
        n_blocks = n // spec.block
        scale_bytes = (spec.nbytes(n) - n) // n_blocks
        first = skip * width // spec.block
        out = payload[first * scale_bytes : n_blocks * scale_bytes]
        out += payload[n_blocks * scale_bytes + skip * width :]
    else:
        out = encode(decode(payload, (rows, width), codec)[skip:], codec)
    assert len(out) == spec.nbytes(keep)  # our own bytes, not remote input
    return out
