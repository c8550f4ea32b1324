"""Hypothesis profiles: "ci" (deterministic, bounded) is the default; HYPOTHESIS_PROFILE=dev explores more."""

import os

import torch
from hypothesis import HealthCheck, settings

# Without a GPU, Triton kernels run on CPU tensors through the interpreter; it must be
# switched on before rotfn.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
