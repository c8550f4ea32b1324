"""One dispatch point: the choice is observable, and an explicit backend never falls back."""

import types

import pytest
import torch

import rotfn
from rotfn.errors import BackendUnavailableError

X = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
R = rotfn.hadamard(64, seed=0)
FMT = rotfn.mxfp4()

CALLS = {
    "rotate": lambda backend: rotfn.rotate(X, R, backend=backend),
    "qdq": lambda backend: rotfn.qdq(X, FMT, backend=backend),
    "quantize": lambda backend: rotfn.quantize(X, FMT, backend=backend),
    "rotate_qdq": lambda backend: rotfn.rotate_qdq(X, R, FMT, backend=backend),
    "dequantize": lambda backend: rotfn.dequantize(rotfn.quantize(X, FMT, backend="torch"), backend=backend),
}


@pytest.mark.parametrize("op", sorted(CALLS))
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cpu_tensors_run_the_reference_and_trace_says_so(op, backend):
    with rotfn.dispatch.trace() as ran:
        CALLS[op](backend)
    assert ran[-1] == (op, "torch")


@pytest.mark.parametrize("op", sorted(CALLS))
def test_triton_without_kernels_raises_instead_of_falling_back(op, monkeypatch):
    """Without an importable rotfn.kernels (no triton), an explicit backend="triton" raises."""
    monkeypatch.setattr(rotfn.dispatch, "_load_kernels", lambda: (None, "No module named 'triton'"))
    assert not rotfn.dispatch.kernels_available()
    with rotfn.dispatch.trace() as ran, pytest.raises(BackendUnavailableError, match="No module named 'triton'"):
        CALLS[op]("triton")
    assert all(backend != "triton" for _, backend in ran)
    CALLS[op]("auto")  # auto still runs, on the reference


def test_trace_is_scoped():
    with rotfn.dispatch.trace() as outer:
        rotfn.rotate(X, R)
        with rotfn.dispatch.trace() as inner:
            rotfn.qdq(X, FMT)
    assert outer == [("rotate", "torch")] and inner == [("qdq", "torch")]
    rotfn.rotate(X, R)  # outside any trace: nothing recorded, nothing raised


@pytest.mark.parametrize("declines", [True, False], ids=["declines", "serves"])
def test_trace_records_the_reference_when_the_cpu_kernel_declines(declines, monkeypatch):
    """A CPU kernel that accepts a call and then declines it (returns None) is traced as the reference that ran."""
    x, served = X.double(), torch.full_like(X.double(), 7.0)
    calls = []

    def rotate(x, r):
        calls.append((x, r))
        return None if declines else served

    fake = types.SimpleNamespace(unsupported=lambda op, x, **spec: None, rotate=rotate)
    monkeypatch.setattr(rotfn.dispatch, "_load_cpu_kernels", lambda: fake)
    with rotfn.dispatch.trace() as ran:
        got = rotfn.rotate(x, R)
    assert len(calls) == 1
    if declines:
        assert ran == [("rotate", "torch")]
        assert torch.equal(got, rotfn.rotate(x, R, backend="torch"))
    else:
        assert ran == [("rotate", "numba")] and got is served
