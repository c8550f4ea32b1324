"""Tables for the demo, the benchmarks and the notebook views of reports and plans: plain text and HTML."""

from __future__ import annotations

import html
from collections.abc import Sequence

__all__ = ["format_table", "html_table"]


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


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]], *, caption: str | None = None,
               footer: Sequence[str] = ()) -> str:
    """Format rows of cells as an HTML ``<table>`` (what Jupyter shows for ``_repr_html_``), every text escaped.

    Args:
        header: column titles.
        rows: one sequence of cells per row (each cell printed with ``str``), as long as ``header``.
        caption: a title above the table, or None.
        footer: lines shown under the table, one paragraph each (summaries, notes).

    Returns:
        The HTML as one string.

    Example:
        >>> print(html_table(["layer", "dB"], [["<q>", "1.50"]], caption="a & b"))
        <table><caption>a &amp; b</caption><thead><tr><th>layer</th><th>dB</th></tr></thead><tbody><tr><td>&lt;q&gt;</td><td>1.50</td></tr></tbody></table>
    """
    def cells(tag: str, row: Sequence[object]) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row) + "</tr>"

    head = "" if caption is None else f"<caption>{html.escape(caption)}</caption>"
    body = "".join(cells("td", row) for row in rows)
    table = f"<table>{head}<thead>{cells('th', header)}</thead><tbody>{body}</tbody></table>"
    return table + "".join(f"<p>{html.escape(line)}</p>" for line in footer)
