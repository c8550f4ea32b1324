"""Rounding weights against the statistics of their inputs: :func:`gptq` for one weight,
:func:`calibrate` for a plan's quantized linears (collected through :mod:`rotfn.model`), :func:`save` /
:func:`load` of the result."""

from rotfn.calibration._calibrate import ACTIVATIONS, Calibration, calibrate
from rotfn.calibration._file import load, save
from rotfn.calibration._gptq import gptq

__all__ = ["gptq", "calibrate", "Calibration", "ACTIVATIONS", "save", "load"]
