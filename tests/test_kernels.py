"""Triton kernels against the torch reference: quantization bit for bit, rotation within ulps.

On CPU these run under Triton's interpreter (``TRITON_INTERPRET=1``, set in
conftest.py) on small shapes; on a GPU the same tests run on CUDA tensors, with
bf16 and larger shapes added.
"""

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rotfn
import rotfn.testing as rt

kernels = pytest.importorskip("rotfn.kernels", reason="triton is not installed")
triton = pytest.importorskip("triton")
tl = triton.language
kn = kernels.numbers

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# the interpreter's bf16 arithmetic is unreliable: bf16 only on the GPU
DTYPES = (torch.float32, torch.float16, torch.bfloat16) if CUDA else (torch.float32, torch.float16)
HALF = tuple(d for d in DTYPES if d != torch.float32)
FORMATS = [
    rotfn.mxfp4(), rotfn.mxfp4("even"), rotfn.mxfp4("rceil"), rotfn.mxfp8(), rotfn.mxfp8("rceil"),
    rotfn.nvfp4(), rotfn.nvfp4(None), rotfn.nvfp4(0.05),
    rotfn.intq(4, group=32), rotfn.intq(4, group=16, symmetric=False), rotfn.intq(8, group=128),
    rotfn.intq(4), rotfn.intq(8, symmetric=False), rotfn.intq(3, clip=0.9),
    rotfn.fp8(), rotfn.fp8("token"), rotfn.fp8("channel"),
    # rules of the serving export: power-of-two NVFP4 global scales, scales rounded to the model's dtype
    rotfn.nvfp4("pow2"), rotfn.fp8("channel", scale_dtype="bfloat16"), rotfn.intq(8, scale_dtype="float16"),
]
BLOCKS = kernels.launch._DENSE_BLOCKS


def inputs(n=256, *, dtypes=DTYPES, rows=rt.row_counts(300 if CUDA else 5), scale_exponents=(-6, 6)):
    """``[..., n]`` kernel inputs from :func:`rotfn.testing.tensors` on the test device."""
    return rt.tensors(n, dtypes=dtypes, rows=rows, scale_exponents=scale_exponents).map(lambda x: x.to(DEVICE))


def _dtypes(block):
    """The dtypes the fused kernels take with a rotation block (fp32 256 x 256 blocks are refused: shared memory)."""
    return HALF if block == 256 else DTYPES


@contextlib.contextmanager
def _on_triton(*ops):
    """Assert that the block dispatched exactly ``ops``, each to the Triton kernels (a test of a kernel is never
    a test of the reference against itself)."""
    with rotfn.dispatch.trace() as ran:
        yield
    assert ran == [(op, "triton") for op in ops]


def _edge_cases(dtype):
    """Blocks of zeros, NaN, +-Inf, subnormals, +-max, ties: one row each, 256 wide."""
    big = torch.finfo(dtype).max
    rows = torch.zeros(8, 256)
    rows[1, :32] = torch.nan
    rows[2, 40] = torch.inf
    rows[3, 70] = -torch.inf
    rows[4] = 2.0**-130 if dtype == torch.float32 else 2.0**-20
    rows[5, ::2] = big
    rows[5, 1::2] = -big
    rows[6] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]).repeat(32)
    rows[7] = -rows[6]
    return rows.to(dtype).to(DEVICE)


@pytest.mark.parametrize("fmt", FORMATS, ids=repr)
@settings(max_examples=6 if not CUDA else 10)
@given(x=inputs())
def test_qdq_and_quantize_are_bit_exact(fmt, x):
    with _on_triton("qdq", "quantize"):
        y, qk = rotfn.qdq(x, fmt, backend="triton"), rotfn.quantize(x, fmt, backend="triton")
    rt.assert_bits_equal(y, rotfn.qdq(x, fmt, backend="torch"), name="qdq")
    qr = rotfn.quantize(x, fmt, backend="torch")
    rt.assert_bits_equal(qk.codes, qr.codes, name="codes")
    rt.assert_bits_equal(qk.scales, qr.scales, name="scales")
    for name in ("global_scale", "zero_points"):
        a, b = getattr(qk, name), getattr(qr, name)
        assert (a is None) == (b is None), name
        if a is not None:
            rt.assert_bits_equal(a, b, name=name)
    rt.assert_bits_equal(rotfn.dequantize(qk), rotfn.qdq(x, fmt, backend="torch"), name="dequantize(quantize)")


