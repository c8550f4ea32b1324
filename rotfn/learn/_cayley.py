"""Cayley SGD on the orthogonal group: a descent step that stays orthogonal to rounding.

Legend: ``X`` is ``[b, b]`` orthogonal (``X X^T = I``), ``G = dL/dX`` the Euclidean
gradient, ``M`` the momentum (a tangent vector at X). One step (Li, Li and Todorovic 2020,
Algorithm 1, with the exact Cayley transform instead of its fixed-point iteration)::

    M  <- beta M - G
    W^ = M X^T - 1/2 X (X^T M X^T),   W = W^ - W^T         (skew-symmetric)
    M  <- W X                                               (momentum kept tangent)
    X  <- (I - lr/2 W)^-1 (I + lr/2 W) X                    (Cayley retraction)

The Cayley transform of a skew-symmetric ``W`` is orthogonal, so ``X`` stays on the
manifold however many steps are taken; with ``beta = 0``, ``W X = -1/2 (G - X G^T X)``,
half the negative Riemannian gradient.
"""

from __future__ import annotations

import torch

__all__ = ["cayley_step", "orthogonality_error"]


def cayley_step(x: torch.Tensor, grad: torch.Tensor, velocity: torch.Tensor, *, lr: float,
                momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One Cayley SGD step with momentum on the orthogonal group.

    ``W = skew(M X^T)`` projected as in the module docstring, ``X' = (I - lr/2 W)^-1 (I + lr/2 W) X``.

    Args:
        x: ``[b, b]`` orthogonal matrix (float64 keeps ``X X^T = I`` to about 1e-15).
        grad: ``[b, b]`` Euclidean gradient ``dL/dX``.
        velocity: ``[b, b]`` momentum from the previous step (zeros at the start).
        lr: step size (> 0).
        momentum: ``beta`` in ``[0, 1)``.

    Returns:
        ``(x_new, velocity_new)``: new tensors; the inputs are not modified.

    Example:
        >>> import torch
        >>> x = torch.eye(4, dtype=torch.float64)
        >>> g = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> x2, v = cayley_step(x, g, torch.zeros_like(x), lr=0.5, momentum=0.9)
        >>> orthogonality_error(x2) < 1e-14, bool((x2 * g).sum() < (x * g).sum())   # stays orthogonal, goes downhill
        (True, True)

    References:
        J. Li, F. Li, S. Todorovic, "Efficient Riemannian optimization on the Stiefel manifold via the
        Cayley transform", ICLR 2020 (arXiv 2002.01113); SpinQuant (Liu et al. 2024, arXiv 2405.16406).
    """
    m = momentum * velocity - grad
    w_hat = m @ x.T - 0.5 * x @ (x.T @ m @ x.T)
    w = w_hat - w_hat.T
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    x_new = torch.linalg.solve(eye - (lr / 2) * w, (eye + (lr / 2) * w) @ x)
    return x_new, w @ x


def orthogonality_error(x: torch.Tensor) -> float:
    """``max |X X^T - I|`` in x's dtype.

    Example:
        >>> orthogonality_error(torch.eye(3))
        0.0
    """
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return (x @ x.T - eye).abs().max().item()
