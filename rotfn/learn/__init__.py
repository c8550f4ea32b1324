"""Learned rotations: Cayley SGD on the orthogonal group, gradients from torch.func.grad (SpinQuant style).

* :func:`rotations`: learn a plan's R1 / R2 (QuaRot plans) or per-linear rotations so that the
  quantized model's loss on calibration batches goes down; returns a :class:`LearnResult`
  whose ``.plan`` holds the learned rotations as ``rotfn.from_matrix`` specs.
* :func:`evaluate`: the same loss for any plan through ``rotfn.fold`` / ``rotfn.call`` (held-out batches).
* :func:`fidelity`: the loss "stay close to the float model" on a chosen view of the outputs.
* :func:`calibration`: token batches cut from prose that ships with rotfn (no download).
* :func:`cayley_step`: the optimizer step, a pure function.

Slots: the learned entries with role ``r`` and rotation ``U`` (or ``U.T``) share one matrix
``U blockdiag(Q)`` per scope: the whole model for R1 (from the embedding to lm_head), a numbered
block for R2 (``model.layers.3``: its V heads and the o_proj reading them), a module for R4 and
per_linear (a linear's online input and its folded weight). So each pair that must agree for
exactness holds one matrix, and quarot plans get SpinQuant's layout: one R1, one R2 per layer.

Losses (``loss=None``): next-token cross-entropy for causal LMs when batches carry ``input_ids``
(labels = the ids shifted by one, or ``batch["labels"]``), else the relative squared error
``sum (y - y_float)^2 / sum y_float^2`` of the output (``last_hidden_state``, logits, or the
output tensor) against the float model's, over real tokens. ``loss="fidelity"`` picks the
latter for causal LMs too; ``loss=fidelity(view)`` compares a view of the outputs (sentence
embeddings, say); any ``loss(outputs, batch) -> scalar tensor`` works as well.

Example:
    >>> import torch, rotfn
    >>> batches = rotfn.learn.calibration(lambda s: list(s.encode()), seq_len=32, batch_size=2, n_batches=2)
    >>> batches[0]["input_ids"].shape
    torch.Size([2, 32])

References:
    SpinQuant (Liu et al. 2024, arXiv 2405.16406); J. Li, F. Li, S. Todorovic, "Efficient Riemannian
    optimization on the Stiefel manifold via the Cayley transform", ICLR 2020 (arXiv 2002.01113).
"""

from rotfn.learn._cayley import cayley_step, orthogonality_error
from rotfn.learn._data import calibration, calibration_text
from rotfn.learn._data import check_batches as check_batches  # internal (not in __all__): rotfn.calibrate
from rotfn.learn._data import to_device as to_device
from rotfn.learn._loss import Fidelity, evaluate, fidelity
from rotfn.learn._rotations import LearnResult, rotations
from rotfn.learn._slots import LEARNABLE_ROLES

__all__ = [
    "rotations", "LearnResult", "LEARNABLE_ROLES",
    "evaluate", "fidelity", "Fidelity",
    "calibration", "calibration_text",
    "cayley_step", "orthogonality_error",
]
