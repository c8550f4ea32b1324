"""QTensor: the packed result of :func:`rotfn.quantize`."""

from __future__ import annotations

import dataclasses

import torch

from rotfn.specs.formats import Format

__all__ = ["QTensor"]


@dataclasses.dataclass(frozen=True, eq=False)
class QTensor:
    """Quantized codes plus scales; :func:`rotfn.dequantize` turns it back into a tensor.

    Legend: ``x`` had shape ``[..., n]``; ``G`` = number of scale groups per row
    (``n / group``; 1 for a per-row scale; the whole tensor for a per-tensor scale).

    Attributes:
        codes: element codes. 4-bit formats (mxfp4, nvfp4, intq bits <= 4): uint8
            ``[..., ceil(n / 2)]``, two codes per byte, lower index in the low nibble.
            mxfp8 / fp8: float8_e4m3fn ``[..., n]``. intq bits > 4: int8 (symmetric)
            or uint8 (asymmetric) ``[..., n]``. Signed intq nibbles are two's complement.
        scales: mxfp4/8: float8_e8m0fnu ``[..., G]`` (0xFF = NaN group); nvfp4:
            float8_e4m3fn ``[..., G]``; intq: float32 ``[..., G]``; fp8: float32 ``[]``
            (tensor) or ``[..., 1]`` (per row).
        shape: shape of the quantized tensor.
        dtype: dtype of the quantized tensor (the default of ``dequantize``).
        format: the format spec.
        global_scale: nvfp4 only: float32 0-d tensor ``s_g``.
        zero_points: asymmetric intq only: uint8 ``[..., G]``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    format: Format
    global_scale: torch.Tensor | None = None
    zero_points: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales, global scale and zero points together."""
        parts = (self.codes, self.scales, self.global_scale, self.zero_points)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def to(self, device) -> QTensor:
        """The same QTensor with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(
            self, codes=move(self.codes), scales=move(self.scales),
            global_scale=move(self.global_scale), zero_points=move(self.zero_points),
        )

    def __repr__(self) -> str:
        return (
            f"QTensor({self.format!r}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"codes={self.codes.dtype}, scales={self.scales.dtype}{tuple(self.scales.shape)}, "
            f"{self.nbytes} bytes, device={self.device})"
        )
