"""Streaming fold of a sharded Hugging Face checkpoint: a plan's weight side baked in, one tensor piece at a time.

:func:`fold_checkpoint` reads ``src_dir``'s safetensors tensor by tensor (memory-mapped
with :func:`safetensors.safe_open`), folds each with the part of the plan that writes it
running the plan's fold program (:func:`rotfn.transforms.compile_fold`: the engine
:func:`rotfn.fold` runs, so the bits are the same) and streams it into output shards
(:class:`rotfn.io._shard.ShardWriter`). Memory stays at a few pieces of the largest tensors,
not the model: large tensors are folded in pieces of about ``piece_elements`` elements along
the dim the program says they may be cut along, the mapped source pages are released every
:data:`MAP_BUDGET` bytes by reopening the file, and only the small tensors other keys read
(norm scales) are kept, until their last reader is done. A key rotated on both sides
(o_proj, v_proj) is folded in the program's stages, so every key is cut into pieces. For
speed, the kernel is asked to read :data:`READ_AHEAD` bytes ahead of the piece being cut.

The output directory is built in place and is, at every moment, either complete or
marked incomplete:

1. ``.rotfn-incomplete`` (JSON, :mod:`rotfn.io._progress`: the job's digests, its plan and
   layout, the shards already finished) is written first and removed last;
2. each shard is written to a temporary sibling, fsynced and renamed
   (``model-0000i-of-0000n.safetensors``, or ``model.safetensors`` for one), then
   recorded in the marker;
3. then ``model.safetensors.index.json``, the source's small files (tokenizer,
   generation config, ...), ``rotfn.json`` (the plan, see :func:`rotfn.io._hf.write_rotfn_json`;
   its presence says the weights are folded with it) and ``config.json`` last
   (``tie_word_embeddings`` set to false when the plan unties the embeddings).

Under a ``torch.distributed`` process group (:mod:`rotfn.distributed`) every rank checks and lays out
the same job (checked to agree), rank 0 does step 1 while the others wait, each rank does step 2 for
the shards :func:`rotfn.distributed.assign` gives it (recording them in its own
``.rotfn-incomplete.rank{r}``, :mod:`rotfn.io._progress`), and rank 0 does step 3 once every rank
finished. Each phase is a :func:`rotfn.distributed.together` block, so a rank that fails stops all
of them before the next phase writes anything.

A rerun of the same job resumes: shards recorded in the marker (or a rank's record), with the recorded size and
modification time and the expected header, are kept. Another job (other plan, source, layout,
precision or export) is refused unless ``overwrite=True`` says to start over, so the work of an
interrupted fold is never mixed with, nor silently dropped for, a different one.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import safetensors
import torch

from rotfn._progress import progress_bar
from rotfn.distributed import assign, first_writes, gather, same, together, world
from rotfn.errors import ArgumentError, CheckpointError, FoldError, PlanError, message
from rotfn.io._atomic import write_atomic, write_text_atomic
from rotfn.io._checkpoint import INDEX, SINGLE, Checkpoint, guard_config, inventory, is_weight_file, skeleton
from rotfn.io._compressed import Export, _linear_qtensors
from rotfn.io._compressed_stream import TEMP_PREFIX, assemble, write_parts
from rotfn.io._hf import ROTFN_JSON, ROTFN_TENSORS, _hf_layout, _shard_bytes, _shards, read_rotfn_json, write_rotfn_json
from rotfn.io._malloc import freed_blocks_kept
from rotfn.io._progress import MARKER, PART_NAMES, is_marker, job_parts, marker_of, new_marker, read_done, read_marker
from rotfn.io._shard import ShardWriter, TensorEntry, header_bytes
from rotfn.plans import Plan, calibrated_rounding, check_plan, describe, fold_program
from rotfn.specs import QTensor
from rotfn.transforms import (
    PIECE_ELEMENTS,
    QDQ,
    KeyProgram,
    Rotate,
    Rounded,
    Stage,
    key_program,
    pin_roundings,
    pin_shared_scales,
    precision_dtype,
)

__all__ = ["COPY_PIECE_BYTES", "MAP_BUDGET", "MARKER", "READ_AHEAD", "FoldStats", "fold_checkpoint"]

#: Bytes per piece of a tensor the plan leaves unchanged (copied as it is).
COPY_PIECE_BYTES = 64 << 20
#: Source bytes read through one memory map before it is reopened (mapped pages count as resident memory).
MAP_BUDGET = 256 << 20
#: Source bytes asked ahead of the piece being read (``posix_fadvise(WILLNEED)``), so that the workers' first
#: touch of a mapped piece finds its pages in the page cache instead of waiting on the disk. A tensor read
#: whole (cut into columns, or in stages) is asked for whole: its column pieces touch every row of it, and
#: page faults scattered over 100 MB read the disk a few KiB at a time.
READ_AHEAD = 64 << 20
#: ``export=`` of :func:`fold_checkpoint`: None (a folded checkpoint for rotfn.load_hf) or a serving format.
EXPORTS = (None, "compressed-tensors")


@dataclasses.dataclass
class FoldStats:
    """What one :func:`fold_checkpoint` call did (under a process group: this rank's share; ``shards`` is the whole's).

    Attributes:
        tensors: tensors written by this call.
        shards: output shards in the checkpoint.
        shards_skipped: shards an earlier, interrupted run had finished (kept, not rewritten; under a process group
            counted by rank 0, which finds them).
        bytes_read: ``{source file: bytes of tensor data read}`` (each tensor once: the sum is the data of the shards).
        reads: ``{source tensor: times its data was read}``.
        opens: ``{source file: times it was opened}`` (memory maps are reopened every :data:`MAP_BUDGET` bytes).
        bytes_written: tensor bytes written by this call.
        peak_held_bytes: most bytes of tensors the fold held at once: the cached tensors other keys
            read, the source piece, its folded result, and an output being assembled.
        seconds: wall time.
    """

    tensors: int = 0
    shards: int = 0
    shards_skipped: int = 0
    bytes_read: Counter = dataclasses.field(default_factory=Counter)
    reads: Counter = dataclasses.field(default_factory=Counter)
    opens: Counter = dataclasses.field(default_factory=Counter)
    bytes_written: int = 0
    peak_held_bytes: int = 0
    seconds: float = 0.0


# ----- reading -------------------------------------------------------------------------------
class _Reader:
    """Source tensors, or parts along one dim, as memory-mapped views; one open file at a time, reopened
    every ``MAP_BUDGET`` bytes so the pages it mapped stop counting as the process's memory."""

    def __init__(self, ckpt: Checkpoint, stats: FoldStats):
        self.ckpt, self.stats = ckpt, stats
        self._file: str | None = None
        self._handle = None
        self._mapped = 0
        self._ahead: tuple[str, int] | None = None  # (file, offset up to which the pages were asked for)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor ``name`` (or its ``rows``) as a view of the mapped file."""
        file, entry = self.ckpt.tensors[name]
        if file != self._file or self._mapped >= MAP_BUDGET:
            self.close()
            self._handle = safetensors.safe_open(os.path.join(self.ckpt.dir, file), framework="pt")
            self._file, self._mapped = file, 0
            self.stats.opens[file] += 1
        if rows is None:  # a whole tensor, maybe cut into columns: ask for all of it, in one sequential read
            self._read_ahead(file, entry.begin, max(entry.nbytes, READ_AHEAD))
        else:
            self._read_ahead(file, entry.begin + (rows.start or 0) * entry.row_bytes, READ_AHEAD)
        t = self._handle.get_tensor(name) if rows is None else self._handle.get_slice(name)[rows]
        nbytes = t.numel() * t.element_size()
        self._mapped += nbytes
        self.stats.bytes_read[file] += nbytes
        if rows is None or not rows.start:
            self.stats.reads[name] += 1
        return t

    def _read_ahead(self, file: str, offset: int, length: int) -> None:
        """Ask the kernel to read ``length`` bytes of ``file`` from ``offset`` (where it can), unless most are asked for."""
        done = self._ahead[1] if self._ahead is not None and self._ahead[0] == file else 0
        start, stop = max(done, offset), offset + length
        if stop - start < READ_AHEAD // 4 or not hasattr(os, "posix_fadvise"):
            return
        fd = os.open(os.path.join(self.ckpt.dir, file), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, start, stop - start, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
        self._ahead = (file, stop)

    def close(self) -> None:
        self._handle = self._file = None


# ----- the job -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Out:
    """One output tensor: its key, the source tensor holding its unfolded data, its part of the fold program."""

    key: str
    source: str
    entry: TensorEntry
    fold: KeyProgram
    param: str | None = None  # the fused experts param of one expert's projection (its codes are keyed by it)


def _resolve_plan(fn: str, plan, model) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if callable(plan):
        built = plan(model)
        if isinstance(built, Plan):
            return built
        raise PlanError(message(fn, "plan", "a function model -> rotfn.Plan", f"one returning {type(built).__name__}"))
    raise PlanError(message(fn, "plan", "a rotfn.Plan, or a function model -> Plan (it gets the checkpoint's skeleton)",
                            type(plan).__name__, "pass e.g. lambda m: rotfn.plans.quarot(m, r1=rotfn.hadamard(4096, seed=0))"))


def _expert_parts(model, state: dict[str, tuple[int, ...]], ckpt: Checkpoint) -> dict[str, tuple[str, int, slice]]:
    """``{checkpoint tensor: (fused param, expert, its rows)}`` for fused 3-D experts the checkpoint holds per expert
    (transformers 5 fuses ``experts.{e}.gate_proj`` / ``up_proj`` into ``experts.gate_up_proj`` on load; its own
    reverse conversion, applied to a row numbering, says which rows each checkpoint tensor holds)."""
    parts: dict[str, tuple[str, int, slice]] = {}
    for key, shape in state.items():
        if len(shape) != 3 or key in ckpt.tensors:
            continue
        index = torch.arange(shape[0] * shape[1]).reshape(shape[0], shape[1], 1)
        for name, rows in _hf_layout(model, {key: index}).items():
            rows = rows.reshape(-1)
            e, lo = divmod(int(rows[0]), shape[1])
            if name == key or not torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + len(rows))) or (
                    lo + len(rows) > shape[1]):
                continue  # not a run of one expert's rows: left to the names check below
            parts[name] = (key, e, slice(lo, lo + len(rows)))
    return parts


