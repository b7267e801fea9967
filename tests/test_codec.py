"""Activation codecs: wire layouts byte by byte, error bounds, and that garbage from a peer
is refused with InvalidArgument and nothing else."""

from __future__ import annotations

import math
import struct
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nanoshard.codec import (
    CODECS,
    INT8_MAX_ABS,
    MAX_RANK,
    check_codec,
    decode,
    encode,
    encoded_size,
    int8_scales,
    max_abs_error_bound,
    parse_codec,
)
from nanoshard.errors import InvalidArgument

LOSSY = ("fp16", "bf16", "int8", "int8-32", "int8-64")
# Largest magnitude each codec's encoder accepts (see the module docstring).
RANGE = {
    c: float(np.float32(v))  # exactly representable, as hypothesis wants for width=32
    for c, v in {"fp32": 3.4e38, "fp16": 65504, "bf16": 3.38e38, "int8": 1e37}.items()
}
RANGE["int8-32"] = RANGE["int8-64"] = RANGE["int8"]

fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int32).numpy() if t.dtype == torch.float32 else t.numpy()


def bf16_value(word: int) -> float:
    return float(np.array([word << 16], np.uint32).view(np.float32)[0])


def ceil_scale_bits(m: float) -> int:
    """Bits of the smallest bfloat16 b with 127 * b >= m, exactly (Fractions), independent of
    the codec: start near m / 127 and walk up or down one bf16 value at a time."""
    target = Fraction(m) / 127
    b = int(np.array([m / 127], np.float32).view(np.uint32)[0]) >> 16
    while Fraction(bf16_value(b)) < target:
        b += 1
    while b > 0 and Fraction(bf16_value(b - 1)) >= target:
        b -= 1
    return b


def int8_bytes(a: np.ndarray, block: int) -> bytes:
    """The int8-B payload of float32 ``a``, rebuilt from the module docstring with numpy."""
    chunks = [a[i : i + block] for i in range(0, a.size, block)]
    words = np.array([ceil_scale_bits(float(np.abs(c).max())) for c in chunks], dtype="<u2")
    scales = (words.astype(np.uint32) << 16).view(np.float32)
    q = np.concatenate(
        [np.rint(c / s) if s > 0 else c * 0 for c, s in zip(chunks, scales, strict=True)]
    )
    assert np.abs(q).max() <= 127  # rounded-up scales: the encoder's clamp never bites
    return words.tobytes() + q.astype(np.int8).tobytes()


def assert_within_bound(x: torch.Tensor, codec: str) -> None:
    y = decode(encode(x, codec), tuple(x.shape), codec)
    assert y.shape == x.shape and y.dtype == torch.float32
    err = (y - x.float()).abs()
    bound = max_abs_error_bound(x, codec)
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{codec}: error {err.view(-1)[worst]} > bound {bound.view(-1)[worst]} "
        f"at x={x.view(-1)[worst]}"
    )


# ------------------------------------------------------------------------- names, sizes


def test_codec_names() -> None:
    assert CODECS == ("fp32", "fp16", "bf16", "int8", "int8-32", "int8-64")
    for name in CODECS:
        assert check_codec(name) == name
    assert parse_codec("int8").block == 32 and parse_codec("int8-64").block == 64
    # "int8" and "int8-32" are the same bytes.
    x = torch.randn(3, 100)
    assert encode(x, "int8") == encode(x, "int8-32")


@pytest.mark.parametrize("name", ["int4", "", "INT8", "int8-16", "fp32 ", None, 8, b"fp32"])
def test_unknown_codec_lists_valid_names(name: object) -> None:
    with pytest.raises(InvalidArgument) as e:
        check_codec(name)
    for valid in CODECS:
        assert valid in str(e.value)


def test_huge_codec_name_is_not_echoed_whole() -> None:
    with pytest.raises(InvalidArgument) as e:
        check_codec("x" * 100_000)
    assert len(str(e.value)) < 200


