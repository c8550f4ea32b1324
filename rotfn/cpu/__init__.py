"""CPU kernels behind :mod:`rotfn.dispatch` (numba): exact float64 Hadamard rotations.

Importing this package needs ``numba`` (``pip install rotfn[cpu]``). :func:`rotate` returns
the reference's bits or None where it cannot prove them; :func:`unsupported` says why a
call is not even tried. The dispatcher runs the reference in both cases.
"""

from rotfn.cpu.hadamard import rotate, unsupported

__all__ = ["rotate", "unsupported"]