def _part_program(fn: str, name: str, kp: KeyProgram, expert: int, rows: slice, shape: tuple[int, ...]) -> KeyProgram:
    """The fused experts' program ``kp`` for expert ``expert``'s rows ``rows`` (a 2-D checkpoint tensor of
    ``shape``): the same operations, one dim less, a rounding already made (:class:`Rounded`) cut to the part's
    rows; PlanError for one that mixes the expert or row axis (it needs the whole)."""
    ops = tuple(QDQ(op.fmt, Rounded(_rows_of(op.rounding.q, expert, rows)), op.key)
                if isinstance(op, QDQ) and isinstance(op.rounding, Rounded) else op for op in kp.ops)
    whole_rows = rows.stop - rows.start == kp.shape[1]
    allowed = {1, 2} if whole_rows else {2}
    bad = [op for op in ops if not (isinstance(op, QDQ) and isinstance(op.rounding, Rounded)) and not op.mixes(3) <= allowed]
    if bad:
        raise PlanError(message(fn, "plan", f"operations on {kp.key} that act on each expert's rows alone (the "
                                "checkpoint holds one tensor per expert)", f"{type(bad[0]).__name__} mixing "
                                f"dims {sorted(bad[0].mixes(3))} (e.g. a scale measured over all experts)",
                                "fold this model in memory with rotfn.fold, or use a format with per-group scales"))
    ops = tuple(dataclasses.replace(op, dim=op.dim - 1) if isinstance(op, Rotate) else op for op in ops)
    return key_program(name, shape, kp.dtype, ops)


def _rows_of(q: QTensor, expert: int, rows: slice) -> QTensor:
    """Rows ``rows`` of expert ``expert`` of a fused experts' ``[E, out, in]`` QTensor, as a 2-D QTensor (the export's
    cut of a fused param into its checkpoint linears)."""
    first = expert * q.shape[1]
    return _linear_qtensors(q, {"": torch.arange(first + rows.start, first + rows.stop)})[""]


