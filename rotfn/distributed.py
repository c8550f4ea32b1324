"""rotfn under ``torch.distributed``: this process's rank, its share of the work, sums across ranks, failing together.

rotfn starts no process group and picks no backend: it runs on the one the caller initialized
(``torchrun`` + ``torch.distributed.init_process_group``; NCCL on GPUs, gloo on CPUs), and without one
every function here is the one-process identity (rank 0 of 1), so single-process behaviour is unchanged.
The ``rotfn`` command initializes the group itself when ``torchrun`` launched it.

The distributed calls of rotfn (``rotfn.learn.rotations``, ``rotfn.calibrate``, ``rotfn.fold_checkpoint``)
alternate local work with collectives. A rank that fails in its local work must not leave the others
waiting in the next collective: :func:`together` wraps a local phase, and at its end every rank learns
whether any rank failed; the failed rank raises its own error, every other rank a
:class:`~rotfn.errors.DistributedError` naming it. A rank whose process ends (killed, out of memory) makes the
collectives of the others fail; they raise :class:`~rotfn.errors.DistributedError` too.

Example:
    >>> import rotfn
    >>> rotfn.distributed.world()            # no process group: rank 0 of 1
    (0, 1)
    >>> rotfn.distributed.share(list(range(5)))
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from rotfn.errors import ArgumentError, DistributedError, DTypeError, ShapeError, message

__all__ = ["world", "is_distributed", "share", "assign", "together", "all_reduce", "sum_together", "gather", "merge",
           "concat", "piece", "same", "first_writes"]


def _dist():
    """``torch.distributed`` when this process is in an initialized group, else None."""
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process in the default process group; ``(0, 1)`` without one.

    Returns:
        Two ints, ``0 <= rank < size``.

    Example:
        >>> world()
        (0, 1)
    """
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def is_distributed() -> bool:
    """True when this process is one of several ranks of an initialized process group.

    Example:
        >>> is_distributed()
        False
    """
    return world()[1] > 1


def share(items: Sequence) -> list:
    """This rank's share of ``items``: every ``size``-th item from its rank (``items[rank::size]``).

    The shares of all ranks are disjoint and together are ``items``; with one rank the share is everything.

    Args:
        items: a sequence every rank passes the same.

    Returns:
        A list (empty when there are fewer items than ranks and this rank's turn never comes).

    Example:
        >>> share("abcde")                   # on rank 1 of 2: ['b', 'd']
        ['a', 'b', 'c', 'd', 'e']
    """
    rank, size = world()
    return list(items)[rank::size]


