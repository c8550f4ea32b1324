"""Durable and portable results: rotfn checkpoints, HF export, streaming fold of sharded checkpoints."""

from rotfn.io._checkpoint import skeleton
from rotfn.io._file import load, save
from rotfn.io._hf import export_hf, load_hf
from rotfn.io._stream import FoldStats, fold_checkpoint

__all__ = ["save", "load", "export_hf", "load_hf", "fold_checkpoint", "FoldStats", "skeleton"]
