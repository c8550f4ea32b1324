"""Rounding weights against the statistics of their inputs: GPTQ (:func:`gptq`)."""

from rotfn.calibration._gptq import gptq

__all__ = ["gptq"]