def _outputs(fn: str, ckpt: Checkpoint, model, plan: Plan, precision: torch.dtype, calibration=None) -> list[_Out]:
    """The output tensors in read order, each with its source; checks names and shapes against the model.
    Weights a ``calibration`` rounded against statistics (GPTQ) take its codes (each such key folded whole).

    Fused partitions sharing an NVFP4 global scale, and fused experts held per expert with a measured one, are
    folded up to their rounding once here, to measure it (:func:`rotfn.transforms.pin_shared_scales`). Fused
    experts held per expert get one program per checkpoint tensor (see :func:`_part_program`).
    """
    info = describe(model, fn=fn)
    check_plan(fn, info, plan)
    state = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    parts = _expert_parts(model, state, ckpt)
    covered = {key for key, _, _ in parts.values()}
    tied = {k: g for g in info.tied for k in g}
    extra = [k for k in ckpt.tensors if k not in state and k not in parts]
    missing = [k for k in state if k not in ckpt.tensors and k not in covered
               and not any(m in ckpt.tensors for m in tied.get(k, ()))]
    wrong = [f"{k}: {list(e.shape)} (model {list(state[k])})" for k, (_, e) in ckpt.tensors.items()
             if k in state and e.shape != state[k]]
    wrong += [f"{k}: {list(e.shape)} (rows {r.start}..{r.stop - 1} of {key})" for k, (_, e) in ckpt.tensors.items()
              if k in parts for key, _, r in [parts[k]] if tuple(e.shape) != (r.stop - r.start, state[key][2])]
    if extra or missing or wrong:
        raise CheckpointError(message(
            fn, "src_dir", f"the tensor names and shapes of {info.cls} built from its config.json",
            f"{len(missing)} missing {missing[:3]}, {len(extra)} unexpected {extra[:3]}, {len(wrong)} of other shape {wrong[:2]}",
            "fold a checkpoint saved by transformers for this config"))
    stored = {k: ckpt.tensors[m][1].dtype for k in info.shapes for m in (k, *tied.get(k, ())) if m in ckpt.tensors}
    stored |= {key: ckpt.tensors[name][1].dtype for name, (key, _, _) in parts.items()}
    tensors = {k: torch.empty(tuple(s), dtype=stored.get(k, torch.float32), device="meta") for k, s in info.shapes.items()}
    by_param: dict[str, list[tuple[str, int, slice]]] = {}
    for name, (key, e, rows) in parts.items():
        by_param.setdefault(key, []).append((name, e, rows))
    reader = _Reader(ckpt, FoldStats())  # measured NVFP4 global scales first (these reads are not the fold's)

    def whole(key: str) -> torch.Tensor:
        if key not in by_param:
            return reader.read(key)
        t = torch.empty(state[key], dtype=stored[key])
        for name, e, rows in by_param[key]:
            t[e, rows] = reader.read(name)
        return t

    rounding = calibrated_rounding(fn, "calibration", calibration, plan)
    program = pin_shared_scales(fold_program(fn, plan, tensors, *rounding), whole, precision=precision,
                                alone=tuple(by_param))
    # experts held per expert that a calibration rounded: checked and cut once, each folded whole here first
    program = pin_roundings(program, whole, tuple(k for k in by_param if k in (rounding[1] or ())), precision=precision)
    reader.close()
    late = [k for k, kp in program.keys.items() if not kp.reads_given]
    if late:
        raise PlanError(message(fn, "plan", "a plan whose entries read tensors as the checkpoint holds them",
                                f"entries of {late[:3]} that read a tensor another entry changed first",
                                "fold it in memory with rotfn.fold"))
    untied = set(plan.untied)
    outs: list[_Out] = []
    for name, (_, entry) in ckpt.tensors.items():
        if name in parts:
            key, expert, rows = parts[name]
            outs.append(_Out(name, name, entry, _part_program(fn, name, program.keys[key], expert, rows,
                                                              tuple(entry.shape)), key))
            continue
        outs.append(_Out(name, name, entry, program.keys[name]))
        outs += [_Out(other, name, dataclasses.replace(entry, name=other), program.keys[other])
                 for other in tied.get(name, ()) if other in untied and other not in ckpt.tensors]
    return outs


def _layout(outs: list[_Out], limit: int) -> list[tuple[str, list[_Out]]]:
    """Output shards as :func:`rotfn.export_hf` cuts them: in order, at most ``limit`` bytes (a larger tensor alone)."""
    by_key = {o.key: o for o in outs}
    sizes = {o.key: torch.empty(o.entry.shape, dtype=o.entry.dtype, device="meta") for o in outs}
    groups = [[by_key[k] for k in keys] for keys in _shards(sizes, limit)]
    if len(groups) == 1:
        return [(SINGLE, groups[0])]
    return [(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups)]


