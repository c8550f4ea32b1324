"""rotfn.metrics: typed errors on bad input, and values against closed forms."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rotfn
import rotfn.testing as rt
from rotfn.errors import ArgumentError, DTypeError, RotfnError, ShapeError
from rotfn.metrics import energy_ratio_db, sqnr_db

X = torch.tensor([1.0, -2.0, 3.0, 0.5])

BAD = [
    # (call, error type, builtin it also is, regex the message must match)
    (lambda: sqnr_db([1.0, 2.0], X), DTypeError, TypeError, r"sqnr_db: argument 'x': expected a torch.Tensor, got list; fix:"),
    (lambda: sqnr_db(X, 1.0), DTypeError, TypeError, r"sqnr_db: argument 'y': expected a torch.Tensor, got float"),
    (lambda: sqnr_db(torch.arange(4), X), DTypeError, TypeError, r"sqnr_db: argument 'x': expected a floating tensor, got torch.int64; fix: cast"),
    (lambda: sqnr_db(X, X.bool()), DTypeError, TypeError, r"sqnr_db: argument 'y': expected a floating tensor, got torch.bool"),
    (lambda: sqnr_db(X, X[:3]), ShapeError, ValueError, r"sqnr_db: argument 'y': expected x's shape \[4\], got \[3\]"),
    (lambda: sqnr_db(X, X[None]), ShapeError, ValueError, r"sqnr_db: argument 'y': expected x's shape \[4\], got \[1, 4\]"),
    (lambda: sqnr_db(X, X.to("meta")), ShapeError, ValueError, r"sqnr_db: argument 'y': expected a tensor on x's device cpu, got device meta"),
    (lambda: sqnr_db(X[:0], X[:0]), ShapeError, ValueError, r"sqnr_db: argument 'x': expected a non-empty tensor, got shape \[0\]"),
    (lambda: sqnr_db(torch.tensor([1.0, math.nan]), X[:2]), ArgumentError, ValueError, r"sqnr_db: argument 'x': expected finite values, got NaN or Inf"),
    (lambda: sqnr_db(X, torch.tensor([1.0, 2.0, math.inf, 0.5])), ArgumentError, ValueError, r"sqnr_db: argument 'y': expected finite values"),
    (lambda: sqnr_db(X, -X.bfloat16().abs() * math.inf), ArgumentError, ValueError, r"sqnr_db: argument 'y': expected finite values"),
    (lambda: energy_ratio_db("1", 1.0), DTypeError, TypeError, r"energy_ratio_db: argument 'signal': expected a real number.*got str"),
    (lambda: energy_ratio_db(1.0, True), DTypeError, TypeError, r"energy_ratio_db: argument 'noise': expected a real number.*got bool"),
    (lambda: energy_ratio_db(torch.tensor(1.0), 1.0), DTypeError, TypeError, r"energy_ratio_db: argument 'signal'.*got Tensor; fix: pass a Python float"),
    (lambda: energy_ratio_db(-1.0, 1.0), ArgumentError, ValueError, r"energy_ratio_db: argument 'signal': expected a finite energy >= 0, got -1.0"),
    (lambda: energy_ratio_db(1.0, math.nan), ArgumentError, ValueError, r"energy_ratio_db: argument 'noise': expected a finite energy >= 0, got nan"),
    (lambda: energy_ratio_db(math.inf, 1.0), ArgumentError, ValueError, r"energy_ratio_db: argument 'signal'.*got inf"),
]


@pytest.mark.parametrize("call,error,builtin,pattern", BAD, ids=[f"case{i}" for i in range(len(BAD))])
def test_bad_input_table(call, error, builtin, pattern):
    with pytest.raises(error, match=pattern) as info:
        call()
    assert isinstance(info.value, RotfnError) and isinstance(info.value, builtin)


def test_identical_tensors_have_infinite_sqnr():
    assert sqnr_db(X, X.clone()) == math.inf
    assert sqnr_db(torch.zeros(3), torch.zeros(3)) == math.inf  # no noise at all
    assert energy_ratio_db(0.0, 0.0) == math.inf


@pytest.mark.parametrize(("x", "y", "expected"), [
    (torch.ones(4), torch.zeros(4), 0.0),  # y = 0: the noise is the signal
    (torch.ones(4), torch.full((4,), 0.75), 10 * math.log10(16)),  # |x - y| = |x| / 4 everywhere: 12.04 dB
    (torch.ones(2), torch.tensor([1.25, 0.75]), 10 * math.log10(16)),  # the noise's sign does not count
    (torch.ones(100), torch.cat([torch.full((1,), 2.0), torch.ones(99)]), 20.0),  # one unit error in 100 units of energy
    (torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5]), 10 * math.log10(25 / 0.25)),
    (torch.ones(8), torch.full((8,), -1.0), 10 * math.log10(8 / 32)),  # a flipped sign: -6.02 dB
    (torch.zeros(4), torch.ones(4), -math.inf),  # no signal, some noise
], ids=["y=0", "quarter", "+-quarter", "one-of-100", "3-4-5", "flipped", "no-signal"])
def test_closed_form_values(x, y, expected):
    got = sqnr_db(x, y)
    assert got == expected if math.isinf(expected) else math.isclose(got, expected, rel_tol=1e-12, abs_tol=1e-12)


def test_energy_ratio_db_is_ten_log10_of_the_ratio():
    assert energy_ratio_db(100.0, 1.0) == 20.0
    assert energy_ratio_db(1, 1000) == -30.0
    assert energy_ratio_db(5.0, 0.0) == math.inf and energy_ratio_db(0.0, 5.0) == -math.inf


@given(x=rt.tensors(32, dtypes=(torch.float32, torch.float64)), k=st.integers(-900, 900))
def test_sqnr_is_scale_invariant_and_immune_to_overflow(x, k):
    """``sqnr(c x, c y) == sqnr(x, y)`` for a power of two c, bit for bit, even where ``(c x)^2`` overflows float64."""
    x = x.double()
    y = rotfn.qdq(x.float(), rotfn.intq(4)).double()
    scaled = sqnr_db(x * 2.0**k, y * 2.0**k)
    assert scaled == sqnr_db(x, y)
    assert math.isfinite(scaled) or bool((x == y).all())


def test_sqnr_db_sums_in_float64_whatever_the_dtypes():
    """A bf16 approximation of a float32 tensor: the same value as both in float64."""
    x = rt.make_tensor("normal", (16, 64), 0)
    y = x.bfloat16()
    assert sqnr_db(x, y) == sqnr_db(x.double(), y.double())
    x64, y64 = x.double(), y.double()
    expected = 10 * math.log10(x64.square().sum().item() / (x64 - y64).square().sum().item())
    assert math.isclose(sqnr_db(x, y), expected, rel_tol=1e-12)
