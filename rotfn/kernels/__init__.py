"""Triton kernels behind :mod:`rotfn.dispatch`: same signatures as :mod:`rotfn.ops`.

Importing this module needs ``triton``. On CPU tensors the kernels run only
under Triton's interpreter (``TRITON_INTERPRET=1`` set before the import);
:func:`unsupported` says why a call cannot run, and the dispatcher turns that
into a typed error for ``backend="triton"`` (``"auto"`` then uses the reference).
"""

from rotfn.kernels.gptq import gptq
from rotfn.kernels.launch import INTERPRET, qdq, quantize, rotate, rotate_qdq, unsupported

__all__ = ["rotate", "rotate_qdq", "qdq", "quantize", "gptq", "unsupported", "INTERPRET"]
