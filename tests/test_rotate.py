"""rotate / rotate_back: equal x @ R and x @ R.T, invert each other, never touch the input, differentiate."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rotfn
import rotfn.testing as rt

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@st.composite
def rotation_and_input(draw, dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16), max_n=128):
    r = draw(rt.rotations(max_n=max_n))
    x = draw(rt.tensors(r.n, dtypes=dtypes, scale_exponents=(-4, 4)))
    return r, x


@given(rotation_and_input())
def test_rotate_equals_dense_matmul(case):
    r, x = case
    before = x.clone()
    y = rotfn.rotate(x, r)
    assert y.dtype == x.dtype and y.shape == x.shape
    rt.assert_bits_equal(x, before, name="input after rotate")
    expected = (x.double() @ r.matrix()).to(x.dtype)
    scale = max(1.0, x.abs().max().item())
    torch.testing.assert_close(y.double(), expected.double(), rtol=0, atol=TOL[x.dtype] * scale * 4)


@given(rotation_and_input())
def test_rotate_back_inverts_rotate(case):
    r, x = case
    rt.assert_inverse(x, r)
    torch.testing.assert_close(
        rotfn.rotate_back(x, r).double(), (x.double() @ r.matrix().T).to(x.dtype).double(),
        rtol=0, atol=TOL[x.dtype] * max(1.0, x.abs().max().item()) * 4,
    )


@given(rotation_and_input(dtypes=(torch.float64,)))
def test_rotate_with_transpose_spec_is_rotate_back(case):
    r, x = case
    assert torch.equal(rotfn.rotate(x, r.T), rotfn.rotate_back(x, r))


@pytest.mark.parametrize("shape", [(64,), (0, 64), (2, 3, 64), (1, 1, 1, 64)])
def test_any_leading_shape(shape):
    r = rotfn.hadamard(64, seed=0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    y = rotfn.rotate(x, r)
    assert y.shape == x.shape
    if x.numel():
        torch.testing.assert_close(y.reshape(-1, 64), x.reshape(-1, 64) @ r.matrix(torch.float32), rtol=0, atol=1e-5)


def test_non_contiguous_input():
    r = rotfn.hadamard(32, seed=0)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)).T  # [8, 32], strided
    assert not x.is_contiguous()
    torch.testing.assert_close(rotfn.rotate(x, r), x.contiguous() @ r.matrix(torch.float32), rtol=0, atol=1e-5)


@given(rt.rotations(max_n=128), rt.seeds(), st.integers(0, 2), st.integers(1, 40))
def test_a_transposed_view_is_rotated_where_it_lies(r, seed, dim, columns):
    """The columns of a weight (``t.movedim(dim, -1)`` of a contiguous t) rotate in place in memory: same values."""
    shape = [2, 3, columns]
    shape[dim] = r.n
    t = rt.make_tensor("normal", tuple(shape), seed, dtype=torch.float64)
    x = t.movedim(dim, -1)
    y = rotfn.rotate(x, r)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x.contiguous() @ r.matrix(), rtol=0, atol=1e-12)
    torch.testing.assert_close(rotfn.rotate_back(y, r), x, rtol=0, atol=1e-12)


def test_half_precision_computes_in_fp32():
    r = rotfn.hadamard(256, seed=0)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    expected = (x.float() @ r.matrix(torch.float32)).to(torch.bfloat16)
    # one rounding at the end: at most one bf16 ulp away from the fp32 result rounded once
    assert (rotfn.rotate(x, r).float() - expected.float()).abs().max() <= 2**-7 * expected.float().abs().max()


@given(rt.rotations(max_n=64), rt.seeds())
def test_gradient_of_rotate_is_rotate_back(r, seed):
    x = rt.make_tensor("normal", (3, r.n), seed, dtype=torch.float64).requires_grad_()
    g = rt.make_tensor("normal", (3, r.n), seed + 1, dtype=torch.float64)
    (rotfn.rotate(x, r) * g).sum().backward()
    torch.testing.assert_close(x.grad, rotfn.rotate_back(g, r), rtol=0, atol=1e-12)


def test_torch_func_grad_and_vmap():
    r = rotfn.hadamard(32, seed=1)
    x = torch.randn(5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grad = torch.func.grad(lambda v: (rotfn.rotate(v, r) * w).sum())(x[0])
    torch.testing.assert_close(grad, r.matrix() @ w, rtol=0, atol=1e-12)
    batched = torch.func.vmap(lambda v: rotfn.rotate(v, r))(x)
    torch.testing.assert_close(batched, x @ r.matrix(), rtol=0, atol=1e-12)
    # second order: the backward is itself differentiable
    hvp = torch.autograd.functional.hessian(lambda v: rotfn.rotate(v, r).pow(2).sum(), x[0])
    torch.testing.assert_close(hvp, 2 * torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-12)


# ----- dim: any dim, moved last and back ------------------------------------------------------------
@settings(max_examples=12)
@given(rt.rotations(max_n=64), rt.seeds(), st.integers(-3, 2), st.sampled_from([torch.float64, torch.float32]))
def test_rotate_along_dim_is_rotate_of_the_moved_dim(r, seed, dim, dtype):
    """``rotate(x, R, dim=d) == rotate(x.movedim(d, -1), R).movedim(-1, d)`` bit for bit; rotate_back inverts it."""
    shape = [2, 3, 5]
    shape[dim] = r.n
    x = rt.make_tensor("normal", tuple(shape), seed, dtype=dtype)
    y = rotfn.rotate(x, r, dim=dim)
    rt.assert_bits_equal(y, rotfn.rotate(x.movedim(dim, -1), r).movedim(-1, dim), name="rotate(dim=)")
    rt.assert_bits_equal(rotfn.rotate_back(x, r, dim=dim), rotfn.rotate_back(x.movedim(dim, -1), r).movedim(-1, dim),
                         name="rotate_back(dim=)")
    torch.testing.assert_close(rotfn.rotate_back(y, r, dim=dim), x, rtol=0, atol=TOL[dtype] * 4 * x.abs().max().item())


def test_a_weight_output_side_is_dim_0():
    """``rotate(W, R, dim=0) == R.T @ W``: what the fold does to a weight's output side; gradient along dim 0 too."""
    r = rotfn.orthogonal(6, seed=2)
    w = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    y = rotfn.rotate(w, r, dim=0)
    torch.testing.assert_close(y, r.matrix().T @ w, rtol=0, atol=1e-12)
    g = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (y * g).sum().backward()
    torch.testing.assert_close(w.grad, rotfn.rotate_back(g, r, dim=0), rtol=0, atol=1e-12)


