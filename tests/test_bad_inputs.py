"""Bad input gets a typed error naming the function, the argument, expected vs got, and a fix."""

import pytest
import torch

import rotfn
from rotfn.errors import (
    ArgumentError,
    BackendUnavailableError,
    DTypeError,
    FormatError,
    OrderError,
    RotationError,
    RotfnError,
    ShapeError,
)

X64 = torch.zeros(2, 64)
R64 = rotfn.hadamard(64)
MX = rotfn.mxfp4()

CASES = [
    # (call, error type, builtin it also is, regex the message must match)
    (lambda: rotfn.hadamard(0), RotationError, ValueError, r"hadamard: argument 'n': expected an int >= 1, got 0"),
    (lambda: rotfn.hadamard(64.0), RotationError, ValueError, r"hadamard: argument 'n': expected an int"),
    (lambda: rotfn.hadamard(6), OrderError, ValueError, r"hadamard: argument 'n'.*got 6; fix: no Hadamard block of 4 or more divides 6: use rotfn.orthogonal\(6, seed=\.\.\.\); the nearest Hadamard orders are 4 and 8"),
    (lambda: rotfn.hadamard(100), OrderError, ValueError, r"hadamard: argument 'n'.*got 100; fix: use block=20 \(5 blocks of 20 x 20; also block=4\) or rotfn.orthogonal\(n, seed=\.\.\.\); the nearest Hadamard orders are 96 and 104"),
    (lambda: rotfn.hadamard(668 * 64), OrderError, ValueError, r"hadamard: argument 'n'.*got 42752; fix: use block=256"),
    (lambda: rotfn.hadamard(64, block=48), RotationError, ValueError, r"argument 'block': expected a divisor of n=64, got 48; fix: use one of"),
    (lambda: rotfn.hadamard(64, block=0), RotationError, ValueError, r"argument 'block': expected an int >= 1"),
    (lambda: rotfn.hadamard(64, seed=-1), RotationError, ValueError, r"argument 'seed': expected an int in \[0, 2\*\*63\)"),
    (lambda: rotfn.hadamard(64, seed="a"), RotationError, ValueError, r"argument 'seed'"),
    (lambda: rotfn.orthogonal(8, seed=None), RotationError, ValueError, r"orthogonal: argument 'seed'"),
    (lambda: rotfn.orthogonal(8, seed=0, block=3), RotationError, ValueError, r"orthogonal: argument 'block'"),
    (lambda: rotfn.from_matrix(torch.ones(3, 3)), RotationError, ValueError, r"from_matrix: argument 'm': expected an orthogonal matrix.*fix: orthogonalize"),
    (lambda: rotfn.from_matrix(torch.eye(3)[:2]), RotationError, ValueError, r"from_matrix: argument 'm': expected a non-empty square"),
    (lambda: rotfn.from_matrix(torch.eye(3, dtype=torch.int64)), RotationError, ValueError, r"expected a floating matrix"),
    (lambda: rotfn.from_matrix([[1.0]]), RotationError, ValueError, r"expected a torch.Tensor, got list"),
    (lambda: rotfn.from_matrix(torch.eye(4), n=6), RotationError, ValueError, r"argument 'n': expected a multiple of the block size 4"),
    (lambda: rotfn.rotate(X64.long(), R64), DTypeError, TypeError, r"rotate: argument 'x': expected dtype float16.*got torch.int64; fix: cast"),
    (lambda: rotfn.rotate([1.0], R64), DTypeError, TypeError, r"rotate: argument 'x': expected a torch.Tensor, got list"),
    (lambda: rotfn.rotate(torch.zeros(2, 32), R64), ShapeError, ValueError, r"rotate: argument 'x': expected last dim 64.*got shape \(2, 32\)"),
    (lambda: rotfn.rotate(torch.tensor(1.0), R64), ShapeError, ValueError, r"expected shape \[..., n\]"),
    (lambda: rotfn.rotate(X64, "hadamard"), RotationError, ValueError, r"rotate: argument 'R': expected a rotfn.Rotation, got str"),
    (lambda: rotfn.rotate_back(torch.zeros(2, 32), R64), ShapeError, ValueError, r"rotate_back: argument 'x'"),
    (lambda: rotfn.rotate(X64, R64, backend="cuda"), ArgumentError, ValueError, r"rotate: argument 'backend': expected one of \('auto', 'torch', 'triton'\)"),
    (lambda: rotfn.rotate(X64.double(), R64, backend="triton"), BackendUnavailableError, RuntimeError, r"rotate: argument 'backend'.*fix: use backend='auto' or backend='torch'"),
    (lambda: rotfn.qdq(torch.zeros(2, 48), MX), ShapeError, ValueError, r"qdq: argument 'x': expected last dim divisible by mxfp4.*group of 32.*rotfn never pads"),
    (lambda: rotfn.qdq(torch.zeros(2, 40), rotfn.nvfp4()), ShapeError, ValueError, r"group of 16"),
    (lambda: rotfn.qdq(torch.zeros(2, 40), rotfn.intq(4, group=32)), ShapeError, ValueError, r"group of 32"),
    (lambda: rotfn.qdq(X64, "mxfp4"), FormatError, ValueError, r"qdq: argument 'fmt': expected a rotfn format spec, got str"),
    (lambda: rotfn.qdq(X64.half().to(torch.int8), MX), DTypeError, TypeError, r"qdq: argument 'x'"),
    (lambda: rotfn.qdq(X64.double(), MX, backend="triton"), BackendUnavailableError, RuntimeError, r"qdq: argument 'backend'"),
    (lambda: rotfn.quantize(torch.zeros(3, 33), MX), ShapeError, ValueError, r"quantize: argument 'x'"),
    (lambda: rotfn.quantize(X64.double(), MX, backend="triton"), BackendUnavailableError, RuntimeError, r"quantize: argument 'backend'"),
    (lambda: rotfn.dequantize(X64), DTypeError, TypeError, r"dequantize: argument 'q': expected a rotfn.QTensor, got Tensor"),
    (lambda: rotfn.dequantize(rotfn.quantize(X64, MX), torch.int32), DTypeError, TypeError, r"dequantize: argument 'dtype'"),
    (lambda: rotfn.rotate_qdq(X64, R64, MX, back=1), DTypeError, TypeError, r"rotate_qdq: argument 'back': expected a bool"),
    (lambda: rotfn.rotate_qdq(torch.zeros(2, 32), R64, MX), ShapeError, ValueError, r"rotate_qdq: argument 'x'"),
    (lambda: rotfn.rotate_qdq(X64.double(), R64, MX, backend="triton"), BackendUnavailableError, RuntimeError, r"rotate_qdq"),
    (lambda: rotfn.mxfp4("ceil"), FormatError, ValueError, r"mxfp4: argument 'scale_rule': expected one of \['floor', 'even', 'rceil'\], got 'ceil'"),
    (lambda: rotfn.mxfp8(3), FormatError, ValueError, r"mxfp8: argument 'scale_rule'"),
    (lambda: rotfn.nvfp4("block"), FormatError, ValueError, r"nvfp4: argument 'global_scale'"),
    (lambda: rotfn.nvfp4(-1.0), FormatError, ValueError, r"nvfp4: argument 'global_scale'"),
    (lambda: rotfn.nvfp4(float("nan")), FormatError, ValueError, r"nvfp4: argument 'global_scale'"),
    (lambda: rotfn.intq(1), FormatError, ValueError, r"intq: argument 'bits': expected an int in 2..8, got 1"),
    (lambda: rotfn.intq(9), FormatError, ValueError, r"intq: argument 'bits'"),
    (lambda: rotfn.intq(4, group=0), FormatError, ValueError, r"intq: argument 'group'"),
    (lambda: rotfn.intq(4, clip=1.5), FormatError, ValueError, r"intq: argument 'clip'"),
    (lambda: rotfn.intq(4, symmetric=False, clip=0.9), FormatError, ValueError, r"intq: argument 'clip': expected 1.0 for symmetric=False"),
    (lambda: rotfn.fp8("row"), FormatError, ValueError, r"fp8: argument 'granularity'"),
    (lambda: rotfn.fp8("token", rule="vllm"), FormatError, ValueError, r"fp8: argument 'rule': expected one of"),
    (lambda: rotfn.fp8("token", scale_dtype="bfloat16", rule="compressed-tensors"), FormatError, ValueError,
     r"fp8: argument 'rule': expected rule='compressed-tensors' with scale_dtype=None"),
    (lambda: rotfn.intq(8, symmetric=False, rule="compressed-tensors"), FormatError, ValueError,
     r"intq: argument 'rule': expected rule='compressed-tensors' with symmetric=True"),
    (lambda: rotfn.gptq(torch.zeros(2, 64), None, rotfn.intq(8, rule="compressed-tensors")), FormatError, ValueError,
     r"gptq: argument 'fmt': expected a format with rotfn's own rule"),
    (lambda: rotfn.qdq(torch.zeros(2, 64), rotfn.fp8("token", rule="compressed-tensors"), backend="triton"),
     BackendUnavailableError, RuntimeError, r"backend"),
    (lambda: rotfn.Rotation.from_dict([]), rotfn.errors.SpecError, ValueError, r"Rotation.from_dict: argument 'd'"),
    (lambda: rotfn.format_from_dict({"version": 1, "name": "int3"}), rotfn.errors.SpecError, ValueError, r"format_from_dict: argument 'd\['name'\]'"),
    (lambda: rotfn.format_from_dict({"version": 1, "name": "intq", "bits": 4}), rotfn.errors.SpecError, ValueError, r"missing"),
]


@pytest.mark.parametrize("call,error,builtin,pattern", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_input_table(call, error, builtin, pattern):
    with pytest.raises(error, match=pattern) as info:
        call()
    assert isinstance(info.value, builtin) and isinstance(info.value, RotfnError)


def test_failed_call_leaves_input_untouched():
    x = torch.randn(2, 48)
    before = x.clone()
    with pytest.raises(ShapeError):
        rotfn.qdq(x, MX)
    assert torch.equal(x, before)