def _rounded_digest(calibration) -> str:
    """``" gptq:<digest>"`` of the codes a calibration rounded against statistics (``""`` without one): part of the
    job, so that a rerun with another calibration restarts rather than resumes."""
    if calibration is None:
        return ""
    h = hashlib.blake2b(digest_size=16)
    rtn = set(calibration.rtn)
    for key in sorted(k for k in calibration.weights if k not in rtn):
        q = calibration.weights[key]
        h.update(key.encode())
        for part in (q.codes, q.scales, q.global_scale, q.zero_points):
            if part is not None:
                h.update(part.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f" gptq:{h.hexdigest()}"


def _job_parts(ckpt: Checkpoint, plan: Plan, shards: list[tuple[str, list[_Out]]], options: str) -> dict[str, str]:
    files = [(f, os.stat(os.path.join(ckpt.dir, f)).st_size, os.stat(os.path.join(ckpt.dir, f)).st_mtime_ns)
             for f in ckpt.files]
    layout = [(name, [(o.key, o.source) for o in group]) for name, group in shards]
    return job_parts(plan, [os.path.abspath(ckpt.dir), files], layout, options)


# ----- the output directory ---------------------------------------------------------------------
def _ours(name: str) -> bool:
    """Files a fold writes (or left half-written): weights, index, config, rotfn.json, temporaries."""
    return (is_weight_file(name) or name in ("config.json", ROTFN_JSON, ROTFN_TENSORS)
            or (name.startswith(".") and name.endswith(".tmp")))


def _prepare_dst(fn: str, dst: str, marker: dict, overwrite: bool) -> dict:
    """Make ``dst`` a directory marked incomplete for ``marker``'s job; returns the marker in force (on a resume the
    interrupted run's, with its ``done`` shards)."""
    os.makedirs(dst, exist_ok=True)
    marker_path = os.path.join(dst, MARKER)
    names = os.listdir(dst)
    prior = read_marker(marker_path) if MARKER in names else None
    if prior is not None and prior.get("job") == marker["job"]:
        for name in names:  # an interrupted shard's temporary file
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(dst, name))
        return prior
    if MARKER in names and not overwrite:
        differs = [PART_NAMES[k] for k in PART_NAMES if prior is not None and prior["parts"].get(k) != marker["parts"][k]]
        resume = f"rerun `{prior['command']}`" if prior is not None and prior.get("command") else "rerun the same fold"
        raise CheckpointError(message(
            fn, "dst_dir", "the job of the interrupted fold it holds (to resume it)",
            f"another job ({', '.join(differs) or 'a marker of another rotfn version'} differs) for {dst!r}",
            f"{resume} to resume it, or pass overwrite=True to start over (its finished shards are deleted)"))
    if names and MARKER not in names and not overwrite:
        done = ROTFN_JSON in names or "config.json" in names  # a finished fold (or another checkpoint)
        got = (f"{dst!r} holding a complete checkpoint (a finished fold has nothing to resume)" if done else
               f"{dst!r} holding {len(names)} files (e.g. {sorted(names)[:3]})")
        raise CheckpointError(message(fn, "dst_dir", "a new or empty directory, or one an interrupted fold left",
                                      got, "pass overwrite=True to replace its checkpoint, or choose another dst_dir"))
    write_text_atomic(marker_path, json.dumps(marker))
    for name in names:  # a restart: nothing of an earlier job or checkpoint may look like part of this one
        if (_ours(name) or is_marker(name) and name != MARKER) and os.path.isfile(os.path.join(dst, name)):
            os.remove(os.path.join(dst, name))
    return marker


def _shard_done(dst: str, name: str, group: list[_Out], marker: dict) -> bool:
    """True when an earlier run of this job finished shard ``name`` and it is unchanged since."""
    path, record = os.path.join(dst, name), marker["done"].get(name)
    if not isinstance(record, dict) or not os.path.isfile(path):
        return False
    prefix, placed = header_bytes([o.entry for o in group], {"format": "pt"})
    st = os.stat(path)
    if st.st_size != len(prefix) + placed[-1].end or st.st_mtime_ns != record.get("mtime_ns"):
        return False
    with open(path, "rb") as f:
        return f.read(len(prefix)) == prefix


def _config_text(src: str, plan: Plan, *, guard: bool = False) -> str:
    """The source's config.json for the output: untied embeddings said so; ``guard``: refused by plain transformers
    (:func:`rotfn.io._checkpoint.guard_config`, for weights that need the plan's online transforms)."""
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if any(set(g) & set(plan.untied) for g in plan.tied):
        config["tie_word_embeddings"] = False
    return json.dumps(guard_config(config) if guard else config, indent=2, sort_keys=True) + "\n"


def _copy_small_files(src: str, dst: str) -> None:
    """Tokenizer, generation config, README...: every regular file but weights, config.json and rotfn's own."""
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not _ours(name) and not is_marker(name):
            write_atomic(os.path.join(dst, name), lambda tmp, path=path: shutil.copyfile(path, tmp))


