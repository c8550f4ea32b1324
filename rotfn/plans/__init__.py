"""Placements as data: which rotation and quantizer goes where in a model.

* :func:`per_linear`: QuIP / AutoRound style, ``x @ R`` online and ``W @ R`` folded at each linear.
* :func:`quarot`: R1 (residual, folded with norm fusion), R2 (per head on V/O), R3 (online on
  Q/K after RoPE), R4 (online before down_proj, folded into it).
* :class:`Plan`: the frozen, printable, serializable result; :data:`FAMILIES`: the model-family adapters.
* :func:`describe`: the read-only model description the builders use (kept here, below
  :mod:`rotfn.model`, so that plans never import the module bridge).

Example:
    >>> import torch, rotfn
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> plan = rotfn.plans.per_linear(m, rotation=rotfn.hadamard(8, seed=1))
    >>> rotfn.plans.Plan.from_dict(plan.to_dict()) == plan
    True
"""

from rotfn.plans._build import per_linear, quarot
from rotfn.plans._checks import require_plan as require_plan  # internal (not in __all__): rotfn's packages
from rotfn.plans._describe import ModelInfo, describe
from rotfn.plans._describe import check_keys as check_keys  # internal, as above
from rotfn.plans._describe import check_model as check_model
from rotfn.plans._describe import check_plan as check_plan
from rotfn.plans._describe import named_tensors as named_tensors
from rotfn.plans._families import FAMILIES, Family, MoE, family_for
from rotfn.plans._families import FUSED as FUSED  # internal: the export checks fused partitions
from rotfn.plans._families import fused_groups as fused_groups
from rotfn.plans._fold import FoldedParams, codes_of, fold, folded_with
from rotfn.plans._fold import calibrated_rounding as calibrated_rounding
from rotfn.plans._fold import check_fold_state as check_fold_state
from rotfn.plans._fold import fold_program as fold_program
from rotfn.plans._plan import ONLINE_KINDS, NormFusion, Online, Plan, WeightRotation, signature
from rotfn.plans._plan import upgrade_plan_dict as upgrade_plan_dict  # internal, as above: io reads old files

__all__ = [
    "Plan", "WeightRotation", "NormFusion", "Online", "ONLINE_KINDS", "signature",
    "per_linear", "quarot", "describe", "ModelInfo",
    "FAMILIES", "Family", "MoE", "family_for",
    "fold", "FoldedParams", "folded_with", "codes_of",
]
