"""The torch reference gives the same bits on CUDA as on CPU (GPU only; skipped without CUDA)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rotfn
import rotfn.testing as rt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@settings(max_examples=40)
@given(rt.formats(), rt.tensors(st.sampled_from([32, 64, 256]), dtypes=DTYPES, max_rows=8))
def test_quantizers_match_cpu_bit_for_bit(fmt, x):
    cpu = rotfn.quantize(x, fmt, backend="torch")
    gpu = rotfn.quantize(x.cuda(), fmt, backend="torch")
    rt.assert_bits_equal(gpu.codes, cpu.codes, name="codes")
    rt.assert_bits_equal(gpu.scales, cpu.scales, name="scales")
    rt.assert_bits_equal(rotfn.qdq(x.cuda(), fmt, backend="torch"), rotfn.qdq(x, fmt), name="qdq")


@settings(max_examples=30)
@given(rt.rotations(max_n=512), rt.seeds(), st.sampled_from(DTYPES))
def test_rotations_match_cpu(r, seed, dtype):
    x = rt.make_tensor("student_t", (4, r.n), seed, dtype=dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    gpu = rotfn.rotate(x.cuda(), r, backend="torch").cpu().double()
    torch.testing.assert_close(gpu, rotfn.rotate(x, r).double(), rtol=tol, atol=tol * x.abs().max().item())
    rt.assert_inverse(x.cuda(), r)


def test_large_model_width_on_cuda():
    r = rotfn.hadamard(29568, seed=0)
    x = torch.randn(16, 29568, device="cuda", dtype=torch.float64)
    torch.testing.assert_close(rotfn.rotate_back(rotfn.rotate(x, r), r), x, rtol=0, atol=1e-12)
