"""Golden tables for rotfn's number formats.

Every expected value here was worked out by hand from ``FORMATS.md`` (the
bit-level rules) and written down as a literal, or built from a literal with a
single fp32 operation that the rule itself names (e.g. ``s_g = 12 / 2688``).
Nothing expected is computed by calling the code under test. Values are compared
bit for bit (``-0`` and ``+0`` differ), so a sign or last-ulp slip fails.
"""

from __future__ import annotations

import math

import pytest
import torch

import rotfn
from rotfn.ops.numbers import e2m1_decode, e2m1_encode, e4m3_round
from rotfn.testing import assert_bits_equal

F32 = torch.float32
INF = math.inf
NAN = math.nan
FP32_MAX = 3.4028234663852886e38  # (2 - 2^-23) * 2^127
RULES = ("floor", "even", "rceil")


# ----- helpers --------------------------------------------------------------------
def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F32)


def above(v: float) -> float:
    """The fp32 neighbour of v towards +inf."""
    return torch.nextafter(f32(v), f32(INF)).item()


def below(v: float) -> float:
    """The fp32 neighbour of v towards -inf."""
    return torch.nextafter(f32(v), f32(-INF)).item()


def padded(values, n: int) -> list[float]:
    """values followed by zeros up to n elements (one quantization block)."""
    return list(values) + [0.0] * (n - len(values))


def scale_bytes(q: rotfn.QTensor) -> torch.Tensor:
    return q.scales.view(torch.uint8)


def assert_qdq(x: torch.Tensor, fmt, expected: torch.Tensor) -> None:
    """qdq(x) and dequantize(quantize(x)) both equal the hand-written expected, bit for bit."""
    assert_bits_equal(rotfn.qdq(x, fmt), expected, name=f"qdq {fmt!r}")
    assert_bits_equal(rotfn.dequantize(rotfn.quantize(x, fmt)), expected, name=f"dequantize(quantize) {fmt!r}")


# ===== 1. E2M1 ======================================================================
# code -> value, from "magnitudes of codes 0..7: 0, 0.5, 1, 1.5, 2, 3, 4, 6", sign in bit 3.
E2M1_TABLE = [
    (0, 0.0), (1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0), (5, 3.0), (6, 4.0), (7, 6.0),
    (8, -0.0), (9, -0.5), (10, -1.0), (11, -1.5), (12, -2.0), (13, -3.0), (14, -4.0), (15, -6.0),
]

# midpoint, grid value below, grid value above, where RNE sends the exact midpoint (the even code)
E2M1_TIES = [
    (0.25, 0.0, 0.5, 0.0),
    (0.75, 0.5, 1.0, 1.0),
    (1.25, 1.0, 1.5, 1.0),
    (1.75, 1.5, 2.0, 2.0),
    (2.5, 2.0, 3.0, 2.0),
    (3.5, 3.0, 4.0, 4.0),
    (5.0, 4.0, 6.0, 4.0),
]

E2M1_ROUNDING = (
    # the FORMATS.md list
    [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),
     (0.2500001, 0.5), (above(5.0), 6.0), (6.0, 6.0), (-0.25, -0.0)]
    # exact ties and their fp32 neighbours, both signs
    + [(s * mid, s * tie) for mid, _, _, tie in E2M1_TIES for s in (1.0, -1.0)]
    + [(s * below(mid), s * lo) for mid, lo, _, _ in E2M1_TIES for s in (1.0, -1.0)]
    + [(s * above(mid), s * hi) for mid, _, hi, _ in E2M1_TIES for s in (1.0, -1.0)]
    # off-tie values, zeros, tiny values keep their sign
    + [(0.1, 0.0), (0.3, 0.5), (1.1, 1.0), (2.9, 3.0), (4.9, 4.0), (-2.6, -3.0),
       (0.0, 0.0), (-0.0, -0.0), (1e-45, 0.0), (-1e-45, -0.0), (-0.2, -0.0)]
    # saturation at +-6
    + [(above(6.0), 6.0), (6.5, 6.0), (7.0, 6.0), (1e30, 6.0), (FP32_MAX, 6.0), (INF, 6.0),
       (-6.0, -6.0), (-7.0, -6.0), (-FP32_MAX, -6.0), (-INF, -6.0)]
)


def test_e2m1_decode_all_16_codes():
    codes = torch.tensor([c for c, _ in E2M1_TABLE], dtype=torch.uint8)
    assert_bits_equal(e2m1_decode(codes), f32([v for _, v in E2M1_TABLE]), name="e2m1_decode")


@pytest.mark.parametrize("code, value", E2M1_TABLE)
def test_e2m1_encode_grid_value_gives_its_code(code, value):
    got = e2m1_encode(f32([value]))
    assert got.dtype == torch.uint8
    assert got.tolist() == [code]


@pytest.mark.parametrize("x, expected", E2M1_ROUNDING, ids=lambda v: repr(v))
def test_e2m1_rounding(x, expected):
    got = e2m1_decode(e2m1_encode(f32([x])))
    assert_bits_equal(got, f32([expected]), name=f"E2M1_RNE({x!r})")


