"""Toy problems and estimator research tools.

- :mod:`.yin_zhou`: the ARM paper's toy ``E[sum_i (z_i - p0)^2]`` and training curves of
  every estimator (``binopt toy``).
- :mod:`.vae`: a binary VAE (200 Bernoulli latents, linear or nonlinear) on dynamically
  binarized MNIST, trained with any estimator, with the gradient-basket variance protocol.
- :mod:`.maxcut`: max-cut / QUBO on random graphs solved with Bernoulli logits, against
  enumeration and local search.
- :mod:`.variance`: bias and variance of estimators at a point of a problem
  (``binopt variance``).

See ``docs/toys/`` for the guides and the committed benchmark results.
"""

from .maxcut import QUBO, brute_force, local_search, optimize_logits, random_maxcut, random_qubo
from .variance import Setting, logit_setting, measure
from .yin_zhou import P0_VALUES, YinZhouToy, train_toy

__all__ = [
    "P0_VALUES",
    "QUBO",
    "Setting",
    "YinZhouToy",
    "brute_force",
    "local_search",
    "logit_setting",
    "measure",
    "optimize_logits",
    "random_maxcut",
    "random_qubo",
    "train_toy",
]