def test_int8_bytes_per_value_for_n_embd_768() -> None:
    fp32 = encoded_size((1, 768), "fp32")
    assert fp32 == 3072
    assert encoded_size((1, 768), "int8") == 24 * 2 + 768 == 816
    assert encoded_size((1, 768), "int8") / fp32 == (1 + 2 / 32) / 4 == 0.265625 <= 0.27
    assert encoded_size((1, 768), "int8-64") == 12 * 2 + 768 == 792
    assert encoded_size((1, 768), "int8-64") / fp32 == (1 + 2 / 64) / 4 == 0.2578125
    assert encoded_size((512, 768), "int8") == 512 * 816
    assert encoded_size((1, 768), "fp16") == encoded_size((1, 768), "bf16") == 1536


@fast
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=9), codec=st.sampled_from(CODECS))
def test_encoded_size_is_the_payload_length(shape: tuple[int, ...], codec: str) -> None:
    x = torch.randn(shape)
    assert len(encode(x, codec)) == encoded_size(shape, codec)


# ------------------------------------------------------------------------- wire layouts


def test_wire_layouts_byte_by_byte() -> None:
    """Each layout rebuilt with numpy alone, from the module docstring's description."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, generator=g) * 3  # 100 = one full int8-64 block + a partial one
    x[70:80] = 0.0
    a = x.numpy()
    assert encode(x, "fp32") == a.astype("<f4").tobytes()
    assert encode(x, "fp16") == a.astype("<f2").tobytes()
    # bf16: the upper 16 bits of the fp32, rounded to nearest even.
    u = a.view(np.uint32).astype(np.uint64)
    bf = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
    assert encode(x, "bf16") == bf.tobytes()
    for codec, block in (("int8-64", 64), ("int8-32", 32)):
        payload = encode(x, codec)
        assert payload == int8_bytes(a, block)
        assert len(payload) == 2 * math.ceil(100 / block) + 100
    # The partial last block's scale comes from its own 36 values only, rounded up by less
    # than one bf16 step (2^-7 relative).
    first, last = (bf16_value(b) for b in struct.unpack("<2H", encode(x, "int8-64")[:4]))
    for scale, part in ((first, x[:64]), (last, x[64:])):
        m = float(part.abs().max())
        assert m / 127 <= scale < m / 127 * (1 + 2**-7)


def test_int8_byte_layout_at_the_edges() -> None:
    """Scales at both ends of the range: subnormal, exact multiples of 127, near 2^126."""
    top = float(np.nextafter(np.float32(INT8_MAX_ABS), np.float32(0)))
    for values in (
        [1e-45, 0.0, -3e-45],  # subnormal inputs: the scale is the smallest bf16, 2^-133
        [127.0 * 2.0**-130, 2.0**-140],  # a subnormal quotient that is a bf16 exactly
        [float(np.nextafter(np.float32(127.0 * 2.0**-130), np.float32(1)))],  # ... and above
        [127.0, 0.5, -63.5, 1.5],  # scale 1 exactly: ties to even
        [127.0 + 2.0**-16, 0.50390625],  # scale 1 + 2^-7: the largest round-up there is
        [-top, 1.0, 2.0**100],
    ):
        a = np.array(values, np.float32)
        payload = encode(torch.from_numpy(a), "int8")
        assert payload == int8_bytes(a, 32), values
        assert bool(torch.isfinite(decode(payload, a.shape, "int8")).all())


def ceil_cases() -> list[float]:
    """absmax values where rounding up to bf16 is delicate: 127 * (a bf16 value) and its
    float32 neighbours, across the exponent range including subnormal quotients."""
    out = [0.0, 1e-45, 2.0**-149 * 127, 2.0**-126, 2.0**-126 * 127]
    for e in (-149, -140, -133, -130, -127, -126, -125, -60, -1, 0, 1, 60, 118, 119):
        for frac in (0x00, 0x01, 0x40, 0x7F):
            b = np.float32(2.0**e * (1 + frac / 128))
            m = np.float32(b * np.float32(127))
            for v in (np.nextafter(m, np.float32(0)), m, np.nextafter(m, np.float32(np.inf))):
                if 0 <= v < INT8_MAX_ABS:
                    out.append(float(v))
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(0, float(np.float32(2.0**126 * (1 - 2**-24))), width=32),
            st.floats(0, float(np.float32(2e-36)), width=32),  # subnormal m / 127
            st.sampled_from(ceil_cases()),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_int8_scale_is_absmax_over_127_rounded_up_to_bf16(absmax: list[float]) -> None:
    words = int8_scales(np.array(absmax, np.float32))
    assert words.dtype == np.uint16
    assert [int(b) for b in words] == [ceil_scale_bits(m) for m in absmax]
    for b, m in zip(words, absmax, strict=True):
        assert 127 * Fraction(bf16_value(int(b))) >= Fraction(m)  # so |x / s| <= 127
        assert bf16_value(int(b)) <= 2.0**120  # within what the decoder accepts


def test_all_zero_block_has_scale_zero_and_decodes_to_zero() -> None:
    x = torch.zeros(2, 64)
    x[1] = torch.linspace(-1, 1, 64)
    payload = encode(x, "int8")  # 4 blocks of 32: two all-zero, then two of the linspace
    assert struct.unpack("<4H", payload[:8])[:2] == (0, 0)
    assert 0 not in struct.unpack("<4H", payload[:8])[2:]
    assert payload[8 : 8 + 64] == bytes(64)
    y = decode(payload, (2, 64), "int8")
    assert torch.equal(y[0], torch.zeros(64))


# ------------------------------------------------------------------------- exactness and bounds


@fast
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=12),
        elements=st.floats(allow_nan=False, allow_infinity=False, width=32),
    )
)
def test_fp32_round_trip_is_bitwise(a: np.ndarray) -> None:
    x = torch.from_numpy(a.copy())
    y = decode(encode(x, "fp32"), a.shape, "fp32")
    assert np.array_equal(bits(y), bits(x))  # equal bits: -0.0 and subnormals survive


def test_negative_zero() -> None:
    x = torch.tensor([-0.0, 0.0, -1e-45, 1.0])
    for codec in ("fp32", "fp16", "bf16"):
        y = decode(encode(x, codec), (4,), codec)
        assert math.copysign(1.0, float(y[0])) == -1.0, codec
    y = decode(encode(x, "int8"), (4,), "int8")  # int8 has no -0: documented
    assert math.copysign(1.0, float(y[0])) == 1.0 and float(y[0]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype: torch.dtype) -> None:
    x = (torch.randn(4, 96) * 50).to(dtype)
    same = "fp16" if dtype == torch.float16 else "bf16"
    assert torch.equal(decode(encode(x, same), (4, 96), same, dtype=dtype), x)
    assert torch.equal(decode(encode(x, "fp32"), (4, 96), "fp32"), x.float())


@fast
@given(
    codec=st.sampled_from(LOSSY),
    data=st.data(),
)
def test_lossy_round_trip_within_bound_on_edge_floats(codec: str, data: st.DataObject) -> None:
    top = RANGE[codec]
    a = data.draw(
        hnp.arrays(
            np.float32,
            hnp.array_shapes(min_dims=1, max_dims=2, max_side=150),
            elements=st.floats(-top, top, width=32),
        )
    )
    assert_within_bound(torch.from_numpy(a.copy()), codec)


@st.composite
def activations(draw: st.DrawFn) -> tuple[torch.Tensor, str]:
    """Gaussian activations at a random scale, with zeroed spans and one huge outlier."""
    codec = draw(st.sampled_from(LOSSY))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    exp = draw(st.integers(-40, 30))
    x = torch.randn(shape, generator=g) * 10.0**exp
    flat = x.view(-1)
    if draw(st.booleans()):
        start = draw(st.integers(0, flat.numel() - 1))
        flat[start : start + draw(st.integers(1, 200))] = 0.0
    if draw(st.booleans()):
        flat[draw(st.integers(0, flat.numel() - 1))] = -(10.0 ** (exp + draw(st.integers(1, 8))))
    # 6e4: below 65504 also once rounded to bf16; finfo.max: the input dtype's own range.
    top = min(6e4 if codec == "fp16" else RANGE[codec], torch.finfo(dtype).max)
    return x.clamp(-top, top).to(dtype), codec


@settings(max_examples=150, deadline=None)
@given(activations())
def test_lossy_round_trip_within_bound_on_activations(case: tuple[torch.Tensor, str]) -> None:
    x, codec = case
    assert_within_bound(x, codec)


def test_int8_bound_is_tight() -> None:
    """The bound is not vacuous: it is reached where the scale rounds up the most."""
    # max|x| = 127 + 2^-16: max/127 lies just above 1, so the scale rounds up to 1 + 2^-7,
    # and 0.50390625 = (1 + 2^-7) / 2 sits exactly halfway between 0 and one step.
    x = torch.tensor([127.0 + 2.0**-16, 0.50390625] + [0.0] * 30)
    y = decode(encode(x, "int8"), (32,), "int8")
    err = float((y - x).abs()[1])
    assert err == 0.50390625
    bound = float(max_abs_error_bound(x, "int8")[1])
    assert 0.9999 * bound <= err <= bound
    # This half step is larger than half of the unrounded one: bf16 scales cost up to 2^-7.
    assert err > float(x[0]) / 254 * (1 + 2**-14)
    # Where max/127 is a bf16 value the scale is exact and the error half a step: 0.5.
    x = torch.tensor([127.0, 0.5] + [0.0] * 30)
    y = decode(encode(x, "int8"), (32,), "int8")
    assert float((y - x).abs()[1]) == 0.5 == 127 / 254


@pytest.mark.parametrize("codec", ["int8", "int8-64"])
def test_int8_bound_is_approached_on_random_activations(codec: str) -> None:
    x = torch.randn(128, 768, generator=torch.Generator().manual_seed(0)) * 3
    err = (decode(encode(x, codec), x.shape, codec) - x).abs()
    ratio = float((err / max_abs_error_bound(x, codec)).max())
    assert 0.99 < ratio <= 1.0


def test_int8_outlier_only_hurts_its_own_block() -> None:
    x = torch.linspace(-1, 1, 256).view(4, 64).clone()
    x[1, 7] = 1e6
    c = (1 + 2**-7) * (1 + 2**-14)
    for codec, block in (("int8", 32), ("int8-64", 64)):
        err = (decode(encode(x, codec), (4, 64), codec) - x).abs().view(-1, block)
        hit = 64 // block  # the block holding x[1, 7]
        assert float(err[hit].max()) <= 1e6 / 254 * c
        assert float(err[hit].max()) > 0.4  # the outlier's block loses its small values
        others = torch.cat((err[:hit], err[hit + 1 :]))
        assert float(others.max()) <= 1 / 254 * c
    # int8's finer blocks: x[1, 32:] keeps its precision, where int8-64 loses it.
    err = (decode(encode(x, "int8"), (4, 64), "int8") - x).abs()
    assert float(err[1, 32:].max()) <= 1 / 254 * c


def test_fp16_and_bf16_relative_error() -> None:
    x = torch.logspace(-4, 4, 1000)
    for codec, u in (("fp16", 2**-11), ("bf16", 2**-8)):
        y = decode(encode(x, codec), (1000,), codec)
        assert float(((y - x).abs() / x).max()) <= u


# ------------------------------------------------------------------------- encode refuses


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_encode_refuses_non_finite(codec: str, bad: float) -> None:
    x = torch.randn(3, 70)
    x[2, 69] = bad
    with pytest.raises(InvalidArgument, match="NaN or inf"):
        encode(x, codec)


@pytest.mark.parametrize(
    ("codec", "ok", "too_big"),
    [
        ("fp16", 65504.0, 65520.0),
        ("bf16", 3.38e38, 3.4e38),
        ("int8", 2.0**125, INT8_MAX_ABS),
        ("int8-64", 2.0**126 * (1 - 2**-24), INT8_MAX_ABS),
    ],
)
def test_encode_range(codec: str, ok: float, too_big: float) -> None:
    x = torch.tensor([1.0, -ok])
    y = decode(encode(x, codec), (2,), codec)
    assert bool(torch.isfinite(y).all()) and float(y[1]) == pytest.approx(-ok, rel=2**-7)
    with pytest.raises(InvalidArgument, match=r"wider codec|beyond"):
        encode(torch.tensor([1.0, too_big]), codec)


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(3, dtype=torch.float64),
        torch.arange(3),
        torch.tensor(1.0),
        torch.zeros(0, 768),
        torch.zeros((1,) * (MAX_RANK + 1)),
        [1.0, 2.0],
        np.zeros(3, np.float32),
    ],
)
def test_encode_refuses_non_activations(x: object) -> None:
    with pytest.raises(InvalidArgument):
        encode(x, "fp32")  # type: ignore[arg-type]


def test_encode_accepts_views_and_grad() -> None:
    w = torch.randn(64, 3, requires_grad=True)
    x = (w * 2).t()  # non-contiguous, part of a graph
    for codec in CODECS:
        y = decode(encode(x, codec), (3, 64), codec)
        assert bool((y - x.detach()).abs().le(max_abs_error_bound(x, codec)).all())


# ------------------------------------------------------------------------- decode refuses


@pytest.mark.parametrize("codec", CODECS)
def test_decode_wrong_length_says_expected_and_got(codec: str) -> None:
    payload = encode(torch.randn(2, 768), codec)
    expected = len(payload)
    for bad in (payload[:-1], payload + b"\0", b"", payload * 2):
        with pytest.raises(InvalidArgument) as e:
            decode(bad, (2, 768), codec)
        assert f"must be {expected} bytes, got {len(bad)}" in str(e.value)
    with pytest.raises(InvalidArgument):
        decode(payload, (768, 3), codec)  # a shape that does not match the bytes


@pytest.mark.parametrize(
    "shape",
    [
        [],
        (),
        [0],
        [-1],
        [3, -2],
        [1, 0, 768],
        [2**40, 2**40],
        [2**63, 2**63],
        [1] * (MAX_RANK + 1),
        [1] * 10**6,
        [1.5],
        [768.0],
        ["3"],
        [True],
        [None],
        [[1, 2]],
        None,
        "768",
        b"\x03",
        768,
        {1.5: 2},
    ],
)
def test_decode_refuses_bad_shapes(shape: object) -> None:
    for codec in ("fp32", "int8"):
        with pytest.raises(InvalidArgument):
            decode(b"\0" * 3072, shape, codec)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            encoded_size(shape, codec)  # type: ignore[arg-type]


def test_shape_types_a_peer_may_send() -> None:
    payload = encode(torch.ones(2, 3), "fp32")
    for shape in (torch.Size([2, 3]), (np.int64(2), np.int32(3)), np.array([2, 3]), [2, 3]):
        assert decode(payload, shape, "fp32").shape == (2, 3)  # type: ignore[arg-type]


def test_max_elements() -> None:
    payload = encode(torch.ones(10, 10), "fp32")
    assert decode(payload, (10, 10), "fp32", max_elements=100).shape == (10, 10)
    with pytest.raises(InvalidArgument, match="max_elements"):
        decode(payload, (10, 10), "fp32", max_elements=99)
    with pytest.raises(InvalidArgument, match="max_elements"):
        decode(b"", (8192, 8192, 2), "fp32")  # 128M > the 64M default, refused before reading


BAD_SCALES = {  # bfloat16 words a peer may send as a scale
    "NaN": 0x7FC0,
    "-NaN": 0xFFC0,
    "NaN with payload": 0x7F81,
    "inf": 0x7F80,
    "-inf": 0xFF80,
    "-1.0": 0xBF80,
    "-2^-133": 0x8001,  # the smallest negative subnormal
    "-0.0": 0x8000,  # harmless, but the encoder never sends a sign bit
    "2^120 (1 + 2^-7)": 0x7B81,  # the first bf16 above the limit
    "2^121": 0x7C00,
    "max finite": 0x7F7F,
}


@pytest.mark.parametrize("word", BAD_SCALES.values(), ids=BAD_SCALES.keys())
@pytest.mark.parametrize("codec", ["int8", "int8-64"])
def test_decode_refuses_bad_scales(word: int, codec: str) -> None:
    payload = bytearray(encode(torch.randn(2, 64), codec))
    n_blocks = 128 // parse_codec(codec).block
    k = n_blocks - 1
    payload[2 * k : 2 * k + 2] = struct.pack("<H", word)
    with pytest.raises(InvalidArgument, match=f"scale {k} is"):
        decode(bytes(payload), (2, 64), codec)


def test_decode_accepts_the_largest_scale() -> None:
    assert bf16_value(0x7B80) == 2.0**120
    payload = struct.pack("<H", 0x7B80) + struct.pack("<2b", 127, -127)
    y = decode(payload, (2,), "int8")
    assert y.tolist() == [127 * 2.0**120, -127 * 2.0**120]


def test_decode_refuses_int8_minus_128() -> None:
    payload = bytearray(encode(torch.randn(64), "int8"))
    payload[2 * 2 + 10] = 0x80  # after 2 scales of 2 bytes: value 10 := -128
    with pytest.raises(InvalidArgument, match="-128"):
        decode(bytes(payload), (64,), "int8")


@pytest.mark.parametrize(
    ("codec", "word"),
    [
        ("fp32", struct.pack("<f", math.nan)),
        ("fp32", struct.pack("<f", -math.inf)),
        ("fp16", struct.pack("<H", 0x7C00)),  # +inf
        ("fp16", struct.pack("<H", 0xFE01)),  # a NaN
        ("bf16", struct.pack("<H", 0x7FC0)),  # NaN
        ("bf16", struct.pack("<H", 0xFF80)),  # -inf
    ],
)
def test_decode_refuses_non_finite_values(codec: str, word: bytes) -> None:
    payload = bytearray(encode(torch.randn(100), codec))
    payload[len(word) * 37 : len(word) * 38] = word
    with pytest.raises(InvalidArgument, match="NaN or inf"):
        decode(bytes(payload), (100,), codec)


def test_decode_refuses_values_that_overflow_the_requested_dtype() -> None:
    payload = encode(torch.tensor([1e5, 1.0]), "fp32")
    y = decode(payload, (2,), "fp32", dtype=torch.bfloat16)
    assert float(y[0]) == pytest.approx(1e5, rel=1e-2)
    with pytest.raises(InvalidArgument, match="overflow dtype"):
        decode(payload, (2,), "fp32", dtype=torch.float16)
    with pytest.raises(InvalidArgument, match="overflow dtype"):
        decode(encode(torch.tensor([1e5, 1.0]), "int8"), (2,), "int8", dtype=torch.float16)


@pytest.mark.parametrize("payload", ["abcd", None, [0, 0, 0, 0], 1234, np.zeros(4, np.uint8)])
def test_decode_refuses_non_bytes(payload: object) -> None:
    with pytest.raises(InvalidArgument, match="payload must be bytes"):
        decode(payload, (1,), "fp32")  # type: ignore[arg-type]


def test_decode_refuses_non_float_dtype() -> None:
    with pytest.raises(InvalidArgument, match="float dtype"):
        decode(bytes(4), (1,), "fp32", dtype=torch.int32)


def test_decode_output_is_a_fresh_writable_tensor() -> None:
    x = torch.randn(3, 64)
    for codec in CODECS:
        payload = encode(x, codec)
        for buf in (payload, bytearray(payload), memoryview(payload)):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # e.g. torch's "buffer is not writable"
                y = decode(buf, [3, 64], codec, dtype=torch.bfloat16)
            assert y.shape == (3, 64) and y.dtype == torch.bfloat16 and y.is_contiguous()
            y.add_(1.0)  # writable, and does not alias the payload
        assert encode(x, codec) == payload


# ------------------------------------------------------------------------- garbage in


def _decode_or_refuse(payload: bytes, shape: object, codec: object) -> None:
    try:
        y = decode(payload, shape, codec, max_elements=1 << 16)  # type: ignore[arg-type]
    except InvalidArgument:
        return
    assert tuple(y.shape) == tuple(shape)  # type: ignore[arg-type]
    assert bool(torch.isfinite(y).all())


junk_codec = st.one_of(st.sampled_from(CODECS), st.text(max_size=12), st.none(), st.integers())
junk_shape = st.one_of(
    st.lists(st.integers(-(2**70), 2**70), max_size=10),
    st.lists(st.integers(-2, 40), min_size=1, max_size=3),
    st.lists(st.one_of(st.floats(), st.booleans(), st.text(max_size=2)), max_size=3),
    st.integers(),
    st.none(),
)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=600), shape=junk_shape, codec=junk_codec)
def test_garbage_is_refused_never_crashes(payload: bytes, shape: object, codec: object) -> None:
    _decode_or_refuse(payload, shape, codec)


@settings(max_examples=300, deadline=None)
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=20),
    codec=st.sampled_from(CODECS),
    data=st.data(),
)
def test_random_bytes_of_the_right_length(
    shape: tuple[int, ...], codec: str, data: st.DataObject
) -> None:
    """Right length, random contents: gets past the length check into the value checks."""
    n = encoded_size(shape, codec)
    payload = data.draw(st.binary(min_size=n, max_size=n))
    _decode_or_refuse(payload, shape, codec)
