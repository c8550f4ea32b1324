"""Every notebook runs top to bottom in a real Jupyter kernel (as "Run All" would), on CPU, shows no
warning of tqdm's and no traceback, and draws every figure it displays."""

import json
import pathlib
import re

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _texts(output) -> list[str]:
    """The text an output shows: a stream's, an error's traceback, or a display's plain text and HTML."""
    if output["output_type"] == "stream":
        return [output["text"]]
    if output["output_type"] == "error":
        return ["\n".join(output["traceback"])]
    data = output.get("data", {})
    return [data[k] if isinstance(data[k], str) else "".join(data[k]) for k in ("text/plain", "text/html") if k in data]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_a_kernel_without_warnings_or_tracebacks(path):
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and code[0].outputs == [] or all(o["output_type"] != "stream" or o["name"] != "stderr"
                                                 for o in code[0].outputs), code[0].outputs
    for i, cell in enumerate(code):
        for output in cell.outputs:
            for text in _texts(output):
                assert "TqdmWarning" not in text, (i, text)
                assert not (output["output_type"] == "stream" and output["name"] == "stderr" and "Traceback" in text), \
                    (i, text)
                assert output["output_type"] != "error", (i, text)
            if output.get("data", {}).get("text/plain", "").startswith("<Figure"):
                assert "image/png" in output["data"], (i, "a figure shown as its repr, not drawn")


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_use_only_the_public_api(path):
    """No code cell names a private rotfn module (``rotfn._demo``, ``rotfn.io._file``, ...)."""
    cells = json.loads(path.read_text())["cells"]
    code = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert not re.findall(r"\brotfn(?:\.\w+)*\._\w+", code)
