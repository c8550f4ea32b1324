"""rotfn: rotations and quantizers for PyTorch models, as pure functions over tensors and specs.

Example:
    >>> import torch, rotfn
    >>> R = rotfn.hadamard(4096, seed=0)
    >>> x = torch.randn(8, 4096)
    >>> y = rotfn.rotate_qdq(x, R, rotfn.mxfp4(), back=True)   # R^T Q(x R)
    >>> y.shape
    torch.Size([8, 4096])
"""

# Ctrl-C while these load (torch: seconds) ends the rotfn command with one line, exit 130 (rotfn._command);
# a program importing rotfn gets its KeyboardInterrupt as usual
from rotfn import _command

with _command.interrupt_exits():
    # the user-facing subpackages (rotfn.testing is imported on first use, by __getattr__ below)
    from rotfn import calibration, dispatch, distributed, errors, io, learn, metrics, model, plans, transforms

    # the curated names, each from the room that defines it (grouped by topic in __all__)
    from rotfn._report import LayerReport, Report, report
    from rotfn.calibration import calibrate, gptq
    from rotfn.functional import dequantize, qdq, quantize, rotate, rotate_back, rotate_qdq
    from rotfn.io import export_compressed, export_hf, fold_checkpoint, load, load_hf, save
    from rotfn.model import call, params
    from rotfn.plans import FoldedParams, Plan, fold
    from rotfn.specs import (
        FP8,
        MX,
        NVFP4,
        Format,
        IntQ,
        QTensor,
        Rotation,
        ScaleRule,
        format_from_dict,
        fp8,
        from_matrix,
        hadamard,
        intq,
        mxfp4,
        mxfp8,
        nvfp4,
        orthogonal,
    )
    from rotfn.transforms import Where, chain, where

__version__ = "0.1.0"

__all__ = [
    # rotations
    "Rotation", "hadamard", "orthogonal", "from_matrix",
    # formats
    "Format", "ScaleRule", "MX", "NVFP4", "IntQ", "FP8", "mxfp4", "mxfp8", "nvfp4", "intq", "fp8",
    "format_from_dict", "QTensor",
    # tensor functions
    "rotate", "rotate_back", "qdq", "quantize", "dequantize", "rotate_qdq",
    # rounding against calibration statistics
    "gptq", "calibrate",
    # parameter dicts and models
    "params", "call", "fold", "FoldedParams", "Plan", "where", "Where", "chain",
    # checkpoints
    "save", "load", "export_hf", "export_compressed", "load_hf", "fold_checkpoint",
    # measuring a plan
    "report", "Report", "LayerReport",
    # subpackages
    "plans", "transforms", "model", "learn", "calibration", "io", "metrics", "errors", "dispatch", "distributed", "testing",
]


def __getattr__(name: str):
    # rotfn.testing needs hypothesis (the `test` extra): imported on first use, not with rotfn (and importlib
    # imported here, so that it does not become an attribute of rotfn)
    if name == "testing":
        import importlib

        return importlib.import_module("rotfn.testing")
    raise AttributeError(f"module 'rotfn' has no attribute {name!r}")