def test_rotate_qdq_along_dim_quantizes_that_dim():
    r, fmt = rotfn.hadamard(32, seed=0), rotfn.mxfp4()
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
    got = rotfn.rotate_qdq(x, r, fmt, dim=0)
    rt.assert_bits_equal(got, rotfn.rotate_qdq(x.T, r, fmt).T, name="rotate_qdq(dim=0)")
    back = rotfn.rotate_qdq(x, r, fmt, back=True, dim=0)
    rt.assert_bits_equal(back, rotfn.rotate_qdq(x.T, r, fmt, back=True).T, name="rotate_qdq(back=True, dim=0)")


@pytest.mark.parametrize("fn", [rotfn.rotate, rotfn.rotate_back,
                                lambda x, r, dim: rotfn.rotate_qdq(x, r, rotfn.intq(8), dim=dim)])
@pytest.mark.parametrize("dim", [2, -3, 1.0, True, None])
def test_a_dim_out_of_range_or_not_an_int_is_an_argument_error(fn, dim):
    with pytest.raises(rotfn.errors.ArgumentError, match=r"argument 'dim'.*expected an int in \[-2, 2\)"):
        fn(torch.ones(4, 4), rotfn.hadamard(4), dim=dim)


def test_a_dim_of_another_size_is_a_shape_error():
    with pytest.raises(rotfn.errors.ShapeError, match="dim -2 of size 4"):
        rotfn.rotate(torch.ones(3, 4), rotfn.hadamard(4), dim=0)