# ----- writing -----------------------------------------------------------------------------------
class _Fold:
    """Writes the shards of one job: cached reads, pieces folded by a pool of threads, statistics, progress.

    The main thread cuts tensors into pieces (mapped views, cheap) and writes results in
    file order; ``workers`` threads fold pieces, each running a stage of the fold program.
    """

    def __init__(self, reader: _Reader, outs: list[_Out], stats: FoldStats, bar, pool: ThreadPoolExecutor, window: int,
                 dtype: torch.dtype, piece_elements: int):
        self.reader, self.stats, self.bar, self.pool, self.window = reader, stats, bar, pool, window
        self.dtype, self.piece_elements = dtype, piece_elements  # what the folds compute in (precision=), piece size
        self.sources = {k: k for k in reader.ckpt.tensors} | {o.key: o.source for o in outs}
        needed = {self.sources[k] for o in outs for k in o.fold.reads}
        # a cached tensor is used by the keys that read it and by its own output
        self.users = Counter([self.sources[k] for o in outs for k in o.fold.reads] +
                             [o.source for o in outs if o.source in needed])
        self.cache: dict[str, torch.Tensor] = {}
        self.in_flight = 0  # bytes of pieces submitted and not written yet (the piece and its result)
        self.whole: dict[str, int] = {}  # bytes of tensors held whole until written (source view, result)
        self.done, self.total = 0, len(outs)

    def held(self) -> None:
        """Record the bytes held now: the cache, the pieces in flight, whole tensors being folded."""
        now = sum(t.numel() * t.element_size() for t in self.cache.values()) + self.in_flight + sum(self.whole.values())
        self.stats.peak_held_bytes = max(self.stats.peak_held_bytes, now)

    def prefetch(self) -> None:
        """Read the tensors other keys read (norm scales) into memory, in file order, each once."""
        for name in self.reader.ckpt.tensors:
            if name in self.users:
                self.cache[name] = self.reader.read(name).clone()
        self.reader.close()

    def release(self, out: _Out) -> None:
        """``out`` is written (or was, by an earlier run): drop cached tensors nobody needs any more."""
        for name in [self.sources[k] for k in out.fold.reads] + ([out.source] if out.source in self.users else []):
            self.users[name] -= 1
            if self.users[name] <= 0:
                self.cache.pop(name, None)
        self.whole.pop(out.key, None)
        self.done += 1
        self.bar.set_postfix_str(f"tensors {self.done}/{self.total}", refresh=False)

    def read(self, out: _Out, rows: slice | None = None) -> torch.Tensor:
        if out.source in self.cache:
            t = self.cache[out.source]
            return t if rows is None else t[rows]
        return self.reader.read(out.source, rows)

    def pieces(self, out: _Out, at: int, writer: ShardWriter):
        """``(value or future, bytes held, data offset)`` of one output tensor, whose data starts at offset ``at``.

        A value is a tensor for the main thread to write at the offset, the byte count of a
        piece a worker folded and wrote itself (pieces along dim 0: ``offset`` None), or None
        (a column piece or a stage put into an assembled tensor).
        """
        kp, entry = out.fold, out.entry
        if not kp.ops:  # copied as it is, in pieces of COPY_PIECE_BYTES
            rows = entry.shape[0] if entry.shape else 1
            step = max(1, COPY_PIECE_BYTES * rows // max(entry.nbytes, 1))
            for lo in range(0, rows, step):
                piece = self.read(out, slice(lo, lo + step) if entry.shape else None)
                yield _Done(piece), piece.numel() * piece.element_size(), at + lo * entry.row_bytes
            return
        reads = {k: self.cache[self.sources[k]] for k in kp.reads}
        if len(kp.stages) > 1:
            yield from self._staged(out, self.read(out), reads, at)
            return
        stage = kp.stages[0]
        if stage.axis == 0:
            for cut in stage.cuts(entry.shape, self.piece_elements):
                piece = self.read(out, cut)  # a mapped view: the worker's first read of it faults the pages in
                yield (self.pool.submit(_fold_write, writer, at + cut.start * entry.row_bytes, self.run_piece, stage,
                                        piece, reads), 2 * piece.numel() * piece.element_size(), None)
            return
        whole = self.read(out)  # one mapped view, folded whole or cut along another dim into `assembled`
        self.whole[out.key] = 2 * entry.nbytes
        assembled = torch.empty(entry.shape, dtype=entry.dtype) if stage.axis is not None else None
        for cut in stage.cuts(entry.shape, self.piece_elements):
            piece = whole if cut is None else whole[_along(stage.axis, cut)]
            yield self.pool.submit(self.run_piece, stage, piece, reads, assembled, cut), 0, at
        if assembled is not None:
            yield _Done(assembled), 0, at

    def _staged(self, out: _Out, source: torch.Tensor, reads, at: int):
        """A key rotated on both sides, stage by stage (:attr:`rotfn.transforms.KeyProgram.stages`): every stage's
        pieces go to the pool; between stages the whole key is held in the work dtype."""
        entry = out.entry
        self.whole[out.key] = entry.nbytes + torch.Size(entry.shape).numel() * self.dtype.itemsize  # result, between stages
        x = source  # mapped; each first-stage piece enters its fold in the work dtype
        stages = out.fold.stages
        for i, stage in enumerate(stages):
            last = i == len(stages) - 1
            result = torch.empty(entry.shape, dtype=entry.dtype if last else self.dtype)
            futures = [self.pool.submit(self.run_piece, stage, x[_along(stage.axis, cut)], reads, result, cut)
                       for cut in stage.cuts(entry.shape, self.piece_elements)]
            if not last:
                for future in futures:  # the next stage reads every row / column of this one
                    future.result()
                x = result
                continue
            for future in futures:
                yield future, 0, None
            yield _Done(result), 0, at

    def run_piece(self, stage: Stage, piece: torch.Tensor, reads, assembled: torch.Tensor | None = None,
                  cut: slice | None = None) -> torch.Tensor | None:
        """Fold one piece (in a worker) with the program's ``stage``; returns it in the piece's dtype, or puts it
        into ``assembled`` (at ``cut`` along the stage's axis, rounded once to its dtype) and returns None."""
        with torch.no_grad():  # (a checkpoint's tensors take no gradient: nothing to record)
            folded = stage.run(piece, reads, precision=self.dtype, piece_elements=self.piece_elements,
                               out_dtype=piece.dtype if assembled is None else assembled.dtype)
        if assembled is None:
            return folded
        assembled[_along(stage.axis, cut)] = folded
        return None

    def write_shard(self, path: str, group: list[_Out]) -> None:
        """Write one shard: the main thread cuts pieces and hands them to the workers, which fold the pieces
        along dim 0 and write them at their place; it writes the rest (copies, tensors assembled from
        columns or stages) itself, and finishes tensors in file order."""
        writer = ShardWriter(path, [o.entry for o in group], {"format": "pt"})
        offsets = {e.name: e.begin for e in writer.entries}
        pending: collections.deque = collections.deque()

        def finish_one() -> None:
            result, size, offset, out, last = pending.popleft()
            value = result.result()
            n = writer.write_at(offset, value) if isinstance(value, torch.Tensor) else value or 0
            self.stats.bytes_written += n
            self.bar.update(n)
            self.in_flight -= size
            if last:
                self.stats.tensors += 1
                self.release(out)

        previous = None  # the newest item, not in `pending` until the next one (or the tensor's end) comes
        try:
            for out in group:
                previous = None
                for item in self.pieces(out, offsets[out.entry.name], writer):
                    if previous is not None:
                        pending.append((*previous, out, False))
                    previous = item
                    self.in_flight += item[1]
                    self.held()
                    while len(pending) >= self.window:
                        finish_one()
                if previous is None:  # an empty tensor: nothing to write
                    self.stats.tensors += 1
                    self.release(out)
                else:
                    pending.append((*previous, out, True))
            while pending:
                finish_one()
            writer.close()
        except BaseException:
            items = [*pending, previous] if previous is not None else pending
            futures = [result for result, *_ in items if isinstance(result, Future)]
            for future in futures:
                future.cancel()
            wait(futures)  # no worker may write into the file once it is closed (its descriptor could be reused)
            writer.abort()
            raise


class _Done:
    """A result that is already there, in the place of a future."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _along(axis: int, cut: slice) -> tuple[slice, ...]:
    """The index of the slice ``cut`` along dim ``axis``."""
    return (slice(None),) * axis + (cut,)


def _fold_write(writer: ShardWriter, offset: int, run_piece, stage: Stage, piece: torch.Tensor, reads) -> int:
    """Fold one piece along dim 0 (in a worker) and write it at ``offset`` of the shard's data; returns its bytes."""
    return writer.write_at(offset, run_piece(stage, piece, reads))


def _finish_export(src: str, dst: str, plan: Plan, shards: list[tuple[str, list[TensorEntry]]], qconfig: dict) -> None:
    """After the shards of an export: the index, the source's small files, config.json (with the quantization
    config) last, and the marker removed."""
    if len(shards) > 1:
        entries = [e for _, group in shards for e in group]
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries),
                              "total_parameters": sum(torch.Size(e.shape).numel() for e in entries)},
                 "weight_map": dict(sorted((e.name, name) for name, group in shards for e in group))}
        write_text_atomic(os.path.join(dst, INDEX), json.dumps(index, indent=2) + "\n")
    _copy_small_files(src, dst)
    config = json.loads(_config_text(src, plan))
    config["quantization_config"] = qconfig
    write_text_atomic(os.path.join(dst, "config.json"), json.dumps(config, indent=2, sort_keys=True) + "\n")
    _unmark(dst)


