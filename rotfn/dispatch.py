"""The one place that chooses between the torch reference, the Triton kernels and the CPU kernel.

``backend="torch"`` always runs :mod:`rotfn.ops`. ``backend="triton"`` runs
:mod:`rotfn.kernels` or raises :class:`rotfn.errors.BackendUnavailableError`
(never a silent fallback). ``backend="auto"`` picks Triton for CUDA tensors
when the kernels can serve the call; for a float64 Sylvester Hadamard rotation
on the CPU, :mod:`rotfn.cpu` (numba, when installed), which returns the
reference's bits or declines, handing the call to the reference; the reference
otherwise. A ``rotate_qdq`` the kernels cannot fuse runs under ``"auto"`` as its parts,
each dispatched as ``rotate`` and ``qdq`` would be, so ``rotate_qdq(x, R, fmt)`` is
``qdq(rotate(x, R), fmt)`` bit for bit on every device (the reference is that composition).

:func:`trace` records which implementation each op actually ran on (``"torch"``
for a CPU kernel that declined), so tests can prove a fast path was taken::

    with rotfn.dispatch.trace() as ran:
        rotfn.qdq(x, rotfn.mxfp4())
    assert ran == [("qdq", "torch")]
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
from collections.abc import Callable, Iterator

import torch

from rotfn import ops
from rotfn.errors import BackendUnavailableError, message

__all__ = ["BACKENDS", "kernels_available", "select", "trace"]

BACKENDS = ("auto", "torch", "triton")

_REFERENCE: dict[str, Callable] = {
    "rotate": ops.rotate,
    "rotate_qdq": ops.rotate_qdq,
    "qdq": ops.qdq,
    "quantize": ops.quantize,
    "dequantize": ops.dequantize,
    "gptq": ops.gptq,
}

_trace: contextvars.ContextVar[list | None] = contextvars.ContextVar("rotfn_dispatch_trace", default=None)


def _load_kernels():
    """The kernels module, or the reason it cannot be used."""
    try:
        return importlib.import_module("rotfn.kernels"), None
    except ImportError as err:
        return None, f"{err}"


@functools.lru_cache(maxsize=1)
def _load_cpu_kernels():
    """The CPU kernels module (numba), or None when numba is not installed."""
    try:
        return importlib.import_module("rotfn.cpu")
    except ImportError:
        return None


def kernels_available() -> bool:
    """True when :mod:`rotfn.kernels` imports (Triton installed and rotfn ships kernels)."""
    return _load_kernels()[0] is not None


def select(fn: str, op: str, backend: str, x: torch.Tensor, *, dim: int = -1, **spec) -> Callable:
    """Return the implementation of ``op`` for this call; the trace records what runs.

    The choice is recorded here, except for the CPU kernel: it may decline at run time, so
    its implementation records ``"numba"`` or, when it hands the call to the reference,
    ``"torch"``. Every implementation works on the last dim; for another ``dim`` the returned
    function moves it last and back (:func:`_along`), so no implementation needs a ``dim`` of its own.

    Args:
        fn: public function name, for error messages.
        op: one of ``rotate``, ``rotate_qdq``, ``qdq``, ``quantize``, ``dequantize``, ``gptq``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (already validated).
        x: the input tensor (or a codes tensor for ``dequantize``): its device decides ``"auto"``.
        dim: the dim ``op`` acts on (negative, already validated; ``rotate`` and ``rotate_qdq`` only).
        spec: the rotation / format of the call, so kernels can say whether they serve it.

    Raises:
        BackendUnavailableError: ``backend="triton"`` and the kernels cannot run this call.
    """
    x = x.movedim(dim, -1)
    chosen, impl = "torch", _REFERENCE[op]
    if backend == "auto" and not x.is_cuda:
        cpu = _load_cpu_kernels()
        if cpu is not None and cpu.unsupported(op, x, **spec) is None:
            return _along(functools.partial(_exact_or_reference, op, cpu.rotate, impl), dim, contiguous=False)
    if backend != "torch":
        kernels, why = _load_kernels()
        if kernels is not None:
            why = kernels.unsupported(op, x, **spec)
        if why is None and (backend == "triton" or x.is_cuda):
            chosen, impl = "triton", getattr(kernels, op)
        elif backend == "triton":
            raise BackendUnavailableError(
                message(fn, "backend", "a backend that can run this call", f"'triton' ({why})",
                        "use backend='auto' or backend='torch'")
            )
    if op == "rotate_qdq" and chosen == "torch" and backend == "auto" and _parts_run_faster(x, **spec):
        return _along(functools.partial(_rotate_then_qdq, fn), dim, contiguous=False)
    _record(op, chosen)
    return _along(impl, dim, contiguous=chosen == "triton")


def _parts_run_faster(x: torch.Tensor, *, rotation, fmt, back) -> bool:
    """Whether ``"auto"`` runs this call's rotation or qdq, dispatched alone, elsewhere than on the reference
    (the CPU kernel, or the Triton kernels where they serve the parts but not the fused call)."""
    cpu = _load_cpu_kernels()
    kernels = _load_kernels()[0] if x.is_cuda else None
    parts = (("rotate", {"rotation": rotation}), ("qdq", {"fmt": fmt}))
    return any(m is not None and m.unsupported(op, x, **spec) is None for m in (cpu, kernels) for op, spec in parts)


def _rotate_then_qdq(fn: str, x: torch.Tensor, r, fmt, back: bool) -> torch.Tensor:
    """``rotate_qdq`` as its parts, each dispatched on its own under ``"auto"``: where the kernels cannot fuse a
    call, ``rotate_qdq`` still runs the rotation (and qdq) where ``rotate`` (and ``qdq``) would, so it is
    ``qdq(rotate(x, R), fmt)`` bit for bit on every device."""
    y = select(fn, "rotate", "auto", x, rotation=r)(x, r)
    y = select(fn, "qdq", "auto", y, fmt=fmt)(y, fmt)
    return select(fn, "rotate", "auto", y, rotation=r.T)(y, r.T) if back else y


def _along(impl: Callable, dim: int, *, contiguous: bool) -> Callable:
    """``impl`` (which works on the last dim) applied along ``dim``: moved last and back.

    The reference and the CPU kernel rotate a moved view where it lies in memory; the Triton
    kernels read rows of the last dim, so they get a contiguous copy.
    """
    if dim == -1:
        return impl

    def along(x: torch.Tensor, *args):
        moved = x.movedim(dim, -1)
        return impl(moved.contiguous() if contiguous else moved, *args).movedim(-1, dim)

    return along


def _record(op: str, backend: str) -> None:
    """Append ``(op, backend)`` to the innermost :func:`trace`, if any."""
    record = _trace.get()
    if record is not None:
        record.append((op, backend))


def _exact_or_reference(op: str, exact: Callable, reference: Callable, *args):
    """``exact(*args)`` (a CPU kernel that returns the reference's bits or None), else ``reference(*args)``;
    records which of the two ran."""
    out = exact(*args)
    if out is None:
        _record(op, "torch")
        return reference(*args)
    _record(op, "numba")
    return out


@contextlib.contextmanager
def trace() -> Iterator[list[tuple[str, str]]]:
    """Collect ``(op, backend)`` pairs of every dispatched call inside the block.

    Example:
        >>> import torch, rotfn
        >>> with rotfn.dispatch.trace() as ran:
        ...     _ = rotfn.rotate(torch.ones(4), rotfn.hadamard(4))
        >>> ran
        [('rotate', 'torch')]
    """
    record: list[tuple[str, str]] = []
    token = _trace.set(record)
    try:
        yield record
    finally:
        _trace.reset(token)
