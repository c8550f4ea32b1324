"""How close a quantized tensor or model is to its reference: the one home of the numbers that report, bench,
the demo, the docs and the notebooks print.

* :func:`sqnr_db`: signal-to-quantization-noise ratio in dB (and :func:`energy_ratio_db` for energies summed
  elsewhere, e.g. over batches);
* :func:`rel_error`: ``|x - y| / |x|`` in the Frobenius or the max norm;
* :func:`cosine`: cosine similarity of rows (embeddings), per row or their mean;
* :func:`perplexity`: ``exp`` of the next-token cross-entropy of a causal LM's logits.

Every function accumulates in float64 and returns Python floats (``cosine(..., mean=False)``: a float64 tensor).

Example:
    >>> import torch, rotfn
    >>> x = torch.tensor([1.0, 1.0])
    >>> round(rotfn.metrics.sqnr_db(x, torch.tensor([1.1, 0.9])), 2)
    20.0
"""

from __future__ import annotations

import math
import numbers

import torch

from rotfn.errors import ArgumentError, DTypeError, ShapeError, message

__all__ = ["sqnr_db", "energy_ratio_db", "rel_error", "cosine", "perplexity"]

#: The label that :func:`perplexity` skips (transformers' convention for padding and prompt tokens).
IGNORE_INDEX = -100


def _check_energy(fn: str, arg: str, value) -> float:
    """``value`` as a float when it is a finite real number >= 0 (an energy), else a typed error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DTypeError(message(fn, arg, "a real number (an energy such as sum x^2)", type(value).__name__,
                                 "pass a Python float, e.g. t.square().sum().item()"))
    if not math.isfinite(value) or value < 0:
        raise ArgumentError(message(fn, arg, "a finite energy >= 0", repr(value),
                                    "sum squares of finite values (in float64, so they do not overflow)"))
    return float(value)


def _check_floating(fn: str, arg: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(message(fn, arg, "a torch.Tensor", type(t).__name__, "wrap it with torch.as_tensor"))
    if not t.is_floating_point():
        raise DTypeError(message(fn, arg, "a floating tensor", t.dtype, f"cast with {arg}.float()"))


def _check_finite(fn: str, arg: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ArgumentError(message(fn, arg, "finite values", "NaN or Inf",
                                    "find where the non-finite values come from before measuring"))


def _check_pair(fn: str, x, y) -> None:
    """Raise a typed error unless ``x`` and ``y`` are non-empty finite floating tensors of one shape and device."""
    for arg, t in (("x", x), ("y", y)):
        _check_floating(fn, arg, t)
    if x.shape != y.shape:
        raise ShapeError(message(fn, "y", f"x's shape {list(x.shape)}", list(y.shape),
                                 "compare a tensor with its own quantized version"))
    if x.device != y.device:
        raise ShapeError(message(fn, "y", f"a tensor on x's device {x.device}", f"device {y.device}",
                                 f"move it with y.to({str(x.device)!r})"))
    if x.numel() == 0:
        raise ShapeError(message(fn, "x", "a non-empty tensor", f"shape {list(x.shape)}",
                                 "measure a tensor with at least one element"))
    for arg, t in (("x", x), ("y", y)):
        _check_finite(fn, arg, t)


def _unit_scaled(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``y`` in float64, times one power of two that brings their largest magnitude into [0.5, 1).

    The scale is exact, so every ratio of norms is unchanged, and no square of a large float64 overflows.
    """
    x64, y64 = x.detach().double(), y.detach().double()
    peak = max(x64.abs().max().item(), y64.abs().max().item())
    if peak > 0:
        scale = math.ldexp(1.0, -max(math.frexp(peak)[1], -1021))
        x64, y64 = x64 * scale, y64 * scale
    return x64, y64