# ===== 2. E4M3 ======================================================================
def e4m3_by_hand(byte: int) -> float:
    """Bias 7, 3 mantissa bits, exponent field 0 = subnormal (m * 2^-9), S.1111.111 = NaN, no Inf."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0xF and man == 0x7:
        return NAN
    if exp == 0:
        return sign * man * 2.0**-9
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


E4M3_NAMED = [
    (0x00, 0.0), (0x80, -0.0), (0x01, 2.0**-9), (0x81, -(2.0**-9)), (0x07, 7 * 2.0**-9),
    (0x08, 2.0**-6), (0x38, 1.0), (0x39, 1.125), (0x3A, 1.25), (0x70, 128.0), (0x77, 240.0),
    (0x78, 256.0), (0x7E, 448.0), (0xFE, -448.0),
]


def test_e4m3_all_256_bytes_decode():
    decoded = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    expected = f32([e4m3_by_hand(b) for b in range(256)])
    nan = torch.isnan(expected)
    assert nan.nonzero().flatten().tolist() == [0x7F, 0xFF]
    assert torch.equal(torch.isnan(decoded), nan)
    assert_bits_equal(decoded[~nan], expected[~nan], name="e4m3 decode")
    assert not torch.isinf(decoded).any()
    finite = decoded[~nan]
    assert finite.max().item() == 448.0 and finite.min().item() == -448.0
    assert finite[finite > 0].min().item() == 2.0**-9


@pytest.mark.parametrize("byte, value", E4M3_NAMED, ids=lambda v: repr(v))
def test_e4m3_named_bytes(byte, value):
    got = torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    assert_bits_equal(got, f32([value]), name=f"e4m3 0x{byte:02X}")


E4M3_ROUNDING = [
    (1.0625, 1.0),                # midpoint 1.0 | 1.125 -> even mantissa 000
    (above(1.0625), 1.125),
    (below(1.0625), 1.0),
    (1.1875, 1.25),               # midpoint 1.125 | 1.25 -> even mantissa 010
    (below(1.1875), 1.125),
    (-1.0625, -1.0),
    (-1.1875, -1.25),
    (272.0, 256.0),               # 256 | 288
    (304.0, 320.0),               # 288 | 320
    (440.0, 448.0),               # 416 | 448
    (3 * 2.0**-10, 2.0**-8),      # subnormal tie 1 | 2 (x 2^-9) -> 2
    (5 * 2.0**-10, 2.0**-8),      # subnormal tie 2 | 3 -> 2
    (7 * 2.0**-10, 2.0**-7),      # subnormal tie 3 | 4 -> 4
    (2.0**-10, 0.0),              # tie 0 | min subnormal -> 0
    (above(2.0**-10), 2.0**-9),
    (-(2.0**-10), -0.0),
    (15 * 2.0**-10, 2.0**-6),     # tie max subnormal (7 x 2^-9) | min normal -> min normal
    (2.0**-6 + 2.0**-10, 2.0**-6),  # tie 2^-6 | 2^-6 + 2^-9 -> 2^-6
    (0.0, 0.0),
    (-0.0, -0.0),
    (448.0, 448.0),
    (449.0, 448.0),               # clamp before the cast
    (464.0, 448.0),
    (500.0, 448.0),
    (1e30, 448.0),
    (INF, 448.0),
    (-500.0, -448.0),
    (-1e30, -448.0),
    (-INF, -448.0),
]


@pytest.mark.parametrize("x, expected", E4M3_ROUNDING, ids=lambda v: repr(v))
def test_e4m3_round(x, expected):
    got = e4m3_round(f32([x]))
    assert got.dtype == torch.float8_e4m3fn
    assert_bits_equal(got.float(), f32([expected]), name=f"E4M3_RNE({x!r})")


def test_e4m3_round_nan_stays_nan():
    assert torch.isnan(e4m3_round(f32([NAN, 1.0])).float()).tolist() == [True, False]


# ===== 3. E8M0 scale bytes ============================================================
def test_e8m0_byte_b_means_two_to_the_b_minus_127():
    # A block whose amax is 6 * 2^(b-127) has e_a = b - 125, so floor gives e = b - 127: byte b.
    # That reaches every byte 0..252 (byte 0: amax 1.5 * 2^-125, still normal).
    bs = list(range(253))
    x = torch.zeros(len(bs), 32)
    x[:, 0] = f32([6.0 * 2.0 ** (b - 127) for b in bs])
    q = rotfn.quantize(x, rotfn.mxfp4())
    assert q.scales.dtype == torch.float8_e8m0fnu
    assert q.scales.shape == (253, 1)
    assert scale_bytes(q).flatten().tolist() == bs
    assert_bits_equal(q.scales.float().flatten(), f32([2.0 ** (b - 127) for b in bs]), name="e8m0 value")
    assert_bits_equal(rotfn.qdq(x, rotfn.mxfp4()), x, name="6 * 2^(b-127) is on the grid")


# ===== 4. MXFP4 =======================================================================
# (rule, amax, byte, qdq(amax)); the block is [amax, 0, ..., 0, -amax].
MX_RULE_CHECKS = [
    ("floor", 6.0, 127, 6.0),
    ("even", 6.0, 127, 6.0),
    ("rceil", 6.0, 127, 6.0),
    ("floor", 7.0, 127, 6.0),
    ("even", 7.0, 128, 8.0),
    ("rceil", 7.0, 128, 8.0),
    ("floor", 1.51, 125, 1.5),
    ("even", 1.51, 125, 1.5),   # 1.51 + half an E2M1 ulp < 2: no carry, as floor
    ("rceil", 1.51, 126, 1.5),  # 1.51 * 2 = 3.02 -> 3
    ("floor", 1.75, 125, 1.5),
    ("even", 1.75, 126, 2.0),
    ("rceil", 1.75, 126, 2.0),  # 1.75 * 2 = 3.5 -> 4 (tie to even)
    ("floor", 0.0, 0, 0.0),
    ("even", 0.0, 0, 0.0),
    ("rceil", 0.0, 0, 0.0),
    ("floor", 12.0, 128, 12.0),
    ("floor", 0.5, 124, 0.5),
]


@pytest.mark.parametrize("rule, amax, byte, y", MX_RULE_CHECKS)
def test_mxfp4_scale_rule_checks(rule, amax, byte, y):
    fmt = rotfn.mxfp4(rule)
    x = f32(padded([amax], 31) + [-amax])
    q = rotfn.quantize(x, fmt)
    assert q.scales.dtype == torch.float8_e8m0fnu
    assert scale_bytes(q).tolist() == [byte]
    assert_qdq(x, fmt, f32(padded([y], 31) + [-y]))


# Elements of one block rounded on the scaled grid: (amax, inputs, outputs); floor scale 2^(e_a - 2).
MX_ELEMENT_CASES = [
    (6.0, [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -3.5, -0.25, 0.3],
          [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, -0.0, 0.5]),
    (12.0, [12.0, 5.0, 10.0, 0.5, 0.5000001, -7.0, 11.0],    # scale 2: x/2 on the E2M1 grid
           [12.0, 4.0, 8.0, 0.0, 1.0, -8.0, 12.0]),
    (0.375, [0.375, 0.1, 0.15625, -0.03125, -0.015625],    # e_a = -2, scale 2^-4: x * 16 on the grid
            [0.375, 0.09375, 0.125, -0.03125, -0.0]),
]


@pytest.mark.parametrize("amax, xs, ys", MX_ELEMENT_CASES)
def test_mxfp4_elements_round_on_scaled_grid(amax, xs, ys):
    fmt = rotfn.mxfp4()
    x = f32(padded(xs, 32))
    assert_qdq(x, fmt, f32(padded(ys, 32)))


@pytest.mark.parametrize("rule", RULES)
def test_mxfp4_all_zero_block(rule):
    fmt = rotfn.mxfp4(rule)
    x = torch.zeros(2, 32)
    x[1] = -0.0
    q = rotfn.quantize(x, fmt)
    assert scale_bytes(q).tolist() == [[0], [0]]
    expected = torch.zeros(2, 32)
    expected[1] = -0.0
    assert_qdq(x, fmt, expected)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "+inf", "-inf"])
def test_mxfp4_non_finite_block_is_nan_and_neighbours_untouched(rule, bad):
    fmt = rotfn.mxfp4(rule)
    x = f32(padded([6.0, 0.75, -1.25], 32) + padded([1.0, bad, 2.0], 32) + padded([-6.0, 2.5], 32))
    q = rotfn.quantize(x, fmt)
    assert scale_bytes(q).tolist() == [127, 0xFF, 127]
    assert torch.isnan(q.scales.float()).tolist() == [False, True, False]
    y = rotfn.qdq(x, fmt)
    assert torch.isnan(y[32:64]).all()
    assert_bits_equal(y[:32], f32(padded([6.0, 1.0, -1.0], 32)), name="block before")
    assert_bits_equal(y[64:], f32(padded([-6.0, 2.0], 32)), name="block after")
    assert_bits_equal(rotfn.dequantize(q), y, name="dequantize(quantize) vs qdq")


SUBNORMAL_BLOCKS = [
    # amax 2^-127 (subnormal): e_a = -127, e = clamp(-129) = -127, byte 0; x * 2^127 = 1, .5, .75, .125
    ([2.0**-127, 2.0**-128, 3 * 2.0**-129, 2.0**-130, -(2.0**-130)],
     [2.0**-127, 2.0**-128, 2.0**-127, 0.0, -0.0]),
    # amax 2^-130: x * 2^127 = 0.125 -> 0
    ([2.0**-130, -(2.0**-130), 2.0**-149], [0.0, -0.0, 0.0]),
]


@pytest.mark.parametrize("rule", ["floor", "even"])
@pytest.mark.parametrize("xs, ys", SUBNORMAL_BLOCKS)
def test_mxfp4_subnormal_block(rule, xs, ys):
    fmt = rotfn.mxfp4(rule)
    x = f32(padded(xs, 32))
    assert scale_bytes(rotfn.quantize(x, fmt)).tolist() == [0]
    assert_qdq(x, fmt, f32(padded(ys, 32)))


RCEIL_SUBNORMAL_D = [
    # d = amax * fp32(1/6) is subnormal: it rounds up to a power of two like any other d.
    # amax 2^-127: d ~ 2^-129.6 <= 2^-127 -> e = -127, byte 0; 2^-128 * 2^127 = 0.5 stays
    ([2.0**-127, 2.0**-128], 0, [2.0**-127, 2.0**-128]),
    # amax 2^-124: d ~ 1.33 * 2^-127 > 2^-127 -> e = -126, byte 1; 2^-124 * 2^126 = 4
    ([2.0**-124, 2.0**-128], 1, [2.0**-124, 0.0]),
    # amax 6 * 2^-127 = 1.5 * 2^-125: d rounds to 2^-127 (not above it) -> byte 0, 6 stays 6
    ([6 * 2.0**-127], 0, [6 * 2.0**-127]),
]


@pytest.mark.parametrize("xs, byte, ys", RCEIL_SUBNORMAL_D)
def test_mxfp4_rceil_subnormal_d_rounds_up_to_a_power_of_two(xs, byte, ys):
    fmt = rotfn.mxfp4("rceil")
    x = f32(padded(xs, 32))
    assert scale_bytes(rotfn.quantize(x, fmt)).tolist() == [byte]
    assert_qdq(x, fmt, f32(padded(ys, 32)))


def test_mxfp4_max_fp32_floor():
    # e_a = 127, e = 125, byte 252; max * 2^-125 = 7.99999952 -> 6; 2^127 * 2^-125 = 4
    fmt = rotfn.mxfp4("floor")
    x = f32(padded([FP32_MAX, -FP32_MAX, 2.0**127], 32))
    assert scale_bytes(rotfn.quantize(x, fmt)).tolist() == [252]
    assert_qdq(x, fmt, f32(padded([6 * 2.0**125, -6 * 2.0**125, 2.0**127], 32)))


@pytest.mark.parametrize("rule", ["even", "rceil"])
def test_mxfp4_max_fp32_even_rceil_follow_the_rules_to_inf(rule):
    # even: amax rounds up to 2^128, e = 126. rceil: d = max/6 has exponent 125 and a mantissa, e = 126.
    # Byte 253; max * 2^-126 = 3.99999976 -> E2M1 4, and 4 * 2^126 = 2^128 overflows fp32 (step 6
    # of FORMATS.md), so the literal rules give +-inf here. See the report on this suite.
    fmt = rotfn.mxfp4(rule)
    x = f32(padded([FP32_MAX, -FP32_MAX, 2.0**127], 32))
    assert scale_bytes(rotfn.quantize(x, fmt)).tolist() == [253]
    assert_qdq(x, fmt, f32(padded([INF, -INF, 2.0**127], 32)))


def test_mxfp4_negative_zero_preserved():
    fmt = rotfn.mxfp4()
    x = f32(padded([6.0, -0.0, -0.1, -0.25, 0.0], 32))
    assert_qdq(x, fmt, f32(padded([6.0, -0.0, -0.0, -0.0, 0.0], 32)))


def test_mxfp4_packing_two_codes_per_byte_low_nibble_first():
    fmt = rotfn.mxfp4()
    x = torch.zeros(2, 64)
    x[0, :6] = f32([0.5, -1.0, 6.0, -0.0, 1.5, 3.0])   # codes 1, 0xA, 7, 8, 3, 5
    x[1, :4] = f32([-6.0, 4.0, 2.0, -0.5])             # codes 0xF, 6, 4, 9
    q = rotfn.quantize(x, fmt)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (2, 32)
    assert q.scales.shape == (2, 2)
    expected = torch.zeros(2, 32, dtype=torch.uint8)
    expected[0, :3] = torch.tensor([0xA1, 0x87, 0x53], dtype=torch.uint8)
    expected[1, :2] = torch.tensor([0x6F, 0x94], dtype=torch.uint8)
    assert_bits_equal(q.codes, expected, name="packed codes")
    assert scale_bytes(q).tolist() == [[127, 0], [127, 0]]


def test_mxfp4_leading_dims_shapes():
    q = rotfn.quantize(torch.ones(2, 3, 64), rotfn.mxfp4())
    assert q.codes.shape == (2, 3, 32) and q.scales.shape == (2, 3, 2)
    assert q.shape == (2, 3, 64) and q.dtype == F32


# ===== 5. MXFP8 =======================================================================
# (rule, block head, byte, qdq of the head); the rest of the block is zeros.
MXFP8_CASES = [
    # amax 448: e_a = 8, e = 0, byte 127, elements on the E4M3 grid
    ("floor", [448.0, 1.0625, 1.1875, 300.0, -0.0, 3 * 2.0**-10, -(2.0**-10)], 127,
     [448.0, 1.0, 1.25, 288.0, -0.0, 2.0**-8, -0.0]),
    # amax 500: e_a = 8, byte 127; 500 saturates to 448; 250 -> 256 (step 16)
    ("floor", [500.0, 250.0], 127, [448.0, 256.0]),
    # amax 1: e = -8, byte 119; x * 256: 2^-17 -> 2^-9 (min subnormal), 2^-18 -> 2^-10 tie -> 0
    ("floor", [1.0, 2.0**-17, 2.0**-18, 1.0625], 119, [1.0, 2.0**-17, 0.0, 1.0]),
    # rceil: d = 448 * fp32(1/448) = 1 exactly: byte 127
    ("rceil", [448.0, 300.0], 127, [448.0, 288.0]),
    # rceil: d = 500/448 has a mantissa: e = 1, byte 128; 250 -> 256, 125 -> 128, times 2
    ("rceil", [500.0, 250.0], 128, [512.0, 256.0]),
    # even (E4M3 has 3 mantissa bits: add 1 << 19): 480 = 1.875 * 2^8 stays, byte 127, saturates to 448
    ("even", [480.0, 1.0], 127, [448.0, 1.0]),
    # 496 = 1.9375 * 2^8 rounds up to 2^9: byte 128; 496 / 2 = 248 tie 240 | 256 -> 256; 1 / 2 exact
    ("even", [496.0, 1.0], 128, [512.0, 1.0]),
]


@pytest.mark.parametrize("rule, xs, byte, ys", MXFP8_CASES)
def test_mxfp8_hand_cases(rule, xs, byte, ys):
    fmt = rotfn.mxfp8(rule)
    x = f32(padded(xs, 32))
    q = rotfn.quantize(x, fmt)
    assert q.codes.dtype == torch.float8_e4m3fn and q.codes.shape == (32,)
    assert q.scales.dtype == torch.float8_e8m0fnu
    assert scale_bytes(q).tolist() == [byte]
    assert_qdq(x, fmt, f32(padded(ys, 32)))


def test_mxfp8_non_finite_block():
    fmt = rotfn.mxfp8()
    x = f32(padded([448.0, 1.0625], 32) + padded([INF, 1.0], 32))
    q = rotfn.quantize(x, fmt)
    assert scale_bytes(q).tolist() == [127, 0xFF]
    y = rotfn.qdq(x, fmt)
    assert torch.isnan(y[32:]).all()
    assert_bits_equal(y[:32], f32(padded([448.0, 1.0], 32)), name="finite block")


# ===== 6. NVFP4 =======================================================================
S_G_12 = f32(12.0) / f32(2688.0)  # the worked example's global scale, one fp32 division


def nvfp4_worked_example_x() -> torch.Tensor:
    return f32(padded([3.3, 0.9], 16) + padded([12.0, 10.0, 7.5, 4.9], 16))


def nvfp4_worked_example_y() -> torch.Tensor:
    # y = (q * s_b) * s_g; q * s_b is exact: 6*120, 1.5*120 | 6*448, 4*448, 4*448, 2*448
    head0 = f32([720.0, 180.0]) * S_G_12
    head1 = f32([2688.0, 1792.0, 1792.0, 896.0]) * S_G_12
    return torch.cat([head0, torch.zeros(14), head1, torch.zeros(12)])


def test_nvfp4_worked_example():
    fmt = rotfn.nvfp4()
    x = nvfp4_worked_example_x()
    q = rotfn.quantize(x, fmt)
    assert q.global_scale.dtype == F32 and q.global_scale.shape == ()
    assert_bits_equal(q.global_scale, S_G_12, name="s_g")
    assert q.scales.dtype == torch.float8_e4m3fn and q.scales.shape == (2,)
    assert q.scales.float().tolist() == [120.0, 448.0]
    assert scale_bytes(q).tolist() == [0x6F, 0x7E]     # 120 = 1.875 * 2^6, 448 = 1.75 * 2^8
    expected_codes = torch.zeros(16, dtype=torch.uint8)
    # block 0: 3.3 -> 6 (code 7), 0.9 -> 1.5 (code 3); block 1: 12 -> 6 (7), 10 -> 4 (6), 7.5 -> 4 (6), 4.9 -> 2 (4)
    expected_codes[[0, 8, 9]] = torch.tensor([0x37, 0x67, 0x46], dtype=torch.uint8)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (16,)
    assert_bits_equal(q.codes, expected_codes, name="codes")
    assert_qdq(x, fmt, nvfp4_worked_example_y())


def test_nvfp4_zero_blocks():
    fmt = rotfn.nvfp4()
    x = f32(padded([-0.0], 16) + padded([12.0, 10.0], 16))
    q = rotfn.quantize(x, fmt)
    # s_b = E4M3(clamp(0, 2^-9, 448)) = 2^-9 = byte 0x01
    assert scale_bytes(q).tolist() == [0x01, 0x7E]
    expected = torch.cat([f32(padded([-0.0], 16)), f32([2688.0, 1792.0]) * S_G_12, torch.zeros(14)])
    assert_qdq(x, fmt, expected)


def test_nvfp4_all_zero_tensor():
    # FORMATS.md: a zero block gives zeros; rotfn.nvfp4's docstring: s_g = 1 for an all-zero tensor.
    fmt = rotfn.nvfp4()
    x = torch.zeros(2, 32)
    x[1, 5] = -0.0
    q = rotfn.quantize(x, fmt)
    assert_bits_equal(q.global_scale, f32(1.0), name="s_g")
    assert_qdq(x, fmt, x.clone())


def test_nvfp4_non_finite_blocks_and_global_scale_over_finite_values():
    fmt = rotfn.nvfp4()
    x = torch.cat([nvfp4_worked_example_x(), f32(padded([NAN, 1.0], 16)), f32(padded([INF, -INF, 2.0], 16))])
    q = rotfn.quantize(x, fmt)
    assert_bits_equal(q.global_scale, S_G_12, name="s_g over the finite values")
    y = rotfn.qdq(x, fmt)
    assert torch.isnan(y[32:]).all()
    assert_bits_equal(y[:32], nvfp4_worked_example_y(), name="finite blocks")
    assert_bits_equal(rotfn.dequantize(q), y, name="dequantize(quantize) vs qdq")


# (global_scale, block head, s_b, qdq of the head)
NVFP4_GIVEN_SCALE_CASES = [
    # s_g = 1: 6.375 / 6 = 1.0625 -> E4M3 tie -> s_b 1.0; 6.375 -> 6; 5 -> 4; -2.5 -> -2; 0.25 -> 0
    (None, [6.375, 5.0, -2.5, 0.25, -0.0], 1.0, [6.0, 4.0, -2.0, 0.0, -0.0]),
    # 7.125 / 6 = 1.1875 -> tie -> s_b 1.25; 7.125 / 1.25 = 5.7 -> 6 -> 7.5; 2.5 / 1.25 = 2 -> 2.5
    (None, [7.125, 2.5], 1.25, [7.5, 2.5]),
    # 10752 / 6 = 1792 clamps to 448; 10752 / 448 = 24 clamps to 6 -> 2688
    (None, [10752.0, -448.0], 448.0, [2688.0, -448.0]),
    # 6 * 2^-12 / 6 = 2^-12 clamps up to 2^-9; 0.75 tie -> 1 -> 2^-9
    (None, [6 * 2.0**-12], 2.0**-9, [2.0**-9]),
    # s_g = 0.5: s_b = 6/6/0.5 = 2; s_b * s_g = 1
    (0.5, [6.0, 3.0, -1.5, 0.7], 2.0, [6.0, 3.0, -1.5, 0.5]),
    # s_g = 3: 6/6/3 = 0.333 -> E4M3 0.34375 (step 2^-5 in [0.25, 0.5)); s_b * s_g = 1.03125;
    # 6 / 1.03125 = 5.82 -> 6 -> 6 * 0.34375 * 3; 2 / 1.03125 = 1.94 -> 2
    (3.0, [6.0, 2.0], 0.34375, [6.1875, 2.0625]),
]


@pytest.mark.parametrize("global_scale, xs, s_b, ys", NVFP4_GIVEN_SCALE_CASES)
def test_nvfp4_given_global_scale(global_scale, xs, s_b, ys):
    fmt = rotfn.nvfp4(global_scale)
    x = f32(padded(xs, 16))
    q = rotfn.quantize(x, fmt)
    assert q.global_scale.dtype == F32 and q.global_scale.shape == ()
    assert q.global_scale.item() == (1.0 if global_scale is None else global_scale)
    assert q.scales.float().tolist() == [s_b]
    assert_qdq(x, fmt, f32(padded(ys, 16)))


def test_nvfp4_stored_dtypes_and_shapes():
    q = rotfn.quantize(torch.ones(3, 64), rotfn.nvfp4())
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (3, 32)
    assert q.scales.dtype == torch.float8_e4m3fn and q.scales.shape == (3, 4)
    assert q.global_scale.dtype == F32 and q.global_scale.shape == ()


# ===== 7. intq ========================================================================
# (fmt kwargs, rows, expected scales [rows, G], expected qdq)
INTQ_SYMMETRIC_CASES = [
    # 4-bit, s = 7 / 7 = 1; 2.5 -> 2, -3.5 -> -4, +-0.5 -> 0 (integer codes have no -0)
    (dict(bits=4), [[7.0, 2.5, -3.5, 0.5, -0.5, 1.4, -7.0]], [[1.0]],
     [[7.0, 2.0, -4.0, 0.0, 0.0, 1.0, -7.0]]),
    # 4-bit, s = 3.5 / 7 = 0.5: 1.25 -> 2.5 -> 2; -0.75 -> -1.5 -> -2; 0.25 -> 0.5 -> 0
    (dict(bits=4), [[3.5, 1.25, -0.75, 0.25]], [[0.5]], [[3.5, 1.0, -1.0, 0.0]]),
    # 8-bit, s = 127 / 127 = 1: 63.5 -> 64, -62.5 -> -62
    (dict(bits=8), [[127.0, 63.5, -62.5, 0.5, -127.0]], [[1.0]], [[127.0, 64.0, -62.0, 0.0, -127.0]]),
    # 8-bit, s = 254 / 127 = 2: 5 -> 2.5 -> 2; -3 -> -1.5 -> -2
    (dict(bits=8), [[254.0, 5.0, -3.0]], [[2.0]], [[254.0, 4.0, -4.0]]),
    # 3-bit, s = 3 / 3 = 1
    (dict(bits=3), [[3.0, -3.0, 1.5, -2.5]], [[1.0]], [[3.0, -3.0, 2.0, -2.0]]),
    # 2-bit, s = 1: codes in [-2, 1]
    (dict(bits=2), [[1.0, -1.0, 0.5, -0.6]], [[1.0]], [[1.0, -1.0, 0.0, -1.0]]),
    # clip 0.5: s = 0.5 * 14 / 7 = 1; values beyond saturate to [-8, 7]
    (dict(bits=4, clip=0.5), [[14.0, -14.0, 3.5, -9.0, 6.5]], [[1.0]], [[7.0, -8.0, 4.0, -8.0, 6.0]]),
    # group 4: s = 1 and 2
    (dict(bits=4, group=4), [[7.0, 1.0, -2.5, 0.0, 14.0, 5.0, -3.0, 1.0]], [[1.0, 2.0]],
     [[7.0, 1.0, -2.0, 0.0, 14.0, 4.0, -4.0, 0.0]]),
    # group None: one scale per row
    (dict(bits=4), [[7.0, 2.5], [-14.0, 5.0]], [[1.0], [2.0]], [[7.0, 2.0], [-14.0, 4.0]]),
    # all-zero group: s = 1, zeros
    (dict(bits=4, group=2), [[0.0, -0.0, 7.0, 1.0]], [[1.0, 1.0]], [[0.0, 0.0, 7.0, 1.0]]),
]


@pytest.mark.parametrize("kwargs, xs, scales, ys", INTQ_SYMMETRIC_CASES)
def test_intq_symmetric(kwargs, xs, scales, ys):
    fmt = rotfn.intq(**kwargs)
    x = f32(xs)
    q = rotfn.quantize(x, fmt)
    assert q.scales.dtype == F32
    assert_bits_equal(q.scales, f32(scales), name="scales")
    assert q.zero_points is None
    assert_qdq(x, fmt, f32(ys))


# (fmt kwargs, row, scale, zero point, codes before packing, qdq)
INTQ_ASYMMETRIC_CASES = [
    # range [-3, 12], s = 1, z = 3
    (dict(bits=4), [-3.0, 12.0, 0.5, 1.5, 2.5, -2.5], 1.0, 3, [0, 15, 3, 5, 5, 1], [-3.0, 12.0, 0.0, 2.0, 2.0, -2.0]),
    # positive only: range [0, 15] (zero included), s = 1, z = 0
    (dict(bits=4), [1.0, 15.0, 7.5, 2.5], 1.0, 0, [1, 15, 8, 2], [1.0, 15.0, 8.0, 2.0]),
    # negative only: range [-15, 0], s = 1, z = 15; -7.5 -> -8
    (dict(bits=4), [-15.0, -1.0, -7.5], 1.0, 15, [0, 14, 7], [-15.0, -1.0, -8.0]),
    # z = RNE(2.5) = 2
    (dict(bits=4), [-2.5, 12.5], 1.0, 2, [0, 14], [-2.0, 12.0]),
    # z = RNE(3.5) = 4; 11.5 -> 12 + 4 = 16 clamps to 15
    (dict(bits=4), [-3.5, 11.5], 1.0, 4, [0, 15], [-4.0, 11.0]),
    # range [-2, 5.5], s = 0.5, z = 4
    (dict(bits=4), [-2.0, 5.5, 0.3, -0.75], 0.5, 4, [0, 15, 5, 2], [-2.0, 5.5, 0.5, -1.0]),
    # 2-bit: range [-1, 2], s = 1, z = 1
    (dict(bits=2), [-1.0, 2.0, 0.5], 1.0, 1, [0, 3, 1], [-1.0, 2.0, 0.0]),
    # 8-bit: range [0, 255], s = 1, z = 0
    (dict(bits=8), [0.0, 255.0, 127.5], 1.0, 0, [0, 255, 128], [0.0, 255.0, 128.0]),
    # 8-bit: range [-128, 127], s = 1, z = 128
    (dict(bits=8), [-128.0, 127.0, 0.5], 1.0, 128, [0, 255, 128], [-128.0, 127.0, 0.0]),
    # all-zero group: s = 1, z = 0
    (dict(bits=4), [0.0, 0.0], 1.0, 0, [0, 0], [0.0, 0.0]),
]


def packed(codes: list[int]) -> list[int]:
    """Two 4-bit codes per byte, lower index in the low nibble (odd count: high nibble 0)."""
    codes = codes + [0] * (len(codes) % 2)
    return [codes[i] | codes[i + 1] << 4 for i in range(0, len(codes), 2)]


@pytest.mark.parametrize("kwargs, xs, scale, zero, codes, ys", INTQ_ASYMMETRIC_CASES)
def test_intq_asymmetric(kwargs, xs, scale, zero, codes, ys):
    fmt = rotfn.intq(**kwargs, symmetric=False)
    x = f32([xs])
    q = rotfn.quantize(x, fmt)
    assert_bits_equal(q.scales, f32([[scale]]), name="scale")
    assert q.zero_points.dtype == torch.uint8 and q.zero_points.tolist() == [[zero]]
    assert q.codes.dtype == torch.uint8
    assert q.codes.tolist() == [packed(codes) if kwargs["bits"] <= 4 else codes]
    assert_qdq(x, fmt, f32([ys]))


INTQ_PACKED_SIGNED = [
    # (bits, clip, row, signed codes, packed bytes); nibbles are two's complement
    (4, 1.0, [-1.0, 2.0, 7.0, -7.0], [-1, 2, 7, -7], [0x2F, 0x97]),
    (4, 0.5, [-14.0, 14.0, -3.0, 0.0, 1.0], [-8, 7, -3, 0, 1], [0x78, 0x0D, 0x01]),
    (2, 1.0, [1.0, -1.0, 0.0, 0.4], [1, -1, 0, 0], [0xF1, 0x00]),
    (2, 0.5, [-2.0, 2.0], [-2, 1], [0x1E]),
    (3, 1.0, [3.0, -3.0, -2.0, 1.0], [3, -3, -2, 1], [0xD3, 0x1E]),
]


@pytest.mark.parametrize("bits, clip, xs, ints, bytes_", INTQ_PACKED_SIGNED)
def test_intq_signed_nibbles_packed(bits, clip, xs, ints, bytes_):
    q = rotfn.quantize(f32([xs]), rotfn.intq(bits, clip=clip))
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (1, len(bytes_))
    assert packed([i & 0xF for i in ints]) == bytes_  # the table itself is consistent
    assert q.codes.tolist() == [bytes_]


def test_intq_8bit_codes_not_packed():
    q = rotfn.quantize(f32([[127.0, 63.5, -62.5, -127.0]]), rotfn.intq(8))
    assert q.codes.dtype == torch.int8 and q.codes.tolist() == [[127, 64, -62, -127]]


# ===== 8. fp8 =========================================================================
# (granularity, rows, scales, qdq)
FP8_CASES = [
    # amax 448: s = 1; elements on the E4M3 grid
    ("tensor", [[448.0, 1.0625, -1.1875, 300.0], [3 * 2.0**-10, 2.0**-10, 0.0, -0.0]], 1.0,
     [[448.0, 1.0, -1.25, 288.0], [2.0**-8, 0.0, 0.0, -0.0]]),
    # amax 7: s = 7/448 = 2^-6; 1.1 * 64 = 70.4 -> 72 -> 1.125
    ("tensor", [[7.0, 1.1, -0.5]], 2.0**-6, [[7.0, 1.125, -0.5]]),
    # per row: s = 896/448 = 2 and 0.875/448 = 2^-9; -0.1 * 512 = -51.2 -> -52 -> -0.1015625
    ("token", [[896.0, 2.0, -1.5], [0.875, -0.1, 0.0]], [[2.0], [2.0**-9]],
     [[896.0, 2.0, -1.5], [0.875, -0.1015625, 0.0]]),
    ("channel", [[896.0, 2.0, -1.5], [0.875, -0.1, 0.0]], [[2.0], [2.0**-9]],
     [[896.0, 2.0, -1.5], [0.875, -0.1015625, 0.0]]),
]


@pytest.mark.parametrize("granularity, xs, scales, ys", FP8_CASES)
def test_fp8(granularity, xs, scales, ys):
    fmt = rotfn.fp8(granularity)
    x = f32(xs)
    q = rotfn.quantize(x, fmt)
    assert q.codes.dtype == torch.float8_e4m3fn and q.codes.shape == x.shape
    assert q.scales.dtype == F32
    assert_bits_equal(q.scales, f32(scales), name="scales")
    assert_qdq(x, fmt, f32(ys))


@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_fp8_zero_tensor_gives_zeros(granularity):
    fmt = rotfn.fp8(granularity)
    x = torch.zeros(2, 8)
    x[1, 3] = -0.0
    assert_qdq(x, fmt, x.clone())


def test_fp8_zero_row_per_token():
    fmt = rotfn.fp8("token")
    x = f32([[0.0, -0.0], [448.0, 1.0625]])
    assert_qdq(x, fmt, f32([[0.0, -0.0], [448.0, 1.0]]))


# ===== 9. dequantize(quantize) == qdq, and dtypes ======================================
GOLDEN_INPUTS = [
    ("mxfp4-floor", rotfn.mxfp4("floor"), lambda: f32(padded([7.0, 1.75, NAN], 32) + padded([1.51, -0.0], 32))),
    ("mxfp4-even", rotfn.mxfp4("even"), lambda: f32(padded([7.0, 1.75], 32) + padded([INF], 32))),
    ("mxfp4-rceil", rotfn.mxfp4("rceil"), lambda: f32(padded([1.51, 2.0**-127], 32) + padded([-INF, 1.0], 32))),
    ("mxfp4-max", rotfn.mxfp4("even"), lambda: f32(padded([FP32_MAX, 2.0**-130], 32))),
    ("mxfp8-floor", rotfn.mxfp8(), lambda: f32(padded([448.0, 1.0625, 2.0**-18], 32) + padded([NAN], 32))),
    ("mxfp8-rceil", rotfn.mxfp8("rceil"), lambda: f32(padded([500.0, 250.0], 32))),
    ("nvfp4-example", rotfn.nvfp4(), nvfp4_worked_example_x),
    ("nvfp4-nan", rotfn.nvfp4(), lambda: torch.cat([nvfp4_worked_example_x(), f32(padded([NAN], 16))])),
    ("nvfp4-none", rotfn.nvfp4(None), lambda: f32(padded([6.375, 5.0, -2.5], 16) + padded([10752.0], 16))),
    ("nvfp4-3.0", rotfn.nvfp4(3.0), lambda: f32(padded([6.0, 2.0], 16))),
    ("int4", rotfn.intq(4, group=4), lambda: f32([[7.0, 1.0, -2.5, 0.0, 14.0, 5.0, -3.0, 1.0]])),
    ("int4-clip", rotfn.intq(4, clip=0.5), lambda: f32([[14.0, -14.0, 3.5, -9.0, 6.5]])),
    ("int8", rotfn.intq(8), lambda: f32([[127.0, 63.5, -62.5, 0.5]])),
    ("uint4", rotfn.intq(4, symmetric=False), lambda: f32([[-3.0, 12.0, 0.5, 2.5], [0.0, 0.0, 0.0, 0.0]])),
    ("uint8", rotfn.intq(8, symmetric=False), lambda: f32([[-128.0, 127.0, 0.5]])),
    ("fp8-tensor", rotfn.fp8(), lambda: f32([[448.0, 1.0625, -1.1875, 300.0]])),
    ("fp8-token", rotfn.fp8("token"), lambda: f32([[896.0, 2.0, -1.5], [0.875, -0.1, 0.0]])),
]


@pytest.mark.parametrize("fmt, make_x", [g[1:] for g in GOLDEN_INPUTS], ids=[g[0] for g in GOLDEN_INPUTS])
def test_dequantize_quantize_equals_qdq(fmt, make_x):
    x = make_x()
    assert_bits_equal(rotfn.dequantize(rotfn.quantize(x, fmt)), rotfn.qdq(x, fmt), name=f"{fmt!r}")


# (fmt, input, expected); every value exact in fp16 and bf16
DTYPE_CASES = [
    ("mxfp4", rotfn.mxfp4(), padded([7.0, -1.25, 0.75, 2.5, -0.0], 32), padded([6.0, -1.0, 1.0, 2.0, -0.0], 32)),
    ("mxfp4-rceil", rotfn.mxfp4("rceil"), padded([7.0, 1.75], 32), padded([8.0, 2.0], 32)),
    ("mxfp8", rotfn.mxfp8(), padded([448.0, 1.0625, 1.1875, 300.0], 32), padded([448.0, 1.0, 1.25, 288.0], 32)),
    ("nvfp4", rotfn.nvfp4(None), padded([6.0, 5.0, -2.5, 0.25], 16), padded([6.0, 4.0, -2.0, 0.0], 16)),
    ("int4", rotfn.intq(4), [7.0, 2.5, -3.5, 1.0], [7.0, 2.0, -4.0, 1.0]),
    ("uint4", rotfn.intq(4, symmetric=False), [-3.0, 12.0, 2.5], [-3.0, 12.0, 2.0]),
    ("fp8", rotfn.fp8(), [448.0, 1.0625, 300.0, -1.1875], [448.0, 1.0, 288.0, -1.25]),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fmt, xs, ys", [c[1:] for c in DTYPE_CASES], ids=[c[0] for c in DTYPE_CASES])
def test_half_inputs_keep_their_dtype(dtype, fmt, xs, ys):
    x = torch.tensor([xs], dtype=dtype)
    expected = torch.tensor([ys], dtype=dtype)
    assert_qdq(x, fmt, expected)
    assert rotfn.quantize(x, fmt).dtype == dtype
