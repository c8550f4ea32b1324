"""Hypothesis strategies for rotations, formats and tensors.

Hypothesis owns all randomness: tensors are built from a *drawn seed* with a
``torch.Generator``, never from the global RNG, so every failure shrinks and
replays. Sizes are capped by arguments so test suites stay fast.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from rotfn.specs import constructible_orders
from rotfn.specs import formats as F
from rotfn.specs.rotation import Rotation, from_matrix, hadamard, orthogonal

__all__ = ["seeds", "hadamard_orders", "rotations", "formats", "row_counts", "tensors", "make_tensor", "DISTRIBUTIONS",
           "ROTATION_KINDS", "EDGE_ROWS"]

#: Kinds drawn by :func:`rotations`. "signed" is the random-sign Hadamard ``diag(s) @ H``.
ROTATION_KINDS = ("hadamard", "signed", "orthogonal", "matrix")
#: Distributions drawn by :func:`tensors`.
DISTRIBUTIONS = ("normal", "laplace", "student_t", "outliers")
#: Row counts that end a kernel's grid in a partial program: one row, a few, and one past a power of two.
EDGE_ROWS = (1, 3, 17, 129, 257, 1025)


def seeds() -> st.SearchStrategy[int]:
    """Seeds for ``torch.Generator.manual_seed`` and rotation specs.

    Example:
        >>> from hypothesis import given
        >>> @given(seeds())
        ... def test(seed):
        ...     assert 0 <= seed < 2**32
        >>> test()
    """
    return st.integers(min_value=0, max_value=2**32 - 1)


def hadamard_orders(max_n: int = 1 << 15, min_n: int = 1) -> st.SearchStrategy[int]:
    """Orders n in [min_n, max_n] for which ``rotfn.hadamard(n)`` can be built (shrinks to small n).

    Example:
        >>> from hypothesis import given
        >>> import rotfn
        >>> @given(hadamard_orders(4096))
        ... def test(n):
        ...     assert rotfn.hadamard(n).n == n
        >>> test()
    """
    orders = [n for n in constructible_orders(1 << 15) if min_n <= n <= max_n]
    return st.sampled_from(orders)


@st.composite
def rotations(
    draw,
    n: int | None = None,
    *,
    kinds: tuple[str, ...] = ROTATION_KINDS,
    max_n: int = 256,
    blocks: bool | tuple[int, ...] = True,
    transposed: bool = True,
) -> Rotation:
    """Rotation specs of every kind, optionally block-diagonal and transposed.

    Args:
        n: fixed size, or None to draw one (<= max_n, constructible for Hadamard kinds).
        kinds: subset of :data:`ROTATION_KINDS`.
        max_n: cap on a drawn n (and on the block size of dense kinds).
        blocks: True: also draw block-diagonal rotations (block size = any divisor of n);
            False: full rotations only; a tuple: draw the block size from these (n itself is a
            full rotation), e.g. the blocks a kernel serves; each must divide n (pass n too).
        transposed: also draw ``R.T`` specs.

    Raises:
        ValueError: a block size in ``blocks`` that does not divide n, or a tuple ``blocks`` without n.

    Example:
        >>> from hypothesis import given
        >>> import rotfn, rotfn.testing as rt
        >>> @given(rt.rotations(64))
        ... def test(R):
        ...     assert R.n == 64
        >>> test()
    """
    kind = draw(st.sampled_from(kinds))
    is_hadamard = kind in ("hadamard", "signed")
    given_n = n
    if n is None:
        n = draw(hadamard_orders(max_n) if is_hadamard else st.integers(1, max_n))
    if isinstance(blocks, (tuple, list)):
        if given_n is None or any(n % b for b in blocks):
            raise ValueError(f"rotations: blocks {blocks} must divide a given n, got n={given_n}")
        choices = list(blocks)
    else:
        choices = [n]
        if blocks:
            choices += [b for b in range(1, n) if n % b == 0 and (not is_hadamard or b in constructible_orders(1 << 15))]
    size = draw(st.sampled_from(sorted(choices, reverse=True)))
    block = None if size == n else size
    seed = draw(seeds())
    if kind == "hadamard":
        r = hadamard(n, block=block)
    elif kind == "signed":
        r = hadamard(n, block=block, seed=seed)
    elif kind == "orthogonal":
        r = orthogonal(n, block=block, seed=seed)
    else:
        r = from_matrix(orthogonal(size, seed=seed).matrix(), n=n)
    return r.T if transposed and draw(st.booleans()) else r


@st.composite
def formats(draw, names: tuple[str, ...] = ("mxfp4", "mxfp8", "nvfp4", "intq", "fp8")) -> F.Format:
    """Format specs with every option drawn (scale rules, global scales, bits, groups, clip, scale dtypes).

    intq groups are drawn from (None, 16, 32); pair with tensors whose last dim is a multiple of 32.

    Example:
        >>> from hypothesis import given
        >>> import rotfn
        >>> @given(formats(), tensors(64))
        ... def test(fmt, x):
        ...     assert rotfn.qdq(x, fmt).shape == x.shape
        >>> test()
    """
    name = draw(st.sampled_from(names))
    if name in ("mxfp4", "mxfp8"):
        return getattr(F, name)(draw(st.sampled_from([r.value for r in F.ScaleRule])))
    if name == "nvfp4":
        return F.nvfp4(draw(st.sampled_from(["tensor", "pow2", None, 0.01, 1.0])))
    if name == "fp8":
        return F.fp8(draw(st.sampled_from(["tensor", "channel", "token"])), scale_dtype=draw(st.sampled_from(F.SCALE_DTYPES)))
    symmetric = draw(st.booleans())
    clip = draw(st.sampled_from([1.0, 0.9])) if symmetric else 1.0
    return F.intq(draw(st.integers(2, 8)), group=draw(st.sampled_from([None, 16, 32])), symmetric=symmetric, clip=clip,
                  scale_dtype=draw(st.sampled_from(F.SCALE_DTYPES)))


def row_counts(max_rows: int = 5) -> st.SearchStrategy[int]:
    """Row counts in [1, max_rows] that favour :data:`EDGE_ROWS` (partial last programs of a kernel's grid).

    Example:
        >>> from hypothesis import given
        >>> @given(row_counts(200))
        ... def test(rows):
        ...     assert 1 <= rows <= 200
        >>> test()
    """
    edges = [r for r in EDGE_ROWS if r <= max_rows]
    return st.sampled_from(edges) | st.integers(1, max_rows)


def _sample(dist: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """float64 samples of a unit-scale distribution from generator ``gen``."""
    if dist == "normal":
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    u = torch.rand(shape, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    if dist == "laplace":
        return -torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs())
    if dist == "student_t":  # 3 degrees of freedom: z / sqrt(chi2_3 / 3)
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        chi2 = torch.randn((*shape, 3), generator=gen, dtype=torch.float64).square().sum(-1)
        return z / torch.sqrt(chi2 / 3)
    # "outliers": Gaussian with a few channels (last-dim positions) 20-100x larger, as in LLM activations
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    hot = torch.rand(shape[-1], generator=gen, dtype=torch.float64) < 0.03
    gain = 20 + 80 * torch.rand(shape[-1], generator=gen, dtype=torch.float64)
    return x * torch.where(hot, gain, 1.0)


def make_tensor(dist: str, shape: tuple[int, ...], seed: int, *, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """A seeded tensor of a distribution in :data:`DISTRIBUTIONS` (deterministic for a seed).

    Example:
        >>> import torch
        >>> torch.equal(make_tensor("student_t", (2, 8), 7), make_tensor("student_t", (2, 8), 7))
        True
    """
    gen = torch.Generator().manual_seed(seed)
    return (_sample(dist, shape, gen) * scale).to(dtype)


@st.composite
def tensors(
    draw,
    n: int | st.SearchStrategy[int],
    *,
    dtypes: tuple[torch.dtype, ...] = (torch.float32,),
    max_rows: int = 4,
    max_lead_dims: int = 2,
    dists: tuple[str, ...] = DISTRIBUTIONS,
    scale_exponents: tuple[int, int] = (-8, 8),
    rows: int | st.SearchStrategy[int] | None = None,
    through: tuple[torch.dtype, ...] | None = None,
) -> torch.Tensor:
    """Tensors ``[..., n]`` built from a drawn seed, shape, dtype, distribution and power-of-two scale.

    Args:
        n: last dim, or a strategy for it.
        dtypes: dtypes to draw from.
        max_rows: cap on each leading dim.
        max_lead_dims: 0..max_lead_dims leading dims.
        dists: distributions to draw from (see :data:`DISTRIBUTIONS`).
        scale_exponents: inclusive range k of the overall scale ``2^k``.
        rows: the number of rows (the product of the leading dims), or a strategy for it such as
            :func:`row_counts`; the leading dims are then ``(rows,)`` or ``(d, rows // d)`` for a drawn
            divisor d. Overrides ``max_rows`` and ``max_lead_dims``.
        through: round the values to one of these dtypes (drawn) before the cast to the drawn dtype:
            e.g. float64 copies of bf16 weights, whose sums the CPU kernel can prove exact.

    Example:
        >>> from hypothesis import given
        >>> import torch, rotfn.testing as rt
        >>> @given(rt.tensors(32, dtypes=(torch.bfloat16,)))
        ... def test(x):
        ...     assert x.shape[-1] == 32 and x.dtype == torch.bfloat16
        >>> test()
    """
    last = draw(n) if isinstance(n, st.SearchStrategy) else n
    if rows is None:
        lead = tuple(draw(st.lists(st.integers(1, max_rows), max_size=max_lead_dims)))
    else:
        m = draw(rows) if isinstance(rows, st.SearchStrategy) else rows
        d = draw(st.sampled_from([d for d in range(1, m + 1) if m % d == 0]))
        lead = (m,) if d == 1 else (d, m // d)
    k = draw(st.integers(*scale_exponents))
    dist, seed, dtype = draw(st.sampled_from(dists)), draw(seeds()), draw(st.sampled_from(dtypes))
    if through is None:
        return make_tensor(dist, (*lead, last), seed, dtype=dtype, scale=2.0**k)
    return make_tensor(dist, (*lead, last), seed, dtype=draw(st.sampled_from(through)), scale=2.0**k).to(dtype)