def _finish(src: str, dst: str, plan: Plan, shards: list[tuple[str, list[_Out]]]) -> None:
    """After the shards: the index, the source's small files, rotfn.json, config.json, and the marker removed."""
    if len(shards) > 1:
        outs = [o for _, group in shards for o in group]
        index = {"metadata": {"total_size": sum(o.entry.nbytes for o in outs),
                              "total_parameters": sum(o.entry.nbytes // o.entry.dtype.itemsize for o in outs)},
                 "weight_map": dict(sorted((o.key, name) for name, group in shards for o in group))}
        write_text_atomic(os.path.join(dst, INDEX), json.dumps(index, indent=2) + "\n")
    _copy_small_files(src, dst)
    write_rotfn_json(dst, plan)
    write_text_atomic(os.path.join(dst, "config.json"), _config_text(src, plan, guard=bool(plan.online)))
    _unmark(dst)


def _unmark(dst: str) -> None:
    """The ranks' records, then the marker, removed: the directory is complete."""
    for name in os.listdir(dst):
        if is_marker(name) and name != MARKER:
            os.remove(os.path.join(dst, name))
    os.remove(os.path.join(dst, MARKER))


def _checked(fn: str, src_dir, dst_dir, max_shard_size, workers, precision, piece_elements, torch_threads,
             keep_freed_blocks, export, calibration, command) -> tuple[Checkpoint, str, int, torch.dtype]:
    """The arguments of :func:`fold_checkpoint` checked: the source, the output directory, the shard limit, the work dtype."""
    ckpt = inventory(src_dir, fn=fn, arg="src_dir")
    if not isinstance(dst_dir, (str, os.PathLike)) or os.path.isfile(dst_dir):
        raise ArgumentError(message(fn, "dst_dir", "a directory path", repr(dst_dir), "name a directory (created if missing)"))
    dst = os.fspath(dst_dir)
    if os.path.isdir(dst) and os.path.samefile(dst, ckpt.dir):
        raise ArgumentError(message(fn, "dst_dir", "a directory other than src_dir", repr(dst),
                                    "write the folded checkpoint next to the source, e.g. src_dir + '-folded'"))
    limit = _shard_bytes(fn, max_shard_size)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ArgumentError(message(fn, "workers", "None or a positive int", repr(workers)))
    dtype = precision_dtype(fn, precision)
    for arg, value in (("piece_elements", piece_elements), ("torch_threads", torch_threads)):
        if (value is not None or arg == "piece_elements") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ArgumentError(message(fn, arg, "a positive int" + (" or None" if arg == "torch_threads" else ""),
                                        repr(value)))
    if not isinstance(keep_freed_blocks, bool):
        raise ArgumentError(message(fn, "keep_freed_blocks", "a bool", repr(keep_freed_blocks)))
    if export not in EXPORTS:
        raise ArgumentError(message(fn, "export", f"one of {EXPORTS}", repr(export),
                                    'pass export="compressed-tensors" for a checkpoint vLLM serves'))
    if command is not None and not isinstance(command, str):
        raise ArgumentError(message(fn, "command", "None or a str", type(command).__name__))
    prior = read_rotfn_json(ckpt.dir)
    if prior is not None:
        raise FoldError(message(fn, "src_dir", "an unfolded checkpoint", f"one folded with {prior!r} (it has {ROTFN_JSON})",
                                "fold the original checkpoint; folding again would rotate twice"))
    return ckpt, dst, limit, dtype


def _blocks(sizes: list[int], ranks: int) -> list[int]:
    """The rank of each item in runs of consecutive items of about the same bytes per rank (rank ``r`` from where
    the bytes before an item reach ``r / ranks`` of the total)."""
    total, before, owners = sum(sizes), 0, []
    for size in sizes:
        owners.append(min(ranks - 1, before * ranks // total) if total else 0)
        before += size
    return owners


def _bar(ckpt: Checkpoint, outs: list[_Out], progress: bool):
    """A progress bar over the source bytes of ``outs`` (this rank's)."""
    return progress_bar(total=sum(o.entry.nbytes for o in outs), unit="B", unit_scale=True, unit_divisor=1024,
                        desc=f"fold {os.path.basename(ckpt.dir)}", disable=not progress, smoothing=0.05)


def fold_checkpoint(src_dir: str | os.PathLike, plan: Plan | Callable, dst_dir: str | os.PathLike, *,
                    max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = True,
                    workers: int | None = None, precision: str = "float64", piece_elements: int = PIECE_ELEMENTS,
                    torch_threads: int | None = None, keep_freed_blocks: bool = False,
                    export: str | None = None, calibration=None, command: str | None = None) -> FoldStats:
    """Fold a plan into a sharded Hugging Face checkpoint on disk, streaming: ``rotfn.fold`` without loading the model.

    For every tensor ``W`` of ``src_dir`` the output holds exactly
    ``rotfn.fold(params, plan)[name]`` (norm fusions ``W diag(g)``, input-side ``W @ R``,
    output-side ``R.T @ W`` and ``b @ R``, weight qdq; float64 math, cast back to
    ``W``'s dtype), bit for bit, while memory stays at a few pieces of the largest
    tensor (see the module docstring for the method and the on-disk protocol). A tied
    embedding the plan unties is written under both names, and ``config.json`` then
    says ``tie_word_embeddings: false``. The plan is recorded in ``rotfn.json``, so
    :func:`rotfn.load_hf` knows the weights are folded; without online transforms,
    ``transformers.AutoModelForCausalLM.from_pretrained(dst_dir)`` runs the folded model, and with
    them plain transformers refuses the directory, through an Auto class or a model class (its ``config.json``
    ``model_type`` and ``dtype`` are ``"rotfn-load_hf-only: load it with rotfn.load_hf(dir), ..."``, the real
    ones kept for rotfn's readers: ``rotfn.io._checkpoint.guard_config``) rather than run it without them.
    Fused partitions that share an NVFP4 global scale (:attr:`rotfn.plans.Plan.shared_scales`) are
    folded one extra time first, to measure it (each whole, in the work dtype).

    Args:
        src_dir: a transformers checkpoint directory: ``config.json`` and ``model.safetensors`` or
            shards with ``model.safetensors.index.json``. MoE experts that transformers fuses into 3-D params
            on load (held per expert in the checkpoint) are folded per expert, bit for bit the rows of the
            fused fold, for plans whose operations on them act on each expert's rows alone (rotations,
            per-group formats, NVFP4, whose global scale over all experts is measured first; an FP8
            ``"tensor"`` scale over all experts is a PlanError).
        plan: a :class:`rotfn.Plan` built for this model (e.g. from :func:`rotfn.io._checkpoint.skeleton`),
            or a function ``model -> Plan`` that gets the skeleton (the model on the meta device).
        dst_dir: output directory, created if missing; an interrupted fold of the same job resumes there
            (another job is refused: see ``overwrite``).
        max_shard_size: largest output shard in bytes, or text such as ``"5GB"`` or ``"500MiB"``.
        overwrite: replace a complete checkpoint (any non-empty directory without the marker) in ``dst_dir``,
            or start over where an interrupted fold of another job (other plan, source, layout, precision or
            export) left ``dst_dir``, deleting its finished shards.
        progress: show a tqdm progress bar (bytes, with tensors done) on stderr.
        workers: pieces folded at once, each by one thread (None: ``torch.get_num_threads()`` as the call starts).
        precision: ``"float64"`` (default; the bits of :func:`rotfn.fold`) or ``"float32"`` (faster without
            the CPU kernel of ``rotfn[cpu]`` (numba), not with it: measurements in ``docs/performance.md``; the
            bits of ``rotfn.fold(..., precision="float32")``, see there). Part of the job: a rerun
            with another precision restarts rather than resumes.
        piece_elements: elements per piece a worker folds (:func:`rotfn.transforms.piece_cuts`; default
            :data:`rotfn.transforms.PIECE_ELEMENTS`, 2 MiB of float64). Any size gives the same bits.
        torch_threads: None (default) leaves torch's intra-op threads alone; an int sets them
            (``torch.set_num_threads``, process-wide) for the call and restores the previous count on
            exit. ``1``, with one worker per core, is the fastest on a CPU: several small independent
            pieces keep the cores busier than one piece split by intra-op barriers.
        keep_freed_blocks: True makes glibc malloc keep freed blocks in the heap for the call
            (:mod:`rotfn.io._malloc`, process-wide; faster: the pieces' temporaries are not page-faulted in
            afresh). On exit mmap is back on and the free memory is returned; glibc cannot go back to its
            adaptive thresholds, so they stay where that scheme settles in a torch process (32 MiB mmap,
            64 MiB trim). No effect elsewhere than glibc or where the environment configures malloc.
        export: None (a folded checkpoint for :func:`rotfn.load_hf`), or ``"compressed-tensors"``: the
            checkpoint :func:`rotfn.export_compressed` writes for the same plan (packed weights,
            ``quantization_config``, transforms), its tensors byte for byte those of the in-memory
            export of ``rotfn.fold(params, plan)`` with the same ``calibration``. Each tensor is folded
            whole (memory: the largest tensor in the work dtype, plus the shard being filled); an
            interrupted export restarts.
        calibration: a :func:`rotfn.calibrate` result of the same plan and checkpoint, computed where the
            model fits, or read back with :func:`rotfn.calibration.load` (``rotfn calibrate`` writes one). The
            weights it rounded against statistics (GPTQ) are written with its codes, bit for bit
            ``rotfn.fold(params, plan, weights_by=calibration)`` (each such tensor folded whole; fused experts the
            checkpoint holds per expert are folded whole once to check the calibration, then written per expert
            with their rows of its codes); PlanError if a folded weight is not the
            one it rounded (another checkpoint; also a ``precision`` whose fold differs in a bit). With ``export=``, its input scales
            also give the activation formats with a static per-linear scale (``nvfp4()`` / ``nvfp4("pow2")``
            activations, ``fp8("tensor")``), as for :func:`rotfn.export_compressed`. Part of the job (its
            codes' digest), as the plan is. None (default): weights rounded to nearest.
        command: how this fold was started (``rotfn fold`` passes its command line), recorded in the
            progress marker so that :func:`rotfn.io._progress.read_progress`, ``rotfn inspect`` and the refusal of
            another job can say how to resume; None records nothing.

    Under a ``torch.distributed`` process group (the caller's; ``torchrun`` with ``rotfn fold`` starts one), call it
    on every rank with the same arguments: the ranks split the output shards by size, each folds and writes its
    own, rank 0 prepares the directory and writes what exists once (index, small files, ``rotfn.json``,
    ``config.json``) after every rank finished, and the output is byte for byte the one-process output. The export
    folds a run of consecutive tensors per rank into temporaries in ``dst_dir`` and the ranks then write the
    one-process shards from them. ``dst_dir`` must be the same directory for every rank (a shared file system
    across machines). A rank that fails makes every rank raise (its own error; the others DistributedError), and
    the directory stays marked incomplete; a rerun on any number of ranks resumes it. See
    ``docs/howto/distributed.md``.

    Returns:
        A :class:`FoldStats` (tensors and bytes read and written, memory peaks, time); under a process group, of this
        rank's share (``shards`` is the checkpoint's).

    Raises:
        ArgumentError: a path is not a path, ``dst_dir`` is ``src_dir`` or a file, bad ``max_shard_size``,
            ``workers``, ``precision``, ``piece_elements``, ``torch_threads``, ``keep_freed_blocks`` or ``command``;
            with ``export=``, static activation scales without ``calibration``; a ``calibration`` that is not one.
        CheckpointError: ``src_dir`` is not a readable checkpoint, its names or shapes differ from its
            config's model, or ``dst_dir`` holds a complete checkpoint or an interrupted fold of another
            job and ``overwrite`` is False.
        PlanError: the plan was built for another model, or changes tied keys differently; a ``calibration`` of
            another plan or model.
        FoldError: ``src_dir`` is already folded (it has a rotfn.json).
        FormatError: with ``export=``, a format compressed-tensors cannot hold (as :func:`rotfn.export_compressed`).
        DistributedError: under a process group, another rank failed or stopped, or the ranks were given different
            sources, plans or options.

    Example:
        >>> import os, tempfile, torch, transformers, rotfn
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                num_attention_heads=4, num_key_value_heads=2)
        >>> src, dst = tempfile.mkdtemp(), tempfile.mkdtemp()
        >>> transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
        >>> stats = rotfn.fold_checkpoint(src, lambda m: rotfn.plans.quarot(m, r1=rotfn.hadamard(32, seed=0)), dst,
        ...                               max_shard_size="40KB", progress=False)
        >>> stats.shards, stats.tensors, sorted(os.listdir(dst))[:3]
        (3, 21, ['config.json', 'generation_config.json', 'model-00001-of-00003.safetensors'])
    """
    fn = "fold_checkpoint"
    start = time.perf_counter()
    rank, ranks = world()
    with together(fn):  # every check, on every rank, before anything is written
        ckpt, dst, limit, dtype = _checked(fn, src_dir, dst_dir, max_shard_size, workers, precision, piece_elements,
                                           torch_threads, keep_freed_blocks, export, calibration, command)
        model = skeleton(ckpt.dir)
        plan = _resolve_plan(fn, plan, model)
        outs = _outputs(fn, ckpt, model, plan, dtype, calibration)
        exporter = None if export is None else Export(fn, model, plan, calibration)
        shards = _layout(outs, limit)
        layout = [] if export else [(name, len(group)) for name, group in shards]  # an export does not resume by shard
        options = f"{precision} {export}" + (f" {exporter.scales_digest()}" if exporter and exporter.input_scales else "")
        options += _rounded_digest(calibration)
        marker = new_marker(_job_parts(ckpt, plan, shards, options), plan, os.path.abspath(ckpt.dir),
                            layout, len(outs), command)
    same(fn, "src_dir, plan and options", [torch.frombuffer(bytearray(marker["job"].encode()), dtype=torch.uint8)])
    with together(fn):  # the directory made and marked incomplete once, before any rank writes into it
        if first_writes():
            marker = _prepare_dst(fn, dst, marker, overwrite)
            marker["done"] = read_done(dst, marker["job"])  # what earlier runs finished, whichever rank did it
            pending = [name for name, group in shards if not _shard_done(dst, name, group, marker)]
    pending = gather(fn, "shards", pending if first_writes() else None)[0]  # rank 0's view, so every rank deals the same
    stats = FoldStats(shards=len(shards))
    threads = torch.get_num_threads()
    workers = workers or threads
    with together(fn), contextlib.ExitStack() as process:  # the process-wide settings asked for, undone on exit
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
            process.callback(torch.set_num_threads, threads)
        if keep_freed_blocks:
            process.enter_context(freed_blocks_kept())
        if exporter is not None:  # a run of the outputs per rank, packed into temporaries; the shards cut after
            owners = _blocks([o.entry.nbytes for o in outs], ranks)
            mine = [o for o, owner in zip(outs, owners) if owner == rank]
            with _bar(ckpt, mine, progress) as bar:
                job = _Fold(_Reader(ckpt, stats), outs, stats, bar, None, 1, dtype, piece_elements)
                job.prefetch()
                parts = write_parts(dst, exporter, mine, job.read,
                                    lambda out: {k: job.cache[job.sources[k]] for k in out.fold.reads}, limit=limit,
                                    dtype=dtype, piece_elements=piece_elements, stats=stats, bar=bar,
                                    prefix=TEMP_PREFIX if ranks == 1 else f"{TEMP_PREFIX}rank{rank}-",
                                    tail=exporter.transform_weights if ranks == 1 else None)
                job.reader.close()
        else:
            groups = dict(shards)  # the shards left to write, dealt out by size (a resume's too)
            owners = dict(zip(pending, assign([sum(o.entry.nbytes for o in groups[name]) for name in pending])))
            bar = _bar(ckpt, [o for name, owner in owners.items() if owner == rank for o in groups[name]], progress)
            marker["done"] = read_done(dst, marker["job"])  # this rank's records keep every earlier one
            with bar, ThreadPoolExecutor(workers, thread_name_prefix="rotfn-fold") as pool:
                reader = _Reader(ckpt, stats)
                job = _Fold(reader, outs, stats, bar, pool, window=2 * workers + 1, dtype=dtype,
                            piece_elements=piece_elements)
                job.prefetch()
                for name, group in shards:
                    if owners.get(name) != rank:
                        stats.shards_skipped += name not in owners and first_writes()
                        for out in group:
                            job.release(out)
                        continue
                    path = os.path.join(dst, name)
                    write_atomic(path, lambda tmp, group=group: job.write_shard(tmp, group))
                    reader.close()
                    marker["done"][name] = {"mtime_ns": os.stat(path).st_mtime_ns}
                    write_text_atomic(os.path.join(dst, marker_of(rank)), json.dumps(marker))
    if exporter is not None:
        written = assemble(fn, dst, exporter, parts, limit=limit, stats=stats)
        stats.shards = len(written)
    with together(fn):  # what exists once, written once every rank finished its shards
        if first_writes():
            if exporter is not None:
                _finish_export(ckpt.dir, dst, plan, written, exporter.qconfig)
            else:
                _finish(ckpt.dir, dst, plan, shards)
    stats.seconds = time.perf_counter() - start
    return stats
