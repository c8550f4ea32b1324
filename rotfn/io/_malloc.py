"""Keep freed memory blocks in the process while a long job allocates and frees tensors (glibc malloc).

Torch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold
with a fresh ``mmap`` and gives the heap's free top back to the OS above its trim
threshold (both adapt at run time, starting at 128 KiB), so a loop that allocates and
frees temporaries of a few MiB may page-fault every one of them in afresh: the kernel
zeroes each 4 KiB page on first touch (what that costs a fold: ``docs/performance.md``).
These settings are process-wide: library calls make them only when asked
(``rotfn.fold_checkpoint(..., keep_freed_blocks=True)``). :func:`freed_blocks_kept` turns ``mmap`` off and trimming off
for the length of a job, so every block, however large (the mmap threshold cannot go above
32 MiB), comes from the heap and goes back to it (the effect of ``MALLOC_MMAP_MAX_=0`` and
``MALLOC_TRIM_THRESHOLD_``, or of jemalloc, for one block of code), and then gives the free
memory back. Elsewhere than glibc, or where the environment configures malloc (``MALLOC_*``,
``GLIBC_TUNABLES``), it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator

__all__ = ["SETTING", "freed_blocks_kept", "keep_freed_blocks"]

#: What :func:`keep_freed_blocks` sets, in words (for benchmark reports).
SETTING = "glibc malloc: no mmap, no trim"

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # from <malloc.h>
_DEFAULT_MMAP_MAX = 65536
# Where glibc's adaptive thresholds settle in a process that frees large blocks (the mmap threshold rises to
# the largest freed block, at most 32 MiB on 64-bit, and the trim threshold to twice it): what a torch
# process has anyway, and the values left after a job (any mallopt stops the adapting for good).
_SETTLED_MMAP_THRESHOLD = 32 << 20
_SETTLED_TRIM_THRESHOLD = 64 << 20
_NO_TRIM = 2**31 - 1

_lock = threading.Lock()
_depth = 0


def _glibc():
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``) and the environment does not
    configure malloc itself, else None."""
    configured = any(k.startswith("MALLOC_") for k in os.environ) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or configured:
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
        libc.mallopt, libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_blocks() -> bool:
    """Make glibc malloc serve every block from its heap and never trim it, for the rest of the process.

    Returns:
        True when the setting took effect (glibc), False elsewhere.
    """
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM) == 1


@contextlib.contextmanager
def freed_blocks_kept() -> Iterator[bool]:
    """Within the block, keep freed blocks for reuse (:func:`keep_freed_blocks`); afterwards give them back.

    On exit ``mmap`` is back on, the mmap and trim thresholds are set where glibc's adaptive
    scheme settles in a process that frees large blocks (32 MiB and 64 MiB; fixed from then on:
    glibc stops adapting them once any is set), and ``malloc_trim`` returns the free memory to the OS. Nested and
    concurrent blocks restore once the last one ends.

    Yields:
        True when glibc malloc was reconfigured.

    Example:
        >>> with freed_blocks_kept():
        ...     pass
    """
    global _depth
    with _lock:
        _depth += 1
        ok = keep_freed_blocks()
    try:
        yield ok
    finally:
        with _lock:
            _depth -= 1
            libc = _glibc() if ok and _depth == 0 else None
            if libc is not None:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP_THRESHOLD)
                libc.mallopt(_M_TRIM_THRESHOLD, _SETTLED_TRIM_THRESHOLD)
                libc.malloc_trim(0)
