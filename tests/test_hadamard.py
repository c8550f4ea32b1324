"""Hadamard constructions: every factor exact, every model width buildable, orthogonality up to 2^15."""

import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rotfn
import rotfn.testing as rt
from rotfn.errors import OrderError
from rotfn.ops import hadamard as fast
from rotfn.specs import _hadamard as had
from rotfn.specs import _williamson as williamson

ISSUE_FACTORS = [12, 20, 28, 36, 40, 44, 52, 60, 92, 108, 116, 140, 148, 156, 172]

# real model widths -> the factor K rotfn must pick (n = K * 2^m, smallest constructible K)
MODEL_WIDTHS = {
    64: 1, 128: 1, 2048: 1, 3584: 28, 4096: 1, 5120: 20, 8192: 1, 11008: 172, 13824: 108,
    14336: 28, 18944: 148, 27648: 108, 28672: 28, 29568: 924,
}


@pytest.mark.parametrize("k", ISSUE_FACTORS)
def test_issue_factor_orders_are_hadamard(k):
    h = had.hadamard_dense(k, had.choose_factor(k)) * math.sqrt(k)
    torch.testing.assert_close(h.abs(), torch.ones(k, k, dtype=torch.float64), rtol=0, atol=1e-13)
    signs = h.sign()
    assert torch.equal(signs @ signs.T, k * torch.eye(k, dtype=torch.float64))


def test_every_factor_rotfn_uses_is_exactly_hadamard():
    factors = sorted({had.choose_factor(n) for n in had.constructible_orders()})
    assert factors[-1] <= had.MAX_FACTOR
    for k in factors:
        h = had.factor_matrix(k)
        assert set(h.unique().tolist()) <= {-1.0, 1.0}, k
        assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64)), k


@pytest.mark.parametrize("k", sorted(williamson.ORDERS))
def test_williamson_sequences_are_symmetric_with_zero_paf(k):
    rows = williamson.WILLIAMSON_SEQUENCES[k // 4]
    m = k // 4
    seqs = [torch.tensor([1 if c == "+" else -1 for c in row]) for row in rows]
    for s in seqs:
        assert len(s) == m and torch.equal(s[1:], s[1:].flip(0))
    for shift in range(1, m):
        assert sum(int((s * s.roll(-shift)).sum()) for s in seqs) == 0


def test_paley_constructions_cover_both_families():
    assert had._construction(12) is had._paley1  # q = 11 = 3 mod 4
    assert had._construction(36) is had._paley2  # q = 17 = 1 mod 4
    assert had._construction(52) is williamson.williamson_hadamard
    assert not had.can_build_factor(668)  # an order no construction here reaches (667 = 23 * 29, 333 = 9 * 37)


@pytest.mark.parametrize("n,k", sorted(MODEL_WIDTHS.items()))
def test_model_widths(n, k):
    r = rotfn.hadamard(n, seed=0)
    assert r.factor == k and r.n == n
    rt.assert_orthogonal(r, atol=1e-12)


def test_paley1_factor_is_not_symmetric_and_transpose_is_used():
    r = rotfn.hadamard(12 * 4)  # Paley I factor: I + S with S skew
    m = r.matrix()
    assert not torch.equal(m, m.T)
    x = torch.randn(3, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rotfn.rotate_back(x, r), x @ m.T, rtol=0, atol=1e-13)


@given(rt.hadamard_orders(1 << 15), st.booleans())
def test_orthogonal_for_every_constructible_order(n, signed):
    rt.assert_orthogonal(rotfn.hadamard(n, seed=7 if signed else None), atol=1e-12)


@given(rt.hadamard_orders(2048), rt.seeds())
def test_fwht_path_equals_dense_matmul(n, seed):
    r = rotfn.hadamard(n, seed=seed)
    x = rt.make_tensor("normal", (3, n), seed, dtype=torch.float64)
    torch.testing.assert_close(rotfn.rotate(x, r), x @ r.matrix(), rtol=0, atol=1e-12)
    torch.testing.assert_close(rotfn.rotate_back(x, r), x @ r.matrix().T, rtol=0, atol=1e-12)


@given(st.integers(0, 12), rt.seeds())
def test_fwht_is_sylvester(m, seed):
    n = 2**m
    x = rt.make_tensor("normal", (2, n), seed, dtype=torch.float64)
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(m):
        sylvester = torch.kron(sylvester, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    torch.testing.assert_close(fast.fwht(x), x @ sylvester, rtol=0, atol=1e-9 * n)


@given(st.integers(0, 12), st.integers(1, 3), rt.seeds())
def test_fwht_along_a_middle_dim_equals_the_last_dim_moved(m, trail, seed):
    x = rt.make_tensor("normal", (2, 2**m, trail), seed, dtype=torch.float64)
    torch.testing.assert_close(fast.fwht(x, dim=1), fast.fwht(x.movedim(1, -1)).movedim(-1, 1), rtol=0, atol=1e-9 * 2**m)
    scale = 2.0 ** -(m // 2)  # a power of two rides in the last pass: exactly the same bits as multiplying after
    assert torch.equal(fast.fwht(x, dim=1, scale=scale), fast.fwht(x, dim=1) * scale)


@pytest.mark.parametrize("m", range(16))
def test_cpu_radix_split_covers_m_in_passes_of_at_most_7_bits(m):
    for device in ("cpu", "cuda"):
        bits = fast.radix_bits(m, device)
        assert sum(bits) == m and all(0 <= b <= 7 for b in bits) and len(bits) >= 1


@pytest.mark.parametrize("n", [3, 6, 10, 14, 22, 668 * 8, 100003])
def test_unbuildable_orders_raise_with_a_suggestion(n):
    with pytest.raises(OrderError, match=r"hadamard: argument 'n'.*fix: (use block=\d+|no Hadamard block of 4 or more "
                                         r"divides \d+: use rotfn.orthogonal).*; the nearest Hadamard orders are") as info:
        rotfn.hadamard(n)
    nearest = [int(m) for m in re.findall(r"\d+", str(info.value).rpartition("orders are ")[2])]
    assert all(m != n and rotfn.hadamard(m).n == m for m in nearest)
    assert not any(had.choose_factor(m) for m in range(min(nearest) + 1, max(nearest)) if m != n)


@pytest.mark.parametrize("n, blocks", [(668 * 512, (2048, 1024)), (100, (20, 4)), (668 * 64, (256, 128))])
def test_unbuildable_order_suggests_the_largest_blocks_that_work(n, blocks):
    with pytest.raises(OrderError, match=rf"use block={blocks[0]} \({n // blocks[0]} blocks of {blocks[0]} x "
                                         rf"{blocks[0]}; also block={blocks[1]}\)") as info:
        rotfn.hadamard(n)
    assert isinstance(info.value, ValueError)
    assert all(rotfn.hadamard(n, block=b).block == b for b in blocks)


def test_unbuildable_block_names_block():
    with pytest.raises(OrderError, match="argument 'block'"):
        rotfn.hadamard(24, block=6)
