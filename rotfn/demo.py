"""rotfn's main job in one screen: exact Hadamard rotations at real model widths, and what they buy a quantizer.

Prints two tables:

* rotations: for each width n the construction ``n = K * 2^m`` of ``rotfn.hadamard(n)``,
  its orthogonality (float64) and the round-trip error ``rotate_back(rotate(x))`` (float32);
* formats: the SQNR of ``qdq(x)`` with no rotation, with a full random-sign Hadamard
  and with a block-32 random-sign Hadamard, on seeded activations (Gaussian, heavy-tailed,
  Gaussian with outlier channels).

Run it with ``python -m rotfn demo`` (or ``rotfn demo``, ``python -m rotfn.demo``).
Needs the test extras (``pip install rotfn[test]``) for :mod:`rotfn.testing`.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import torch

import rotfn

__all__ = [
    "WIDTHS",
    "DISTRIBUTIONS",
    "FORMATS",
    "format_table",
    "sqnr_db",
    "rotation_rows",
    "sqnr_rows",
    "add_arguments",
    "run",
    "main",
]

#: Hidden and MLP widths of common LLMs (Llama 2/3, Qwen 2/2.5, Mistral) plus two small ones.
WIDTHS = (64, 128, 2048, 3584, 4096, 5120, 8192, 11008, 13824, 14336, 18944, 27648, 28672, 29568)
#: Distributions of the format table (see :func:`rotfn.testing.make_tensor`).
DISTRIBUTIONS = ("normal", "student_t", "outliers")
#: Formats of the format table.
FORMATS = (
    rotfn.mxfp4("floor"),
    rotfn.mxfp4("even"),
    rotfn.mxfp4("rceil"),
    rotfn.mxfp8(),
    rotfn.nvfp4(),
    rotfn.intq(4, group=32),
    rotfn.intq(8),
    rotfn.fp8("token"),
)


def _make_tensor(dist: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    # imported here, not at the top: rotfn.testing needs hypothesis, and `rotfn --help` should not
    from rotfn.testing.strategies import make_tensor

    return make_tensor(dist, shape, seed)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], *, align: str | None = None) -> str:
    """Format rows of cells as an aligned plain-text table with a rule under the header.

    Args:
        header: column titles.
        rows: one sequence of cells per row (each cell printed with ``str``), as long as ``header``.
        align: one ``"l"`` or ``"r"`` per column; default: first column left, the rest right.

    Returns:
        The table as one string without a trailing newline.

    Example:
        >>> print(format_table(["n", "ms"], [[256, "0.12"], [4096, "1.50"]]))
        n        ms
        ----  ----
        256   0.12
        4096  1.50
    """
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["-" * w for w in widths]

    def line(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()

    return "\n".join(line(row) for row in [cells[0], rule, *cells[1:]])


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - y)^2)`` in dB (float64 sums).

    Args:
        x: the reference tensor.
        y: its approximation, same shape.

    Returns:
        The SQNR in dB; ``inf`` when ``y == x``.

    Example:
        >>> round(sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.1, 0.9])), 2)
        20.0
    """
    signal = x.double().square().sum().item()
    noise = (x.double() - y.double()).square().sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def rotation_rows(widths: Sequence[int] = WIDTHS, *, seed: int = 0, probes: int = 8, rows: int = 16) -> list[list[str]]:
    """One row per width: construction, orthogonality error and round-trip error of ``rotfn.hadamard``.

    Orthogonality: ``probes`` basis vectors ``e_i`` spread over ``[0, n)`` are rotated
    in float64, giving rows ``e_i R`` of R, and ``max |R R^T - I|`` is taken over them.
    Round trip: ``max |rotate_back(rotate(x, R), R) - x|`` for ``R = hadamard(n, seed=seed)``
    and ``x`` a ``[rows, n]`` float32 standard normal (seeded).

    Args:
        widths: sizes n to build.
        seed: seed of the sign vector and of x.
        probes: basis vectors per orthogonality check.
        rows: rows of x in the round-trip check.

    Returns:
        Rows of cells ``[n, "K x 2^m", K, 2^m, orthogonality error, round-trip error]``.

    Example:
        >>> rotation_rows([12])[0][:4]
        ['12', '12 x 2^0', '12', '1']
    """
    out = []
    for n in widths:
        rotation = rotfn.hadamard(n, seed=seed)
        k = rotation.factor
        m = (n // k).bit_length() - 1
        pick = torch.linspace(0, n - 1, min(probes, n), dtype=torch.float64).round().long().unique()
        basis = torch.zeros(len(pick), n, dtype=torch.float64)
        basis[torch.arange(len(pick)), pick] = 1.0
        some_rows = rotfn.rotate(basis, rotfn.hadamard(n))
        ortho = (some_rows @ some_rows.T - torch.eye(len(pick), dtype=torch.float64)).abs().max().item()
        x = _make_tensor("normal", (rows, n), seed)
        inverse = (rotfn.rotate_back(rotfn.rotate(x, rotation), rotation) - x).abs().max().item()
        out.append([str(n), f"{k} x 2^{m}", str(k), str(2**m), f"{ortho:.1e}", f"{inverse:.1e}"])
    return out


def sqnr_rows(dist: str, *, shape: tuple[int, int] = (256, 4096), seed: int = 0,
              formats: Sequence[rotfn.Format] = FORMATS) -> list[tuple[rotfn.Format, float, float, float]]:
    """SQNR (dB) of each format on one distribution: no rotation, full Hadamard, block-32 Hadamard.

    ``x = make_tensor(dist, shape, seed)`` (float32). The rotated columns are
    ``rotate_qdq(x, R, fmt, back=True)``, i.e. ``R^T Q(x R)``, measured in x's basis,
    with ``R = hadamard(n, seed=seed)`` and ``hadamard(n, block=32, seed=seed)``.

    Args:
        dist: one of :data:`rotfn.testing.DISTRIBUTIONS`.
        shape: ``[rows, n]`` of x; n a multiple of 32 with a constructible Hadamard.
        seed: seed of x and of the sign vectors.
        formats: format specs to compare.

    Returns:
        One ``(format, none, full, block 32)`` tuple per format.

    Example:
        >>> fmt, none, full, block = sqnr_rows("normal", shape=(4, 64), formats=[rotfn.mxfp8()])[0]
        >>> fmt, 25 < none < 35
        (mxfp8(scale_rule='floor'), True)
    """
    x = _make_tensor(dist, shape, seed)
    full = rotfn.hadamard(shape[-1], seed=seed)
    block = rotfn.hadamard(shape[-1], block=32, seed=seed)
    out = []
    for fmt in formats:
        plain = sqnr_db(x, rotfn.qdq(x, fmt))
        rotated = [sqnr_db(x, rotfn.rotate_qdq(x, r, fmt, back=True)) for r in (full, block)]
        out.append((fmt, plain, *rotated))
    return out


def _int_at_least(minimum: int):
    """An argparse ``type`` accepting ints >= minimum, with a readable error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's options to ``parser`` (shared by ``python -m rotfn.demo`` and ``rotfn demo``).

    Args:
        parser: a parser or subcommand parser.

    Returns:
        The same parser.
    """
    parser.add_argument("--seed", type=_int_at_least(0), default=0,
                        help="seed of the data and the sign vectors (default 0)")
    parser.add_argument("--rows", type=_int_at_least(1), default=256,
                        help="rows of the [rows, 4096] activations of the format table (default 256)")
    return parser


def run(*, seed: int = 0, rows: int = 256) -> int:
    """Print the rotation table and the format tables.

    Args:
        seed: seed of the data and the sign vectors.
        rows: rows of the ``[rows, 4096]`` activations of the format table.

    Returns:
        0.
    """
    start = time.perf_counter()
    print(f"rotfn {rotfn.__version__} demo (torch {torch.__version__}, {torch.get_num_threads()} threads, seed {seed})")
    print()
    print("1. Hadamard rotations at model widths: R = H_K (x) H_{2^m} / sqrt(n), applied in O(n log n).")
    print("   max|RR^T-I|: over 8 rows of R = hadamard(n), float64 (~1e-16 is exact);")
    print(f"   round trip: max |rotate_back(rotate(x, R), R) - x|, R = hadamard(n, seed={seed}), x ~ N(0, 1) float32.")
    print()
    print(format_table(["n", "n = K x 2^m", "K", "2^m", "max|RR^T-I|", "round trip"], rotation_rows(seed=seed)))
    print()
    print(f"2. SQNR in dB (higher is better) of fake quantization on [{rows}, 4096] float32 activations:")
    print("   none = qdq(x, fmt); full / block 32 = rotate_qdq(x, R, fmt, back=True), i.e. R^T Q(x R),")
    print(f"   with R = hadamard(4096, seed={seed}) or hadamard(4096, block=32, seed={seed}).")
    gains = []
    for dist in DISTRIBUTIONS:
        table = sqnr_rows(dist, shape=(rows, 4096), seed=seed)
        gains += [(full - none, fmt, dist) for fmt, none, full, _ in table]
        cells = [[repr(fmt), f"{none:.2f}", f"{full:.2f}", f"{block:.2f}", f"{full - none:+.2f}"]
                 for fmt, none, full, block in table]
        print()
        print(f"   x ~ {dist}")
        print(format_table(["format", "none", "full", "block 32", "full-none"], cells))
    best, worst = max(gains, key=lambda g: g[0]), min(gains, key=lambda g: g[0])
    print()
    print("A full rotation makes x R close to Gaussian whatever x is, so the 'full' column barely depends on")
    print("the distribution: it gains what a format loses on heavy tails, and loses where small scale groups")
    print("had already isolated the outlier channels.")
    print(f"   largest gain: {best[1]!r} on {best[2]}, {best[0]:+.2f} dB")
    print(f"   largest loss: {worst[1]!r} on {worst[2]}, {worst[0]:+.2f} dB")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo from the command line: ``python -m rotfn.demo [--seed S] [--rows R]``.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        The exit code: 0 on success, 2 on a usage error (argparse prints the message).

    Example:
        >>> main(["--rows", "0"])
        2
    """
    parser = add_arguments(argparse.ArgumentParser(prog="python -m rotfn.demo", description=__doc__.splitlines()[0]))
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse exits on --help (0) and on usage errors (2)
        return 0 if stop.code is None else int(stop.code)
    return run(seed=args.seed, rows=args.rows)


if __name__ == "__main__":
    raise SystemExit(main())