@pytest.mark.parametrize("fmt", FORMATS, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edge_cases_are_bit_exact(fmt, dtype):
    x = _edge_cases(dtype)
    with _on_triton("qdq", "quantize"):
        y, qk = rotfn.qdq(x, fmt, backend="triton"), rotfn.quantize(x, fmt, backend="triton")
    rt.assert_bits_equal(y, rotfn.qdq(x, fmt, backend="torch"))
    qr = rotfn.quantize(x, fmt, backend="torch")
    rt.assert_bits_equal(qk.codes, qr.codes, name="codes")
    rt.assert_bits_equal(qk.scales, qr.scales, name="scales")


def _ulps(a, b):
    """Distance in units of the last place of a's dtype."""
    eps = torch.finfo(a.dtype).eps
    scale = torch.maximum(a.double().abs(), b.double().abs()).clamp(min=torch.finfo(a.dtype).tiny)
    return ((a.double() - b.double()).abs() / (scale * eps)).nan_to_num(0.0)


# large Hadamard blocks K * 2^m (the FWHT kernel): (n, block); the GPU adds the model widths
FWHT_SIZES = [(512, None), (192, None), (448, None), (576, None), (1536, None), (2048, 512), (256, None), (6144, None),
              (32768, None)] + ([(4096, None), (11008, None), (14336, None), (28672, None), (8192, 4096)] if CUDA else [])


def _close_to_reference(got, ref, dtype):
    """Within the fp32 accumulation's rounding plus one rounding to dtype: a few ulps of the row's scale.

    fp32 sums run in another order than the reference's (up to 172 terms in a Hadamard factor
    stage), so fp32 gets a few dozen fp32 ulps of the row's largest value on top.
    """
    row_max = ref.double().abs().amax(-1, keepdim=True)
    tol = 8 * torch.finfo(dtype).eps * row_max + (4e-6 if dtype == torch.float32 else 0) * row_max
    return bool(((got.double() - ref.double()).abs() <= tol).all())


@pytest.mark.parametrize("kind", rt.ROTATION_KINDS)
@pytest.mark.parametrize("block", BLOCKS)
@settings(max_examples=4 if not CUDA else 6)
@given(data=st.data())
def test_block_rotation_within_ulps(kind, block, data):
    x = data.draw(inputs(dtypes=_dtypes(block)), label="x")
    r = data.draw(rt.rotations(256, kinds=(kind,), blocks=(block,)), label="rotation")
    with _on_triton("rotate"):
        got = rotfn.rotate(x, r, backend="triton")
    ref = rotfn.rotate(x, r, backend="torch")
    assert _close_to_reference(got, ref, x.dtype), float((got.double() - ref.double()).abs().max())


@settings(max_examples=3 if not CUDA else 6, deadline=None)
@given(r=rt.rotations(64, kinds=("hadamard", "signed"), blocks=(16, 32, 64)), dim=st.integers(-3, 1), seed=rt.seeds())
def test_rotation_along_another_dim_is_the_kernel_on_the_moved_dim(r, dim, seed):
    """dim != -1 at the dispatch layer: the kernel on the moved dim, bit for bit; rotate_back inverts it."""
    shape = [3, 5, 2]
    shape[dim] = r.n
    x = rt.make_tensor("normal", tuple(shape), seed, dtype=torch.float32).to(DEVICE)
    with _on_triton("rotate", "rotate", "rotate"):
        got = rotfn.rotate(x, r, dim=dim, backend="triton")
        moved = rotfn.rotate(x.movedim(dim, -1), r, backend="triton").movedim(-1, dim)
        back = rotfn.rotate_back(got, r, dim=dim, backend="triton")
    rt.assert_bits_equal(got, moved, name="rotate(dim=, backend='triton')")
    assert _close_to_reference(back.movedim(dim, -1), x.movedim(dim, -1), x.dtype)


@pytest.mark.parametrize("n,block", FWHT_SIZES, ids=[f"{n}/{b}" for n, b in FWHT_SIZES])
@settings(max_examples=3 if not CUDA else 5, deadline=None)
@given(data=st.data())
def test_large_hadamard_rotation_within_ulps(n, block, data):
    x = data.draw(inputs(n, rows=rt.row_counts(3 if not CUDA else 70), scale_exponents=(0, 0)), label="x")
    r = data.draw(rt.rotations(n, kinds=("hadamard", "signed"), blocks=(block or n,)), label="rotation")
    with _on_triton("rotate", "rotate"):
        got = rotfn.rotate(x, r, backend="triton")
        back = rotfn.rotate_back(got, r, backend="triton")
    ref = rotfn.rotate(x, r, backend="torch")
    assert _close_to_reference(got, ref, x.dtype), float((got.double() - ref.double()).abs().max())
    assert _close_to_reference(back, x, x.dtype)  # rotate_back(rotate(x)) == x within the roundings


@pytest.mark.parametrize("fmt", [rotfn.mxfp4(), rotfn.nvfp4(), rotfn.intq(4, group=32), rotfn.fp8("token")], ids=repr)
@pytest.mark.parametrize("n", [512, 1536] + ([4096, 14336] if CUDA else []))
@settings(max_examples=2 if not CUDA else 4, deadline=None)
@given(data=st.data())
def test_large_hadamard_rotate_qdq_is_qdq_of_the_kernel_rotation(fmt, n, data):
    x = data.draw(inputs(n, rows=3, scale_exponents=(0, 0)), label="x")
    r = data.draw(rt.rotations(n, kinds=("signed",), blocks=(n,), transposed=False), label="rotation")
    with _on_triton("rotate", "rotate_qdq", "rotate_qdq", "rotate"):
        rotated = rotfn.rotate(x, r, backend="triton")
        fused = rotfn.rotate_qdq(x, r, fmt, backend="triton")
        back = rotfn.rotate_qdq(x, r, fmt, back=True, backend="triton")
        fused_back = rotfn.rotate_back(fused, r, backend="triton")
    rt.assert_bits_equal(fused, rotfn.qdq(rotated, fmt, backend="torch"), name="rotate_qdq vs qdq(kernel rotation)")
    rt.assert_bits_equal(back, fused_back, name="back")


@pytest.mark.parametrize("fmt", FORMATS, ids=repr)
@settings(max_examples=4 if not CUDA else 6)
@given(block=st.sampled_from(BLOCKS), data=st.data())
def test_fused_rotate_qdq_is_qdq_of_the_kernel_rotation(fmt, block, data):
    """Every difference from the reference comes from the rotation, never from the quantizer:
    the fused kernel equals the reference qdq of the kernel's own rotation, bit for bit, and
    that rotation is within ulps of the reference (test above). Every block: test_every_launch_layout."""
    x = data.draw(inputs(dtypes=_dtypes(block)), label="x")
    r = data.draw(rt.rotations(256, kinds=("signed", "orthogonal"), blocks=(block,)), label="rotation")
    with _on_triton("rotate", "rotate_qdq", "rotate_qdq"):
        rotated = rotfn.rotate(x, r, backend="triton")
        fused = rotfn.rotate_qdq(x, r, fmt, backend="triton")
        back = rotfn.rotate_qdq(x, r, fmt, back=True, backend="triton")
    rt.assert_bits_equal(fused, rotfn.qdq(rotated, fmt, backend="torch"), name="fused vs qdq(kernel rotation)")
    expected = rotfn.rotate_back(fused, r, backend="torch")
    ok = (back.double() - expected.double()).abs() <= 8 * torch.finfo(x.dtype).eps * expected.double().abs().amax(
        -1, keepdim=True
    )
    assert bool((ok | (back.isnan() & expected.isnan())).all())


@pytest.mark.parametrize("fmt", [rotfn.mxfp4(), rotfn.mxfp4("rceil"), rotfn.mxfp8(), rotfn.nvfp4(None)], ids=repr)
@settings(max_examples=4 if not CUDA else 6)
@given(x=inputs(), seed=rt.seeds())
def test_fused_mismatches_sit_next_to_rounding_ties(fmt, x, seed):
    """Against the full reference, a fused MX / fixed-scale NVFP4 value may differ only where the
    reference rotation lies within a few ulps of a decision point (a grid midpoint, or a power
    of two that moves a group scale)."""
    r = rotfn.hadamard(256, block=32, seed=seed)
    with _on_triton("rotate_qdq"):
        fused = rotfn.rotate_qdq(x, r, fmt, backend="triton")
    expected = rotfn.rotate_qdq(x, r, fmt, backend="torch")
    bad = rt.bits(fused) != rt.bits(expected)
    if not bad.any():
        return
    rot_ref = rotfn.rotate(x, r, backend="torch")
    rot_ker = rotfn.rotate(x, r, backend="triton")
    # a mismatch needs the two rotations to differ in the element itself or in its scale group
    group = fmt.group
    diff_el = rt.bits(rot_ref) != rt.bits(rot_ker)
    diff_group = diff_el.reshape(*x.shape[:-1], -1, group).any(-1, keepdim=True).expand(
        *x.shape[:-1], -1, group).reshape(x.shape)
    assert bool((diff_el | diff_group)[bad].all()), "a quantizer mismatch without a rotation difference"
    assert float(_ulps(rot_ref, rot_ker)[diff_el].max()) <= 8


def _launch_layouts():
    """Every launch layout of the fused kernels, with the narrowest row width and a format that picks it.

    A layout is ``(block, W, G, BR)``: the rotation block of the tensor-core dot (None: no rotation) and
    :func:`rotfn.kernels.launch._layout`'s chunk width, scale group inside a chunk and chunks per
    program. Rows 16..1024 wide with every block and format reach all of them (wider rows only repeat
    W = 1024).
    """
    layouts = {}
    for n in (16, 32, 64, 128, 256, 512, 1024):
        for block in (None, *(t for t in BLOCKS if n % t == 0)):
            r = None if block is None else rotfn.hadamard(n, block=None if block == n else block)
            for fmt in (None, *FORMATS) if r is not None else FORMATS:
                probe = torch.empty(1, n, dtype=torch.float16, device=DEVICE)
                op = "rotate" if fmt is None else "qdq" if r is None else "rotate_qdq"
                if kernels.unsupported(op, probe, rotation=r, fmt=fmt) is None:
                    layouts.setdefault((block, *kernels.launch._layout(n, r, fmt)), (n, fmt))
    return layouts


def _rows(i, n):
    """Rows of the i-th layout: 1, 3, 17, 129 in turn (partial last programs), those that keep the interpreter
    under ~8k elements."""
    counts = [r for r in rt.EDGE_ROWS[:4] if CUDA or r * n <= 129 * 64]
    return counts[i % len(counts)]


LAYOUTS = [(layout, n, fmt, _rows(i, n)) for i, (layout, (n, fmt)) in enumerate(_launch_layouts().items())]


@pytest.mark.parametrize("layout,n,fmt,rows", LAYOUTS,
                         ids=[f"B{t}-W{w}-G{g}-BR{br}-n{n}-rows{rows}" for (t, w, g, br), n, _, rows in LAYOUTS])
@settings(max_examples=1 if not CUDA else 3)
@given(data=st.data())
def test_every_launch_layout(layout, n, fmt, rows, data):
    """Every (block, W, G, BR) the launcher picks, on odd row counts: the rotation within ulps of the reference,
    the quantizer bit for bit (on the kernel's own rotation), on the kernels."""
    block = layout[0]
    x = data.draw(inputs(n, dtypes=_dtypes(block), rows=rows), label="x")
    r = None if block is None else data.draw(rt.rotations(n, blocks=(block,)), label="rotation")
    assert (block, *kernels.launch._layout(n, r, fmt)) == layout
    if fmt is None:
        with _on_triton("rotate"):
            got = rotfn.rotate(x, r, backend="triton")
        assert _close_to_reference(got, rotfn.rotate(x, r, backend="torch"), x.dtype)
    elif r is None:
        with _on_triton("qdq", "quantize"):
            y, q = rotfn.qdq(x, fmt, backend="triton"), rotfn.quantize(x, fmt, backend="triton")
        rt.assert_bits_equal(y, rotfn.qdq(x, fmt, backend="torch"), name="qdq")
        rt.assert_bits_equal(rotfn.dequantize(q), y, name="dequantize(quantize)")
        rt.assert_bits_equal(q.codes, rotfn.quantize(x, fmt, backend="torch").codes, name="codes")
    else:
        with _on_triton("rotate", "rotate_qdq"):
            rotated, fused = rotfn.rotate(x, r, backend="triton"), rotfn.rotate_qdq(x, r, fmt, backend="triton")
        rt.assert_bits_equal(fused, rotfn.qdq(rotated, fmt, backend="torch"), name="fused vs qdq(kernel rotation)")


def test_the_fwht_sizes_reach_every_launch_plan_of_the_fwht_kernel():
    """FWHT_SIZES take every branch of the FWHT launch: K = 1 and K > 1, one to three radix passes, the
    factor stage in one chunk of KC rows and in several, one block per program and several."""
    plans = []
    for n, block in FWHT_SIZES:
        r = rotfn.hadamard(n, block=block)
        k, kp, *radices = kernels.launch._fwht_plan(r.block_size, r.factor)
        size = kp * radices[0] * radices[1] * radices[2]
        plans.append((k > 1, sum(p > 1 for p in radices), kp > kernels.launch._FWHT_KC,
                      kernels.launch._FWHT_ELEMENTS // size > 1))
    for branch, values in enumerate([{False, True}, {1, 2, 3}, {False, True}, {False, True}]):
        assert {plan[branch] for plan in plans} == values, branch


@pytest.mark.skipif(not CUDA, reason="the interpreter does not compile")
def test_no_recompile_across_token_counts(monkeypatch):
    """A model forward sees every token count: after the first call, none may compile a kernel again."""
    compiled = []
    def hook(*args, **kwargs):
        compiled.append(kwargs.get("repr", args))
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.runtime, "jit_post_compile_hook"):
        monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", hook)
    else:  # older triton
        monkeypatch.setattr(triton.runtime.jit.JITFunction, "compiled_hook", hook, raising=False)
    r = rotfn.hadamard(256, block=32, seed=0)
    calls = [lambda x: rotfn.rotate_qdq(x, r, rotfn.mxfp4(), backend="triton"),
             lambda x: rotfn.qdq(x, rotfn.intq(8), backend="triton"),  # two passes: stats + quant
             lambda x: rotfn.quantize(x, rotfn.nvfp4(), backend="triton"),
             lambda x: rotfn.rotate(x, rotfn.hadamard(256, seed=0), backend="triton")]  # FWHT kernel
    for call in calls:
        call(torch.randn(64, 256, device="cuda"))
    assert compiled, "the hook saw no compilation: it would not see a recompile either"
    compiled.clear()
    for m in (1, 7, 16, 33, 100, 257, 4096):
        for call in calls:
            call(torch.randn(m, 256, device="cuda"))
    assert compiled == []


def test_gradients_through_kernels():
    r = rotfn.hadamard(64, seed=1)
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    g = torch.randn(4, 64, device=DEVICE)
    (rotfn.rotate(x, r, backend="triton") * g).sum().backward()
    torch.testing.assert_close(x.grad, rotfn.rotate_back(g, r, backend="torch"), rtol=0, atol=1e-5)
    x.grad = None
    (rotfn.rotate_qdq(x, r, rotfn.mxfp4(), backend="triton") * g).sum().backward()
    torch.testing.assert_close(x.grad, rotfn.rotate_back(g, r, backend="torch"), rtol=0, atol=1e-5)
    x.grad = None
    (rotfn.qdq(x, rotfn.nvfp4(), backend="triton") * g).sum().backward()
    assert torch.equal(x.grad, g)


UNSUPPORTED = [
    (lambda: rotfn.rotate(torch.zeros(2, 96, device=DEVICE), rotfn.hadamard(96), backend="triton"), "96 = 12\\*8"),
    (lambda: rotfn.rotate(torch.zeros(2, 512, device=DEVICE), rotfn.orthogonal(512, seed=0), backend="triton"),
     "block 512"),
    (lambda: rotfn.rotate(torch.zeros(2, 344, device=DEVICE), rotfn.hadamard(344), backend="triton"), "172\\*2"),
    (lambda: rotfn.rotate(torch.zeros(1, 65536, device=DEVICE), rotfn.hadamard(65536), backend="triton"),
     "up to 32768"),
    (lambda: rotfn.rotate(torch.zeros(2, 256, device=DEVICE), rotfn.orthogonal(256, seed=0), backend="triton"),
     "float32"),
    (lambda: rotfn.qdq(torch.zeros(2, 64, device=DEVICE, dtype=torch.float64), rotfn.mxfp4(), backend="triton"),
     "float64"),
    (lambda: rotfn.qdq(torch.zeros(2, 48, device=DEVICE), rotfn.intq(4, group=48), backend="triton"),
     "not a power of two"),
    (lambda: rotfn.dequantize(rotfn.quantize(torch.zeros(2, 64), rotfn.mxfp4()), backend="triton"), "dequantize"),
]


@pytest.mark.parametrize("call,why", UNSUPPORTED, ids=[w for _, w in UNSUPPORTED])
def test_unservable_calls_raise_instead_of_falling_back(call, why):
    with pytest.raises(rotfn.errors.BackendUnavailableError, match=why):
        call()


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(kernels.launch, "INTERPRET", False)
    with pytest.raises(rotfn.errors.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        rotfn.qdq(torch.zeros(2, 64), rotfn.mxfp4(), backend="triton")
    with rotfn.dispatch.trace() as ran:
        rotfn.qdq(torch.zeros(2, 64), rotfn.mxfp4(), backend="auto")
    assert ran == [("qdq", "torch")]


@pytest.mark.skipif(not CUDA, reason="auto picks Triton only for CUDA tensors")
def test_auto_picks_triton_on_cuda():
    with rotfn.dispatch.trace() as ran:
        rotfn.rotate_qdq(torch.randn(8, 256, device="cuda"), rotfn.hadamard(256, block=32), rotfn.mxfp4())
        rotfn.rotate(torch.randn(8, 4096, device="cuda"), rotfn.hadamard(4096))  # the FWHT kernel
        rotfn.rotate(torch.randn(8, 4096, device="cuda"), rotfn.orthogonal(4096, seed=0))  # no dense 4096 kernel
    assert ran == [("rotate_qdq", "triton"), ("rotate", "triton"), ("rotate", "torch")]


# ----- the element functions of rotfn.kernels.numbers, exhaustively against rotfn.ops.numbers -----------
@triton.jit
def _numbers_probe(x_ptr, code_ptr, e2m1_ptr, e4m3_ptr, rint_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(code_ptr + offs, kn.e2m1_code(v), mask=mask)
    tl.store(e2m1_ptr + offs, kn.e2m1_round(v), mask=mask)
    tl.store(e4m3_ptr + offs, kn.e4m3_value(v), mask=mask)
    tl.store(rint_ptr + offs, kn.rint(v * 1024.0), mask=mask)


def _probe_values() -> torch.Tensor:
    """Every multiple of 2^-12 in (-8, 8), each E2M1 / E4M3 decision point and its fp32 neighbours, zeros, subnormals."""
    grid = torch.arange(-8 * 4096 + 1, 8 * 4096, dtype=torch.float64).float() / 4096
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 2**-6, 2**-9, 2**-10, 3 * 2**-10, 0.0])
    ties = torch.cat([ties, -ties])
    up, down = torch.nextafter(ties, torch.tensor(9.0)), torch.nextafter(ties, torch.tensor(-9.0))
    tiny = torch.tensor([1e-45, -1e-45, 1e-40, -1e-40, 1.1754942e-38])
    return torch.cat([grid, ties, up, down, tiny]).contiguous()


def test_element_functions_equal_the_reference_bit_for_bit():
    from rotfn.ops import numbers as ref

    x = _probe_values().to(DEVICE)
    code, e2m1 = torch.empty_like(x, dtype=torch.int32), torch.empty_like(x)
    e4m3, rnd = torch.empty_like(x), torch.empty_like(x)
    _numbers_probe[(triton.cdiv(x.numel(), 1024),)](x, code, e2m1, e4m3, rnd, x.numel(), BLOCK=1024)
    x = x.cpu()
    rt.assert_bits_equal(code.cpu().to(torch.uint8), ref.e2m1_encode(x), name="e2m1_code")
    rt.assert_bits_equal(e2m1.cpu(), ref.e2m1_decode(ref.e2m1_encode(x)), name="e2m1_round")
    rt.assert_bits_equal(e4m3.cpu(), ref.e4m3_round(x).float(), name="e4m3_value")
    # torch.round rounds ties to even too; a zero result is +0 in rint, as integer codes decode
    rt.assert_bits_equal(rnd.cpu(), torch.round(x * 1024.0) + 0.0, name="rint")


@triton.jit
def _scales_probe(s_ptr, bf16_ptr, fp16_ptr, pow2_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(s_ptr + offs, mask=mask, other=1.0)
    tl.store(bf16_ptr + offs, kn.round_scale_down(s, 1), mask=mask)
    tl.store(fp16_ptr + offs, kn.round_scale_down(s, 2), mask=mask)
    tl.store(pow2_ptr + offs, kn.pow2_ceil(s), mask=mask)


def _positive_scales() -> torch.Tensor:
    """Positive fp32 values over every exponent (subnormals too), with mantissas at and next to the bf16 / fp16
    rounding points, the dtypes' limits and their neighbours, +inf and NaN."""
    bits = torch.arange(1, 255, dtype=torch.int64)[:, None] << 23
    mantissas = torch.tensor([0, 1, 0x1FFF, 0x2000, 0x2001, 0xFFFF, 0x10000, 0x10001, 0x400000, 0x7FFFFF])
    normal = (bits + mantissas[None, :]).reshape(-1)
    sub = torch.tensor([1, 2, 3, 0x3FF, 0x400, 0x401, 0xFFFF, 0x10000, 0x10001, 0x400000, 0x7FFFFF])
    limits = torch.tensor([65504.0, 65520.0, 2**-14, 2**-24, 3.3895314e38, 3.4028235e38, float("inf"), float("nan")])
    limits = torch.cat([limits, torch.nextafter(limits[:6], torch.tensor(0.0)),
                        torch.nextafter(limits[:6], torch.tensor(float("inf")))])
    return torch.cat([normal.to(torch.int32).view(torch.float32), sub.to(torch.int32).view(torch.float32), limits])


def test_scale_functions_equal_the_reference_bit_for_bit():
    """round_scale_down (bf16, fp16) and pow2_ceil, what the quant kernel derives row / tensor scales and NVFP4's
    "pow2" global scale with, against rotfn.ops.quant's round_scale and nvfp4_global_from_amax."""
    from rotfn.ops import quant as ref

    s = _positive_scales().to(DEVICE)
    bf16, fp16, pow2 = torch.empty_like(s), torch.empty_like(s), torch.empty_like(s)
    _scales_probe[(triton.cdiv(s.numel(), 1024),)](s, bf16, fp16, pow2, s.numel(), BLOCK=1024)
    s = s.cpu()
    rt.assert_bits_equal(bf16.cpu(), ref.round_scale(s, "bfloat16"), name="round_scale_down bfloat16")
    rt.assert_bits_equal(fp16.cpu(), ref.round_scale(s, "float16"), name="round_scale_down float16")
    finite = torch.isfinite(s) & (s <= 2.0**127)
    amax = s[finite] * 2688.0  # nvfp4_global_from_amax divides by 2688 first: undo it exactly where it is exact
    exact = torch.isfinite(amax) & ((amax / 2688.0) == s[finite])
    rt.assert_bits_equal(pow2.cpu()[finite][exact], ref.nvfp4_global_from_amax(amax[exact], pow2=True),
                         name="pow2_ceil")


@pytest.mark.parametrize("fmt", [rotfn.intq(4, group=32, scale_dtype="bfloat16"),
                                 rotfn.intq(4, group=16, symmetric=False, scale_dtype="float16"),
                                 rotfn.intq(8, scale_dtype="bfloat16"), rotfn.fp8("tensor", scale_dtype="float16")])
def test_scales_rounded_to_a_dtype_run_on_the_kernels_bit_for_bit(fmt):
    span = 30 if fmt.scale_dtype == "bfloat16" else 3  # float16 scales saturate at 65504 (zero points overflow)
    x = torch.randn(4, 64, device=DEVICE) * torch.logspace(-span, span, 4, device=DEVICE)[:, None]
    with _on_triton("qdq"):
        y = rotfn.qdq(x, fmt, backend="triton")
    rt.assert_bits_equal(y.cpu(), rotfn.qdq(x.cpu(), fmt, backend="torch"))
    with _on_triton("quantize"):
        q = rotfn.quantize(x, fmt, backend="triton")
    want = rotfn.quantize(x.cpu(), fmt, backend="torch")
    rt.assert_bits_equal(q.codes.cpu(), want.codes)
    rt.assert_bits_equal(q.scales.cpu(), want.scales)

ALLOCATION_CASES = {  # (op, rotation, format): the allocations of one call (the output; pass 1's statistics)
    "qdq mxfp4": ("qdq", None, rotfn.mxfp4(), 1),
    "qdq int4 per row": ("qdq", None, rotfn.intq(4), 2),
    "qdq nvfp4 tensor": ("qdq", None, rotfn.nvfp4(), 2),
    "qdq fp8 per token": ("qdq", None, rotfn.fp8("token"), 2),
    "rotate block 32": ("rotate", rotfn.hadamard(4096, block=32, seed=0), None, 1),
    "rotate_qdq block 32 mxfp4": ("rotate_qdq", rotfn.hadamard(4096, block=32, seed=0), rotfn.mxfp4(), 1),
    "rotate_qdq block 128 fp8 per token": ("rotate_qdq", rotfn.hadamard(4096, block=128, seed=0), rotfn.fp8("token"),
                                           2),
    "rotate full 4096": ("rotate", rotfn.hadamard(4096, seed=0), None, 1),
    "rotate_qdq full 4096 mxfp4": ("rotate_qdq", rotfn.hadamard(4096, seed=0), rotfn.mxfp4(), 1),
}


@pytest.mark.skipif(not CUDA, reason="counts allocations of the CUDA caching allocator")
@pytest.mark.parametrize("case", ALLOCATION_CASES)
def test_kernels_allocate_only_their_output_and_statistics(case):
    op, rotation, fmt, expected = ALLOCATION_CASES[case]
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    call = {"qdq": lambda: rotfn.qdq(x, fmt, backend="triton"),
            "rotate": lambda: rotfn.rotate(x, rotation, backend="triton"),
            "rotate_qdq": lambda: rotfn.rotate_qdq(x, rotation, fmt, backend="triton")}[op]
    call()  # the first call compiles and caches the rotation's device tables
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    with torch.no_grad():
        y = call()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] - before == expected, case
    assert y.shape == x.shape
