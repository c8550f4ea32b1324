"""Assertion helpers for rotations and quantizers, with reports that show where and by how much."""

from __future__ import annotations

import torch

from rotfn.functional import qdq, rotate, rotate_back
from rotfn.specs.formats import MX, Format, IntQ
from rotfn.specs.rotation import Rotation

__all__ = ["assert_bits_equal", "assert_orthogonal", "assert_inverse", "assert_qdq_laws", "bits"]

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor as a same-width integer tensor (NaNs compare by payload).

    Example:
        >>> import torch
        >>> bits(torch.tensor([1.0, -0.0]))
        tensor([ 1065353216, -2147483648], dtype=torch.int32)
    """
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def assert_bits_equal(
    actual: torch.Tensor, expected: torch.Tensor, *, name: str = "tensor", show: int = 5, nan_payload: bool = False
) -> None:
    """Assert two tensors are identical bit for bit (dtype, shape and every bit, the sign of zero included).

    NaN matches NaN whatever its sign and payload (devices disagree on the NaN a
    float-to-half cast produces), unless ``nan_payload=True``.

    Raises:
        AssertionError: listing the number of mismatches and the first ``show`` with index and both values.

    Example:
        >>> import torch
        >>> assert_bits_equal(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))
    """
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        raise AssertionError(
            f"{name}: dtype/shape differ: {actual.dtype}{tuple(actual.shape)} vs {expected.dtype}{tuple(expected.shape)}"
        )
    diff = bits(actual.cpu()) != bits(expected.cpu())
    if not nan_payload and actual.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        diff &= ~(actual.cpu().isnan() & expected.cpu().isnan())
    if diff.any():
        idx = diff.nonzero()[:show]
        a, e = actual.cpu(), expected.cpu()
        rows = [f"  at {tuple(i.tolist())}: {a[tuple(i)].float().item()!r} vs {e[tuple(i)].float().item()!r}" for i in idx]
        raise AssertionError(f"{name}: {int(diff.sum())} of {diff.numel()} elements differ in bits\n" + "\n".join(rows))


def assert_orthogonal(r: Rotation, *, atol: float = 1e-12, rows: int = 8, dense_max: int = 2048) -> None:
    """Assert ``R @ R.T == I`` in float64 within ``atol``.

    For ``n <= dense_max`` the dense matrix is checked; above that, ``rows`` rows
    of R (obtained by rotating basis vectors, spread over the whole range) are
    checked for orthonormality against each other and for ``rotate_back``
    returning the basis vectors, so huge orders cost ``O(rows * n log n)``.

    Raises:
        AssertionError: with the largest deviation found.

    Example:
        >>> import rotfn
        >>> assert_orthogonal(rotfn.hadamard(11008, seed=0))   # 11008 > dense_max: sampled rows
    """
    n = r.n
    if n <= dense_max:
        m = r.matrix()
        err = (m @ m.T - torch.eye(n, dtype=torch.float64)).abs().max().item()
    else:
        pick = torch.linspace(0, n - 1, rows, dtype=torch.float64).round().long().unique()
        basis = torch.zeros(len(pick), n, dtype=torch.float64)
        basis[torch.arange(len(pick)), pick] = 1.0
        some_rows = rotate(basis, r)
        err = max(
            (some_rows @ some_rows.T - torch.eye(len(pick), dtype=torch.float64)).abs().max().item(),
            (rotate_back(some_rows, r) - basis).abs().max().item(),
        )
    if not err <= atol:
        raise AssertionError(f"{r!r} is not orthogonal: max |R R^T - I| = {err:.3g} > {atol:g}")


def assert_inverse(x: torch.Tensor, r: Rotation, *, atol: float | None = None) -> None:
    """Assert ``rotate_back(rotate(x, R), R) == x`` within ``atol`` (default by dtype, relative to max |x|).

    Example:
        >>> import torch, rotfn
        >>> assert_inverse(torch.randn(3, 64, dtype=torch.bfloat16), rotfn.orthogonal(64, seed=0))
    """
    default = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
    tol = (default[x.dtype] if atol is None else atol) * max(1.0, x.abs().max().item())
    err = (rotate_back(rotate(x, r), r).double() - x.double()).abs().max().item()
    if not err <= tol:
        raise AssertionError(f"rotate_back(rotate(x, R), R) != x for {r!r}: max error {err:.3g} > {tol:.3g}")


def assert_qdq_laws(x: torch.Tensor, fmt: Format) -> None:
    """Assert the laws every quantizer obeys on finite ``x``.

    Shape and dtype preserved; the input untouched; idempotent
    (``qdq(qdq(x)) == qdq(x)`` bit for bit) for MX formats in any dtype, and for
    symmetric intq without clipping on float32/float64 inputs (a float16/bfloat16
    output re-rounds ``q * s``, which moves the next scale); asymmetric intq on
    float32/float64 is idempotent up to one fp32 rounding of its scale (its range
    ``(q_max - z) s - (-z s)`` is re-rounded), checked as 4 ulp.

    Raises:
        AssertionError: naming the law that failed.

    Example:
        >>> import torch, rotfn
        >>> assert_qdq_laws(torch.randn(4, 64), rotfn.mxfp4("even"))
    """
    before = x.clone()
    y = qdq(x, fmt)
    assert y.shape == x.shape and y.dtype == x.dtype, f"{fmt!r}: qdq changed shape/dtype"
    assert_bits_equal(x, before, name=f"{fmt!r}: input after qdq")
    intq_exact = isinstance(fmt, IntQ) and fmt.clip == 1.0 and x.dtype in (torch.float32, torch.float64)
    if isinstance(fmt, MX) or (intq_exact and fmt.symmetric):
        assert_bits_equal(qdq(y, fmt), y, name=f"{fmt!r}: qdq(qdq(x)) vs qdq(x)")
    elif intq_exact:
        again = qdq(y, fmt)
        tol = 4 * torch.finfo(torch.float32).eps * y.abs().amax(-1, keepdim=True)
        if not bool(((again - y).abs() <= tol).all()):
            raise AssertionError(f"{fmt!r}: qdq(qdq(x)) differs from qdq(x) by more than 4 ulp of the row max")
