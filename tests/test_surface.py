"""The curated top-level surface: ``rotfn.__all__`` is exactly these names, and each one resolves."""

import importlib

import rotfn

#: ``rotfn.__all__`` in its order (DESIGN.md's fixed names and the user-facing subpackages); changing the
#: surface is a decision, made here on purpose.
SURFACE = (
    "Rotation", "hadamard", "orthogonal", "from_matrix",
    "Format", "ScaleRule", "MX", "NVFP4", "IntQ", "FP8", "mxfp4", "mxfp8", "nvfp4", "intq", "fp8",
    "format_from_dict", "QTensor",
    "rotate", "rotate_back", "qdq", "quantize", "dequantize", "rotate_qdq",
    "gptq", "calibrate",
    "params", "call", "fold", "FoldedParams", "Plan", "where", "Where", "chain",
    "save", "load", "export_hf", "export_compressed", "load_hf", "fold_checkpoint",
    "report", "Report", "LayerReport",
    "plans", "transforms", "model", "learn", "calibration", "io", "metrics", "errors", "dispatch", "distributed", "testing",
)


def test_all_is_the_curated_surface():
    assert tuple(rotfn.__all__) == SURFACE


def test_every_name_resolves_and_subpackages_are_rotfns_own():
    modules = SURFACE[SURFACE.index("plans"):]
    for name in modules:
        assert getattr(rotfn, name) is importlib.import_module(f"rotfn.{name}"), name
    for name in SURFACE[:SURFACE.index("plans")]:
        assert callable(getattr(rotfn, name)), name
