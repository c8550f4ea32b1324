"""The numba CPU kernel for float64 Sylvester Hadamard rotations: the reference's bits or a refusal, never other bits.

Inputs come from the public :mod:`rotfn.testing` strategies; every call goes through
:func:`rotfn.rotate` under :func:`rotfn.dispatch.trace`, so each test proves which of the kernel
and the reference ran. Whether the kernel must serve a call is decided here by its documented test
(the module docstring of :mod:`rotfn.cpu.hadamard`), computed in torch apart from the kernel.
"""

import math

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import rotfn
import rotfn.testing as rt
from rotfn import ops

cpu = pytest.importorskip("rotfn.cpu", reason="numba is not installed (pip install rotfn[cpu])")

#: Where float64 inputs come from: copies of weights stored in these dtypes, and full float64 values.
SOURCES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
#: Finest bit the kernel allows (``L >= -1000``), as the largest binade ``e`` of a block's sum: ``e - 51 >= -1000``.
_LOWEST_SUM_BINADE = -949


def _on_grid(v: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Per block: every ``v_j`` is a multiple of ``2^(e - 51)`` (``v * 2^(51 - e)`` stays below 2^53, exact)."""
    t = torch.ldexp(v, (51 - e).unsqueeze(-1).double())
    return (t == t.floor()).all(-1)


def _must_serve(x: torch.Tensor, r: rotfn.Rotation) -> bool | None:
    """True when the kernel must serve ``rotate(x, r)``, False when it must decline, None when either is right.

    A block ``v`` (b entries of a row) with ``2^e <= S = sum |v_j| < 2^(e+1)`` is exact when every ``v_j``
    is a multiple of ``2^(e - 51)`` and ``e - 51 >= -1000``. The kernel sums S in another order (within
    ``b * 2^-53``), so near a power of two its e may be one more or less: then only what holds for both
    counts. An exact zero anywhere in the output declines the call (where the sums are exact, the
    reference's output has the kernel's bits, zeros included); so do NaN, infinity and all-zero blocks.
    """
    if x.numel() == 0:
        return False
    v = x.reshape(-1, r.block_size)
    s = v.abs().sum(-1)
    finite = torch.isfinite(v).all(-1) & torch.isfinite(s) & (s > 0)
    slack = r.block_size * 2.0**-51
    e_low = torch.frexp(s * (1 - slack)).exponent - 1
    e_high = torch.frexp(s * (1 + slack)).exponent - 1
    zero = bool((ops.rotate(x, r) == 0).any())
    if zero or not bool((finite & _on_grid(v, e_low) & (e_high >= _LOWEST_SUM_BINADE)).all()):
        return False
    return True if bool((_on_grid(v, e_high) & (e_low >= _LOWEST_SUM_BINADE)).all()) else None


@st.composite
def _laid_out(draw, x: torch.Tensor) -> torch.Tensor:
    """``x``, or the same values with the rotated dim at a drawn place in memory (a weight's columns: dim 0)."""
    p = draw(st.integers(0, x.ndim - 1))
    return x if p == x.ndim - 1 else x.movedim(-1, p).contiguous().movedim(p, -1)


def _sylvester_orders(max_bits: int = 12, min_bits: int = 0) -> st.SearchStrategy[int]:
    return st.integers(min_bits, max_bits).map(lambda bits: 1 << bits)


def _rotate_traced(x, r):
    """``rotfn.rotate(x, r)`` and the backend the dispatcher records for it."""
    with rotfn.dispatch.trace() as ran:
        got = rotfn.rotate(x, r)
    assert len(ran) == 1 and ran[0][0] == "rotate", ran
    return got, ran[0][1]


@given(data=st.data())
def test_float64_sylvester_rotations_run_on_numba_exactly_where_the_sums_are_exact(data):
    """Every block size, signs, R or R.T, rows or a transposed view, copies of bf16/fp16/fp32 values or full
    float64: the kernel runs where its test holds (and gives the reference's bits and layout), the
    reference where it does not."""
    n = data.draw(_sylvester_orders(), label="n")
    r = data.draw(rt.rotations(n, kinds=("hadamard", "signed")), label="rotation")
    x = data.draw(rt.tensors(n, dtypes=(torch.float64,), rows=rt.row_counts(64), through=SOURCES), label="x")
    x = data.draw(_laid_out(x), label="layout")
    expected = _must_serve(x, r)
    got, ran = _rotate_traced(x, r)
    event(f"ran on {ran} (the test says {'serve' if expected else 'decline' if expected is False else 'either'})")
    if expected is not None:
        assert ran == ("numba" if expected else "torch")
    ref = ops.rotate(x, r)
    rt.assert_bits_equal(got, ref)
    assert got.stride() == ref.stride()


@st.composite
def _not_for_the_kernel(draw):
    """``(x, R, why)``: calls the kernel does not take (another dtype, rotation kind or block order, no
    memory order of the rotated dim, no rows), each otherwise one it could serve."""
    why = draw(st.sampled_from(["dtype", "kind", "order", "layout", "empty"]))
    if why == "order":  # K * 2^m with K > 1: the block is not a Sylvester matrix
        n = draw(rt.hadamard_orders(256, min_n=3).filter(lambda n: n & (n - 1)))
        r = rotfn.hadamard(n, seed=draw(st.none() | rt.seeds()))
    else:
        n = draw(_sylvester_orders(8, min_bits=1))  # n = 1: every other column of two is still contiguous
        kinds = ("orthogonal", "matrix") if why == "kind" else ("hadamard", "signed")
        r = draw(rt.rotations(n, kinds=kinds))
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if why == "dtype" else (torch.float64,)
    x = draw(rt.tensors(n * (2 if why == "layout" else 1), dtypes=dtypes, rows=rt.row_counts(16),
                        through=(torch.bfloat16,)))
    if why == "layout":  # every other column: no dim of the view lies contiguous
        x = x[..., ::2]
    elif why == "empty":
        x = x[:0]
    return x, r, why


@given(case=_not_for_the_kernel())
def test_what_the_kernel_does_not_take_runs_and_traces_the_reference(case):
    x, r, why = case
    if why in ("dtype", "kind", "order"):
        assert cpu.unsupported("rotate", x, rotation=r) is not None  # declined before the kernel runs
    else:
        assert cpu.rotate(x, r) is None
    got, ran = _rotate_traced(x, r)
    assert ran == "torch"
    rt.assert_bits_equal(got, ops.rotate(x, r))


def _weights(source: torch.dtype, rows: int, n: int, seed: int, *, scaled: bool) -> torch.Tensor:
    """float64 copies of a weight stored in ``source``, times a ``source`` per-column norm scale if ``scaled``."""
    w = rt.make_tensor("normal", (rows, n), seed, dtype=source, scale=0.02).double()
    if scaled:  # a norm scale folded in: the product of two source values, exact in float64
        w = w * (0.5 + rt.make_tensor("normal", (n,), seed + 1, dtype=torch.float64).abs()).to(source).double()
    return w


@pytest.mark.parametrize("rows", rt.EDGE_ROWS)
@pytest.mark.parametrize(("source", "scaled"), [(torch.bfloat16, True), (torch.float16, True), (torch.float32, False)])
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_typical_weights_with_full_blocks_run_on_numba(rows, source, scaled, layout):
    """bf16/fp16 weights with a folded norm scale and fp32 weights under a full-size Hadamard, R or R.T, signed or not."""
    x = _weights(source, rows, 128, rows, scaled=scaled)
    x = x if layout == "rows" else x.T.contiguous().T
    for r in (rotfn.hadamard(128, seed=1), rotfn.hadamard(128, seed=1).T, rotfn.hadamard(128)):
        assert _must_serve(x, r)
        got, ran = _rotate_traced(x, r)
        assert ran == "numba"
        rt.assert_bits_equal(got, ops.rotate(x, r))


def test_what_passes_depends_on_the_block_size():
    """The kernel declines a whole call for one exact zero output or one value too far below its block's sum.
    Blocks of 2: ``v_0 = +-v_1`` in some block of a bf16 weight is all but certain, while the fp32 copy of the
    same values (finer bits) has none; blocks of 4096: the bf16 weight passes, and some row of the fp32 one
    has a value more than ~2^28 below its sum."""
    x16, x32 = (_weights(source, 64, 4096, 0, scaled=False) for source in (torch.bfloat16, torch.float32))
    for x, r, served in [(x16, rotfn.hadamard(4096, block=2), False), (x32, rotfn.hadamard(4096, block=2), True),
                         (x16, rotfn.hadamard(4096), True), (x32, rotfn.hadamard(4096), False)]:
        assert _must_serve(x, r) is served
        assert (cpu.rotate(x, r) is not None) is served
        got, ran = _rotate_traced(x, r)
        assert ran == ("numba" if served else "torch")
        rt.assert_bits_equal(got, ops.rotate(x, r))
    assert bool((ops.rotate(x16, rotfn.hadamard(4096, block=2)) == 0).any())  # why the bf16 blocks of 2 decline


def _with(value, where=5, n=64):
    x = _weights(torch.bfloat16, 4, n, 3, scaled=False)
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
    assert _must_serve(x, r) is False
    assert cpu.rotate(x, r) is None
    got, ran = _rotate_traced(x, r)
    assert ran == "torch"
    rt.assert_bits_equal(got, ops.rotate(x, r), nan_payload=True)


def test_a_fine_bit_within_range_passes():
    """The test is not a blanket refusal of low bits: 2^-20 next to 1.0 is exact in float64 (32 binades of room)."""
    x = _with(2.0**-20)
    r = rotfn.hadamard(64, seed=0)
    assert _must_serve(x, r)
    got, ran = _rotate_traced(x, r)
    assert ran == "numba"
    rt.assert_bits_equal(got, ops.rotate(x, r))


X64 = _weights(torch.bfloat16, 4, 64, 0, scaled=False)


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


def test_gradients_run_on_numba_also_under_torch_func():
    """Backward is another rotation (``g @ R.T``), served by the kernel too, and torch.func.grad hands the
    autograd function plain tensors: the same two kernel calls, the same bits."""
    r = rotfn.hadamard(64, seed=0)
    x = X64.clone().requires_grad_()
    with rotfn.dispatch.trace() as ran:
        rotfn.rotate(x, r).pow(2).sum().backward()
    assert ran == [("rotate", "numba"), ("rotate", "numba")]
    rt.assert_bits_equal(x.grad, ops.rotate(2 * ops.rotate(X64, r), r.T))
    with rotfn.dispatch.trace() as ran:
        g = torch.func.grad(lambda t: rotfn.rotate(t, r).pow(2).sum())(X64)
    assert ran == [("rotate", "numba"), ("rotate", "numba")]
    rt.assert_bits_equal(g, x.grad)


def test_fold_of_a_bf16_model_has_the_same_bits_with_and_without_the_kernel(monkeypatch):
    config = rt.make_config("llama", hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=96)
    model = rt.tiny_model(config, dtype=torch.bfloat16)
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
        rt.assert_bits_equal(fast[k], reference[k], name=k)
