"""Public tensor functions: validate every argument, then dispatch.

Legend: ``x`` is ``[..., n]``, any leading shape, dtype float16, bfloat16,
float32 or float64, on any device; every function acts on the last dim (the rotations on
``dim``, the last by default) and returns a new tensor (the input is never modified). ``backend`` is ``"auto"``,
``"torch"`` or ``"triton"`` (see :mod:`rotfn.dispatch`).
"""

from __future__ import annotations

import torch

from rotfn import dispatch
from rotfn.errors import ArgumentError, DTypeError, FormatError, RotationError, ShapeError, message
from rotfn.specs import QTensor
from rotfn.specs.formats import Format
from rotfn.specs.rotation import Rotation

__all__ = ["rotate", "rotate_back", "qdq", "quantize", "dequantize", "rotate_qdq", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----- validation ------------------------------------------------------------
def _check_x(fn: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise DTypeError(message(fn, "x", "a torch.Tensor", type(x).__name__, "wrap it with torch.as_tensor"))
    if x.dtype not in FLOAT_DTYPES:
        raise DTypeError(message(fn, "x", "dtype float16, bfloat16, float32 or float64", x.dtype, "cast with x.float()"))
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ShapeError(message(fn, "x", "shape [..., n] with n >= 1", f"shape {tuple(x.shape)}"))


def _check_dim(fn: str, x: torch.Tensor, dim) -> int:
    """``dim`` as a negative index of x (``-1`` the last dim), or ArgumentError."""
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise ArgumentError(message(fn, "dim", f"an int in [{-x.ndim}, {x.ndim}) (x has {x.ndim} dims)", repr(dim),
                                    "pass dim=-1 (the last dim) or the index of the dim to rotate"))
    return dim - x.ndim if dim >= 0 else dim


def _check_rotation(fn: str, x: torch.Tensor, r, dim: int = -1) -> None:
    if not isinstance(r, Rotation):
        raise RotationError(
            message(fn, "R", "a rotfn.Rotation", type(r).__name__,
                    "build one with rotfn.hadamard, rotfn.orthogonal or rotfn.from_matrix")
        )
    if x.shape[dim] != r.n:
        where = "last dim" if dim == -1 else f"dim {dim} of size"
        raise ShapeError(
            message(fn, "x", f"{where} {r.n} (the rotation's n)", f"shape {tuple(x.shape)}",
                    f"build the rotation for n={x.shape[dim]} or reshape x")
        )


def _check_format(fn: str, x: torch.Tensor, fmt, dim: int = -1) -> None:
    if not isinstance(fmt, Format):
        raise FormatError(
            message(fn, "fmt", "a rotfn format spec", type(fmt).__name__,
                    "build one with rotfn.mxfp4(), rotfn.nvfp4(), rotfn.intq(4) ...")
        )
    n = x.shape[dim]
    if fmt.group is not None and n % fmt.group:
        where = "last dim" if dim == -1 else f"dim {dim} of a size"
        raise ShapeError(
            message(fn, "x", f"{where} divisible by {fmt!r}'s group of {fmt.group}", f"shape {tuple(x.shape)}",
                    "quantize a dim that is a multiple of the group (rotfn never pads)")
        )


def _check_backend(fn: str, backend) -> None:
    if backend not in dispatch.BACKENDS:
        raise ArgumentError(message(fn, "backend", f"one of {dispatch.BACKENDS}", repr(backend)))


# ----- autograd wrappers (torch.func compatible) -------------------------------
class _Rotate(torch.autograd.Function):
    """``x @ R``; backward is ``g @ R.T``: the transpose spec, not the same op again."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, r, backend, dim):
        return dispatch.select("rotate", "rotate", backend, x, dim=dim, rotation=r)(x, r)

    @staticmethod
    def run(x, r, backend, dim):
        """``apply``, or with gradients off (nothing to record) the forward alone: ``apply`` binds its
        arguments through ``inspect`` on every call, ~30 us, which a streaming fold pays per piece."""
        return _Rotate.apply(x, r, backend, dim) if torch.is_grad_enabled() else _Rotate.forward(x, r, backend, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.r, ctx.backend, ctx.dim = inputs[1], inputs[2], inputs[3]

    @staticmethod
    def backward(ctx, g):
        return _Rotate.apply(g, ctx.r.T, ctx.backend, ctx.dim), None, None, None


class _StraightThrough(torch.autograd.Function):
    """A quantizer with the straight-through gradient: ``d qdq(x) / dx := I``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, impl, fmt):
        return impl(x, fmt)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g, None, None


# ----- public functions --------------------------------------------------------
def rotate(x: torch.Tensor, R: Rotation, *, dim: int = -1, backend: str = "auto") -> torch.Tensor:  # noqa: N803
    """Rotate the last dim (or ``dim``): ``y = x @ R``.

    Hadamard rotations run as a fast Walsh-Hadamard transform (``O(n log n)``),
    never as a dense matrix; math in fp32 (fp64 for fp64 inputs), output in x's dtype.
    Differentiable: the gradient is ``g @ R.T``. Along another dim it is the same rotation of
    the vectors that dim holds: ``rotate(x, R, dim=d) == rotate(x.movedim(d, -1), R).movedim(-1, d)``
    bit for bit; for a weight ``W: [out, in]``, ``rotate(W, R, dim=0) == R.T @ W`` (its output side).

    Args:
        x: ``[..., n]`` floating tensor (``n`` at ``dim``).
        R: a :class:`rotfn.Rotation` with ``R.n == n``.
        dim: the dim to rotate, ``-x.ndim <= dim < x.ndim`` (default the last).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        Tensor of x's shape, dtype and device.

    Raises:
        DTypeError: x not a float16/bfloat16/float32/float64 tensor.
        ArgumentError: dim not an int in range.
        ShapeError: ``x.shape[dim] != R.n``.
        RotationError: R not a Rotation.
        BackendUnavailableError: ``backend="triton"`` cannot run this call.

    Example:
        >>> import torch, rotfn
        >>> R = rotfn.hadamard(4, seed=0)
        >>> x = torch.tensor([1.0, 2.0, 3.0, 4.0])
        >>> torch.allclose(rotfn.rotate(x, R), x @ R.matrix(torch.float32))
        True
        >>> torch.allclose(rotfn.rotate_back(rotfn.rotate(x, R), R), x)
        True
        >>> W = torch.randn(4, 3, dtype=torch.float64)
        >>> torch.allclose(rotfn.rotate(W, R, dim=0), R.matrix().T @ W)
        True
    """
    _check_x("rotate", x)
    dim = _check_dim("rotate", x, dim)
    _check_rotation("rotate", x, R, dim)
    _check_backend("rotate", backend)
    return _Rotate.run(x, R, backend, dim)


def rotate_back(x: torch.Tensor, R: Rotation, *, dim: int = -1, backend: str = "auto") -> torch.Tensor:  # noqa: N803
    """Undo :func:`rotate`: ``y = x @ R.T`` (the inverse, since R is orthogonal), along the last dim or ``dim``.

    Uses the transpose of R's spec (same blocks, same partition, signs applied
    first), so ``rotate_back(rotate(x, R), R) == x`` up to rounding even when R is
    not symmetric.

    Args:
        x: ``[..., n]`` floating tensor (``n`` at ``dim``).
        R: the rotation that was applied.
        dim: the dim to rotate back (default the last).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        Tensor of x's shape, dtype and device.

    Raises:
        DTypeError, ArgumentError, ShapeError, RotationError, BackendUnavailableError: as :func:`rotate`.

    Example:
        >>> import torch, rotfn
        >>> R = rotfn.orthogonal(8, seed=0)
        >>> x = torch.randn(3, 8, dtype=torch.float64)
        >>> y = torch.randn(8, 3, dtype=torch.float64)
        >>> torch.allclose(rotfn.rotate_back(rotfn.rotate(y, R, dim=0), R, dim=0), y)
        True
    """
    _check_x("rotate_back", x)
    dim = _check_dim("rotate_back", x, dim)
    _check_rotation("rotate_back", x, R, dim)
    _check_backend("rotate_back", backend)
    return _Rotate.run(x, R.T, backend, dim)


def qdq(x: torch.Tensor, fmt: Format, *, backend: str = "auto") -> torch.Tensor:
    """Fake-quantize: round x to ``fmt`` and back, ``dequantize(quantize(x, fmt))``.

    Bit-exact to the rules of ``docs/formats.md``; the gradient is straight-through
    (identity). Groups holding NaN or Inf come back as NaN.

    Args:
        x: ``[..., n]`` floating tensor; n divisible by the format's group (32 for
            MX, 16 for NVFP4, ``group`` for intq).
        fmt: a format spec (:func:`rotfn.mxfp4`, :func:`rotfn.nvfp4`, ...).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        Tensor of x's shape, dtype and device.

    Raises:
        DTypeError: x not floating.
        ShapeError: n not divisible by the format's group.
        FormatError: fmt not a format spec.
        BackendUnavailableError: ``backend="triton"`` cannot run this call.

    Example:
        >>> import torch, rotfn
        >>> rotfn.qdq(torch.tensor([[0.3, -1.2] + [0.0] * 30]), rotfn.mxfp4())[0, :2]
        tensor([ 0.2500, -1.0000])
    """
    _check_x("qdq", x)
    _check_format("qdq", x, fmt)
    _check_backend("qdq", backend)
    impl = dispatch.select("qdq", "qdq", backend, x, fmt=fmt)
    return _StraightThrough.apply(x, impl, fmt) if torch.is_grad_enabled() else impl(x, fmt)


def quantize(x: torch.Tensor, fmt: Format, *, backend: str = "auto") -> QTensor:
    """Quantize to packed codes and scales (a :class:`rotfn.QTensor`).

    ``dequantize(quantize(x, fmt))`` equals ``qdq(x, fmt)`` bit for bit.

    Args:
        x: ``[..., n]`` floating tensor (n divisible by the format's group).
        fmt: a format spec.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        A QTensor: 4-bit codes two per uint8 byte, scales as float8_e8m0fnu (MX),
        float8_e4m3fn (NVFP4) or float32 (intq, fp8).

    Raises:
        DTypeError, ShapeError, FormatError, BackendUnavailableError: as :func:`qdq`.

    Example:
        >>> import torch, rotfn
        >>> q = rotfn.quantize(torch.randn(4, 64), rotfn.mxfp4())
        >>> q.codes.shape, q.scales.shape, q.scales.dtype
        (torch.Size([4, 32]), torch.Size([4, 2]), torch.float8_e8m0fnu)
    """
    _check_x("quantize", x)
    _check_format("quantize", x, fmt)
    _check_backend("quantize", backend)
    with torch.no_grad():
        return dispatch.select("quantize", "quantize", backend, x, fmt=fmt)(x.detach(), fmt)


def dequantize(q: QTensor, dtype: torch.dtype | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Decode a :class:`rotfn.QTensor` to a tensor (fp32 math, one cast to ``dtype``).

    Args:
        q: the output of :func:`rotfn.quantize`.
        dtype: output dtype (float16/bfloat16/float32/float64); default the dtype that was quantized.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        Tensor of shape ``q.shape`` on q's device.

    Raises:
        TypeError (DTypeError): q not a QTensor, or dtype not floating.

    Example:
        >>> import torch, rotfn
        >>> x = torch.randn(2, 32)
        >>> torch.equal(rotfn.dequantize(rotfn.quantize(x, rotfn.nvfp4())), rotfn.qdq(x, rotfn.nvfp4()))
        True
    """
    if not isinstance(q, QTensor):
        raise DTypeError(message("dequantize", "q", "a rotfn.QTensor", type(q).__name__, "create it with rotfn.quantize"))
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise DTypeError(message("dequantize", "dtype", "float16, bfloat16, float32 or float64", dtype))
    _check_backend("dequantize", backend)
    return dispatch.select("dequantize", "dequantize", backend, q.codes, fmt=q.format)(q, dtype)


def rotate_qdq(
    x: torch.Tensor, R: Rotation, fmt: Format, *, back: bool = False, dim: int = -1, backend: str = "auto"  # noqa: N803
) -> torch.Tensor:
    """Rotate then fake-quantize: ``qdq(rotate(x, R), fmt)``; with ``back=True`` also ``rotate_back``.

    ``back=False`` is the online activation path (``x' = Q(x R)`` feeding ``W R``);
    ``back=True`` measures quantization error in the original basis,
    ``R^T Q(x R)``. One fused kernel on GPU; gradient straight through the qdq. With ``dim``
    the rotation and the format's groups run along that dim, as ``rotate(x, R, dim=dim)`` does.

    Args:
        x: ``[..., n]`` floating tensor with ``n == R.n`` (at ``dim``) divisible by the format's group.
        R: a :class:`rotfn.Rotation`.
        fmt: a format spec.
        back: rotate back after quantizing.
        dim: the dim to rotate and quantize (default the last).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        Tensor of x's shape, dtype and device.

    Raises:
        DTypeError: x not floating, or back not a bool.
        ArgumentError: dim not an int in range.
        ShapeError: ``x.shape[dim] != R.n``, or n not divisible by the format's group.
        RotationError: R not a Rotation.
        FormatError: fmt not a format spec.
        BackendUnavailableError: ``backend="triton"`` cannot run this call.

    Example:
        >>> import torch, rotfn
        >>> x = torch.randn(8, 64)
        >>> R = rotfn.hadamard(64, block=32, seed=0)
        >>> torch.equal(rotfn.rotate_qdq(x, R, rotfn.mxfp4()), rotfn.qdq(rotfn.rotate(x, R), rotfn.mxfp4()))
        True
    """
    _check_x("rotate_qdq", x)
    dim = _check_dim("rotate_qdq", x, dim)
    _check_rotation("rotate_qdq", x, R, dim)
    _check_format("rotate_qdq", x, fmt, dim)
    if not isinstance(back, bool):
        raise DTypeError(message("rotate_qdq", "back", "a bool", repr(back)))
    _check_backend("rotate_qdq", backend)
    impl = dispatch.select("rotate_qdq", "rotate_qdq", backend, x, dim=dim, rotation=R, fmt=fmt, back=back)
    if not torch.is_grad_enabled():  # nothing to record: skip apply's per-call argument binding, as qdq does
        return impl(x, R, fmt, back)
    return _RotateQDQ.apply(x, impl, R, fmt, back, backend, dim)


class _RotateQDQ(torch.autograd.Function):
    """Fused rotate + qdq (+ rotate back) with the straight-through gradient of its qdq.

    ``d/dx Q(x R) := g R^T``; with ``back`` the two rotations cancel to the identity.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, impl, r, fmt, back, backend, dim):
        return impl(x, r, fmt, back)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.r, ctx.back, ctx.backend, ctx.dim = inputs[2], inputs[4], inputs[5], inputs[6]

    @staticmethod
    def backward(ctx, g):
        grad = g if ctx.back else _Rotate.apply(g, ctx.r.T, ctx.backend, ctx.dim)
        return grad, None, None, None, None, None, None
