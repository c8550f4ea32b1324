"""The streaming compressed-tensors export of :func:`rotfn.fold_checkpoint` (``export="compressed-tensors"``).

The checkpoint is read tensor by tensor, in file order; each tensor is folded whole with its
part of the plan's fold program (the stages :func:`rotfn.fold` and the streaming fold run, so
the values are theirs bit for bit), and a quantized weight keeps the QTensor its rounding
produced (:meth:`rotfn.transforms.Stage.run` with ``codes=``), which :class:`rotfn.io._compressed.Export`
packs as :func:`rotfn.export_compressed` does. Output shards fill greedily up to
``max_shard_size`` (the rule of :func:`rotfn.export_hf`), each written to a hidden temporary
file and renamed to its ``model-0000i-of-0000n.safetensors`` name once the count is known.
Memory: one tensor folded in the work dtype, plus the shard being filled.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import safetensors.torch
import torch

from rotfn.io._atomic import write_atomic
from rotfn.io._compressed import Export
from rotfn.io._encode import storable
from rotfn.io._shard import TensorEntry

__all__ = ["write_compressed", "TEMP_PREFIX"]

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


def write_compressed(dst: str, export: Export, outs: Iterable, read: Callable, reads_of: Callable, *, limit: int,
                     dtype: torch.dtype, piece_elements: int, stats, bar) -> list[tuple[str, list[TensorEntry]]]:
    """Write the packed checkpoint's shards into ``dst``; returns ``[(file name, entries)]`` in order.

    Args:
        dst: the output directory (marked incomplete by the caller).
        export: the plan's :class:`Export` (checked before anything is written).
        outs: the fold's outputs in read order (``rotfn.io._stream._Out``).
        read: ``out -> Tensor``, its source tensor (a mapped view).
        reads_of: ``out -> {key: Tensor}``, the tensors its program reads.
        limit: largest shard in bytes.
        dtype: the fold's work dtype; piece_elements: the rotations' piece size.
        stats: the :class:`rotfn.io.FoldStats` to fill; bar: a tqdm bar over source bytes.

    Raises:
        PlanError: fused partitions whose NVFP4 global scales differ (known once all are folded);
            the temporary shards are removed first.
    """
    quantized = set(export.plan.quantized)
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
        path = os.path.join(dst, f"{TEMP_PREFIX}{len(temps):05d}.tmp")
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
        add(export.transform_weights)
        export.check_fused()
        if shard:
            flush()
    except BaseException:
        for path, _ in temps:
            if os.path.exists(path):
                os.remove(path)
        raise
    names = ["model.safetensors"] if len(temps) == 1 else [
        f"model-{i + 1:05d}-of-{len(temps):05d}.safetensors" for i in range(len(temps))]
    for name, (path, _) in zip(names, temps):
        os.replace(path, os.path.join(dst, name))
    return [(name, entries) for name, (_, entries) in zip(names, temps)]