def energy_ratio_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` of two energies (``sum x^2``, ``sum (x - y)^2``), e.g. summed over batches.

    Args:
        signal: ``sum x^2``, a finite real number >= 0.
        noise: ``sum (x - y)^2``, a finite real number >= 0.

    Returns:
        The ratio in dB; ``inf`` for zero noise, ``-inf`` for zero signal with noise.

    Raises:
        DTypeError: an argument that is not a real number (a bool, a tensor, a string, ...).
        ArgumentError: a negative, NaN or infinite energy.

    Example:
        >>> energy_ratio_db(100.0, 1.0), energy_ratio_db(1.0, 0.0)
        (20.0, inf)
    """
    signal = _check_energy("energy_ratio_db", "signal", signal)
    noise = _check_energy("energy_ratio_db", "noise", noise)
    if noise == 0:
        return math.inf
    return -math.inf if signal == 0 else 10 * math.log10(signal / noise)


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - y)^2)`` in dB, sums in float64.

    Both tensors are first scaled by one power of two (exact: the ratio is unchanged) that brings
    their largest magnitude near 1, so the squares of large float64 values do not overflow.

    Args:
        x: the reference tensor, any shape (non-empty) and floating dtype, finite.
        y: its approximation, x's shape and device (any floating dtype), finite.

    Returns:
        The SQNR in dB; ``inf`` when ``y == x``, ``-inf`` when ``x`` is all zeros and ``y`` is not.

    Raises:
        DTypeError: ``x`` or ``y`` not a floating tensor.
        ShapeError: ``y``'s shape or device differs from ``x``'s, or ``x`` is empty.
        ArgumentError: NaN or Inf in ``x`` or ``y``.

    Example:
        >>> round(sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.1, 0.9])), 2)
        20.0
    """
    _check_pair("sqnr_db", x, y)
    x64, y64 = _unit_scaled(x, y)
    return energy_ratio_db(x64.square().sum().item(), (x64 - y64).square().sum().item())


_NORMS = ("fro", "max")


def rel_error(x: torch.Tensor, y: torch.Tensor, *, norm: str = "fro") -> float:
    r"""Relative error ``|x - y| / |x|`` of an approximation ``y`` of ``x``, in float64.

    .. math:: \mathrm{fro}: \sqrt{\textstyle\sum (x - y)^2 / \sum x^2}, \qquad
              \mathrm{max}: \max |x - y| / \max |x|.

    The Frobenius form is ``10^(-SQNR / 20)``: ``rel_error`` and :func:`sqnr_db` say the same thing on
    two scales. The max form bounds the worst element (what ``rotfn.testing.assert_equivalent`` checks).

    Args:
        x: the reference tensor, any shape (non-empty) and floating dtype, finite.
        y: its approximation, x's shape and device (any floating dtype), finite.
        norm: ``"fro"`` (default) or ``"max"``.

    Returns:
        The relative error (>= 0); ``0.0`` when ``y == x``, ``inf`` when ``x`` is all zeros and ``y`` is not.

    Raises:
        DTypeError: ``x`` or ``y`` not a floating tensor.
        ShapeError: ``y``'s shape or device differs from ``x``'s, or ``x`` is empty.
        ArgumentError: NaN or Inf in ``x`` or ``y``; ``norm`` not ``"fro"`` or ``"max"``.

    Example:
        >>> x = torch.tensor([3.0, 4.0])
        >>> rel_error(x, torch.tensor([3.0, 4.5])), rel_error(x, torch.tensor([3.0, 4.5]), norm="max")
        (0.1, 0.125)
    """
    fn = "rel_error"
    if norm not in _NORMS:
        raise ArgumentError(message(fn, "norm", f"one of {_NORMS}", repr(norm), "pass norm='fro' or norm='max'"))
    _check_pair(fn, x, y)
    x64, y64 = _unit_scaled(x, y)
    if norm == "max":
        diff, scale = (x64 - y64).abs().max().item(), x64.abs().max().item()
    else:
        diff, scale = (x64 - y64).square().sum().sqrt().item(), x64.square().sum().sqrt().item()
    if scale == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / scale


def cosine(x: torch.Tensor, y: torch.Tensor, *, mean: bool = True) -> float | torch.Tensor:
    r"""Cosine similarity of the rows (last dim) of ``x`` and ``y``: one number per embedding, or their mean.

    .. math:: \cos(x_i, y_i) = \frac{\sum_j x_{ij} y_{ij}}{\sqrt{\sum_j x_{ij}^2}\,\sqrt{\sum_j y_{ij}^2}}

    in float64. A row of zeros has no direction: two zero rows count as 1 (identical), a zero row
    against a non-zero one as 0. A 1-D ``x`` is one row.

    Args:
        x: the reference embeddings ``[..., d]`` (non-empty, floating, finite); 1-D is one row.
        y: the approximations, x's shape and device (any floating dtype), finite.
        mean: True (default): the mean over all rows as a float; False: the per-row cosines as a float64
            tensor of shape ``x.shape[:-1]`` (``[]`` for 1-D), e.g. for their minimum.

    Returns:
        A float in [-1, 1] (``mean=True``), or the float64 tensor of per-row values in [-1, 1].

    Raises:
        DTypeError: ``x`` or ``y`` not a floating tensor; ``mean`` not a bool.
        ShapeError: ``y``'s shape or device differs from ``x``'s, or ``x`` is empty (or 0-d).
        ArgumentError: NaN or Inf in ``x`` or ``y``.

    Example:
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.0, -3.0]])
        >>> cosine(x, y), cosine(x, y, mean=False)
        (0.0, tensor([ 1., -1.], dtype=torch.float64))
    """
    fn = "cosine"
    if not isinstance(mean, bool):
        raise DTypeError(message(fn, "mean", "True or False", repr(mean),
                                 "pass mean=False for the per-row cosines"))
    _check_pair(fn, x, y)
    if x.ndim == 0:
        raise ShapeError(message(fn, "x", "rows [..., d] (1-D or more)", "a 0-d tensor",
                                 "compare embeddings, e.g. of shape [sentences, d]"))
    x64, y64 = _unit_scaled(x, y)
    dot = (x64 * y64).sum(-1)
    nx, ny = x64.square().sum(-1).sqrt(), y64.square().sum(-1).sqrt()
    both_zero, one_zero = (nx == 0) & (ny == 0), (nx == 0) ^ (ny == 0)
    cos = (dot / (nx * ny).where(~(both_zero | one_zero), torch.ones_like(nx))).clamp(-1.0, 1.0)
    cos = cos.masked_fill(both_zero, 1.0).masked_fill(one_zero, 0.0)
    return cos.mean().item() if mean else cos


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    r"""Perplexity of a causal LM: ``exp`` of the mean next-token cross-entropy, with the logits at ``t`` scoring ``ids[t + 1]``.

    Legend: ``B`` sequences (optional), ``T`` tokens each, ``V`` the vocabulary size.

    .. math:: \mathrm{PPL} = \exp\Big(-\frac{1}{N} \sum_{b,\, t < T - 1}
              \log \operatorname{softmax}(\mathrm{logits}_{b,t})_{\,\mathrm{ids}_{b,t+1}}\Big)

    over the ``N`` targets ``ids[b, t + 1]`` that are not :data:`IGNORE_INDEX` (-100, transformers'
    label for padding), log-softmax and sums in float64. A uniform distribution over ``V`` tokens
    has perplexity ``V``; a perfect model, 1.

    Args:
        logits: ``[B, T, V]`` or ``[T, V]`` floating, finite (e.g. ``model(ids).logits``).
        ids: ``[B, T]`` or ``[T]`` integer token ids in ``[0, V)`` or -100, on logits' device.

    Returns:
        The perplexity, a float >= 1.

    Raises:
        DTypeError: ``logits`` not a floating tensor (a model or its output: the fix shows how to get the
            logits); ``ids`` not an integer tensor.
        ShapeError: ``logits`` not 2-D or 3-D; ``ids`` not ``logits.shape[:-1]``; fewer than 2 tokens; ``ids`` on
            another device.
        ArgumentError: NaN or Inf in ``logits``; an id outside ``[0, V)`` other than -100; no target left to score.

    Example:
        >>> round(perplexity(torch.zeros(1, 5, 7), torch.tensor([[1, 2, 3, 4, 5]])), 9)  # uniform over 7 tokens
        7.0
    """
    fn = "perplexity"
    if isinstance(logits, torch.nn.Module) or hasattr(logits, "logits"):  # a model, or its output, not the logits
        what = "a model" if isinstance(logits, torch.nn.Module) else "a model output"
        raise DTypeError(message(fn, "logits", "a torch.Tensor of logits [B, T, V]", f"{what} ({type(logits).__name__})",
                                 "pass the logits: perplexity(model(ids).logits, ids), or with a plan "
                                 "perplexity(rotfn.call(model, params, plan, ids).logits, ids)"))
    _check_floating(fn, "logits", logits)
    if not isinstance(ids, torch.Tensor):
        raise DTypeError(message(fn, "ids", "a torch.Tensor of token ids", type(ids).__name__,
                                 "pass e.g. tokenizer(text, return_tensors='pt')['input_ids']"))
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise DTypeError(message(fn, "ids", "an integer tensor of token ids", ids.dtype, "cast with ids.long()"))
    if logits.ndim not in (2, 3):
        raise ShapeError(message(fn, "logits", "[B, T, V] or [T, V]", list(logits.shape),
                                 "pass the model output's .logits"))
    if tuple(ids.shape) != tuple(logits.shape[:-1]):
        raise ShapeError(message(fn, "ids", f"logits' shape without its last dim {list(logits.shape[:-1])}",
                                 list(ids.shape), "pass the ids the logits were computed from"))
    if logits.shape[-2] < 2 or logits.shape[-1] == 0:
        raise ShapeError(message(fn, "logits", "at least 2 tokens and a non-empty vocabulary", list(logits.shape),
                                 "score sequences of two tokens or more"))
    if ids.device != logits.device:
        raise ShapeError(message(fn, "ids", f"a tensor on logits' device {logits.device}", f"device {ids.device}",
                                 f"move it with ids.to({str(logits.device)!r})"))
    _check_finite(fn, "logits", logits)
    vocab = logits.shape[-1]
    bad = (ids != IGNORE_INDEX) & ((ids < 0) | (ids >= vocab))
    if bool(bad.any()):
        raise ArgumentError(message(fn, "ids", f"token ids in [0, {vocab}) or {IGNORE_INDEX}",
                                    f"{ids[bad].flatten()[0].item()}", "pass ids of the model's own vocabulary"))
    scores = logits.detach()[..., :-1, :].reshape(-1, vocab).double().log_softmax(-1)
    targets = ids[..., 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):
        raise ArgumentError(message(fn, "ids", "at least one target ids[..., 1:] that is not -100", "none",
                                    "label the tokens to score"))
    nll = -scores[keep].gather(1, targets[keep].long()[:, None]).sum() / keep.sum()
    return math.exp(nll.item())
