"""``rotfn.gptq``: validation and dispatch around the reference :func:`rotfn.ops.gptq`."""

from __future__ import annotations

import torch

from rotfn import dispatch, ops
from rotfn.errors import ArgumentError, DTypeError, FormatError, ShapeError, message
from rotfn.functional import FLOAT_DTYPES, quantize
from rotfn.specs import QTensor
from rotfn.specs.formats import Format

__all__ = ["gptq"]

_PRECISIONS = {"float64": torch.float64, "float32": torch.float32}


def gptq(
    w: torch.Tensor,
    h: torch.Tensor | None,
    fmt: Format,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    scale_search: str | None = None,
    precision: str = "float64",
    backend: str = "auto",
) -> QTensor:
    r"""Round a weight to ``fmt`` with GPTQ: each column's rounding error is compensated on the columns not yet rounded.

    GPTQ (Frantar et al. 2022) minimises the layer's output error on the calibration inputs,

    .. math:: \min_Q \operatorname{tr}\big((W - Q)\, H\, (W - Q)^\top\big), \qquad H = X^\top X / N,

    one column at a time: with ``U`` the upper Cholesky factor of ``(H + \lambda I)^{-1}``
    (``\lambda`` = ``damp`` times the mean of ``diag H``), rounding column ``j`` to ``q_j``
    updates every later column ``k`` by ``w_k -= (w_j - q_j) U_{jk} / U_{jj}``. The steps and
    choices (dead inputs, column blocks, when group scales are fixed) are in the reference's
    module docstring (``rotfn/ops/_gptq.py``).
    ``h=None`` is round to nearest (``quantize``), with the scale search when asked, and
    ``h = I`` gives round to nearest exactly.

    Args:
        w: ``[out, n]`` floating weight (the linear computes ``x @ w.T``); n divisible by the
            format's group. Not modified.
        h: ``[n, n]`` Hessian of the linear's inputs, ``X^T X / N`` (any float dtype, same device
            as ``w``), or None for round to nearest.
        fmt: a weight format: :func:`rotfn.mxfp4` (any scale rule), :func:`rotfn.mxfp8`,
            :func:`rotfn.nvfp4`, :func:`rotfn.intq` (groups, symmetric or not), :func:`rotfn.fp8`.
        block_size: columns per lazy-update block (widened to a multiple of the group).
        damp: relative damping added to ``diag H`` (``damp * mean(diag H)``), >= 0.
        act_order: quantize columns in order of decreasing ``H[j, j]`` (the order is undone
            in the result); fixes every group's scales up front, as ``static_groups``.
        static_groups: take every group's scales from ``w`` before any update, instead of
            when the group's first column is reached.
        scale_search: None (the format's scale rule) or ``"mse"``: per group, the candidate
            scale with the least squared error (MX: the floor exponent or the next one up;
            NVFP4: the rule's E4M3 scale or a neighbour; intq, fp8: clip ratios 1.0 .. 0.8),
            chosen when the group's scales are fixed, as MR-GPTQ does.
        precision: ``"float64"`` or ``"float32"``: the dtype of the Hessian math (the
            format's rounding is fp32 either way).
        backend: ``"auto"`` (the Triton kernel for CUDA tensors, the reference otherwise),
            ``"torch"`` (the reference, on ``w``'s device) or ``"triton"``: the column loop in one
            kernel launch per scale group (:mod:`rotfn.kernels.gptq`), the same codes as the
            reference on the same device and precision. Round to nearest (``h=None`` without a
            scale search) is :func:`rotfn.quantize` and dispatches as it does.

    Returns:
        A :class:`rotfn.QTensor` of ``fmt`` with ``w``'s shape and dtype.

    Raises:
        DTypeError: ``w`` or ``h`` not a floating tensor.
        ShapeError: ``w`` not 2-d, n not divisible by the group, ``h`` not ``[n, n]``, or on another device.
        ArgumentError: non-finite values in ``w`` or ``h``; bad ``block_size``, ``damp``,
            ``scale_search``, ``precision`` or ``backend``; ``h`` not positive definite after
            damping (the message says how much was added).
        FormatError: ``fmt`` not a format spec.
        BackendUnavailableError: ``backend="triton"`` and the kernel cannot run (no CUDA tensor, no Triton).

    Example:
        >>> import torch, rotfn
        >>> w, x = torch.randn(8, 64), torch.randn(256, 64)
        >>> q = rotfn.gptq(w, x.T @ x / 256, rotfn.intq(4, group=32))
        >>> q.shape, q.scales.shape
        (torch.Size([8, 64]), torch.Size([8, 2]))
        >>> torch.equal(rotfn.gptq(w, torch.eye(64), rotfn.mxfp4()).codes, rotfn.quantize(w, rotfn.mxfp4()).codes)
        True

    References:
        Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
        Generative Pre-trained Transformers", arXiv 2210.17323. Egiazarian et al., "Bridging
        the Gap Between Promise and Performance for Microscaling FP4 Quantization" (MR-GPTQ),
        arXiv 2509.23202.
    """
    _check(w, h, fmt, block_size, damp, scale_search, precision, backend)
    if h is None and scale_search is None:
        return quantize(w, fmt, backend=backend)
    impl = dispatch.select("gptq", "gptq", backend, w, fmt=fmt)
    with torch.no_grad():
        if h is None:
            return ops.rtn(w.detach(), fmt, scale_search=scale_search)
        return impl(w.detach(), h.detach(), fmt, block_size=block_size, damp=damp, act_order=act_order,
                        static_groups=static_groups, scale_search=scale_search, work=_PRECISIONS[precision])


