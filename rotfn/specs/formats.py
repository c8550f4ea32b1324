"""Number-format specs: frozen values that say how a tensor is quantized.

The bit-level rules are in ``docs/formats.md`` (from the OCP MX v1.0 spec and
NVIDIA's NVFP4 description); the reference math is in :mod:`rotfn.ops.quant`.
Every format quantizes along the last dim in scale groups of ``group``
elements (``None``: one group per row, or the whole tensor for ``fp8("tensor")``).
"""

from __future__ import annotations

import dataclasses
import enum
import math

from rotfn.errors import FormatError, SpecError, message

__all__ = [
    "Format",
    "ScaleRule",
    "MX",
    "NVFP4",
    "IntQ",
    "FP8",
    "mxfp4",
    "mxfp8",
    "nvfp4",
    "intq",
    "fp8",
    "format_from_dict",
    "FORMAT_VERSION",
    "SCALE_DTYPES",
]

FORMAT_VERSION = 2
# version 1 called the scale group "block"
_V1_KEYS = {"block": "group"}


class ScaleRule(str, enum.Enum):
    """How an MX group's power-of-two scale exponent ``e`` is chosen from the group amax ``a``.

    ``e_a`` is the unbiased exponent read from the fp32 bits of ``a`` (-127 for
    zero and subnormals), ``emax`` the element's largest exponent (2 for E2M1,
    8 for E4M3). The byte stored is ``clamp(e, -127, 127) + 127``.
    """

    FLOOR = "floor"
    """``e = e_a - emax`` (OCP MX v1.0 section 6.3). The group max may saturate."""
    EVEN = "even"
    """Round ``a`` to the element's mantissa width first (add half an ulp to the
    fp32 bits, clear the mantissa), then as FLOOR. Lowest MSE of the three."""
    RCEIL = "rceil"
    """``d = a * fp32(1 / max_elem)``; ``e`` = exponent of d, plus one if d has any
    mantissa bit set: the scale rounded up to a power of two, nothing saturates
    (a subnormal d rounds up to 2^-127 or 2^-126 the same way)."""


