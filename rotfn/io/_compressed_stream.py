"""The streaming compressed-tensors export of :func:`rotfn.fold_checkpoint` (``export="compressed-tensors"``).

The checkpoint is read tensor by tensor, in file order; each tensor is folded whole with its
part of the plan's fold program (the stages :func:`rotfn.fold` and the streaming fold run, so
the values are theirs bit for bit), and a quantized weight keeps the QTensor its rounding
produced (:meth:`rotfn.transforms.Stage.run` with ``codes=``), which :class:`rotfn.io._compressed.Export`
packs as :func:`rotfn.export_compressed` does. Output shards fill greedily up to
``max_shard_size`` (the rule of :func:`rotfn.export_hf`), each written to a hidden temporary
file and renamed to its ``model-0000i-of-0000n.safetensors`` name once the count is known.
Memory: one tensor folded in the work dtype, plus the shard being filled.

Under a process group the packed sizes, and so the shards, are known only once every tensor is
packed: each rank packs a run of the tensors into its own temporaries (:func:`write_parts`), and
:func:`assemble` cuts the one-process shards from all of them and has each rank write its share.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import safetensors
import safetensors.torch
import torch

from rotfn.distributed import assign, gather, is_distributed, together, world
from rotfn.io._atomic import write_atomic
from rotfn.io._compressed import Export
from rotfn.io._encode import storable
from rotfn.io._shard import TensorEntry

__all__ = ["TEMP_PREFIX", "assemble", "write_parts"]

#: Shards being written are ``.rotfn-export-0000i.tmp`` (hidden, removed by a rerun) until renamed at the end.
TEMP_PREFIX = ".rotfn-export-"


def _fold_whole(out, source: torch.Tensor, reads: dict, dtype: torch.dtype, piece_elements: int,
                codes: dict | None) -> torch.Tensor:
    """``out``'s tensor folded whole: its stages in turn (between them in the work dtype), rounded once at the end."""
    x = source
    stages = out.fold.stages
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        x = stage.run(x, reads, precision=dtype, piece_elements=piece_elements,
                      out_dtype=out.entry.dtype if last else dtype, codes=codes)
    return x


def write_parts(dst: str, export: Export, outs: Iterable, read: Callable, reads_of: Callable, *, limit: int,
                dtype: torch.dtype, piece_elements: int, stats, bar, prefix: str = TEMP_PREFIX,
                tail: dict[str, torch.Tensor] | None = None) -> list[tuple[str, list[TensorEntry]]]:
    """Fold and pack ``outs`` into temporary shards of ``dst``; returns ``[(temporary path, entries)]`` in order.

    Args:
        dst: the output directory (marked incomplete by the caller).
        export: the plan's :class:`Export` (checked before anything is written).
        outs: the fold's outputs to write, in read order (``rotfn.io._stream._Out``).
        read: ``out -> Tensor``, its source tensor (a mapped view).
        reads_of: ``out -> {key: Tensor}``, the tensors its program reads.
        limit: largest shard in bytes.
        dtype: the fold's work dtype; piece_elements: the rotations' piece size.
        stats: the :class:`rotfn.io.FoldStats` to fill; bar: a tqdm bar over source bytes.
        prefix: the temporaries' names start with it (one per rank under a process group).
        tail: tensors stored after the outputs (the online transforms' weights).

    On an error the temporaries written are removed.
    """
    quantized = set(export.packs)
    temps: list[tuple[str, list[TensorEntry]]] = []
    shard: dict[str, torch.Tensor] = {}
    used = limit

    def add(tensors: dict[str, torch.Tensor]) -> None:
        nonlocal shard, used
        for name, t in storable(tensors).items():
            size = t.numel() * t.element_size()
            if used + size > limit:  # a new shard (a tensor larger than the limit gets one alone)
                if shard:
                    flush()
                used = 0
            shard[name] = t
            used += size

    def flush() -> None:
        nonlocal shard
        path = os.path.join(dst, f"{prefix}{len(temps):05d}.tmp")
        part = shard
        write_atomic(path, lambda tmp: safetensors.torch.save_file(part, tmp, metadata={"format": "pt"}))
        temps.append((path, [TensorEntry(k, t.dtype, tuple(t.shape)) for k, t in part.items()]))
        stats.bytes_written += sum(t.numel() * t.element_size() for t in part.values())
        shard = {}

    try:
        for out in outs:
            source = read(out)
            if not out.fold.ops:
                tensors = {out.key: source.clone()}
            else:
                param = out.param or out.key  # one expert's projection: the fused experts it is part of
                codes: dict | None = {} if param in quantized else None
                with torch.no_grad():
                    folded = _fold_whole(out, source, reads_of(out), dtype, piece_elements, codes)
                tensors = ({out.key: folded} if codes is None else export.packed(
                    param, folded, codes[param], part=None if out.param is None else out.key.removesuffix(".weight")))
            work = torch.Size(out.entry.shape).numel() * dtype.itemsize if out.fold.ops else 0
            stats.peak_held_bytes = max(stats.peak_held_bytes, used + out.entry.nbytes + work +
                                        sum(t.numel() * t.element_size() for t in tensors.values()))
            add(tensors)
            stats.tensors += 1
            bar.update(out.entry.nbytes)
        add(tail or {})
        if shard:
            flush()
    except BaseException:
        _remove(temps)
        raise
    return temps


