"""rotfn.distributed on two gloo ranks (spawned processes): shares, sums, agreement and failing together."""

import os

import pytest
import torch
from ranks import run

import rotfn
from rotfn import distributed


def _primitives():
    rank, size = distributed.world()
    x = torch.tensor([1.0, -2.0]) * (rank + 1)
    (s,) = distributed.all_reduce("t", [x])
    (m,) = distributed.all_reduce("t", [x], op="max")
    like = [x.double(), torch.zeros((), dtype=torch.int64)]
    summed = distributed.sum_together("t", lambda: [x.double() / 3, torch.tensor(rank + 5)], like)
    merged = distributed.merge("t", {f"k{rank}": torch.full((2,), rank)})
    try:
        distributed.merge("t", {"k": rank})
        twice = None
    except rotfn.errors.DistributedError as e:
        twice = str(e)
    distributed.same("t", "eye", [torch.eye(3, dtype=torch.float64)])
    try:
        distributed.same("t", "rank", [torch.tensor([float(rank)])])
        differs = None
    except rotfn.errors.DistributedError as e:
        differs = str(e)
    return dict(world=(rank, size), share=distributed.share(range(5)), sum=s, max=m, x=x, differs=differs,
                first=distributed.first_writes(), on=distributed.is_distributed(), summed=summed,
                merged=merged, twice=twice,
                gathered=distributed.gather("t", "names", {"rank": rank}), assigned=distributed.assign([5, 3, 3, 1, 0]))


def test_primitives_on_two_ranks():
    r0, r1 = run(_primitives)
    assert r0.error is None and r1.error is None, (r0, r1)
    assert r0.value["world"] == (0, 2) and r1.value["world"] == (1, 2)
    assert r0.value["share"] == [0, 2, 4] and r1.value["share"] == [1, 3]
    for r in (r0, r1):
        assert torch.equal(r.value["sum"], torch.tensor([3.0, -6.0]))
        assert torch.equal(r.value["max"], torch.tensor([2.0, -2.0]))
        assert "the same values on every rank" in r.value["differs"]
        assert torch.equal(r.value["summed"][0], torch.tensor([1.0, -2.0], dtype=torch.float64))
        assert r.value["summed"][1].dtype == torch.int64 and r.value["summed"][1].item() == 11
        assert list(r.value["merged"]) == ["k0", "k1"] and torch.equal(r.value["merged"]["k1"], torch.ones(2).long())
        assert "keys ['k'] on two ranks" in r.value["twice"]
        assert r.value["on"]
    assert torch.equal(r0.value["x"], torch.tensor([1.0, -2.0]))  # the input is not changed
    assert r0.value["first"] and not r1.value["first"]
    assert r0.value["gathered"] == r1.value["gathered"] == [{"rank": 0}, {"rank": 1}]
    assert r0.value["assigned"] == r1.value["assigned"] == [0, 1, 1, 0, 0]  # 6 bytes and 6


def _fails_on(bad: int):
    rank, _ = distributed.world()
    with distributed.together("fold_checkpoint"):
        if rank == bad:
            raise rotfn.errors.CheckpointError("fold_checkpoint: argument 'src_dir': broken on purpose")
    return "passed"


def test_a_failed_rank_stops_every_rank_with_a_typed_error():
    r0, r1 = run(_fails_on, 1)
    assert r1.raised("CheckpointError") and "broken on purpose" in r1.error[1]
    assert r0.raised("DistributedError") and r0.raised("RuntimeError")
    assert "rank 1 of 2 failed" in r0.error[1] and r0.error[1].startswith("fold_checkpoint:")


def _dies_on(bad: int):
    rank, _ = distributed.world()
    if rank == bad:
        os._exit(3)  # the process ends: no error, no collective
    distributed.all_reduce("calibrate", [torch.ones(1)])
    return "passed"


def test_a_rank_that_dies_makes_the_others_raise():
    r0, r1 = run(_dies_on, 1, timeout=300)
    assert r1.error == (("ProcessDied",), "exit code 3")
    assert r0.raised("DistributedError"), r0
    assert r0.error[1].startswith("calibrate: argument 'tensors': expected every rank in the collective")


def test_without_a_process_group_everything_is_one_rank():
    assert distributed.world() == (0, 1) and not distributed.is_distributed()
    assert distributed.share([3, 4]) == [3, 4]
    x = torch.ones(2)
    (y,) = distributed.all_reduce("t", [x])
    assert torch.equal(y, x) and y is not x
    with distributed.together("t"):
        pass
    distributed.same("t", "x", [x])
    assert distributed.sum_together("t", lambda: [x], [x])[0] is x
    assert distributed.merge("t", {"a": x}) == {"a": x}
    assert distributed.gather("t", "x", 3) == [3] and distributed.assign([2, 1]) == [0, 0]


@pytest.mark.parametrize("call", [lambda: distributed.all_reduce("t", [torch.ones(1)], op="mean"),
                                  lambda: distributed.assign([1, -2]), lambda: distributed.assign([1.5])])
def test_bad_arguments_are_typed_errors(call):
    with pytest.raises(rotfn.errors.ArgumentError, match=r"^distributed\.(all_reduce|assign): argument '(op|sizes)'"):
        call()


@pytest.mark.parametrize("call, error, where", [
    (lambda: distributed.piece([1, 2]), rotfn.errors.DTypeError, "piece: argument 't'"),
    (lambda: distributed.concat("t", 3), rotfn.errors.DTypeError, "concat: argument 'piece'"),
    (lambda: distributed.concat("t", torch.ones(2, 2)), rotfn.errors.ShapeError, "concat: argument 'piece'"),
])
def test_piece_and_concat_refuse_what_they_cannot_cut(call, error, where):
    with pytest.raises(error, match=rf"^distributed\.{where}: expected"):
        call()


def test_piece_of_one_process_is_the_flat_copy():
    t = torch.arange(6.0).reshape(2, 3)
    p = distributed.piece(t)
    assert torch.equal(p, t.reshape(-1)) and p.data_ptr() != t.data_ptr()
    assert distributed.concat("t", p) is p
