"""The only bridge to ``nn.Module``: :func:`params`, :func:`call`, and one interception mechanism.

* :func:`params`: a model's tensors as a plain dict.
* :func:`intercept`: ``with intercept(model, {Site(...): f}) as m: ...`` runs a per-call clone
  of the model with plain functions at named sites (module inputs and outputs, q/k/v after
  RoPE, fused experts' inputs); the model itself is never changed.
* :func:`online`: a plan's online entries compiled to such site functions.
* :func:`call` = ``intercept(model, online(plan))`` + ``torch.func.functional_call``;
  :func:`call_with` adds more sites (recording a layer's inputs, learned transforms).

``call``, ``rotfn.report``, ``rotfn.learn`` (and calibration) all go through :func:`intercept`;
nothing else in rotfn installs hooks or talks to transformers' attention / experts registries.
The read-only model description plan builders use (``describe``, ``ModelInfo``) lives in
:mod:`rotfn.plans`, below this package, so plans never import the bridge.

Example:
    >>> import torch, rotfn
    >>> from rotfn.model import Site, intercept
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> inputs = []
    >>> with intercept(m, {Site("0"): lambda x: inputs.append(x)}) as im:
    ...     _ = im(torch.ones(2, 4))
    >>> inputs[0].shape
    torch.Size([2, 4])
"""

from rotfn.model._call import call, call_with
from rotfn.model._call import call_as as call_as  # internal (not in __all__): report, calibrate and learn
from rotfn.model._intercept import POINTS, Site, SiteFn, intercept
from rotfn.model._online import activation, online
from rotfn.model._params import params
from rotfn.model._transformers import ATTENTION_NAMES, EXPERTS_NAME

__all__ = [
    "params", "call", "call_with",
    "intercept", "Site", "SiteFn", "POINTS",
    "online", "activation",
    "ATTENTION_NAMES", "EXPERTS_NAME",
]