def _remove(temps: list[tuple[str, list[TensorEntry]]]) -> None:
    for path, _ in temps:
        if os.path.exists(path):
            os.remove(path)


def _names(count: int) -> list[str]:
    """The output shards' file names (as :func:`rotfn.export_hf` names them)."""
    return ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                     for i in range(count)]


def assemble(fn: str, dst: str, export: Export, parts: list[tuple[str, list[TensorEntry]]], *, limit: int,
             stats) -> list[tuple[str, list[TensorEntry]]]:
    """The export's shards in place from the temporaries of :func:`write_parts`; returns ``[(file name, entries)]``.

    One process: its temporaries (holding every tensor and the online transforms' weights) are the shards,
    renamed. Under a process group every rank passes the temporaries of its run of outputs (rank order is output
    order, no online transforms' weights): the ranks learn each other's entries and NVFP4 global scales, cut the
    tensors in order into shards as one process would (greedily up to ``limit``), and each writes the shards
    :func:`rotfn.distributed.assign` gives it, copying the tensors from the temporaries (``dst`` is seen by every
    rank), then removes its temporaries. Every rank returns the same list; ``stats.bytes_written`` counts the bytes
    of this rank's shards.

    Raises:
        PlanError: fused partitions whose NVFP4 global scales differ (known once all are folded), on every rank;
            the temporaries are removed first.
        DistributedError: another rank failed.
    """
    if not is_distributed():
        try:
            export.check_fused()
        except BaseException:
            _remove(parts)
            raise
        names = _names(len(parts))
        for name, (path, _) in zip(names, parts):
            os.replace(path, os.path.join(dst, name))
        return [(name, entries) for name, (_, entries) in zip(names, parts)]
    ranks = gather(fn, "shards", (parts, export.global_scales))
    with together(fn):
        for _, scales in ranks:
            export.global_scales.update(scales)
        try:
            export.check_fused()
        except BaseException:
            _remove(parts)
            raise
        tail = storable(export.transform_weights)
        items = [(path, e) for temps, _ in ranks for path, entries in temps for e in entries]
        items += [(None, TensorEntry(k, t.dtype, tuple(t.shape))) for k, t in tail.items()]
        groups: list[list[tuple[str | None, TensorEntry]]] = []
        used = limit
        for item in items:  # the cut of write_parts' add, over every rank's tensors
            if not groups or used + item[1].nbytes > limit:
                groups.append([])
                used = 0
            groups[-1].append(item)
            used += item[1].nbytes
        names = _names(len(groups))
        rank = world()[0]
        stats.bytes_written = 0
        for name, group, owner in zip(names, groups, assign([sum(e.nbytes for _, e in g) for g in groups])):
            if owner == rank:
                tensors = _copied(group, tail)
                write_atomic(os.path.join(dst, name), lambda tmp, tensors=tensors: safetensors.torch.save_file(
                    tensors, tmp, metadata={"format": "pt"}))
                stats.bytes_written += sum(e.nbytes for _, e in group)
    with together(fn):  # every rank copied what it needed from the others' temporaries
        _remove(parts)
    return [(name, [e for _, e in group]) for name, group in zip(names, groups)]


def _copied(group: list[tuple[str | None, TensorEntry]], tail: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of one shard, in order: read from the temporaries that hold them, or ``tail``'s."""
    tensors, files = {}, {}
    for path, e in group:
        if path is None:
            tensors[e.name] = tail[e.name]
            continue
        if path not in files:
            files[path] = safetensors.safe_open(path, framework="pt")
        tensors[e.name] = files[path].get_tensor(e.name)
    return tensors