def assign(sizes: Sequence[int]) -> list[int]:
    """The rank that does each item of ``sizes`` (its cost, e.g. bytes), balancing the ranks' totals.

    The largest item first, each to the rank with the least so far (the lowest rank of equals): every rank
    computes the same assignment from the same ``sizes``, and no rank's total exceeds another's by more than
    its largest item.

    Args:
        sizes: a sequence of non-negative ints every rank passes the same.

    Returns:
        ``[rank of item 0, rank of item 1, ...]``; all 0 with one rank.

    Raises:
        ArgumentError: a size that is not a non-negative int.

    Example:
        >>> assign([5, 3, 3])                # on 2 ranks: [0, 1, 1]
        [0, 0, 0]
    """
    bad = [v for v in sizes if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise ArgumentError(message("distributed.assign", "sizes", "non-negative ints", repr(bad[0])))
    size = world()[1]
    loads, owners = [0] * size, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owners[i] = min(range(size), key=lambda r: (loads[r], r))
        loads[owners[i]] += sizes[i]
    return owners


def _wire(t: torch.Tensor) -> torch.device:
    """Where the backend can move ``t``: CUDA for NCCL (the current device), the CPU for gloo."""
    if torch.distributed.get_backend() == "nccl":
        return t.device if t.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(fn: str, what: str, collective, *args, **kwargs) -> None:
    """Run one collective; a peer whose process ended (the backend's error) becomes a DistributedError."""
    try:
        collective(*args, **kwargs)
    except (RuntimeError, ConnectionError) as e:  # gloo: "Connection closed by peer"; NCCL: DistBackendError
        raise DistributedError(message(fn, what, "every rank in the collective", f"a rank that stopped ({e})",
                                       "look at the first error of the other ranks' output")) from e


def _status(fn: str, failed: bool) -> list[int]:
    """The ranks that failed, as every rank sees them (one all-reduce of a flag per rank)."""
    rank, size = world()
    flags = torch.zeros(size, dtype=torch.int32)
    flags[rank] = int(failed)
    flags = flags.to(_wire(flags))
    _collective(fn, "ranks", torch.distributed.all_reduce, flags)
    return [r for r, f in enumerate(flags.tolist()) if f]


def _failed(fn: str, failed: list[int]) -> None:
    """Raise this rank's DistributedError when other ranks failed."""
    if failed:
        raise DistributedError(message(fn, "rank", "every rank to finish its share",
                                       f"rank {failed[0]} of {world()[1]} failed" if len(failed) == 1
                                       else f"ranks {failed} of {world()[1]} failed",
                                       "the failed rank's own error (in its output) says why; fix that and rerun"))


@contextlib.contextmanager
def together(fn: str) -> Iterator[None]:
    """Wrap a local phase (no collectives inside) so that every rank leaves it the same way.

    At the end of the block every rank learns which ranks raised in it (one small all-reduce). A
    rank that raised re-raises its own error; when another rank raised, this rank raises a
    :class:`~rotfn.errors.DistributedError` naming it. ``KeyboardInterrupt`` and ``SystemExit`` propagate
    at once (the launcher stops every rank). Without a process group the block runs as it is.

    Args:
        fn: the rotfn function the phase belongs to (named in the error).

    Raises:
        DistributedError: another rank failed in its phase, or stopped.

    Example:
        >>> with together("fold_checkpoint"):
        ...     x = 1 + 1
    """
    if not is_distributed():
        yield
        return
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        _status(fn, True)
        raise
    _failed(fn, _status(fn, False))


def all_reduce(fn: str, tensors: Sequence[torch.Tensor], op: str = "sum") -> list[torch.Tensor]:
    """New tensors: the sum (or max) of each tensor over all ranks, on its own device and dtype.

    The inputs are not changed. Every rank passes tensors of the same shapes and dtypes in the same order;
    every rank receives the same values (bit for bit: one reduction, its result broadcast).

    Args:
        fn: the calling rotfn function (named in errors).
        tensors: the local values.
        op: ``"sum"`` or ``"max"``.

    Returns:
        ``[reduced tensor]``, one per input; copies of the inputs without a process group.

    Raises:
        ArgumentError: ``op`` is neither ``"sum"`` nor ``"max"``.
        DistributedError: another rank stopped.

    Example:
        >>> all_reduce("calibrate", [torch.ones(2)])
        [tensor([1., 1.])]
    """
    if op not in ("sum", "max"):
        raise ArgumentError(message("distributed.all_reduce", "op", "'sum' or 'max'", repr(op)))
    if not is_distributed():
        return [t.clone() for t in tensors]
    reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
    out = []
    for t in tensors:
        buf = t.detach().to(_wire(t), copy=True).contiguous()
        _collective(fn, "tensors", torch.distributed.all_reduce, buf, op=reduce_op)
        out.append(buf.to(t.device))
    return out


def sum_together(fn: str, local: Callable[[], Sequence[torch.Tensor]],
                 like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run ``local()`` (this rank's work, no collectives inside) and sum what it returns over the ranks, in one collective.

    :func:`together` and :func:`all_reduce` in one all-reduce, for a loop that reduces every step (the
    gradients of a data-parallel step): the tensors travel flattened into one float64 buffer, with
    one flag per rank that says whether its ``local()`` raised. A rank that raised contributes zeros,
    then re-raises its own error; every other rank raises a :class:`~rotfn.errors.DistributedError`
    naming it. Without a process group this is ``local()``, its tensors returned as they are.

    The sums are of the float64 values, each returned in its own dtype and device: exact for
    float64 inputs up to the order of the sum (every rank gets the same bits).

    Args:
        fn: the calling rotfn function (named in errors).
        local: returns tensors of the shapes, dtypes and devices of ``like``, in that order.
        like: tensors shaped as ``local()``'s results (their values are not used).

    Returns:
        ``[sum over ranks]``, one tensor per entry of ``like``.

    Raises:
        DistributedError: another rank failed in ``local()``, or stopped; ``local()`` returned
            tensors that do not match ``like``.
        Exception: this rank's own error from ``local()``.

    Example:
        >>> sum_together("learn.rotations", lambda: [torch.ones(2, dtype=torch.float64)], [torch.zeros(2)])
        [tensor([1., 1.], dtype=torch.float64)]
    """
    if not is_distributed():
        return list(local())
    rank, size = world()
    sizes = [t.numel() for t in like]
    wire = _wire(like[0]) if like else torch.device("cpu")
    buf = torch.zeros(size + sum(sizes), dtype=torch.float64, device=wire)
    try:
        values = list(local())
        if [(tuple(v.shape), v.dtype) for v in values] != [(tuple(t.shape), t.dtype) for t in like]:
            raise DistributedError(message(fn, "local", "tensors shaped as like", "other shapes or dtypes"))
        if values:
            buf[size:] = torch.cat([v.detach().reshape(-1).to(wire, torch.float64) for v in values])
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        buf.zero_()
        buf[rank] = 1
        _collective(fn, "tensors", torch.distributed.all_reduce, buf)
        raise
    _collective(fn, "tensors", torch.distributed.all_reduce, buf)
    _failed(fn, [r for r, f in enumerate(buf[:size].tolist()) if f])
    out = []
    for t, part in zip(like, buf[size:].split(sizes), strict=True):
        out.append(part.reshape(t.shape).to(t.device, t.dtype))
    return out


def gather(fn: str, what: str, obj) -> list:
    """Every rank's ``obj``, by rank, on every rank (a picklable value: names, shapes, small tensors).

    Args:
        fn: the calling rotfn function; what: what ``obj`` is (named in errors).
        obj: this rank's value; it travels pickled, so keep it small.

    Returns:
        ``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` without a process group.

    Raises:
        DistributedError: another rank stopped.

    Example:
        >>> gather("fold_checkpoint", "shards", {"a": 1})
        [{'a': 1}]
    """
    if not is_distributed():
        return [obj]
    out: list = [None] * world()[1]
    _collective(fn, what, torch.distributed.all_gather_object, out, obj)
    return out


def merge(fn: str, mine: Mapping[str, object]) -> dict[str, object]:
    """Every rank's ``mine`` merged into one dict, on every rank: results each rank computed for its own keys.

    The values travel pickled (:func:`gather`): keep their tensors on the
    CPU, since a tensor arrives on the device it left from. The keys of the ranks are disjoint;
    the merged dict holds rank 0's keys first, then rank 1's, and so on.

    Args:
        fn: the calling rotfn function (named in errors).
        mine: this rank's ``{key: value}``.

    Returns:
        The merged dict; a copy of ``mine`` without a process group.

    Raises:
        DistributedError: two ranks hold the same key, or a rank stopped.

    Example:
        >>> merge("calibrate", {"a": 1})
        {'a': 1}
    """
    out: dict[str, object] = {}
    for part in gather(fn, "results", dict(mine)):
        twice = out.keys() & part.keys()
        if twice:
            raise DistributedError(message(fn, "results", "one rank per key", f"keys {sorted(twice)[:3]} on two ranks"))
        out.update(part)
    return out


def piece(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``t``: its flat elements ``[rank * c, (rank + 1) * c)``, ``c = ceil(numel / N)``,
    zero-padded to ``c`` (a new tensor); :func:`concat` of the pieces, cut to ``numel``, is ``t.reshape(-1)``.

    Args:
        t: any tensor (the same shape on every rank).

    Returns:
        A 1-D tensor of ``c`` elements, ``t``'s dtype and device; ``t.reshape(-1)`` copied without a process group.

    Raises:
        DTypeError: ``t`` is not a tensor.

    Example:
        >>> piece(torch.arange(5))               # on 2 ranks: rank 0 [0, 1, 2], rank 1 [3, 4, 0]
        tensor([0, 1, 2, 3, 4])
    """
    if not isinstance(t, torch.Tensor):
        raise DTypeError(message("distributed.piece", "t", "a torch.Tensor", type(t).__name__))
    rank, size = world()
    flat = t.detach().reshape(-1)
    c = -(-flat.numel() // size)
    out = torch.zeros(c, dtype=t.dtype, device=t.device)
    part = flat[rank * c:(rank + 1) * c]
    out[:part.numel()] = part
    return out


def concat(fn: str, piece: torch.Tensor) -> torch.Tensor:
    """Every rank's ``piece`` concatenated by rank, on every rank (one all-gather, any dtype, bit for bit).

    Args:
        fn: the calling rotfn function (named in errors).
        piece: this rank's 1-D tensor; the same size and dtype on every rank.

    Returns:
        A new 1-D tensor of ``N * piece.numel()`` elements on ``piece``'s device; ``piece`` itself without a
        process group.

    Raises:
        DTypeError: ``piece`` is not a tensor.
        ShapeError: ``piece`` is not 1-D.
        DistributedError: a rank stopped.

    Example:
        >>> concat("learn.rotations", torch.ones(2))
        tensor([1., 1.])
    """
    if not isinstance(piece, torch.Tensor):
        raise DTypeError(message("distributed.concat", "piece", "a torch.Tensor", type(piece).__name__))
    if piece.ndim != 1:
        raise ShapeError(message("distributed.concat", "piece", "a 1-D tensor", f"shape {tuple(piece.shape)}",
                                 "pass rotfn.distributed.piece(t)"))
    if not is_distributed():
        return piece
    wire = _wire(piece)
    mine = piece.detach().contiguous().view(torch.uint8).to(wire)  # bytes: gloo moves every dtype the same way
    out = torch.empty(world()[1] * mine.numel(), dtype=torch.uint8, device=wire)
    gather_single = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    _collective(fn, "tensors", gather_single, out, mine)
    return out.view(piece.dtype).to(piece.device)


def same(fn: str, arg: str, tensors: Sequence[torch.Tensor]) -> None:
    """Check that every rank holds the same ``tensors`` (bit for bit), else raise on every rank.

    Args:
        fn: the calling rotfn function.
        arg: what the tensors are (named in the error), e.g. ``"rotations"``.
        tensors: the values to compare (same shapes and dtypes on every rank).

    Raises:
        DistributedError: the ranks differ (on every rank), or a rank stopped.

    Example:
        >>> same("learn.rotations", "rotations", [torch.eye(2)])
    """
    if not is_distributed():
        return
    differs = torch.zeros(1, dtype=torch.int32)
    for t in tensors:
        first = t.detach().to(_wire(t), copy=True).contiguous()
        _collective(fn, arg, torch.distributed.broadcast, first, src=0)
        differs |= int(not torch.equal(_bits(first), _bits(t.detach().to(first.device))))
    (differs,) = all_reduce(fn, [differs], op="max")
    if differs.item():
        raise DistributedError(message(fn, arg, "the same values on every rank", "ranks that differ",
                                       "pass every rank the same inputs and seeds"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` (so that NaN equals NaN and -0 differs from +0)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def first_writes() -> bool:
    """True on the rank that writes what exists once (an index, a config): rank 0, or the only process.

    Example:
        >>> first_writes()
        True
    """
    return world()[0] == 0