def _check(w, h, fmt, block_size, damp, scale_search, precision, backend) -> None:
    for name, t in (("w", w), ("h", h)):
        if t is None and name == "h":
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise DTypeError(message("gptq", name, "a float16, bfloat16, float32 or float64 tensor", got,
                                     f"pass {name} as a floating torch.Tensor"))
    if w.ndim != 2 or 0 in w.shape:
        raise ShapeError(message("gptq", "w", "a non-empty weight [out, in]", f"shape {tuple(w.shape)}",
                                 "pass one linear's weight; reshape stacked experts to one matrix each"))
    if not isinstance(fmt, Format):
        raise FormatError(message("gptq", "fmt", "a rotfn format spec", type(fmt).__name__,
                                  "build one with rotfn.mxfp4(), rotfn.nvfp4(), rotfn.intq(4, group=128) ..."))
    if getattr(fmt, "rule", None) is not None:
        raise FormatError(message("gptq", "fmt", "a format with rotfn's own rule", repr(fmt),
                                  "drop rule= (another library's rule is for activations)"))
    n = w.shape[1]
    if fmt.group is not None and n % fmt.group:
        raise ShapeError(message("gptq", "w", f"in-features divisible by {fmt!r}'s group of {fmt.group}",
                                 f"shape {tuple(w.shape)}", "pick a format whose group divides the in-features"))
    if h is not None:
        if tuple(h.shape) != (n, n):
            raise ShapeError(message("gptq", "h", f"the [in, in] = [{n}, {n}] Hessian of w's inputs",
                                     f"shape {tuple(h.shape)}", "collect X^T X / N over the inputs of this linear"))
        if h.device != w.device:
            raise ShapeError(message("gptq", "h", f"a tensor on w's device {w.device}", f"device {h.device}",
                                     f"move it with h.to({str(w.device)!r})"))
    for name, t in (("w", w), ("h", h)):
        if t is not None and not torch.isfinite(t).all():
            raise ArgumentError(message("gptq", name, "finite values", "NaN or Inf",
                                        "find where the non-finite values come from (an overflowing "
                                        "half-precision Hessian: accumulate it in float32)"))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ArgumentError(message("gptq", "block_size", "an int >= 1", repr(block_size), "keep 128"))
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0 or damp == float("inf"):
        raise ArgumentError(message("gptq", "damp", "a finite float >= 0", repr(damp), "keep 0.01"))
    if scale_search not in ops.SCALE_SEARCHES:
        raise ArgumentError(message("gptq", "scale_search", f"one of {ops.SCALE_SEARCHES}", repr(scale_search)))
    if precision not in _PRECISIONS:
        raise ArgumentError(message("gptq", "precision", f"one of {sorted(_PRECISIONS)}", repr(precision),
                                    'keep "float64"'))
    if backend not in dispatch.BACKENDS:
        raise ArgumentError(message("gptq", "backend", f"one of {dispatch.BACKENDS}", repr(backend)))
