"""Plain-text tables for the demo, the benchmarks and :class:`rotfn.Report`."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table"]


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
