"""Host launchers: same signatures as :mod:`rotfn.ops`, Triton underneath.

Each launcher flattens ``x`` to ``[M, N]`` (copying only if the last dim is
strided), picks the tile layout, runs pass 1 (statistics) where a format's scale
covers a whole row or tensor, runs the fused kernel, and restores the shape.
Row- and tensor-wide scales (and NVFP4's measured global scale) are derived from
the pass-1 statistics inside the quant kernel, with the reference's formulas
(:func:`rotfn.ops.quant.intq_params` and friends, bit for bit: the parity tests
check every format and scale dtype), so no host work runs between the passes.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton

from rotfn.kernels.fused import GROUP, ROW, TENSOR, quant_kernel, rotate_kernel, stats_kernel
from rotfn.kernels.fwht import hadamard_kernel
from rotfn.ops import quant as ref
from rotfn.ops.hadamard import radix_bits
from rotfn.specs import QTensor, factor_matrix
from rotfn.specs.formats import FP8, MX, NVFP4, NVFP4_GLOBAL_RULES, Format, IntQ
from rotfn.specs.rotation import Rotation

__all__ = ["rotate", "rotate_qdq", "qdq", "quantize", "unsupported", "INTERPRET"]

#: True when kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1 at import).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DENSE_BLOCKS = (16, 32, 64, 128, 256)
_MIN_W = 32  # chunks narrower than this are widened (when n allows) for longer contiguous runs
_MAX_W = 1024
_TILE_ELEMENTS = 2048  # elements of one program's [BR, W] tile (fused block kernels; swept on an H200)
_WARPS = 2  # warps per program of the fused block kernels (2048-element tiles: 2 warps were fastest)
_WARPS_256 = 4  # ... and for 256 x 256 rotation blocks (2 warps spill registers: docs/performance.md)
_PREC = "ieee"  # fp32 inputs: exact fp32 products (half inputs ignore it)
_FWHT_MAX = 32768  # largest Hadamard block of the FWHT kernel (one block in registers per program)
_FWHT_MAX_ELEMENTS = 32768  # registers: one padded block [KP, 2^m] per program
_FWHT_KC = 32  # output rows of the K x K factor stage per chunk
_FWHT_ELEMENTS = 4096  # blocks smaller than this are batched, several per program
#: warps per FWHT program by its padded elements (swept with bench/fwht_sweep.py on an H100: docs/performance.md)
_FWHT_WARPS = {4096: 4, 8192: 8, 16384: 4, 32768: 8}


def _fmt_code(fmt: Format | None) -> int:
    if fmt is None:
        return 0
    if isinstance(fmt, MX):
        return 1 if fmt.element == "e2m1" else 2
    if isinstance(fmt, NVFP4):
        return 3
    if isinstance(fmt, IntQ):
        return 4 if fmt.symmetric else 5
    return 6


def _scope(fmt: Format | None) -> int:
    if isinstance(fmt, (MX, NVFP4)) or (isinstance(fmt, IntQ) and fmt.group is not None):
        return GROUP.value
    if isinstance(fmt, FP8) and fmt.granularity == "tensor":
        return TENSOR.value
    return ROW.value if fmt is not None else GROUP.value


@functools.lru_cache(maxsize=256)  # asked by unsupported(), pass 1 and the main launch of every call
def _layout(n: int, rotation: Rotation | None, fmt: Format | None) -> tuple[int, int, int] | str:
    """(W, G, BR) for rows of n: chunk width, scale group inside a chunk, chunks per program; or why none fits."""
    b = rotation.block_size if rotation is not None else 1
    grouped = fmt is not None and _scope(fmt) == GROUP.value
    g = fmt.group if grouped else 1
    if g & (g - 1):
        return f"scale group {g} is not a power of two"
    w = max(b, g, 2)
    # widen short chunks for longer contiguous runs; row/tensor scopes go wide (fewer pass-1 atomics)
    widest = _MIN_W if grouped or fmt is None else _MAX_W
    while w < widest and n % (2 * w) == 0:
        w *= 2
    if n % w or w > _MAX_W:
        return f"last dim {n} does not split into chunks of {w} (<= {_MAX_W})"
    # BR * W elements per program, so that the rotation's dot is [E / b, b] x [b, b] with E fixed per block size b
    # (>= 16 rows for the tensor cores): every kernel rotates the same blocks with the same dot shape, and
    # rotate, the fused kernels and pass 1 give bit-identical rotations (W <= _MAX_W <= E).
    return w, (g if grouped else w), max(_TILE_ELEMENTS, 16 * b) // w


def unsupported(op: str, x: torch.Tensor, *, rotation=None, fmt=None, back=False) -> str | None:
    """Why the kernels cannot run this call, or None when they can."""
    if op == "dequantize":
        return "no dequantize kernel (the reference decodes in one elementwise pass on any device)"
    if not (x.is_cuda or (INTERPRET and x.device.type == "cpu")):
        return f"x is on {x.device}: kernels need a CUDA tensor (or TRITON_INTERPRET=1 set before import for CPU)"
    if op == "gptq":  # every weight format and precision; w and h are converted to the working precision
        return None
    if getattr(fmt, "rule", None) is not None:
        return f"{fmt!r}: no kernel computes another library's rule (the reference does, on any device)"
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype}: kernels take float16, bfloat16 and float32"
    if x.numel() == 0:
        return "x is empty"
    path = _path(rotation, x.dtype)
    if path not in ("tile", "fwht", None):
        return path
    layout = _layout(x.shape[-1], rotation if path == "tile" else None, fmt)
    return layout if isinstance(layout, str) else None


def _path(rotation: Rotation | None, dtype: torch.dtype) -> str | None:
    """Which kernel rotates: ``"tile"`` (fused tensor-core tile), ``"fwht"`` (large Hadamard), or why none can."""
    if rotation is None:
        return None
    if rotation.block_size in _DENSE_BLOCKS and not (rotation.block_size == 256 and dtype == torch.float32):
        return "tile"
    if rotation.kind == "hadamard":
        plan = _fwht_plan(rotation.block_size, rotation.factor)
        return "fwht" if not isinstance(plan, str) else plan
    if rotation.block_size == 256:
        return "float32 with a dense 256 block: the fp32 block alone needs 256 KiB of shared memory (use block <= 128)"
    return f"rotation block {rotation.block_size}: kernels serve dense blocks {_DENSE_BLOCKS} and Hadamard blocks K*2^m"


@functools.lru_cache(maxsize=256)
def _fwht_plan(b: int, k: int) -> tuple[int, int, int, int, int] | str:
    """``(K, KP, R1, R2, R3)`` of the FWHT kernel for a Hadamard block ``b = K * 2^m``, or why it cannot serve it.

    The radices split the ``m`` bits into the fewest balanced passes of at most ``2^7`` (on the
    tensor cores a wider GEMM costs little, another pass a trip through shared memory; the CPU
    reference prefers narrower passes); each must be at least 16 (the tensor cores' smallest
    GEMM side).
    """
    p = b // k
    m = p.bit_length() - 1
    bits = radix_bits(m, "cuda")  # the reference's GPU split: one kernel pass per reference pass
    passes = len(bits)
    kp = 1 if k == 1 else max(16, 1 << (k - 1).bit_length())
    if b > _FWHT_MAX:
        return f"Hadamard block {b}: the FWHT kernel serves blocks up to {_FWHT_MAX}"
    if min(bits) < 4 or (k == 1 and passes == 1):
        return f"Hadamard block {b} = {k}*{p}: the FWHT kernel needs 2^m >= 16 in every radix (and b > 128 for K = 1)"
    if kp * p > _FWHT_MAX_ELEMENTS:
        return f"Hadamard block {b} = {k}*{p}: padded to {kp}*{p} > {_FWHT_MAX_ELEMENTS} elements per program"
    r1, r2, r3 = [1 << t for t in bits] + [1] * (3 - passes)
    return k, kp, r1, r2, r3


@functools.lru_cache(maxsize=64)
def _block_matrices(rotation: Rotation, dtype: torch.dtype, device: torch.device):
    """(T, T_lo, T_back, T_back_lo, scale, two, signs) for the kernel's dot products, cached on the device.

    Power-of-two Hadamard blocks are passed as exact +-1 matrices (scale 1/sqrt(b)
    applied in fp32); other blocks in half precision are split into hi + lo parts
    (two dots) so the rotation keeps ~16 bits of the matrix, not 8.
    """
    fwd = rotation.block_matrix()
    if rotation.kind == "hadamard":
        fwd, scale = torch.sign(fwd), 1.0 / math.sqrt(rotation.block_size)
    else:
        scale = 1.0
    two = dtype != torch.float32 and rotation.kind != "hadamard"

    def parts(t):
        hi = t.to(dtype)
        lo = (t - hi.double()).to(dtype) if two else hi
        return hi.to(device).contiguous(), lo.to(device).contiguous()

    return (*parts(fwd), *parts(fwd.T.contiguous()), scale, two, _signs(rotation, device))


def _warps(rotation: Rotation | None) -> int:
    """Warps per program of the fused block kernels for this rotation's block size."""
    return _WARPS_256 if rotation is not None and rotation.block_size >= 256 else _WARPS


