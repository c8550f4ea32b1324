"""rotfn.metrics: typed errors on bad input, values against closed forms, and properties (hypothesis)."""

import math
import pathlib
import re
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rotfn
import rotfn.testing as rt
from rotfn.errors import ArgumentError, DTypeError, RotfnError, ShapeError
from rotfn.metrics import cosine, energy_ratio_db, perplexity, rel_error, sqnr_db

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
    (lambda: rel_error(X, X[:3]), ShapeError, ValueError, r"rel_error: argument 'y': expected x's shape \[4\], got \[3\]"),
    (lambda: rel_error(X.long(), X), DTypeError, TypeError, r"rel_error: argument 'x': expected a floating tensor"),
    (lambda: rel_error(X, X, norm="l1"), ArgumentError, ValueError, r"rel_error: argument 'norm': expected one of \('fro', 'max'\), got 'l1'; fix:"),
    (lambda: rel_error(X, X * math.nan), ArgumentError, ValueError, r"rel_error: argument 'y': expected finite values"),
    (lambda: cosine(X, X[None]), ShapeError, ValueError, r"cosine: argument 'y': expected x's shape \[4\], got \[1, 4\]"),
    (lambda: cosine(torch.tensor(1.0), torch.tensor(1.0)), ShapeError, ValueError, r"cosine: argument 'x': expected rows"),
    (lambda: cosine(X, X, mean=1), DTypeError, TypeError, r"cosine: argument 'mean': expected True or False, got 1"),
    (lambda: cosine([1.0], X), DTypeError, TypeError, r"cosine: argument 'x': expected a torch.Tensor, got list"),
    (lambda: perplexity(torch.zeros(1, 4, 5), torch.zeros(1, 3, dtype=torch.long)), ShapeError, ValueError, r"perplexity: argument 'ids': expected logits' shape without its last dim \[1, 4\], got \[1, 3\]"),
    (lambda: perplexity(torch.zeros(4, 5), torch.zeros(4)), DTypeError, TypeError, r"perplexity: argument 'ids': expected an integer tensor.*got torch.float32; fix: cast with ids.long\(\)"),
    (lambda: perplexity(torch.nn.Linear(2, 5), torch.zeros(4, dtype=torch.long)), DTypeError, TypeError, r"perplexity: argument 'logits': expected a torch.Tensor of logits \[B, T, V\], got a model \(Linear\); fix: pass the logits: perplexity\(model\(ids\).logits, ids\)"),
    (lambda: perplexity(types.SimpleNamespace(logits=torch.zeros(4, 5)), torch.zeros(4, dtype=torch.long)), DTypeError, TypeError, r"perplexity: argument 'logits': expected a torch.Tensor of logits.*got a model output \(SimpleNamespace\); fix: pass the logits"),
    (lambda: perplexity(torch.zeros(4, 5), [0, 1, 2, 3]), DTypeError, TypeError, r"perplexity: argument 'ids': expected a torch.Tensor of token ids, got list"),
    (lambda: perplexity(torch.zeros(4, 5, dtype=torch.long), torch.zeros(4, dtype=torch.long)), DTypeError, TypeError, r"perplexity: argument 'logits': expected a floating tensor"),
    (lambda: perplexity(torch.zeros(5), torch.zeros((), dtype=torch.long)), ShapeError, ValueError, r"perplexity: argument 'logits': expected \[B, T, V\] or \[T, V\], got \[5\]"),
    (lambda: perplexity(torch.zeros(1, 1, 5), torch.zeros(1, 1, dtype=torch.long)), ShapeError, ValueError, r"perplexity: argument 'logits': expected at least 2 tokens"),
    (lambda: perplexity(torch.zeros(3, 5), torch.tensor([0, 5, 1])), ArgumentError, ValueError, r"perplexity: argument 'ids': expected token ids in \[0, 5\) or -100, got 5"),
    (lambda: perplexity(torch.zeros(3, 5), torch.tensor([0, -100, -100])), ArgumentError, ValueError, r"perplexity: argument 'ids': expected at least one target"),
    (lambda: perplexity(torch.full((3, 5), math.inf), torch.tensor([0, 1, 2])), ArgumentError, ValueError, r"perplexity: argument 'logits': expected finite values"),
    (lambda: perplexity(torch.zeros(3, 5), torch.tensor([0, 1, 2], device="meta")), ShapeError, ValueError, r"perplexity: argument 'ids': expected a tensor on logits' device cpu, got device meta"),
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


FEW = settings(max_examples=15)


