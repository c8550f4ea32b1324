"""The numba CPU kernel for float64 Sylvester Hadamard rotations: the reference's bits or a refusal, never other bits."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rotfn
from rotfn import ops
from rotfn.testing import assert_bits_equal, seeds

cpu = pytest.importorskip("rotfn.cpu", reason="numba is not installed (pip install rotfn[cpu])")

SOURCES = (torch.bfloat16, torch.float16, torch.float32)


def _weights(shape, seed, source, *, scaled):
    """float64 values of a low-precision weight, times a low-precision per-column scale if ``scaled`` (a folded norm)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.02).to(source).double()
    if scaled:
        w = w * (0.5 + torch.rand(shape[-1], generator=g, dtype=torch.float64)).to(source).double()
    return w


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 12), block_bits=st.integers(1, 12), signed=st.booleans(), seed=seeds(),
       transposed=st.booleans(), columns=st.integers(0, 40), source=st.sampled_from(SOURCES), scaled=st.booleans())
def test_kernel_returns_the_reference_bits_or_nothing(bits, block_bits, signed, seed, transposed, columns, source,
                                                      scaled):
    """Rows (columns == 0) or a transposed view (the rotated dim first in memory), every block size, signs, R or R.T."""
    n = 1 << bits
    r = rotfn.hadamard(n, block=1 << min(block_bits, bits), seed=seed if signed else None)
    r = r.T if transposed else r
    x = _weights((3, n), seed, source, scaled=scaled) if columns == 0 else _weights((n, columns), seed, source,
                                                                                     scaled=scaled).T
    got = cpu.rotate(x, r)
    if got is not None:
        assert_bits_equal(got, ops.rotate(x, r))
        assert got.stride() == ops.rotate(x, r).stride()


@pytest.mark.parametrize(("source", "scaled"), [(torch.bfloat16, True), (torch.float16, True), (torch.float32, False)])
@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("n", [128, 4096])
def test_kernel_serves_typical_weights(source, scaled, layout, n):
    """bf16/fp16 weights with a folded norm scale and fp32 weights: every block passes the exactness test."""
    x = _weights((16, n), 0, source, scaled=scaled)
    x = x if layout == "rows" else x.T.contiguous().T
    for r in (rotfn.hadamard(n, seed=1), rotfn.hadamard(n, seed=1).T, rotfn.hadamard(n, block=64)):
        got = cpu.rotate(x, r)
        assert got is not None
        assert_bits_equal(got, ops.rotate(x, r))


def _with(value, where=5, n=64):
    x = _weights((4, n), 3, torch.bfloat16, scaled=False)
    x[1, where] = value
    return x


# inputs whose sums could round (or whose bits depend on the order of the sums) in float64
REFUSED = {
    "bits 60 binades apart": _with(2.0**-60),
    "a full-precision float64 value": _with(0.1),
    "NaN": _with(math.nan),
    "infinity": _with(math.inf),
    "an all-zero row": _with(0.0) * torch.tensor([[1.0], [0.0], [1.0], [1.0]], dtype=torch.float64),
    "an exact zero output": torch.tensor([[1.0, 1.0, 2.0, 2.0]], dtype=torch.float64),
    "values near the bottom of float64": _with(0.0) * 2.0**-1000,
}


@pytest.mark.parametrize("case", sorted(REFUSED))
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_kernel_refuses_what_it_cannot_prove_and_dispatch_runs_and_traces_the_reference(case, layout):
    x = REFUSED[case] if layout == "rows" else REFUSED[case].T.contiguous().T
    r = rotfn.hadamard(x.shape[-1])  # unsigned: [1, 1, 2, 2] @ H_4 has zeros
    assert cpu.rotate(x, r) is None
    with rotfn.dispatch.trace() as ran:
        got = rotfn.rotate(x, r)
    assert ran == [("rotate", "torch")]
    assert_bits_equal(got, ops.rotate(x, r), nan_payload=True)


def test_a_fine_bit_within_range_passes():
    """The test is not a blanket refusal of low bits: 2^-20 next to 1.0 is exact in float64 (32 binades of room)."""
    x = _with(2.0**-20)
    r = rotfn.hadamard(64, seed=0)
    assert_bits_equal(cpu.rotate(x, r), ops.rotate(x, r))


X64 = _weights((4, 64), 0, torch.bfloat16, scaled=False)


@pytest.mark.parametrize(("call", "expected"), [
    (lambda: rotfn.rotate(X64, rotfn.hadamard(64, seed=0)), "numba"),
    (lambda: rotfn.rotate_back(X64, rotfn.hadamard(64, block=16)), "numba"),
    (lambda: rotfn.rotate(X64, rotfn.hadamard(64, seed=0), backend="torch"), "torch"),
    (lambda: rotfn.rotate(X64.float(), rotfn.hadamard(64, seed=0)), "torch"),
    (lambda: rotfn.rotate(X64, rotfn.orthogonal(64, seed=0)), "torch"),
    (lambda: rotfn.rotate(X64[:, :48], rotfn.hadamard(48)), "torch"),  # 48 = 12 * 4: a Paley factor
], ids=["signed", "block, back", "backend=torch", "float32", "orthogonal", "non-Sylvester"])
def test_dispatch_picks_the_kernel_only_for_float64_sylvester_hadamard_on_auto(call, expected):
    with rotfn.dispatch.trace() as ran:
        call()
    assert ran == [("rotate", expected)]


def test_gradients_and_torch_func_still_work():
    r = rotfn.hadamard(64, seed=0)
    x = X64.clone().requires_grad_()
    rotfn.rotate(x, r).pow(2).sum().backward()
    assert_bits_equal(x.grad, rotfn.rotate_back(2 * rotfn.rotate(X64, r), r))
    g = torch.func.grad(lambda t: rotfn.rotate(t, r).pow(2).sum())(X64)
    torch.testing.assert_close(g, 2 * X64, rtol=1e-12, atol=1e-12)


def test_fold_of_a_bf16_model_has_the_same_bits_with_and_without_the_kernel(monkeypatch):
    config = rotfn.testing.make_config("llama", hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=96)
    model = rotfn.testing.tiny_model(config, dtype=torch.bfloat16)
    plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=0), r2=rotfn.hadamard(16, seed=1))
    params = rotfn.params(model)
    with rotfn.dispatch.trace() as ran:
        fast = rotfn.fold(params, plan)
    assert ("rotate", "numba") in ran
    monkeypatch.setattr(rotfn.dispatch, "_load_cpu_kernels", lambda: None)
    with rotfn.dispatch.trace() as ran:
        reference = rotfn.fold(params, plan)
    assert ("rotate", "numba") not in ran
    assert fast.keys() == reference.keys()
    for k in fast:
        assert_bits_equal(fast[k], reference[k], name=k)