def _flat(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@functools.lru_cache(maxsize=16)
def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor for pointer arguments a launch does not use (never read or written), made once."""
    return torch.empty(1, dtype=dtype, device=device)


def _rotation_args(x2: torch.Tensor, rotation: Rotation | None) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """Pointer and constexpr arguments that describe the rotation to every kernel, and the transposed blocks."""
    if rotation is None:
        dummy = _dummy(x2.device, x2.dtype)
        return dict(t_ptr=dummy, tlo_ptr=dummy, s_ptr=_dummy(x2.device, torch.float32), ROT=False, B=1, TWO=False,
                    SIGN_FIRST=False, HAS_SIGNS=False, TSCALE=1.0), (dummy, dummy)
    t, tlo, tb, tblo, tscale, two, signs = _block_matrices(rotation, x2.dtype, x2.device)
    args = dict(t_ptr=t, tlo_ptr=tlo, s_ptr=signs if signs is not None else _dummy(x2.device, torch.float32),
                ROT=True, B=rotation.block_size, TWO=two, SIGN_FIRST=not rotation.transposed, HAS_SIGNS=signs is not None,
                TSCALE=tscale)
    return args, (tb, tblo)


_SCALE_DTYPES = {None: 0, "bfloat16": 1, "float16": 2}


def _format_args(fmt: Format | None, scope: int) -> dict:
    """Constexpr arguments that describe the format to the quant kernel."""
    element = 2 if isinstance(fmt, MX) and fmt.element == "e2m1" else 8
    measured = isinstance(fmt, NVFP4) and fmt.global_scale in NVFP4_GLOBAL_RULES
    return dict(
        FMT=_fmt_code(fmt), RULE=["floor", "even", "rceil"].index(fmt.scale_rule.value) if isinstance(fmt, MX) else 0,
        BITS=fmt.bits, SCOPE=scope, CLIP=fmt.clip if isinstance(fmt, IntQ) else 1.0,
        EMAX=element, MBITS=1 if element == 2 else 3, INV_MAX=1.0 / (6.0 if element == 2 else 448.0),
        SDT=_SCALE_DTYPES[getattr(fmt, "scale_dtype", None)],
        GLOBAL=(2 if fmt.global_scale == "pow2" else 1) if measured else 0,
    )


@functools.lru_cache(maxsize=16)
def _fixed_global_scale(fmt: NVFP4, device: torch.device) -> torch.Tensor:
    """A given (or unit) NVFP4 global scale as a 1-element device tensor, made once (no copy per call)."""
    return ref.nvfp4_global_scale(torch.empty(0, device=device), fmt).reshape(1)


def _stats_scope(fmt: Format) -> int | None:
    """The scope pass 1 measures for ``fmt`` (rows, or the tensor), or None when the format needs no pass 1."""
    if isinstance(fmt, NVFP4):
        return TENSOR.value if fmt.global_scale in NVFP4_GLOBAL_RULES else None
    scope = _scope(fmt)
    return None if scope == GROUP.value else scope


def _pass1(x2, rotation, fmt) -> torch.Tensor | None:
    """Pass 1: ``[scopes, 4]`` int32 statistics ``[max |x|, max x+, max -x-, NaN/Inf seen]`` (the floats as bits) of
    each row or of the tensor, from which the quant kernel derives row / tensor scales and NVFP4's global scale."""
    scope = _stats_scope(fmt)
    if scope is None:
        return None
    scopes = x2.shape[0] if scope == ROW.value else 1
    stats = torch.zeros(scopes, 4, dtype=torch.int32, device=x2.device)
    m, n = x2.shape
    w, _, br = _layout(n, rotation, fmt)
    rot, _ = _rotation_args(x2, rotation)
    chunks = m * (n // w)
    stats_kernel[(triton.cdiv(chunks, br),)](x2, stats, K=chunks, CPR=n // w, stride_x=x2.stride(0), BR=br, W=w,
                                             PREC=_PREC, SCOPE=scope, num_warps=_warps(rotation), **rot)
    return stats


def _quant(x2, rotation, fmt, *, back=False, out=None, codes=None, scales=None, zeros=None, rowscale=None,
           gscale=None) -> None:
    """Pass 1 if the format needs it, then the quant kernel; ``rowscale`` / ``gscale`` receive the row (tensor)
    scales and NVFP4's measured global scale when quantizing."""
    m, n = x2.shape
    w, g, br = _layout(n, rotation, fmt)
    chunks = m * (n // w)
    stats = _pass1(x2, rotation, fmt)
    rot, (tb, tblo) = _rotation_args(x2, rotation)
    dummy = _dummy(x2.device, torch.float32)
    pick = lambda t: dummy if t is None else t  # noqa: E731
    fixed = _fixed_global_scale(fmt, x2.device) if isinstance(fmt, NVFP4) and stats is None else None
    quant_kernel[(triton.cdiv(chunks, br),)](
        x2, pick(out), pick(codes), pick(scales), pick(zeros), pick(stats), pick(fixed), pick(rowscale), pick(gscale),
        tb_ptr=tb, tblo_ptr=tblo, K=chunks, CPR=n // w, stride_x=x2.stride(0),
        STORE_CODES=codes is not None, BR=br, W=w, BACK=back, BACK_SIGN_FIRST=not rot["SIGN_FIRST"], PREC=_PREC,
        G=g, NG=w // g, num_warps=_warps(rotation), **rot, **_format_args(fmt, _scope(fmt)),
    )


@functools.lru_cache(maxsize=32)
def _factor(k: int, kp: int, device: torch.device) -> torch.Tensor:
    """The +-1 factor ``H_K`` zero-padded to ``KP x KP`` (fp32, on the device; cached)."""
    a = torch.zeros(kp, kp, dtype=torch.float32)
    a[:k, :k] = factor_matrix(k)
    return a.to(device)


@functools.lru_cache(maxsize=8)
def _sylvester_table(device: torch.device) -> torch.Tensor:
    """The +-1 Sylvester ``H_128`` in bfloat16 (exact), on the device; every radix reads its top-left corner."""
    i = torch.arange(128)
    parity = torch.zeros(128, 128, dtype=torch.int64)
    for bit in range(7):
        parity ^= ((i[:, None] & i[None, :]) >> bit) & 1
    return (1 - 2 * parity).to(torch.bfloat16).to(device)


@functools.lru_cache(maxsize=64)
def _signs(rotation: Rotation, device: torch.device) -> torch.Tensor | None:
    """The rotation's +-1 signs in fp32 on the device, made once: a copy from host memory per call would make the
    host wait for the device's queue (a pageable host-to-device copy synchronizes the stream)."""
    return rotation.sign_vector(torch.float32, device)


def _fwht_rotate(x2: torch.Tensor, r: Rotation, *, kc: int = _FWHT_KC, warps: int | None = None) -> torch.Tensor:
    """``x2 @ R`` for a Hadamard rotation with large blocks (:mod:`rotfn.kernels.fwht`); ``kc`` (factor rows per
    chunk) and ``warps`` (None: :data:`_FWHT_WARPS`) are launch settings, swept by ``bench/fwht_sweep.py``."""
    m, n = x2.shape
    k, kp, r1, r2, r3 = _fwht_plan(r.block_size, r.factor)
    out = torch.empty_like(x2)
    signs = _signs(r, x2.device)
    a = _factor(k, kp, x2.device) if k > 1 else _dummy(x2.device, torch.float32)
    size = kp * r1 * r2 * r3
    rows = max(1, _FWHT_ELEMENTS // size)  # small blocks: several per program
    blocks = m * (n // r.block_size)
    hadamard_kernel[(triton.cdiv(blocks, rows),)](
        x2, out, _sylvester_table(x2.device), a, a if signs is None else signs, blocks, n // r.block_size, x2.stride(0),
        ROWS=rows, K=k, KP=kp, KC=min(kp, kc), R1=r1, R2=r2, R3=r3, SCALE=1.0 / math.sqrt(r.block_size),
        HAS_SIGNS=signs is not None, SIGN_FIRST=not r.transposed, TRANSPOSE=r.transposed,
        PARTS=1 if INTERPRET else 3 if x2.dtype == torch.float32 else 2,
        num_warps=warps or _FWHT_WARPS.get(rows * size, 8),
    )
    return out


def rotate(x: torch.Tensor, r: Rotation) -> torch.Tensor:
    """``x @ R`` in x's dtype: block rotations with blocks 16..256, Hadamard blocks ``K * 2^m`` up to 32768."""
    x2 = _flat(x)
    if _path(r, x.dtype) == "fwht":
        return _fwht_rotate(x2, r).reshape(x.shape)
    m, n = x2.shape
    out = torch.empty_like(x2)
    w, _, br = _layout(n, r, None)
    rot, _ = _rotation_args(x2, r)
    del rot["ROT"]
    chunks = m * (n // w)
    rotate_kernel[(triton.cdiv(chunks, br),)](x2, out, K=chunks, CPR=n // w, stride_x=x2.stride(0), BR=br, W=w,
                                              PREC=_PREC, num_warps=_warps(r), **rot)
    return out.reshape(x.shape)


def rotate_qdq(x: torch.Tensor, r: Rotation | None, fmt: Format, back: bool) -> torch.Tensor:
    """``qdq(rotate(x, R), fmt)`` (then ``rotate_back`` with ``back``) in one fused pass (two for row/tensor scales).

    Large Hadamard blocks (the FWHT kernel) run as rotate, qdq, rotate back: the
    same roundings as the fused tile path, one pass more each way. The qdq runs in
    place on the rotation's output (each program reads its tile before it writes it).
    """
    x2 = _flat(x)
    if _path(r, x.dtype) == "fwht":
        y = _fwht_rotate(x2, r)
        _quant(y, None, fmt, out=y)
        return (_fwht_rotate(y, r.T) if back else y).reshape(x.shape)
    out = torch.empty_like(x2)
    _quant(x2, r, fmt, back=back, out=out)
    return out.reshape(x.shape)


def qdq(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``dequantize(quantize(x, fmt))`` in one pass (two for row/tensor scales)."""
    return rotate_qdq(x, None, fmt, False)


def quantize(x: torch.Tensor, fmt: Format) -> QTensor:
    """Packed codes and scales written directly by the kernel; same layout and bits as the reference."""
    x2 = _flat(x)
    m, n = x2.shape
    lead = x.shape[:-1]
    code_cols = n // 2 if fmt.bits <= 4 else n
    codes = torch.empty(m, code_cols, dtype=torch.uint8, device=x.device)
    scope = _scope(fmt)
    scales = zeros = None
    if scope == GROUP.value:
        scale_dtype = torch.float32 if isinstance(fmt, IntQ) else torch.uint8
        scales = torch.empty(m, n // fmt.group, dtype=scale_dtype, device=x.device)
        if isinstance(fmt, IntQ) and not fmt.symmetric:
            zeros = torch.empty(m, n // fmt.group, dtype=torch.uint8, device=x.device)
    stats_scope = _stats_scope(fmt)
    rowscale = gscale = None
    if stats_scope is not None and not isinstance(fmt, NVFP4):
        rowscale = torch.empty(m if stats_scope == ROW.value else 1, 2, dtype=torch.float32, device=x.device)
    elif stats_scope is not None:
        gscale = torch.empty(1, dtype=torch.float32, device=x.device)
    _quant(x2, None, fmt, codes=codes, scales=scales, zeros=zeros, rowscale=rowscale, gscale=gscale)
    codes = codes.reshape(*lead, code_cols)
    global_scale = None
    if isinstance(fmt, MX):
        scales = scales.view(torch.float8_e8m0fnu).reshape(*lead, -1)
        if fmt.element == "e4m3":
            codes = codes.view(torch.float8_e4m3fn)
    elif isinstance(fmt, NVFP4):
        scales = scales.view(torch.float8_e4m3fn).reshape(*lead, -1)
        global_scale = (gscale if gscale is not None else _fixed_global_scale(fmt, x.device).clone()).reshape(())
    elif isinstance(fmt, IntQ):
        if scope == ROW.value:
            scales = rowscale[:, 0].reshape(*lead, 1).contiguous()
            if not fmt.symmetric:
                zeros = rowscale[:, 1].to(torch.uint8).reshape(*lead, 1)
        else:
            scales = scales.reshape(*lead, -1)
            zeros = None if zeros is None else zeros.reshape(*lead, -1)
        if fmt.bits > 4 and fmt.symmetric:
            codes = codes.view(torch.int8)
    else:
        codes = codes.view(torch.float8_e4m3fn)
        scales = rowscale[:, 0].reshape(*lead, 1).contiguous() if scope == ROW.value else rowscale[0, 0].clone()
    return QTensor(codes, scales, x.shape, x.dtype, fmt, global_scale=global_scale, zero_points=zeros)

