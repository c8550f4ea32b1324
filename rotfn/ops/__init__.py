"""Pure-torch reference math: the executable spec of every rotfn op (CPU and GPU, no Triton)."""

from rotfn.ops.quant import dequantize, qdq, quantize
from rotfn.ops.rotate import rotate, rotate_back, rotate_qdq

__all__ = ["rotate", "rotate_back", "rotate_qdq", "qdq", "quantize", "dequantize"]
