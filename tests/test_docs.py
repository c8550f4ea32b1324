"""The documentation site builds with ``mkdocs build --strict``, API pages included.

Strict mode turns every warning into a failure: a broken link or anchor between pages, a
page missing from the nav, and every docstring problem mkdocstrings / griffe reports while
rendering the API reference (a malformed ``Args`` or ``Raises`` section, a documented
parameter the signature does not have). The ``docs`` extra (``pip install -e '.[docs]'``,
which the Makefile installs) provides mkdocs; without it the test is skipped.
"""

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")

ROOT = pathlib.Path(__file__).resolve().parents[1]

# page -> strings its HTML must contain (mkdocstrings gives every documented object an id)
PAGES = {
    "index.html": ["rotfn"],
    "install/index.html": ["gpu", "triton", "make test"],
    "quickstart/index.html": ["sqnr_db", "without_formats"],
    "troubleshooting/index.html": ["rotfn-load_hf-only", "TRITON_INTERPRET", "NVFP4", "Conv1D"],
    "comparison/index.html": ["AutoRound", "llm-compressor", "ModelOpt", "SpinQuant", "Sources"],
    "performance/index.html": [],
    "accuracy/index.html": ["GPTQ"],
    "formats/index.html": ["MXFP4"],
    "rotations/index.html": ["Hadamard"],
    "concepts/rotations/index.html": [],
    "concepts/plans/index.html": [],
    "concepts/fold-vs-online/index.html": [],
    "concepts/backends/index.html": [],
    "concepts/glossary/index.html": ["plan.rotations vs plan.weights", "<dl>"],
    "howto/tensor/index.html": [],
    "howto/per-linear/index.html": [],
    "howto/quarot/index.html": [],
    "howto/property-tests/index.html": [],
    "howto/gpu/index.html": [],
    "howto/checkpoints/index.html": [],
    "howto/learn/index.html": [],
    "howto/distributed/index.html": ["torchrun", "--nproc-per-node", "--rdzv-endpoint", "DistributedError"],
    "howto/recipes/index.html": ["W4A4KV4", "MR-GPTQ"],
    "api/index.html": ['id="rotfn"'],
    "api/specs/index.html": ['id="rotfn.specs.rotation.hadamard"', 'id="rotfn.specs.rotation.Rotation"',
                             'id="rotfn.specs.formats.mxfp4"', 'id="rotfn.specs.formats.nvfp4"'],
    "api/functional/index.html": ['id="rotfn.functional.rotate"', 'id="rotfn.functional.rotate_back"',
                                  'id="rotfn.functional.qdq"', 'id="rotfn.functional.rotate_qdq"'],
    "api/plans/index.html": ['id="rotfn.plans.per_linear"', 'id="rotfn.plans.quarot"', 'id="rotfn.plans.Plan"',
                             'id="rotfn.plans.fold"'],
    "api/model/index.html": ['id="rotfn.model.params"', 'id="rotfn.model.call"', 'id="rotfn.model.intercept"'],
    "api/report/index.html": ['id="rotfn._report.report"'],
    "api/transforms/index.html": ['id="rotfn.transforms.chain"', 'id="rotfn.transforms.where"'],
    "api/errors/index.html": ['id="rotfn.errors.FoldError"'],
    "api/testing/index.html": ['id="rotfn.testing.strategies.rotations"',
                               'id="rotfn.testing.models.assert_equivalent"'],
    "api/dispatch/index.html": ['id="rotfn.dispatch.trace"'],
    "api/io/index.html": ['id="rotfn.io.save"', 'id="rotfn.io.export_hf"', 'id="rotfn.io.fold_checkpoint"'],
    "api/learn/index.html": ['id="rotfn.learn.rotations"'],
    "api/calibration/index.html": ['id="rotfn.calibration.gptq"', 'id="rotfn.calibration.calibrate"'],
    "api/kernels/index.html": ['id="rotfn.kernels.launch.rotate_qdq"'],
}


def test_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    missing = [page for page in PAGES if not (site / page).is_file()]
    assert not missing, f"pages missing from the built site: {missing}"
    for page, needles in PAGES.items():
        text = (site / page).read_text(encoding="utf-8")
        absent = [n for n in needles if n not in text]
        assert not absent, f"{page} lacks {absent}"
    assert (site / "search" / "search_index.json").is_file()
    # the build's griffe extension (docs/_ext) turns rotfn's "Example:" sections into doctest code;
    # without it the ">>>" lines would render as nested block quotes
    api = (site / "api" / "functional" / "index.html").read_text(encoding="utf-8")
    assert '<span class="gp">&gt;&gt;&gt; </span>' in api
    assert "<blockquote>" not in api
