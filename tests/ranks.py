"""Run a function on several ranks of a gloo process group, each in its own spawned process (for the tests).

``run(target, *args, world=2)`` starts ``world`` processes, initializes ``torch.distributed`` (gloo, a file
rendezvous) in each, calls ``target(*args)`` and returns what each rank returned or raised, by rank:
``Result(value=..., error=None)`` or ``Result(value=None, error=(the exception's class names, its text))``
(``(("ProcessDied",), "exit code N")`` for a process that ended without a result).
``target`` must be a module-level function of an importable module (spawned processes import it).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import tempfile


@dataclasses.dataclass(frozen=True)
class Result:
    value: object
    error: tuple[tuple[str, ...], str] | None

    def raised(self, name: str) -> bool:
        return self.error is not None and name in self.error[0]


def _main(target, rank: int, world: int, directory: str, args: tuple, backend: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world)
    try:
        out = Result(target(*args), None)
    except Exception as e:
        out = Result(None, (tuple(c.__name__ for c in type(e).__mro__), str(e)))
    finally:
        with open(os.path.join(directory, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(out, f)
    dist.destroy_process_group()


def run(target, *args, world: int = 2, timeout: float = 600, backend: str = "gloo") -> list[Result]:
    """``[Result of rank 0, Result of rank 1, ...]`` of ``target(*args)`` on ``world`` ranks (gloo, or NCCL with
    rank ``r`` on GPU ``r``)."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_main, args=(target, r, world, d, args, backend)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout} s")
        out = []
        for r in range(world):
            path = os.path.join(d, f"rank{r}.pkl")
            if not os.path.exists(path):  # the process ended without a result
                out.append(Result(None, (("ProcessDied",), f"exit code {procs[r].exitcode}")))
                continue
            with open(path, "rb") as f:
                out.append(pickle.load(f))
        return out
