"""Pure-torch reference math: the executable spec of every rotfn op (CPU and GPU, no Triton).

GPTQ's reference lives in the private module ``_gptq`` so that the function :func:`gptq` does not
shadow a module of the same name here.
"""

from rotfn.ops._gptq import SCALE_SEARCHES, gptq, rtn
from rotfn.ops.quant import dequantize, qdq, quantize
from rotfn.ops.rotate import rotate, rotate_back, rotate_qdq

__all__ = ["rotate", "rotate_back", "rotate_qdq", "qdq", "quantize", "dequantize", "gptq", "rtn", "SCALE_SEARCHES"]
