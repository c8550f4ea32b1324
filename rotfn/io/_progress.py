"""The progress marker of a streaming fold: which job is writing a directory, and how far it got.

:func:`rotfn.fold_checkpoint` writes ``.rotfn-incomplete`` into its output directory first and
removes it last. The marker is JSON::

    {"format": "rotfn-fold-progress", "version": 2,
     "job": sha256 of the parts,                      # the same job resumes, any other is refused
     "parts": {"plan": sha256, "source": sha256, "layout": sha256, "options": "float64 None"},
     "plan": str(plan), "source": "/abs/src", "command": "rotfn fold ..." | null,
     "shards": [[file name, tensors], ...],           # the output's layout ([] for an export)
     "tensors": tensors in the output,
     "done": {file name: {"mtime_ns": ...}}}          # shards finished and renamed into place

so a rerun can tell *what* differs from the interrupted job, and ``rotfn inspect`` can show
what is done, what is pending, the plan and the command that resumes it. The plan is kept as
its printed summary, not its data: a learned 4096 x 4096 rotation would make the marker,
rewritten after every shard, hundreds of MB (its digest tells jobs apart).

Under a process group (:mod:`rotfn.distributed`) the first rank writes the marker and records its
shards there; rank ``r`` records the shards it finished in its own ``.rotfn-incomplete.rank{r}`` (the
marker with its ``done``), so no two processes rewrite one file. A shard is done when any of these
files of the job records it (:func:`read_done`), whatever the number of ranks of the run that wrote it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from rotfn.plans import Plan

__all__ = ["MARKER", "PART_NAMES", "FoldProgress", "is_marker", "job_parts", "marker_of", "new_marker", "read_done",
           "read_marker", "read_progress"]

#: The file that marks an output directory as incomplete.
MARKER = ".rotfn-incomplete"
#: What each part of a job is, in words, for the message that refuses another job.
PART_NAMES = {"plan": "the plan", "source": "the source checkpoint (its path or files changed)",
              "layout": "the shard layout (max_shard_size)", "options": "the precision or export"}
_FORMAT = "rotfn-fold-progress"
_VERSION = 2


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def job_parts(plan: Plan, source: list, layout: list, options: str) -> dict[str, str]:
    """The digests that name a fold job: its plan, source files, output layout and options.

    Example:
        >>> import torch, rotfn
        >>> plan = rotfn.plans.per_linear(torch.nn.Linear(4, 2), rotation=rotfn.hadamard(4))
        >>> sorted(job_parts(plan, ["/src"], [], "float64 None"))
        ['layout', 'options', 'plan', 'source']
    """
    return {"plan": _digest(plan.to_dict()), "source": _digest(source), "layout": _digest(layout), "options": options}


def new_marker(parts: dict[str, str], plan: Plan, source: str, shards: list[tuple[str, int]], tensors: int,
               command: str | None) -> dict:
    """A fresh marker for the job of ``parts`` (nothing done yet)."""
    return {"format": _FORMAT, "version": _VERSION, "job": _digest(parts), "parts": parts, "plan": str(plan),
            "source": source, "command": command, "shards": [list(s) for s in shards],
            "tensors": tensors, "done": {},
            "note": "rotfn.fold_checkpoint is writing this directory (or was interrupted): rerun it to finish"}


def read_marker(path: str) -> dict | None:
    """The marker at ``path``, or None when it is missing, unreadable or of another format or version."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(doc, dict) and doc.get("format") == _FORMAT and doc.get("version") == _VERSION
    return doc if ok and isinstance(doc.get("done"), dict) and isinstance(doc.get("parts"), dict) else None


def marker_of(rank: int) -> str:
    """The file in which ``rank`` records the shards it finished: the marker for the first rank, else its own.

    Example:
        >>> marker_of(0), marker_of(3)
        ('.rotfn-incomplete', '.rotfn-incomplete.rank3')
    """
    return MARKER if rank == 0 else f"{MARKER}.rank{rank}"


def is_marker(name: str) -> bool:
    """True for the marker and the ranks' records (:func:`marker_of`).

    Example:
        >>> is_marker(".rotfn-incomplete.rank1"), is_marker("config.json")
        (True, False)
    """
    return name == MARKER or name.startswith(f"{MARKER}.rank")


def read_done(directory: str, job: str) -> dict:
    """``{shard: record}`` of the shards of job ``job`` finished in ``directory``, from every rank's records.

    Example:
        >>> import tempfile
        >>> read_done(tempfile.mkdtemp(), "job")
        {}
    """
    done: dict = {}
    for name in sorted(os.listdir(directory)):
        doc = read_marker(os.path.join(directory, name)) if is_marker(name) else None
        if doc is not None and doc.get("job") == job:
            done.update(doc["done"])
    return done


@dataclasses.dataclass(frozen=True)
class FoldProgress:
    """How far an interrupted :func:`rotfn.fold_checkpoint` got (see :func:`read_progress`).

    Attributes:
        dir: the output directory.
        source: the source checkpoint directory.
        plan: the plan being folded, as it prints (``str(plan)``).
        shards: ``(file name, tensors, done)`` of each output shard, in order (empty for an export,
            which restarts rather than resumes).
        tensors: tensors of the whole output.
        command: the command line that started the fold, when it was recorded (``rotfn fold`` records it).
    """

    dir: str
    source: str
    plan: str
    shards: tuple[tuple[str, int, bool], ...]
    tensors: int
    command: str | None

    @property
    def tensors_done(self) -> int:
        """Tensors in the finished shards (kept by a rerun of the same job)."""
        return sum(n for _, n, done in self.shards if done)


def read_progress(dir: str | os.PathLike) -> FoldProgress | None:
    """The progress of the fold that is writing (or was interrupted writing) ``dir``; None if none is.

    A shard counts as done when the marker records it and its file is there (a rerun also checks
    its size, time and header before keeping it).

    Example:
        >>> import tempfile
        >>> read_progress(tempfile.mkdtemp()) is None
        True
    """
    directory = os.fspath(dir)
    doc = read_marker(os.path.join(directory, MARKER))
    if doc is None:
        return None
    done = read_done(directory, doc.get("job"))
    shards = tuple((str(name), int(n), name in done and os.path.isfile(os.path.join(directory, name)))
                   for name, n in doc.get("shards", []))
    return FoldProgress(directory, str(doc.get("source")), str(doc.get("plan")), shards, int(doc.get("tensors", 0)), doc.get("command"))
