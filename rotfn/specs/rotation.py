"""The rotation spec: a frozen value that drives rotate, rotate_back, fold, kernels and files.

A :class:`Rotation` describes an orthogonal ``n x n`` matrix

    R = diag(s) @ blockdiag(T, T, ..., T)        (n / b copies of the b x b block T)

where ``T`` is a normalized Hadamard matrix, a Haar-random orthogonal matrix or a
user matrix, and ``s`` is an optional +-1 sign vector of length ``n`` (the
random-sign Hadamard). ``R.T`` is the spec of the transpose, which is the
inverse: ``blockdiag(T.T, ...) @ diag(s)``. Nothing here assumes ``T`` symmetric.

Why the signs come first: rotfn uses row vectors, ``x' = x @ R = (x * s) @ H``,
so the signs scramble the input *before* the mixing. This is the operator QuaRot
and QuIP write as ``H diag(s)`` acting on column vectors. Signs applied after the
mixing (``(x @ H) * s``) would leave the error of every sign-symmetric quantizer
(MX, NVFP4, symmetric intq, FP8) exactly unchanged.

Specs compare and hash by value, print compactly, and round-trip through
:meth:`Rotation.to_dict` / :meth:`Rotation.from_dict` (JSON-safe).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import math

import torch

from rotfn.errors import OrderError, RotationError, SpecError, message
from rotfn.specs import _hadamard as _had

__all__ = ["Rotation", "hadamard", "orthogonal", "from_matrix", "SPEC_VERSION", "pack_signs"]

SPEC_VERSION = 1
_KINDS = ("hadamard", "orthogonal", "matrix")


@dataclasses.dataclass(frozen=True, eq=True, repr=False)
class Rotation:
    """An orthogonal matrix acting on the last dim, as a value.

    Build one with :func:`rotfn.hadamard`, :func:`rotfn.orthogonal` or
    :func:`rotfn.from_matrix`; do not call the constructor directly.

    Attributes:
        kind: ``"hadamard"``, ``"orthogonal"`` or ``"matrix"``.
        n: size of the rotated dimension.
        block: block size ``b`` of a block-diagonal rotation, or None for a full one (``b = n``).
        seed: the seed the random part came from (signs or Haar matrix), or None.
        factor: Hadamard only: ``K`` in ``b = K * 2^m`` (which small Hadamard factor is used).
        transposed: True for the inverse spec ``R.T``.
        signs: packed +-1 sign vector of length n (random-sign Hadamard), or None.
        data: float64 bytes of the ``b x b`` block ``T`` (kind ``"matrix"``), or None.
    """

    kind: str
    n: int
    block: int | None = None
    seed: int | None = None
    factor: int | None = None
    transposed: bool = False
    signs: bytes | None = None
    data: bytes | None = None

    # ----- derived views -------------------------------------------------
    @property
    def block_size(self) -> int:
        """The block size b (``n`` for a full rotation, whose ``block`` is None)."""
        return self.block or self.n

    @property
    def T(self) -> Rotation:  # noqa: N802 - mirrors Tensor.T
        """The inverse rotation (the transpose), as a spec."""
        return dataclasses.replace(self, transposed=not self.transposed)

    @property
    def symmetric(self) -> bool:
        """True when ``R == R.T`` exactly (then rotate and rotate_back agree)."""
        return _block_symmetric(self) and self.signs is None

    def sign_vector(self, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor | None:
        """The length-n +-1 sign vector ``s`` (or None when the rotation has no signs)."""
        if self.signs is None:
            return None
        return _unpack_signs(self.signs, self.n).to(dtype=dtype, device=device, copy=True)

    def block_matrix(self, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
        """The ``b x b`` block ``T`` (or ``T.T`` for a transposed spec), a new tensor."""
        t = _block(self.kind, self.block_size, self.factor, self.seed, self.data)
        return (t.T if self.transposed else t).to(dtype=dtype, device=device, copy=True)

    def matrix(self, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
        """The dense ``n x n`` matrix ``R`` (so ``rotate(x, R) == x @ R.matrix()``).

        Built in float64 then cast once; a new tensor each call. Memory is
        ``n^2`` elements: for large n prefer :func:`rotfn.rotate`, which never builds it.

        Example:
            >>> import torch, rotfn
            >>> m = rotfn.hadamard(8, seed=0).matrix()
            >>> bool(torch.allclose(m @ m.T, torch.eye(8, dtype=torch.float64)))
            True
        """
        t = _block(self.kind, self.block_size, self.factor, self.seed, self.data)
        full = torch.block_diag(*([t] * (self.n // self.block_size)))
        s = self.sign_vector()
        if s is not None:
            full = s[:, None] * full
        return (full.T if self.transposed else full).to(dtype=dtype, device=device, copy=True)

    # ----- printing and serialization -----------------------------------
    def __repr__(self) -> str:
        parts = [self.kind, f"n={self.n}"]
        if self.block is not None:
            parts.append(f"block={self.block}")
        if self.factor not in (None, 1):
            parts.append(f"factor={self.factor}")
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        if self.signs is not None and self.seed is None:
            parts.append("signs=given")
        text = f"Rotation({', '.join(parts)})"
        return f"{text}.T" if self.transposed else text

    def to_dict(self) -> dict:
        """A JSON-safe dict; :meth:`from_dict` rebuilds an equal spec.

        Signs and user matrices are stored as data (base64), so a reload never
        depends on a random generator.

        Example:
            >>> import rotfn
            >>> r = rotfn.hadamard(64, seed=3)
            >>> rotfn.Rotation.from_dict(r.to_dict()) == r
            True
        """
        return {
            "version": SPEC_VERSION,
            "kind": self.kind,
            "n": self.n,
            "block": self.block,
            "seed": self.seed,
            "factor": self.factor,
            "transposed": self.transposed,
            "signs": None if self.signs is None else base64.b64encode(self.signs).decode("ascii"),
            "data": None if self.data is None else base64.b64encode(self.data).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Rotation:
        """Rebuild a spec from :meth:`to_dict` output.

        Raises:
            SpecError: unknown version, missing or ill-typed keys, or data of the wrong length.
        """
        fn = "Rotation.from_dict"
        if not isinstance(d, dict):
            raise SpecError(message(fn, "d", "a dict from Rotation.to_dict()", type(d).__name__))
        if d.get("version") != SPEC_VERSION:
            raise SpecError(
                message(fn, "d['version']", f"{SPEC_VERSION}", d.get("version"), "re-save the rotation with this rotfn version")
            )
        missing = sorted({"kind", "n", "block", "seed", "factor", "transposed", "signs", "data"} - set(d))
        if missing:
            raise SpecError(message(fn, "d", "all keys of Rotation.to_dict()", f"missing {missing}"))
        try:
            signs = None if d["signs"] is None else base64.b64decode(d["signs"], validate=True)
            data = None if d["data"] is None else base64.b64decode(d["data"], validate=True)
        except (ValueError, TypeError) as err:
            raise SpecError(message(fn, "d['signs'] / d['data']", "base64 text", repr(err))) from None
        spec = cls(
            kind=d["kind"], n=d["n"], block=d["block"], seed=d["seed"], factor=d["factor"],
            transposed=d["transposed"], signs=signs, data=data,
        )
        _check_spec(spec, fn)
        return spec


# ----- construction helpers ------------------------------------------------
def pack_signs(s: torch.Tensor) -> bytes:
    """The bytes :attr:`Rotation.signs` holds for a +-1 vector ``s``: bit ``i`` of the stream is ``s[i] < 0``.

    Example:
        >>> pack_signs(torch.tensor([1.0, -1.0, -1.0]))
        b'\\x06'
    """
    bits = (s < 0).to(torch.uint8)
    pad = (-bits.numel()) % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).view(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return bytes((bits * weights).sum(dim=1, dtype=torch.uint8).tolist())


@functools.lru_cache(maxsize=64)  # rotate asks once per call (per piece in a streaming fold); callers copy
def _unpack_signs(packed: bytes, n: int) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
    bits = (raw[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return 1.0 - 2.0 * bits.reshape(-1)[:n].to(torch.float64)


def _random_signs(n: int, seed: int) -> bytes:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bits = torch.randint(0, 2, (n,), generator=gen)
    return pack_signs(1 - 2 * bits)


@functools.lru_cache(maxsize=32)
def _block(kind: str, b: int, factor: int | None, seed: int | None, data: bytes | None) -> torch.Tensor:
    """The b x b block in float64 on CPU (cached; callers copy before handing it out)."""
    if kind == "hadamard":
        return _had.hadamard_dense(b, factor)
    if kind == "orthogonal":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        g = torch.randn(b, b, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        return q * torch.sign(torch.diagonal(r))[None, :]
    return torch.frombuffer(bytearray(data), dtype=torch.float64).reshape(b, b)


def _block_symmetric(spec: Rotation) -> bool:
    t = _block(spec.kind, spec.block_size, spec.factor, spec.seed, spec.data)
    return bool(torch.equal(t, t.T))


def _check_int(fn: str, arg: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RotationError(message(fn, arg, f"an int >= {minimum}", f"{type(value).__name__} {value!r}"))
    if value < minimum:
        raise RotationError(message(fn, arg, f"an int >= {minimum}", value))
    return value


def _check_seed(fn: str, seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise RotationError(message(fn, "seed", "an int in [0, 2**63)", repr(seed), "pass e.g. seed=0"))


def _check_block(fn: str, n: int, block) -> int | None:
    if block is None:
        return None
    _check_int(fn, "block", block, minimum=1)
    if n % block:
        divisors = [b for b in (16, 32, 64, 128, 256, 512) if n % b == 0]
        raise RotationError(
            message(fn, "block", f"a divisor of n={n}", block,
                    f"use one of {divisors}" if divisors else "use block=None for a full rotation")
        )
    return None if block == n else block


def _order_error(fn: str, n: int, b: int, arg: str) -> OrderError:
    """No Hadamard of order ``b`` (``n`` itself, or the ``block`` asked for): the fix offers the largest Hadamard
    blocks that divide ``n`` (Sylvester or with a factor), and for ``n`` the nearest orders that have one."""
    divisors = {d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}
    blocks = sorted((d for d in divisors if 4 <= d < n and d != b and _had.choose_factor(d) is not None),
                    reverse=True)[:2]
    if blocks:
        also = f"; also block={blocks[1]}" if len(blocks) > 1 else ""
        b0 = blocks[0]
        hint = f"use block={b0} ({n // b0} blocks of {b0} x {b0}{also}) or rotfn.orthogonal(n, seed=...)"
    else:
        hint = f"no Hadamard block of 4 or more divides {n}: use rotfn.orthogonal({n}, seed=...)"
    if arg == "n":
        below = next((m for m in range(n - 1, n // 2, -1) if _had.choose_factor(m) is not None), None)
        above = next(m for m in range(n + 1, 2 * n + 1) if _had.choose_factor(m) is not None)  # 2^k is one
        hint += f"; the nearest Hadamard orders are {below} and {above}" if below else f"; the nearest is {above}"
    return OrderError(
        message(fn, arg, "an order K * 2^m with a constructible Hadamard factor K (Paley I/II or the Williamson table)", b, hint)
    )


def _check_spec(spec: Rotation, fn: str) -> None:
    """Validate a spec rebuilt from data (all checks a factory does, plus data lengths)."""
    if spec.kind not in _KINDS:
        raise SpecError(message(fn, "kind", f"one of {_KINDS}", repr(spec.kind)))
    try:
        _check_int(fn, "n", spec.n, minimum=1)
        _check_block(fn, spec.n, spec.block)
        if spec.seed is not None:
            _check_seed(fn, spec.seed)
    except RotationError as err:
        raise SpecError(str(err)) from None
    if spec.block == spec.n:
        raise SpecError(message(fn, "block", "None for a full rotation", spec.block))
    if not isinstance(spec.transposed, bool):
        raise SpecError(message(fn, "transposed", "a bool", repr(spec.transposed)))
    if spec.signs is not None and len(spec.signs) != (spec.n + 7) // 8:
        raise SpecError(message(fn, "signs", f"{(spec.n + 7) // 8} packed bytes", len(spec.signs)))
    if spec.kind == "hadamard":
        if spec.factor != _had.choose_factor(spec.block_size) and not (
            isinstance(spec.factor, int) and spec.factor > 0 and spec.block_size % spec.factor == 0
            and _had.can_build_factor(spec.factor) and (spec.block_size // spec.factor).bit_count() == 1
        ):
            raise SpecError(message(fn, "factor", f"a constructible K with {spec.block_size} = K * 2^m", spec.factor))
    elif spec.factor is not None:
        raise SpecError(message(fn, "factor", f"None for kind {spec.kind!r}", spec.factor))
    if spec.kind == "orthogonal" and spec.seed is None:
        raise SpecError(message(fn, "seed", "an int for kind 'orthogonal'", None))
    if spec.kind == "matrix":
        if spec.data is None or len(spec.data) != 8 * spec.block_size * spec.block_size:
            got = None if spec.data is None else len(spec.data)
            raise SpecError(message(fn, "data", f"{8 * spec.block_size * spec.block_size} bytes of float64", got))
    elif spec.data is not None:
        raise SpecError(message(fn, "data", f"None for kind {spec.kind!r}", f"{len(spec.data)} bytes"))


# ----- public factories ----------------------------------------------------
def hadamard(n: int, *, block: int | None = None, seed: int | None = None) -> Rotation:
    """A normalized Hadamard rotation of order n, optionally block-diagonal and random-signed.

    ``R = diag(s) @ blockdiag(H_b / sqrt(b), ...)`` where ``H_b = H_K (x) H_{2^m}``
    (Sylvester for ``b = 2^m``; ``K`` from Paley I, Paley II or the Williamson
    table) and ``s`` is all ones, or for ``seed=int`` a +-1 vector drawn from a
    seeded CPU generator (same bits on every device), so ``x @ R = (x * s) @ H``:
    the random signs act before the mixing (QuaRot's ``H diag(s)`` on column
    vectors). ``R`` is orthogonal; with signs (or a Paley I or Williamson factor)
    it is **not** symmetric, so its inverse is ``R.T``.

    Args:
        n: size of the rotated (last) dimension.
        block: block size b dividing n for a block-diagonal rotation; None = full.
        seed: int for the random-sign variant ``diag(s) @ H``; None = no signs.

    Returns:
        A frozen :class:`Rotation`.

    Raises:
        RotationError: n or block not a positive int, block does not divide n, bad seed.
        OrderError: no Hadamard of order b can be built (suggests a block or ``rotfn.orthogonal``).

    Example:
        >>> import rotfn
        >>> rotfn.hadamard(11008)
        Rotation(hadamard, n=11008, factor=172)
        >>> rotfn.hadamard(4096, block=32, seed=0)
        Rotation(hadamard, n=4096, block=32, seed=0)

    References:
        QuaRot (Ashkboos et al. 2024, arXiv 2404.00456); QuIP# (Tseng et al. 2024, arXiv 2402.04396).
    """
    fn = "hadamard"
    _check_int(fn, "n", n, minimum=1)
    block = _check_block(fn, n, block)
    b = block or n
    k = _had.choose_factor(b)
    if k is None:
        raise _order_error(fn, n, b, "block" if block else "n")
    signs = None
    if seed is not None:
        _check_seed(fn, seed)
        signs = _random_signs(n, seed)
    return Rotation("hadamard", n, block, seed, k, False, signs, None)


def orthogonal(n: int, *, seed: int, block: int | None = None) -> Rotation:
    """A Haar-random orthogonal rotation (QR of a Gaussian matrix with the sign fix).

    ``T = Q @ diag(sign(diag(R_qr)))`` for ``G = Q R_qr``, ``G`` a ``b x b``
    float64 Gaussian from a seeded CPU generator; the same matrix is used on every
    block of a block-diagonal rotation.

    Args:
        n: size of the rotated dimension.
        seed: int seed of the Gaussian draw.
        block: block size b dividing n, or None for a full ``n x n`` rotation.

    Returns:
        A frozen :class:`Rotation`.

    Raises:
        RotationError: bad n, seed or block.

    Example:
        >>> import rotfn
        >>> rotfn.orthogonal(96, seed=1)
        Rotation(orthogonal, n=96, seed=1)

    References:
        F. Mezzadri, "How to generate random matrices from the classical compact groups" (2007).
    """
    fn = "orthogonal"
    _check_int(fn, "n", n, minimum=1)
    _check_seed(fn, seed)
    block = _check_block(fn, n, block)
    return Rotation("orthogonal", n, block, seed, None, False, None, None)


def from_matrix(m: torch.Tensor, *, n: int | None = None, atol: float = 1e-6) -> Rotation:
    """A rotation from a user matrix, checked orthogonal in float64.

    ``max |M @ M.T - I| <= atol`` is required. With ``n`` given, ``M`` is the
    ``b x b`` block of a block-diagonal rotation of size n.

    Args:
        m: ``[b, b]`` floating tensor (any device; copied to float64 CPU bytes).
        n: total size (a multiple of b), or None for ``n = b``.
        atol: orthogonality tolerance.

    Returns:
        A frozen :class:`Rotation` of kind ``"matrix"``.

    Raises:
        RotationError: m not a square floating matrix, not orthogonal, or n not a multiple of b.

    Example:
        >>> import torch, rotfn
        >>> r = rotfn.from_matrix(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
        >>> rotfn.rotate(torch.tensor([1.0, 2.0]), r)
        tensor([-2.,  1.])
    """
    fn = "from_matrix"
    if not isinstance(m, torch.Tensor):
        raise RotationError(message(fn, "m", "a torch.Tensor", type(m).__name__, "wrap it with torch.as_tensor"))
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise RotationError(message(fn, "m", "a non-empty square [b, b] matrix", f"shape {tuple(m.shape)}"))
    if not (m.dtype.is_floating_point and m.dtype.itemsize >= 2):
        raise RotationError(message(fn, "m", "a floating matrix", m.dtype, "cast with m.double()"))
    b = m.shape[0]
    t = m.detach().to(device="cpu", dtype=torch.float64).contiguous()
    err = (t @ t.T - torch.eye(b, dtype=torch.float64)).abs().max().item()
    if not err <= atol:
        raise RotationError(
            message(fn, "m", f"an orthogonal matrix (max |M M^T - I| <= {atol:g})", f"error {err:.3g}",
                    "orthogonalize it (e.g. torch.linalg.qr) or raise atol")
        )
    total = b if n is None else _check_int(fn, "n", n, minimum=1)
    if total % b:
        raise RotationError(message(fn, "n", f"a multiple of the block size {b}", total))
    block = None if total == b else b
    return Rotation("matrix", total, block, None, None, False, None, t.numpy().tobytes())


