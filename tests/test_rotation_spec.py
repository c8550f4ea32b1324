"""Rotation specs are frozen values: hashable, printable, round-tripping, single source of truth."""

import dataclasses
import json

import pytest
import torch
from hypothesis import given

import rotfn
import rotfn.testing as rt
from rotfn.errors import RotationError, SpecError


@given(rt.rotations(max_n=96))
def test_to_dict_round_trip_through_json(r):
    d = json.loads(json.dumps(r.to_dict()))
    back = rotfn.Rotation.from_dict(d)
    assert back == r and hash(back) == hash(r)
    assert torch.equal(back.matrix(), r.matrix())


@given(rt.rotations(max_n=64))
def test_transpose_spec_is_the_inverse(r):
    assert r.T.T == r and r.T != r
    m = r.matrix()
    assert torch.equal(r.T.matrix(), m.T)
    rt.assert_orthogonal(r, atol=1e-12)


def test_frozen_and_hashable():
    r = rotfn.hadamard(64, seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.n = 32
    assert len({r, rotfn.hadamard(64, seed=1), rotfn.hadamard(64, seed=2)}) == 2


def test_repr_is_compact_and_informative():
    assert repr(rotfn.hadamard(11008)) == "Rotation(hadamard, n=11008, factor=172)"
    assert repr(rotfn.hadamard(4096, block=32, seed=0).T) == "Rotation(hadamard, n=4096, block=32, seed=0).T"
    assert repr(rotfn.orthogonal(96, seed=1)) == "Rotation(orthogonal, n=96, seed=1)"
    assert "matrix, n=4" in repr(rotfn.from_matrix(torch.eye(2), n=4))


def test_random_sign_hadamard_is_orthogonal_but_not_symmetric():
    r = rotfn.hadamard(256, seed=3)
    m = r.matrix()
    assert not torch.equal(m, m.T) and not r.symmetric
    torch.testing.assert_close(m @ m.T, torch.eye(256, dtype=torch.float64), rtol=0, atol=1e-12)
    # the inverse is the transpose, not the matrix itself
    assert (m @ m - torch.eye(256, dtype=torch.float64)).abs().max() > 0.5
    assert rotfn.hadamard(256).symmetric


def test_signs_are_seeded_and_device_independent():
    a, b = rotfn.hadamard(1000, seed=42), rotfn.hadamard(1000, seed=42)
    assert a == b and a.signs == b.signs
    s = a.sign_vector()
    assert s.shape == (1000,) and set(s.unique().tolist()) == {-1.0, 1.0}
    # the signs come from torch's CPU generator: the same draw the spec documents
    expected = 1 - 2 * torch.randint(0, 2, (1000,), generator=torch.Generator().manual_seed(42))
    assert torch.equal(s, expected.double())
    assert rotfn.hadamard(1000, seed=43).signs != a.signs


def test_block_matrix_is_block_diagonal():
    r = rotfn.hadamard(64, block=16, seed=5)
    m = r.matrix()
    mask = torch.block_diag(*[torch.ones(16, 16, dtype=torch.float64)] * 4)
    assert torch.equal(m * (1 - mask), torch.zeros(64, 64, dtype=torch.float64))
    assert r.block == 16 and r.block_size == 16 and r.n == 64
    assert rotfn.hadamard(64, block=64).block is None


def test_orthogonal_is_seeded_and_haar_like():
    a = rotfn.orthogonal(32, seed=0).matrix()
    assert torch.equal(a, rotfn.orthogonal(32, seed=0).matrix())
    assert not torch.equal(a, rotfn.orthogonal(32, seed=1).matrix())
    torch.testing.assert_close(a @ a.T, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-12)
    # sign fix of the QR: Haar measure has E[tr Q] = 0; without the fix diag(R) > 0 biases nothing here,
    # but det must be +-1 and the determinant sign must vary with the seed
    dets = {round(torch.linalg.det(rotfn.orthogonal(8, seed=s).matrix()).item()) for s in range(20)}
    assert dets == {-1, 1}


def test_from_matrix_checks_orthogonality_in_float64():
    q = rotfn.orthogonal(16, seed=0).matrix()
    r = rotfn.from_matrix(q.float())
    assert r.kind == "matrix" and r.n == 16
    with pytest.raises(RotationError, match=r"from_matrix: argument 'm': expected an orthogonal matrix"):
        rotfn.from_matrix(q * 1.01)
    assert rotfn.from_matrix(q * (1 + 1e-9), atol=1e-6).n == 16


def test_matrix_returns_a_fresh_tensor():
    r = rotfn.hadamard(8)
    m = r.matrix()
    m.zero_()
    assert r.matrix().abs().sum() > 0


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: {**d, "version": 99}, "version"),
        (lambda d: {k: v for k, v in d.items() if k != "n"}, "missing"),
        (lambda d: {**d, "kind": "fourier"}, "kind"),
        (lambda d: {**d, "block": 7}, "block"),
        (lambda d: {**d, "signs": "AAAA"}, "signs"),
        (lambda d: {**d, "signs": "not base64!"}, "base64"),
        (lambda d: {**d, "factor": 13}, "factor"),
        (lambda d: {**d, "transposed": "yes"}, "transposed"),
    ],
)
def test_from_dict_rejects_bad_data(mutate, match):
    d = rotfn.hadamard(64, seed=1, block=32).to_dict()
    with pytest.raises(SpecError, match=match):
        rotfn.Rotation.from_dict(mutate(d))


def test_from_dict_rejects_truncated_matrix():
    d = rotfn.from_matrix(torch.eye(4)).to_dict()
    d["data"] = d["data"][:8]
    with pytest.raises(SpecError, match="data"):
        rotfn.Rotation.from_dict(d)
