"""Joint sampling of every gate of a network and the L0-regularised training objective.

:class:`GatedNetwork` wraps a module containing :class:`~.layers.L0Layer` s. Its
:meth:`~GatedNetwork.objective` builds ``f(z)`` = per-sample minibatch loss of the network
under gate sample ``z`` (a dict layer-name -> ``(S, units)``), lets ONE ``binopt`` estimator
sample all gates jointly and returns

    surrogate(E_z[ mean_n L(h(x_n; theta * z), y_n) ])  +  sum_l lam_l / N  sum_j P(z_j != 0) |g_j|

whose backward pass gives the estimator's gradient for the gate parameters ``phi`` and the
ordinary Monte Carlo gradient for the weights, from ONE forward pass over the ``S`` stacked
samples (``S = 2`` for ARM/DisARM, ``1`` for hard concrete / straight-through).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import binopt

from .layers import L0Layer, SampleBatchNorm2d


@dataclass
class StepOutput:
    """What one call of :meth:`GatedNetwork.objective` returns.

    Attributes
    ----------
    loss : torch.Tensor
        Scalar to call ``backward`` on (surrogate data loss + L0 penalty).
    data_loss : torch.Tensor
        Detached estimate of the expected data loss.
    penalty : torch.Tensor
        Detached L0 penalty.
    logits : torch.Tensor
        Detached network outputs of the LAST sample group, shape ``(B, classes)``.
    """

    loss: torch.Tensor
    data_loss: torch.Tensor
    penalty: torch.Tensor
    logits: torch.Tensor


class GatedNetwork(nn.Module):
    """A network whose L0 gates are sampled jointly by one estimator.

    Parameters
    ----------
    module : nn.Module
        Network containing :class:`L0Layer` s (dense layers with ``gated=False`` allowed).
    estimator : str or binopt.Estimator
        ``"arm"`` (default), ``"disarm"``, ``"hard_concrete"``, ``"straight_through"``,
        ``"reinforce_loo"``, ``"gumbel"``, ...
    lam : float or mapping
        L0 strength, global or per gated layer name (missing names get 0).
    num_train : int
        Training set size ``N``; the penalty is divided by it, as in the reference
        formulation where the data term is a mean over examples.
    """

    def __init__(
        self,
        module: nn.Module,
        estimator: str | binopt.Estimator = "arm",
        lam: float | Mapping[str, float] = 0.1,
        num_train: int = 1,
        **estimator_options,
    ) -> None:
        super().__init__()
        self.module = module
        self.estimator = binopt.get_estimator(estimator, **estimator_options)
        if int(num_train) < 1:
            raise ValueError(f"num_train must be >= 1; got {num_train}")
        self.num_train = int(num_train)
        layers = self.gated_layers()
        if isinstance(lam, Mapping):
            unknown = set(lam) - set(layers)
            if unknown:
                raise ValueError(
                    f"lam names unknown gated layers {sorted(unknown)}; gated layers: {list(layers)}"
                )
            self.lam = {name: float(lam.get(name, 0.0)) for name in layers}
        else:
            self.lam = {name: float(lam) for name in layers}
        bad = {k: v for k, v in self.lam.items() if not v >= 0}
        if bad:
            raise ValueError(f"lam must be >= 0; got {bad}")
        for layer in layers.values():
            layer.gate.estimator = self.estimator
        self._bn = [m for m in module.modules() if isinstance(m, SampleBatchNorm2d)]

    # ------------------------------------------------------------------ structure
    def gated_layers(self) -> dict[str, L0Layer]:
        """Gated layers by qualified name, in module order."""
        return {
            name: m
            for name, m in self.module.named_modules()
            if isinstance(m, L0Layer) and m.gate is not None
        }

    def gate_parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.gated_layers().values():
            yield layer.gate.phi

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        gate_ids = {id(p) for p in self.gate_parameters()}
        return (p for p in self.module.parameters() if id(p) not in gate_ids)

    def logits(self) -> dict[str, torch.Tensor]:
        return {name: layer.gate.logits() for name, layer in self.gated_layers().items()}

    # ------------------------------------------------------------------ forward passes
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic forward with the test-time gates (or the current samples)."""
        return self.module(x)

    @contextlib.contextmanager
    def sampled(self, z: Mapping[str, torch.Tensor]):
        """Run the module with gate samples ``z`` (name -> ``(S, units)``)."""
        layers = self.gated_layers()
        s = next(iter(z.values())).shape[0] if z else 1
        try:
            for name, layer in layers.items():
                layer.set_gate_values(z[name])
            for bn in self._bn:
                bn.num_sample_groups = s
            yield s
        finally:
            for layer in layers.values():
                layer.set_gate_values(None)
            for bn in self._bn:
                bn.num_sample_groups = 1

    def objective(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
    ) -> StepOutput:
        """Surrogate training loss for one minibatch (call ``.loss.backward()``).

        ``loss_fn(outputs, targets, reduction="none")`` gives per-example losses.
        """
        logits = self.logits()
        last_out: list[torch.Tensor] = []

        def f(z: dict[str, torch.Tensor]) -> torch.Tensor:
            with self.sampled(z) as s:
                xs = x.repeat((s,) + (1,) * (x.dim() - 1))
                out = self.module(xs)
            last_out.append(out.detach()[-x.shape[0] :])
            per_example = loss_fn(out, y.repeat(s), reduction="none")
            return per_example.reshape(s, -1).mean(1)

        if logits:
            data = self.estimator.surrogate(f, logits)
        else:  # a dense network: nothing to sample
            data = f({}).mean()
        penalty = self.penalty()
        return StepOutput(
            loss=data + penalty,
            data_loss=data.detach(),
            penalty=penalty.detach(),
            logits=last_out[-1],
        )

    # ------------------------------------------------------------------ sparsity
    def penalty(self) -> torch.Tensor:
        """``sum_l lam_l / N * sum_j P(z_j != 0) * group_size_l``."""
        total = None
        for name, layer in self.gated_layers().items():
            if self.lam[name] == 0.0:
                continue
            term = self.lam[name] * layer.gate.group_size * layer.gate.prob_nonzero().sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros((), device=next(self.module.parameters()).device)
        return total / self.num_train

    @torch.no_grad()
    def expected_kept_fraction(self) -> float:
        """Expected fraction of gated weights kept, ``sum P(z != 0) |g| / sum |g|`` (syncs)."""
        kept = total = 0.0
        for layer in self.gated_layers().values():
            g = layer.gate
            kept += float(g.prob_nonzero().sum()) * g.group_size
            total += g.num_units * g.group_size
        return kept / total if total else 1.0

    @torch.no_grad()
    def kept_units(self) -> dict[str, int]:
        """Units whose test-time gate is non-zero, per gated layer."""
        return {
            name: int((layer.gate.deterministic() > 0).sum())
            for name, layer in self.gated_layers().items()
        }
