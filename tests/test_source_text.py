"""Measurements live in docs/performance.md (dated, with the machine), not in rotfn's docstrings, help or comments,
where nothing keeps them true: no module quotes a speed ratio, a count measured on some model, or a date."""

import pathlib
import re

import pytest

import rotfn

ROOT = pathlib.Path(rotfn.__file__).parent
MEASUREMENT = re.compile(
    r"\b\d+(\.\d+)?x (faster|slower)\b"  # "~1.5x faster"
    r"|\b(twice|three times|half) as (fast|slow)\b"  # "about twice as fast"
    r"|\b\d+ in [\d,]+ on\b"  # "4 in 100,000 on a tiny Llama"
    r"|\b20\d\d-\d\d-\d\d\b",  # a dated run
    re.IGNORECASE,
)


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_quotes_a_measurement(path):
    found = [f"{path.name}:{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
             if MEASUREMENT.search(line)]
    assert not found, "move these to docs/performance.md:\n" + "\n".join(found)