@FEW
@given(x=rt.tensors(32, dtypes=(torch.float32, torch.float64)), k=st.integers(-60, 60))
def test_identity_and_scale_invariance_of_sqnr_rel_error_and_cosine(x, k):
    """x against itself: SQNR inf, error 0, cosine 1 (or no direction: 1 too); and one scale c on both changes nothing."""
    y = rotfn.qdq(x.float(), rotfn.intq(4)).to(x.dtype)
    assert sqnr_db(x, x) == math.inf and rel_error(x, x) == 0.0 == rel_error(x, x, norm="max")
    assert cosine(x, x) == pytest.approx(1.0, abs=1e-12)
    c = 2.0**k
    assert sqnr_db(x * c, y * c) == sqnr_db(x, y)
    assert rel_error(x * c, y * c) == rel_error(x, y) and rel_error(x * c, y * c, norm="max") == rel_error(x, y, norm="max")
    assert cosine(x * c, y * c, mean=False).equal(cosine(x, y, mean=False))


@FEW
@given(x=rt.tensors(16, dtypes=(torch.float32,)), seed=st.integers(0, 2**16), c=st.floats(1e-3, 1e3))
def test_cosine_lies_in_minus_one_one_and_is_one_for_positive_multiples(x, seed, c):
    y = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    per_row = cosine(x, y, mean=False)
    assert per_row.dtype == torch.float64 and per_row.shape == x.shape[:-1]
    assert bool(((per_row >= -1) & (per_row <= 1)).all())
    assert cosine(x, y) == pytest.approx(per_row.mean().item(), abs=1e-15)
    nonzero = x.abs().amax(-1) > 0
    assert torch.allclose(cosine(x, x * c, mean=False)[nonzero], torch.ones(()).double(), rtol=0, atol=1e-12)
    assert torch.allclose(cosine(x, -x * c, mean=False)[nonzero], -torch.ones(()).double(), rtol=0, atol=1e-12)


def test_rel_error_is_the_sqnr_on_another_scale():
    x = rt.make_tensor("normal", (8, 64), 0)
    y = rotfn.qdq(x, rotfn.mxfp4())
    assert math.isclose(rel_error(x, y), 10 ** (-sqnr_db(x, y) / 20), rel_tol=1e-12)
    assert rel_error(torch.zeros(3), torch.ones(3)) == math.inf and rel_error(torch.zeros(3), torch.zeros(3)) == 0.0


def test_cosine_of_zero_rows_and_closed_forms():
    zero, row = torch.zeros(1, 2), torch.tensor([[3.0, 4.0]])
    assert cosine(zero, zero) == 1.0 and cosine(zero, row) == 0.0 == cosine(row, zero)
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), mean=False).shape == ()


@FEW
@given(vocab=st.integers(2, 300), tokens=st.integers(2, 9), shift=st.floats(-50, 50), seed=st.integers(0, 99))
def test_perplexity_of_a_uniform_distribution_over_v_tokens_is_v(vocab, tokens, shift, seed):
    ids = torch.randint(0, vocab, (2, tokens), generator=torch.Generator().manual_seed(seed))
    assert math.isclose(perplexity(torch.full((2, tokens, vocab), shift), ids), vocab, rel_tol=1e-12)


def test_perplexity_is_exp_of_shifted_cross_entropy_and_skips_minus_100():
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 6, 11, generator=g), torch.randint(0, 11, (2, 6), generator=g)
    expected = math.exp(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten()))
    assert math.isclose(perplexity(logits, ids), expected, rel_tol=1e-12)
    assert perplexity(logits[0], ids[0]) == perplexity(logits[:1], ids[:1])  # [T, V] is one sequence
    masked = ids.clone()
    masked[1, 3:] = -100
    kept = torch.cat([logits[0, :-1], logits[1, :2]]).double()
    want = math.exp(torch.nn.functional.cross_entropy(kept, torch.cat([ids[0, 1:], ids[1, 1:3]])))
    assert math.isclose(perplexity(logits, masked), want, rel_tol=1e-12)
    sure = torch.full((1, 4, 5), -1e4).scatter(-1, ids[:1, 1:5, None] % 5, 1e4)  # certain of the next token
    assert perplexity(torch.cat([sure, sure[:, :1]], 1), torch.cat([ids[:1, :1] % 5, ids[:1, 1:5] % 5], 1)) == 1.0


ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_no_notebook_doc_or_module_defines_its_own_sqnr():
    """rotfn.metrics is the one home of SQNR: a private ``def sqnr`` elsewhere is a twin that drifts."""
    pages = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("bench/*.py"),
             *(p for p in ROOT.glob("rotfn/**/*.py") if p.name != "metrics.py")]
    assert len(pages) > 20
    twins = [str(p.relative_to(ROOT)) for p in pages if re.search(r"\bdef _?sqnr(_db)?\s*\(", p.read_text())]
    assert twins == []