class Format:
    """Base of all format specs: a name, a scale group and a dict round trip."""

    name: str
    group: int | None
    """Elements per scale along the last dim (None: a whole row, or the whole tensor)."""

    @property
    def bits(self) -> int:
        """Bits per element code."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        """A JSON-safe dict; :func:`format_from_dict` rebuilds an equal spec.

        Example:
            >>> import rotfn
            >>> f = rotfn.mxfp4("rceil")
            >>> rotfn.format_from_dict(f.to_dict()) == f
            True
        """
        fields = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            fields[f.name] = value.value if isinstance(value, enum.Enum) else value
        return {"version": FORMAT_VERSION, "name": self.name, **fields}


@dataclasses.dataclass(frozen=True)
class MX(Format):
    """OCP microscaling: groups of 32 elements (the spec's "blocks") sharing one E8M0 (power of two) scale.

    Attributes:
        element: ``"e2m1"`` (MXFP4) or ``"e4m3"`` (MXFP8).
        scale_rule: a :class:`ScaleRule`.
        group: elements per scale (32 in the spec).
    """

    element: str = "e2m1"
    scale_rule: ScaleRule = ScaleRule.FLOOR
    group: int = 32

    @property
    def name(self) -> str:
        return "mxfp4" if self.element == "e2m1" else "mxfp8"

    @property
    def bits(self) -> int:
        return 4 if self.element == "e2m1" else 8

    def __repr__(self) -> str:
        return f"{self.name}(scale_rule={self.scale_rule.value!r})"


@dataclasses.dataclass(frozen=True)
class NVFP4(Format):
    """NVFP4: E2M1 elements, one E4M3 scale per 16, one fp32 global scale.

    Attributes:
        global_scale: ``"tensor"`` (amax of the finite values / (448 * 6)), ``"pow2"`` (that,
            rounded up to a power of two), a positive float used as is, or None (global scale 1).
        group: elements per E4M3 scale (16).
    """

    global_scale: str | float | None = "tensor"
    group: int = 16
    name = "nvfp4"

    @property
    def bits(self) -> int:
        return 4

    def __repr__(self) -> str:
        return f"nvfp4(global_scale={self.global_scale!r})"


#: Dtypes an intq / fp8 scale may be rounded to (None: kept in fp32). Engines and compressed-tensors hold
#: these scales in the model's dtype, so a served model has rotfn's values only with the matching rounding.
SCALE_DTYPES = (None, "bfloat16", "float16")

#: NVFP4 global scales measured on the tensor: ``amax / 2688``, and that rounded up to a power of two.
NVFP4_GLOBAL_RULES = ("tensor", "pow2")


@dataclasses.dataclass(frozen=True)
class IntQ(Format):
    """Integer quantization with an fp32 scale per group (and a zero point if asymmetric).

    Attributes:
        bits: 2..8.
        group: elements per scale along the last dim, or None for one group per row.
        symmetric: symmetric (signed codes) or asymmetric (unsigned codes + zero point).
        clip: symmetric only: the scale covers ``clip * amax`` (values beyond saturate).
        scale_dtype: None, or ``"bfloat16"`` / ``"float16"``: each scale rounded down to a value of
            that dtype (see :data:`SCALE_DTYPES`).
        rule: None (rotfn's rule, fp32 arithmetic) or ``"compressed-tensors"`` (that library's
            quantizer: ``s = amax / ((2^b - 1) / 2)`` and every step in the input's dtype, see :func:`intq`).
    """

    bits: int = 4
    group: int | None = None
    symmetric: bool = True
    clip: float = 1.0
    scale_dtype: str | None = None
    rule: str | None = None
    name = "intq"

    def __repr__(self) -> str:
        extra = "" if self.symmetric else ", symmetric=False"
        extra += "" if self.clip == 1.0 else f", clip={self.clip}"
        extra += "" if self.scale_dtype is None else f", scale_dtype={self.scale_dtype!r}"
        extra += "" if self.rule is None else f", rule={self.rule!r}"
        return f"intq({self.bits}, group={self.group}{extra})"


@dataclasses.dataclass(frozen=True)
class FP8(Format):
    """FP8 E4M3 with an fp32 scale ``amax / 448`` per tensor or per row.

    Attributes:
        granularity: ``"tensor"``; ``"channel"`` (rows of a weight ``[out, in]``) and
            ``"token"`` (rows of an activation ``[..., n]``) both take one scale per
            row of the last dim.
        scale_dtype: None, or ``"bfloat16"`` / ``"float16"``: each scale rounded down to a value of that dtype.
        rule: None (rotfn's rule, fp32 arithmetic) or ``"compressed-tensors"`` (that library's
            quantizer: every step in the input's dtype, see :func:`fp8`).
    """

    granularity: str = "tensor"
    scale_dtype: str | None = None
    rule: str | None = None
    name = "fp8"
    group = None

    @property
    def bits(self) -> int:
        return 8

    def __repr__(self) -> str:
        extra = "" if self.scale_dtype is None else f", scale_dtype={self.scale_dtype!r}"
        extra += "" if self.rule is None else f", rule={self.rule!r}"
        return f"fp8({self.granularity!r}{extra})"


def _rule(fn: str, scale_rule) -> ScaleRule:
    try:
        return ScaleRule(scale_rule)
    except ValueError:
        choices = [r.value for r in ScaleRule]
        raise FormatError(message(fn, "scale_rule", f"one of {choices}", repr(scale_rule), "use 'floor' (OCP)")) from None


def mxfp4(scale_rule: str | ScaleRule = "floor") -> MX:
    """MXFP4: E2M1 elements in groups of 32 with an E8M0 scale (OCP MX v1.0).

    ``y = E2M1_RNE(x * 2^-e) * 2^e`` per group, ``e`` from :class:`ScaleRule`.

    Args:
        scale_rule: ``"floor"`` (OCP, default), ``"even"`` or ``"rceil"``.

    Returns:
        A frozen :class:`MX` spec.

    Raises:
        FormatError: unknown scale rule.

    Example:
        >>> import torch, rotfn
        >>> rotfn.qdq(torch.tensor([7.0] + [0.0] * 31), rotfn.mxfp4())[0]
        tensor(6.)

    References:
        OCP Microscaling Formats (MX) v1.0, section 6.3; Rouhani et al. 2023 (arXiv 2310.10537).
    """
    return MX("e2m1", _rule("mxfp4", scale_rule))


def mxfp8(scale_rule: str | ScaleRule = "floor") -> MX:
    """MXFP8: E4M3 elements in groups of 32 with an E8M0 scale (OCP MX v1.0).

    Args:
        scale_rule: ``"floor"`` (OCP, default), ``"even"`` or ``"rceil"``.

    Returns:
        A frozen :class:`MX` spec.

    Raises:
        FormatError: unknown scale rule.

    Example:
        >>> import rotfn
        >>> rotfn.mxfp8()
        mxfp8(scale_rule='floor')
    """
    return MX("e4m3", _rule("mxfp8", scale_rule))


def nvfp4(global_scale: str | float | None = "tensor") -> NVFP4:
    """NVFP4: E2M1 elements, E4M3 scale per 16 elements, fp32 global scale.

    ``s_b = E4M3(clamp(amax_b / 6 / s_g, 2^-9, 448))``,
    ``y = E2M1_RNE(clamp(x / (s_b s_g), -6, 6)) * s_b * s_g``.

    Args:
        global_scale: ``"tensor"`` (``amax / 2688`` over the finite values; 1 for an
            all-zero tensor); ``"pow2"``: the same rounded up to a power of two, so that
            its reciprocal is exact: compressed-tensors and vLLM store ``1 / s_g`` and divide
            by it, which gives rotfn's values bit for bit only then (the serving export,
            :func:`rotfn.export_compressed`, needs it); a positive finite float; or None (1).

    Returns:
        A frozen :class:`NVFP4` spec.

    Raises:
        FormatError: any other global_scale.

    Example:
        >>> import rotfn
        >>> rotfn.nvfp4(None)
        nvfp4(global_scale=None)
    """
    ok = global_scale is None or global_scale in NVFP4_GLOBAL_RULES or (
        isinstance(global_scale, (int, float)) and not isinstance(global_scale, bool)
        and math.isfinite(global_scale) and global_scale > 0
    )
    if not ok:
        raise FormatError(
            message("nvfp4", "global_scale", "'tensor', 'pow2', None or a positive finite float", repr(global_scale))
        )
    return NVFP4(float(global_scale) if isinstance(global_scale, int) else global_scale)


def intq(bits: int, *, group: int | None = None, symmetric: bool = True, clip: float = 1.0,
         scale_dtype: str | None = None, rule: str | None = None) -> IntQ:
    """Integer quantization of 2..8 bits per group of the last dim.

    Symmetric: ``s = clip * amax / (2^(b-1) - 1)``, ``q = clamp(RNE(x / s), -2^(b-1), 2^(b-1) - 1)``.
    Asymmetric: the range ``[min(x_min, 0), max(x_max, 0)]`` (so zero is exact, as in
    GPTQ), ``s = range / (2^b - 1)``, ``z = RNE(-min / s)``, ``q = clamp(RNE(x / s) + z, 0, 2^b - 1)``.
    ``y = (q - z) * s``; an all-zero group has ``s = 1``.

    Args:
        bits: bits per element, 2..8.
        group: elements per scale along the last dim, or None for one per row.
        symmetric: signed codes (True) or unsigned codes with a zero point.
        clip: symmetric only, in (0, 1]: shrink the range to ``clip * amax``.
        scale_dtype: None (fp32 scales), ``"bfloat16"`` or ``"float16"``: ``s`` rounded down to a
            value of that dtype before coding (down: the range still reaches the last code). What a served model holds: compressed-
            tensors and vLLM's int4 kernels keep scales in the model's dtype, so a bf16 model is
            exported bit for bit only with ``scale_dtype="bfloat16"``.
        rule: None, or ``"compressed-tensors"``: the rule of compressed-tensors' quantizer (what
            transformers runs for a dynamic ``int`` activation scheme), symmetric only:
            ``s = D(amax / ((2^b - 1) / 2))`` (127.5 for 8 bits; a zero ``s`` becomes ``eps(D)``),
            ``q = clamp(RNE(D(x / s)), -2^(b-1), 2^(b-1) - 1)``, ``y = D(q s)``, ``D`` the input's
            dtype (float32 for float64 inputs). Non-finite groups follow rotfn's rule (NaN).

    Returns:
        A frozen :class:`IntQ` spec.

    Raises:
        FormatError: bits outside 2..8, group < 1, clip outside (0, 1], clip with symmetric=False,
            an unknown scale_dtype or rule, a rule with symmetric=False, clip or scale_dtype.

    Example:
        >>> import torch, rotfn
        >>> rotfn.qdq(torch.tensor([0.1, -0.7, 0.35]), rotfn.intq(4))
        tensor([ 0.1000, -0.7000,  0.4000])
    """
    fn = "intq"
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise FormatError(message(fn, "bits", "an int in 2..8", repr(bits)))
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
        raise FormatError(message(fn, "group", "a positive int or None", repr(group), "e.g. group=128"))
    if not isinstance(symmetric, bool):
        raise FormatError(message(fn, "symmetric", "a bool", repr(symmetric)))
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip <= 1:
        raise FormatError(message(fn, "clip", "a float in (0, 1]", repr(clip)))
    if not symmetric and clip != 1.0:
        raise FormatError(message(fn, "clip", "1.0 for symmetric=False", clip, "clip the range yourself or use symmetric=True"))
    _check_scale_dtype(fn, scale_dtype)
    _check_rule(fn, rule, symmetric and clip == 1.0 and scale_dtype is None,
                "symmetric=True, clip=1.0 and scale_dtype=None (the rule fixes its own scales)")
    return IntQ(bits, group, symmetric, float(clip), scale_dtype, rule)


#: ``rule=`` of :func:`intq` and :func:`fp8`: None (rotfn's) or another library's quantizer.
RULES = (None, "compressed-tensors")


def _check_rule(fn: str, rule, fits: bool, needs: str) -> None:
    if rule not in RULES:
        raise FormatError(message(fn, "rule", f"one of {RULES}", repr(rule),
                                  "rule='compressed-tensors' predicts a served compressed-tensors model"))
    if rule is not None and not fits:
        raise FormatError(message(fn, "rule", f"rule={rule!r} with {needs}", "other settings", "drop them"))


def _check_scale_dtype(fn: str, scale_dtype) -> None:
    if scale_dtype not in SCALE_DTYPES:
        raise FormatError(message(fn, "scale_dtype", f"one of {SCALE_DTYPES}", repr(scale_dtype),
                                  "pass the model's dtype by name, e.g. scale_dtype='bfloat16'"))


_GRANULARITIES = ("tensor", "channel", "token")


def fp8(granularity: str = "tensor", *, scale_dtype: str | None = None, rule: str | None = None) -> FP8:
    """FP8 E4M3 with ``s = amax / 448``: ``y = E4M3_RNE(x / s) * s``.

    Args:
        granularity: ``"tensor"`` (one scale), ``"channel"`` or ``"token"`` (one per row of the last dim).
        scale_dtype: None (fp32 scales), ``"bfloat16"`` or ``"float16"``: ``s`` rounded down to a value
            of that dtype before coding (compressed-tensors loads fp8 scales in the model's dtype).
        rule: None, or ``"compressed-tensors"``: the rule of compressed-tensors' quantizer (what
            transformers runs for a dynamic ``float`` 8-bit activation scheme): every step rounded to the
            input's dtype ``D`` (float32 for float64 inputs): ``s = D(amax / 448)`` (a zero ``s``
            becomes ``eps(D)``), ``y = D(E4M3_RNE(D(x / s)) s)``; with bf16 inputs the quotient is
            rounded twice (to bf16, then to E4M3), which rotfn's rule does once. compressed-tensors
            takes one scale per token of a 3-D input ``[batch, tokens, n]`` (a linear's input in
            transformers); this rule takes one per row of the last dim for any rank.

    Returns:
        A frozen :class:`FP8` spec.

    Raises:
        FormatError: unknown granularity, scale_dtype or rule; a rule with a scale_dtype.

    Example:
        >>> import rotfn
        >>> rotfn.fp8("token")
        fp8('token')
    """
    if granularity not in _GRANULARITIES:
        raise FormatError(message("fp8", "granularity", f"one of {_GRANULARITIES}", repr(granularity)))
    _check_scale_dtype("fp8", scale_dtype)
    _check_rule("fp8", rule, scale_dtype is None, "scale_dtype=None (the rule keeps scales in the input's dtype)")
    return FP8(granularity, scale_dtype, rule)


_FACTORIES = {
    "mxfp4": lambda d: mxfp4(d["scale_rule"]),
    "mxfp8": lambda d: mxfp8(d["scale_rule"]),
    "nvfp4": lambda d: nvfp4(d["global_scale"]),
    "intq": lambda d: intq(d["bits"], group=d["group"], symmetric=d["symmetric"], clip=d["clip"],
                           scale_dtype=d.get("scale_dtype"), rule=d.get("rule")),
    "fp8": lambda d: fp8(d["granularity"], scale_dtype=d.get("scale_dtype"), rule=d.get("rule")),
}


_LATER = ("scale_dtype", "rule")  # fields added within version 2 (None when a dict lacks them)


def format_from_dict(d: dict) -> Format:
    """Rebuild a format spec from :meth:`Format.to_dict` output.

    A version-1 dict (written by an earlier rotfn, with ``"block"`` for the scale
    group) is read too.

    Raises:
        SpecError: not a dict, unknown version or name, missing or invalid fields.

    Example:
        >>> import rotfn
        >>> rotfn.format_from_dict({"version": 2, "name": "fp8", "granularity": "token"})
        fp8('token')
        >>> old = {"version": 1, "name": "intq", "bits": 4, "block": 32, "symmetric": True, "clip": 1.0}
        >>> rotfn.format_from_dict(old)
        intq(4, group=32)
    """
    fn = "format_from_dict"
    if not isinstance(d, dict):
        raise SpecError(message(fn, "d", "a dict from Format.to_dict()", type(d).__name__))
    if d.get("version") == 1:
        d = {**{_V1_KEYS.get(k, k): v for k, v in d.items()}, "version": FORMAT_VERSION}
    if d.get("version") != FORMAT_VERSION:
        raise SpecError(message(fn, "d['version']", str(FORMAT_VERSION), d.get("version")))
    if d.get("name") not in _FACTORIES:
        raise SpecError(message(fn, "d['name']", f"one of {sorted(_FACTORIES)}", repr(d.get("name"))))
    try:
        fmt = _FACTORIES[d["name"]](d)
    except KeyError as err:
        raise SpecError(message(fn, "d", f"the fields of a {d['name']} spec", f"missing {err}")) from None
    except FormatError as err:
        raise SpecError(str(err)) from None
    # scale_dtype and rule came later within version 2: a dict without them means None
    if {k: v for k, v in fmt.to_dict().items() if k in d or k not in _LATER or v is not None} != d:
        raise SpecError(message(fn, "d", "the fields of Format.to_dict()", d, "re-create it with to_dict()"))
    return fmt
