"""rotfn.gptq: against a plain transcription of the paper's algorithm, its laws as properties, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rotfn
import rotfn.testing as rt
from rotfn.errors import ArgumentError, BackendUnavailableError, DTypeError, FormatError, ShapeError
from rotfn.ops import quant

FORMATS = [
    rotfn.mxfp4(), rotfn.mxfp4("even"), rotfn.mxfp4("rceil"), rotfn.mxfp8(), rotfn.nvfp4(), rotfn.nvfp4(None),
    rotfn.intq(4, group=32), rotfn.intq(4, group=16, symmetric=False), rotfn.intq(3, group=32), rotfn.intq(8),
    rotfn.intq(4, symmetric=False), rotfn.fp8(), rotfn.fp8("channel"),
]


def _layer(seed: int, out: int, n: int, samples: int | None = None):
    """A weight and the Hessian of correlated inputs (float64), as a calibration run gives them."""
    g = torch.Generator().manual_seed(seed)
    samples = samples or 2 * n
    mix = torch.eye(n, dtype=torch.float64) + 0.5 * torch.randn(n, n, generator=g, dtype=torch.float64)
    x = torch.randn(samples, n, generator=g, dtype=torch.float64) @ mix
    return torch.randn(out, n, generator=g), x.T @ x / samples


def _objective(w, q: rotfn.QTensor, h) -> float:
    d = w.double() - rotfn.dequantize(q, torch.float64)
    return torch.trace(d @ h.double() @ d.T).item()


def paper_gptq(w, h, fmt, *, block=128, damp=0.01, act_order=False):
    """GPTQ as Frantar et al. write it (Algorithm 1, arXiv 2210.17323), in float64, read for clarity.

    Group scales come from the group's current columns when its first column is reached
    (with act_order: from the initial weight); each column is coded under its group's scales
    with the format's own encode/decode. Returns (codes [out, n] unpacked, scales).
    """
    W, H = w.double().clone(), h.double().clone()
    out, n = W.shape
    g = fmt.group or n
    for j in range(n):  # dead inputs: no signal, nothing to keep
        if H[j, j] == 0:
            H[j, j], W[:, j] = 1, 0
    s_g = quant.nvfp4_global_scale(W.float(), fmt) if isinstance(fmt, rotfn.NVFP4) else None
    static = act_order or g == n or isinstance(fmt, rotfn.FP8)
    scales = quant.choose_scales(quant.group_view(W.float(), fmt), fmt, s_g) if static else None
    order = list(range(n))
    if act_order:
        order = sorted(range(n), key=lambda j: -H[j, j].item())
        W, H = W[:, order], H[order][:, order]
    H = H + damp * H.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    block = block if static else math.ceil(block / g) * g
    codes = torch.zeros(out, n, dtype=quant.code_dtype(fmt))
    group_scales = []
    for i in range(0, n, block):
        end = min(i + block, n)
        E = torch.zeros(out, end - i, dtype=torch.float64)
        for j in range(i, end):
            col = order[j]
            if static:
                sc = quant.Scales(*(t if t is None or t.ndim == 0 else t[:, col // g, None] for t in scales))
            else:
                if j % g == 0:
                    group_scales.append(quant.choose_scales(W[:, None, j:j + g].float(), fmt, s_g))
                sc = group_scales[-1]
            c = quant.encode(W[:, j, None, None].float(), fmt, sc)
            codes[:, col] = c[:, 0, 0]
            q = quant.decode(c, fmt, sc)[:, 0, 0].double()
            E[:, j - i] = (W[:, j] - q) / Hinv[j, j]
            W[:, j:end] -= E[:, j - i, None] * Hinv[j, j:end]
        W[:, end:] -= E @ Hinv[i:end, end:]
    if not static:
        scales = quant.Scales(torch.cat([s.scales for s in group_scales], -1), s_g,
                              None if group_scales[0].zero_points is None
                              else torch.cat([s.zero_points for s in group_scales], -1))
    return codes, scales


def _unpacked(q: rotfn.QTensor) -> torch.Tensor:
    return quant.unpack(q).reshape(q.shape)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.element_size() == 1 else torch.equal(a, b)


@pytest.mark.parametrize("fmt", FORMATS, ids=repr)
@pytest.mark.parametrize("act_order", [False, True])
def test_codes_equal_the_papers_algorithm(fmt, act_order):
    w, h = _layer(0, 24, 192)
    h[5, :] = h[:, 5] = 0  # a dead input
    q = rotfn.gptq(w, h, fmt, block_size=64, act_order=act_order)
    codes, scales = paper_gptq(w, h, fmt, block=64, act_order=act_order)
    assert _same(_unpacked(q), codes)
    assert _same(q.scales, scales.scales)
    for got, want in ((q.global_scale, scales.global_scale), (q.zero_points, scales.zero_points)):
        assert (got is None) == (want is None) and (got is None or _same(got, want))


def test_gptq_beats_rtn_and_halves_the_objective_on_average():
    ratios = []
    for i, fmt in enumerate(FORMATS):
        w, h = _layer(i, 32, 256)
        rtn = _objective(w, rotfn.quantize(w, fmt), h)
        ratios.append(_objective(w, rotfn.gptq(w, h, fmt), h) / rtn)
    assert max(ratios) < 1 and sum(ratios) / len(ratios) < 0.7, ratios


@settings(deadline=None, max_examples=40)
@given(fmt=rt.formats(), seed=rt.seeds(), out=st.integers(8, 24), groups=st.integers(1, 4),
       act_order=st.booleans(), scale_search=st.sampled_from([None, "mse"]))
def test_objective_at_most_rtns(fmt, seed, out, groups, act_order, scale_search):
    """With several rows and a Hessian of enough samples, GPTQ never loses to round to nearest
    (a single row can: an error spread onto later columns may push a group to a coarser scale)."""
    w, h = _layer(seed, out, (fmt.group or 16) * groups)
    gptq = rotfn.gptq(w, h, fmt, act_order=act_order, scale_search=scale_search)
    assert _objective(w, gptq, h) <= _objective(w, rotfn.quantize(w, fmt), h) * (1 + 1e-9)


@settings(deadline=None, max_examples=30)
@given(fmt=rt.formats(), seed=rt.seeds(), act_order=st.booleans(), diagonal=st.booleans())
def test_identity_and_diagonal_hessians_give_round_to_nearest(fmt, seed, act_order, diagonal):
    """No correlation between inputs: no error to spread, GPTQ is RTN (with act_order, its order undone)."""
    n = (fmt.group or 16) * 3
    w = rt.make_tensor("normal", (6, n), seed)
    g = torch.Generator().manual_seed(seed)
    h = torch.diag(torch.rand(n, generator=g, dtype=torch.float64) + 0.5) if diagonal else torch.eye(n)
    q, want = rotfn.gptq(w, h, fmt, act_order=act_order), rotfn.quantize(w, fmt)
    assert _same(q.codes, want.codes) and _same(q.scales, want.scales)


@settings(deadline=None, max_examples=20)
@given(fmt=st.sampled_from([rotfn.intq(8), rotfn.intq(4, symmetric=False), rotfn.fp8("channel"), rotfn.fp8()]),
       seed=rt.seeds())
def test_act_order_result_does_not_depend_on_the_input_order(fmt, seed):
    """One scale per row: permuting the inputs (w's columns, h's rows and columns) permutes the codes."""
    w, h = _layer(seed, 8, 48)
    h = h + torch.diag(torch.arange(48, dtype=torch.float64) * 1e-3)  # distinct diagonal: one order
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(seed))
    a = rotfn.gptq(w, h, fmt, act_order=True)
    b = rotfn.gptq(w[:, perm], h[perm][:, perm], fmt, act_order=True)
    assert _same(_unpacked(a)[:, perm], _unpacked(b)) and _same(a.scales, b.scales)


@settings(deadline=None, max_examples=25)
@given(fmt=rt.formats(), seed=rt.seeds(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
       static=st.booleans(), precision=st.sampled_from(["float64", "float32"]))
def test_result_is_a_valid_qtensor_and_inputs_are_untouched(fmt, seed, dtype, static, precision):
    w, h = _layer(seed, 5, (fmt.group or 16) * 2)
    w = w.to(dtype)
    w0, h0 = w.clone(), h.clone()
    q = rotfn.gptq(w, h, fmt, static_groups=static, precision=precision, block_size=16)
    ref = rotfn.quantize(w, fmt)
    assert (q.shape, q.dtype, q.format) == (ref.shape, ref.dtype, ref.format)
    for got, want in ((q.codes, ref.codes), (q.scales, ref.scales), (q.global_scale, ref.global_scale),
                      (q.zero_points, ref.zero_points)):
        assert (got is None) == (want is None)
        assert got is None or (got.shape, got.dtype) == (want.shape, want.dtype)
    assert torch.isfinite(rotfn.dequantize(q)).all()
    assert torch.equal(w, w0) and torch.equal(h, h0)


@settings(deadline=None, max_examples=30)
@given(fmt=rt.formats(), seed=rt.seeds())
def test_scale_search_never_increases_a_groups_error(fmt, seed):
    w = rt.make_tensor("normal", (6, (fmt.group or 16) * 2), seed)
    rule, searched = rotfn.quantize(w, fmt), rotfn.gptq(w, None, fmt, scale_search="mse")

    def group_error(q):
        err = quant.group_view((rotfn.dequantize(q, torch.float32) - w).square(), fmt).sum(-1)
        return err.sum() if q.scales.ndim == 0 else err

    assert (group_error(searched) <= group_error(rule)).all()


def test_scale_search_improves_gptq_and_rtn_on_fp4():
    w, h = _layer(3, 32, 256)
    for fmt in (rotfn.mxfp4(), rotfn.nvfp4(), rotfn.intq(4, group=32)):
        assert _objective(w, rotfn.gptq(w, h, fmt, scale_search="mse"), h) < _objective(w, rotfn.gptq(w, h, fmt), h)
        assert _objective(w, rotfn.gptq(w, None, fmt, scale_search="mse"), h) < _objective(w, rotfn.quantize(w, fmt), h)


def test_no_hessian_is_quantize():
    w = torch.randn(4, 64)
    with rotfn.dispatch.trace() as ran:
        q = rotfn.gptq(w, None, rotfn.nvfp4())
    assert ran == [("quantize", "torch")] and _same(q.codes, rotfn.quantize(w, rotfn.nvfp4()).codes)


def test_dead_inputs_are_coded_zero():
    w, h = _layer(1, 8, 64)
    h[:, :32] = h[:32, :] = 0
    q = rotfn.dequantize(rotfn.gptq(w, h, rotfn.intq(4, group=32)))
    assert (q[:, :32] == 0).all() and (q[:, 32:] != 0).any()


W = torch.randn(4, 64)
H = torch.eye(64)
MX = rotfn.mxfp4()
NAN_H = H.clone()
NAN_H[0, 0] = float("nan")
INDEFINITE = -torch.eye(64)

BAD = [
    (lambda: rotfn.gptq(W.long(), H, MX), DTypeError, r"gptq: argument 'w': expected a float16.*got torch.int64"),
    (lambda: rotfn.gptq([[1.0]], H, MX), DTypeError, r"argument 'w'.*got list"),
    (lambda: rotfn.gptq(W, H.int(), MX), DTypeError, r"argument 'h'.*got torch.int32"),
    (lambda: rotfn.gptq(W[0], H, MX), ShapeError, r"argument 'w': expected a non-empty weight \[out, in\], got shape \(64,\)"),
    (lambda: rotfn.gptq(W[:, :40], H[:40, :40], MX), ShapeError, r"in-features divisible by mxfp4.*group of 32"),
    (lambda: rotfn.gptq(W, H[:32, :32], MX), ShapeError, r"argument 'h': expected the \[in, in\] = \[64, 64\] Hessian"),
    (lambda: rotfn.gptq(W, H, "mxfp4"), FormatError, r"argument 'fmt': expected a rotfn format spec, got str"),
    (lambda: rotfn.gptq(W * float("inf"), H, MX), ArgumentError, r"argument 'w': expected finite values"),
    (lambda: rotfn.gptq(W, NAN_H, MX), ArgumentError, r"argument 'h': expected finite values"),
    (lambda: rotfn.gptq(W, INDEFINITE, MX), ArgumentError,
     r"argument 'h': expected a Hessian that is positive definite after damping, got a matrix that is not "
     r"\(damp=0.01 added -0.01 to its diagonal\); fix: raise damp"),
    (lambda: rotfn.gptq(W, H, MX, block_size=0), ArgumentError, r"argument 'block_size': expected an int >= 1"),
    (lambda: rotfn.gptq(W, H, MX, damp=-1.0), ArgumentError, r"argument 'damp': expected a finite float >= 0"),
    (lambda: rotfn.gptq(W, H, MX, scale_search="max"), ArgumentError, r"argument 'scale_search': expected one of"),
    (lambda: rotfn.gptq(W, H, MX, precision="float16"), ArgumentError, r"argument 'precision'"),
    (lambda: rotfn.gptq(W, H, MX, backend="cuda"), ArgumentError, r"argument 'backend'"),
]


@pytest.mark.parametrize("call,error,pattern", BAD, ids=[p[:50] for _, _, p in BAD])
def test_bad_input(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_triton_backend_that_cannot_run_is_a_typed_error(monkeypatch):
    kernels = pytest.importorskip("rotfn.kernels", reason="triton is not installed")
    monkeypatch.setattr(kernels.launch, "INTERPRET", False)
    with pytest.raises(BackendUnavailableError, match=r"gptq: argument 'backend'.*TRITON_INTERPRET=1"):
        rotfn.gptq(W, H, MX, backend="triton")


CUDA = torch.cuda.is_available()


@settings(max_examples=60 if CUDA else 12, deadline=None)
@given(fmt=st.sampled_from(FORMATS), seed=rt.seeds(), out=st.integers(1, 300 if CUDA else 40),
       groups=st.integers(1, 12 if CUDA else 3), block=st.sampled_from([16, 64, 128]), act_order=st.booleans(),
       static=st.booleans(), scale_search=st.sampled_from([None, "mse"]),
       precision=st.sampled_from(["float32", "float64"]))
def test_kernel_codes_equal_the_references(fmt, seed, out, groups, block, act_order, static, scale_search, precision):
    """The GPTQ kernel's column loop rounds as the reference's torch ops do: the same QTensor, bit for bit."""
    pytest.importorskip("rotfn.kernels", reason="triton is not installed")
    w, h = _layer(seed, out, groups * (fmt.group or 32))
    device = "cuda" if CUDA else "cpu"
    w, h = w.to(device), h.to(device)
    kw = dict(block_size=block, act_order=act_order, static_groups=static, scale_search=scale_search,
              precision=precision)
    want = rotfn.gptq(w, h, fmt, backend="torch", **kw)
    with rotfn.dispatch.trace() as ran:
        got = rotfn.gptq(w, h, fmt, backend="triton", **kw)
    assert ran == [("gptq", "triton")]
    for name in ("codes", "scales", "global_scale", "zero_points"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            rt.assert_bits_equal(a, b, name=name)
