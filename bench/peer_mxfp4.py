"""The peer kernel: block-32 Hadamard + MXFP4 qdq the way AutoRound and FP-Quant's simple kernels do it.

Written for rotfn's benchmark from that description (not taken from either project): flat tiles
of ``BLOCK`` elements of a contiguous tensor (autotuned over 1024..16384), each tile viewed as
``BLOCK / b`` rows of the ``b x b`` Hadamard and multiplied by it with ``tl.dot`` (the matrix in
the input dtype, fp32 accumulation), one power-of-two scale per 32 values from their max-abs
(``2^(floor(log2 amax) - 2)``, E2M1's largest exponent), E2M1 by nested comparisons, the
dequantized values stored in the input dtype. It skips what rotfn's kernel does on top: NaN /
Inf groups, the canonical NaN, the exact reference scale rules and the float32 rotation matrix.

``python bench/peer_mxfp4.py`` prints its speed and its distance from ``rotfn.rotate_qdq`` for one
shape; ``bench/gpu_kernels.py`` reports every rotfn kernel as a ratio to it.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

import rotfn


@triton.autotune(
    configs=[triton.Config({"BLOCK": b}, num_warps=w) for b in (1024, 2048, 4096, 8192, 16384) for w in (4, 8)],
    key=["numel", "B"],
)
@triton.jit
def _peer(x_ptr, h_ptr, y_ptr, numel, B: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.reshape(tl.load(x_ptr + offs, mask=mask, other=0.0), (BLOCK // B, B))
    hb = tl.arange(0, B)
    h = tl.load(h_ptr + hb[:, None] * B + hb[None, :])
    v = tl.reshape(tl.dot(x, h, out_dtype=tl.float32), (BLOCK // 32, 32))
    amax = tl.max(tl.abs(v), axis=1)
    exponent = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 2  # biased exponent of amax, minus E2M1's 2
    exponent = tl.maximum(exponent, 1)
    scale = (exponent << 23).to(tl.float32, bitcast=True)
    s = v / scale[:, None]
    a = tl.abs(s)
    q = tl.where(a <= 0.25, 0.0, tl.where(a < 0.75, 0.5, tl.where(a <= 1.25, 1.0, tl.where(
        a < 1.75, 1.5, tl.where(a <= 2.5, 2.0, tl.where(a < 3.5, 3.0, tl.where(a <= 5.0, 4.0, 6.0)))))))
    y = tl.where(s < 0, -q, q) * scale[:, None]
    tl.store(y_ptr + offs, tl.reshape(y, (BLOCK,)).to(y_ptr.dtype.element_ty), mask=mask)


def peer_rotate_qdq(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``qdq_mxfp4(x @ blockdiag(h))`` for a contiguous CUDA ``x`` whose last dim is a multiple of 32 and of h's size.

    Args:
        x: ``[..., n]`` bf16 / fp16, contiguous, on CUDA.
        h: ``[b, b]`` the block (normalized Hadamard), in x's dtype, b >= 16 dividing 32 or a multiple of it.

    Returns:
        A new tensor like ``x``.
    """
    y = torch.empty_like(x)
    numel = x.numel()
    _peer[lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)](x, h, y, numel, B=h.shape[0])
    return y


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192x14336", metavar="MxN")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/peer_mxfp4.py needs a CUDA device", file=sys.stderr)
        return 2
    m, n = (int(d) for d in args.shape.split("x"))
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    r = rotfn.hadamard(n, block=32)
    h = rotfn.hadamard(32).matrix(torch.float32, "cuda").to(x.dtype)
    peer = peer_rotate_qdq(x, h)
    ours = rotfn.rotate_qdq(x, r, rotfn.mxfp4(), backend="triton")
    t = triton.testing.do_bench(lambda: peer_rotate_qdq(x, h), warmup=25, rep=200, return_mode="median")
    nbytes = 2 * x.numel() * x.element_size()
    print(f"# {torch.cuda.get_device_name()}  peer {m}x{n}: {nbytes / t / 1e9:.2f} TB/s; values equal to "
          f"rotfn.rotate_qdq: {float((peer == ours).float().mean()) * 100:.2f}%, relative distance "
          f"{rotfn.metrics.rel_error(peer.float(), ours.float()):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
