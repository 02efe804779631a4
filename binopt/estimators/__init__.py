"""Gradient estimators for Bernoulli variables behind one interface (see :mod:`.base`)."""

from .arm import ARM, DisARM
from .base import (
    Estimator,
    attach_gradient,
    available_estimators,
    get_estimator,
    register_estimator,
)
from .exact import MAX_EXACT_DIM, Exact, all_states, exact_expectation, exact_grad
from .relaxed import GumbelSigmoid, HardConcrete, StraightThrough
from .score_function import REINFORCE, REINFORCELOO

__all__ = [
    "ARM",
    "DisARM",
    "Estimator",
    "Exact",
    "GumbelSigmoid",
    "HardConcrete",
    "MAX_EXACT_DIM",
    "REINFORCE",
    "REINFORCELOO",
    "StraightThrough",
    "all_states",
    "attach_gradient",
    "available_estimators",
    "exact_expectation",
    "exact_grad",
    "get_estimator",
    "register_estimator",
]
