"""binopt: stochastic binary optimization.

Gradient estimators for Bernoulli variables behind one interface, gate parameterizations
and diagnostics. Quick start::

    import torch, binopt
    logits = torch.zeros(5, requires_grad=True)
    f = lambda z: ((z - 0.49) ** 2).sum(-1)        # z: (S, 5) -> (S,)
    loss = binopt.get_estimator("disarm").surrogate(f, logits)
    loss.backward()                                 # logits.grad estimates dE/dlogits
    binopt.exact_grad(f, logits)                    # the exact value, by enumeration
"""

from . import diagnostics, parameterizations
from ._validation import set_validate_args, validate_args_enabled
from .estimators import (
    ARM,
    MAX_EXACT_DIM,
    REINFORCE,
    REINFORCELOO,
    DisARM,
    Estimator,
    Exact,
    GumbelSigmoid,
    HardConcrete,
    StraightThrough,
    available_estimators,
    exact_expectation,
    exact_grad,
    get_estimator,
    register_estimator,
)
from .parameterizations import get_parameterization

__version__ = "0.1.0"

__all__ = [
    "ARM",
    "MAX_EXACT_DIM",
    "REINFORCE",
    "REINFORCELOO",
    "DisARM",
    "Estimator",
    "Exact",
    "GumbelSigmoid",
    "HardConcrete",
    "StraightThrough",
    "available_estimators",
    "diagnostics",
    "exact_expectation",
    "exact_grad",
    "get_estimator",
    "get_parameterization",
    "parameterizations",
    "register_estimator",
    "set_validate_args",
    "validate_args_enabled",
]
