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


@pytest.mark.parametrize("back", [False, True])
def test_rotate_qdq_the_kernels_cannot_fuse_runs_its_parts_where_they_would_run(back, monkeypatch):
    """Under "auto", a rotate_qdq whose rotation alone a faster implementation serves (here a CPU kernel) runs as
    rotate then qdq, each dispatched on its own: the composition bit for bit, wherever the parts run."""
    x = X.double()
    served = lambda x, r: torch.where(x > 0, x, 2 * x) @ r.matrix()  # noqa: E731 (a stand-in "kernel", not x @ R)
    fake = types.SimpleNamespace(unsupported=lambda op, x, **spec: None if op == "rotate" else "no", rotate=served)
    monkeypatch.setattr(rotfn.dispatch, "_load_cpu_kernels", lambda: fake)
    with rotfn.dispatch.trace() as ran:
        got = rotfn.rotate_qdq(x, R, FMT, back=back)
    y = rotfn.qdq(served(x, R), FMT)
    expected = served(y, R.T) if back else y
    assert torch.equal(got, expected)
    assert ran == [("rotate", "numba"), ("qdq", "torch")] + [("rotate", "numba")] * back
    with rotfn.dispatch.trace() as ran:
        rotfn.rotate_qdq(x, R, FMT, back=back, backend="torch")
    assert ran == [("rotate_qdq", "torch")]
