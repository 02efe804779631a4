"""L0-gated layers: a stochastic binary gate on every input neuron, output channel or weight.

A gated layer owns its gate parameters ``phi`` (:class:`L0Gate`). It never samples by
itself: the network-level :class:`~applications.sparsify.network.GatedNetwork` draws the
gates of ALL layers jointly through one ``binopt`` estimator and hands each layer a tensor
of gate values of shape ``(S, num_units)``, one row per sample group. The input batch then
holds ``S`` stacked copies of the minibatch (``(S * B, ...)``), and row ``s`` of the gates
applies to the ``s``-th copy: this evaluates both antithetic samples of ARM in ONE forward
pass. Outside such a context (evaluation, export) a layer applies the estimator's
deterministic test-time gate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import binopt
from binopt.parameterizations import Parameterization, get_parameterization


class L0Gate(nn.Module):
    """Gate parameters ``phi`` of ``num_units`` units, each guarding ``group_size`` weights.

    Parameters
    ----------
    num_units : int
        Number of gates.
    group_size : int
        Weights removed with each unit (what the L0 penalty counts).
    parameterization : str, Parameterization or callable
        ``pi = g(phi)``; default ``ScaledSigmoid(k=7)`` as in L0-ARM. Hard-concrete
        estimators read the logits as ``log a``.
    init_drop_rate : float
        Initial probability that a gate is off, in ``(0, 1)``.
    """

    def __init__(
        self,
        num_units: int,
        group_size: int,
        parameterization: str | Parameterization = "scaled_sigmoid",
        init_drop_rate: float = 0.5,
        **param_options,
    ) -> None:
        super().__init__()
        if not 0.0 < float(init_drop_rate) < 1.0:
            raise ValueError(f"init_drop_rate must be in (0, 1); got {init_drop_rate}")
        self.parameterization = get_parameterization(parameterization, **param_options)
        self.num_units = int(num_units)
        self.group_size = int(group_size)
        self.init_drop_rate = float(init_drop_rate)
        phi0 = self.parameterization.inverse(torch.tensor(1.0 - self.init_drop_rate))
        self.phi = nn.Parameter(torch.full((self.num_units,), float(phi0)))
        # Set by GatedNetwork: the estimator that defines P(z != 0) and the test-time gate.
        self.estimator: binopt.Estimator = binopt.ARM()

    def logits(self) -> torch.Tensor:
        return self.parameterization.logits(self.phi)

    def prob_nonzero(self) -> torch.Tensor:
        return self.estimator.prob_nonzero(self.logits())

    def deterministic(self) -> torch.Tensor:
        return self.estimator.deterministic_gate(self.logits())

    def extra_repr(self) -> str:
        return f"units={self.num_units}, group_size={self.group_size}, {self.parameterization!r}"


class L0Layer(nn.Module):
    """Base of gated layers: holds the gate and the gate values of the current pass."""

    gate: L0Gate | None
    gate_target: str = "input"

    def __init__(self) -> None:
        super().__init__()
        self._z: torch.Tensor | None = None

    def set_gate_values(self, z: torch.Tensor | None) -> None:
        """Gate values ``(S, num_units)`` for the next forward passes (``None`` clears)."""
        self._z = z

    def current_gates(self) -> torch.Tensor | None:
        """``(S, units)`` sampled gates inside a sampling context, else the ``(1, units)``
        deterministic gate; ``None`` for an ungated (dense) layer."""
        if self.gate is None:
            return None
        if self._z is not None:
            return self._z
        return self.gate.deterministic().unsqueeze(0)


def _apply_per_group(t: torch.Tensor, z: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """Multiply ``t`` (``(S*B, ...)``) by gates ``z`` (``(S, U)``) on dimension ``unit_dim``."""
    s = z.shape[0]
    view = t.reshape((s, -1) + tuple(t.shape[1:]))
    shape = [s, 1] + [1] * (t.dim() - 1)
    shape[unit_dim + 1] = z.shape[1]
    return (view * z.reshape(shape).to(t.dtype)).reshape(t.shape)


class L0Linear(L0Layer):
    """Linear layer with one gate per input neuron (``gate='input'``, L0-ARM's choice) or per
    weight (``gate='weight'``); ``gated=False`` makes it a plain dense layer.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
    gated : bool
    gate : {"input", "weight"}
    **gate_options
        Passed to :class:`L0Gate` (``parameterization``, ``init_drop_rate``, ``k``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        gated: bool = True,
        gate: str = "input",
        **gate_options,
    ) -> None:
        super().__init__()
        if gate not in ("input", "weight"):
            raise ValueError(f"L0Linear gate must be 'input' or 'weight'; got {gate!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.gate_target = gate
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()
        if not gated:
            self.gate = None
        elif gate == "input":
            self.gate = L0Gate(in_features, out_features, **gate_options)
        else:
            self.gate = L0Gate(in_features * out_features, 1, **gate_options)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.current_gates()
        if z is None:
            return F.linear(x, self.weight, self.bias)
        if self.gate_target == "input":
            return F.linear(_apply_per_group(x, z, x.dim() - 1), self.weight, self.bias)
        s = z.shape[0]
        w = self.weight.unsqueeze(0) * z.reshape(s, self.out_features, self.in_features)
        xs = x.reshape(s, -1, self.in_features)
        out = torch.bmm(xs, w.transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(x.shape[:-1] + (self.out_features,))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, gate={self.gate_target if self.gate else None}"
        )


class L0Conv2d(L0Layer):
    """2-D convolution with one gate per output channel (multiplies its output).

    Parameters follow :class:`torch.nn.Conv2d`; ``gated=False`` gives a plain convolution.
    """

    gate_target = "output"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        gated: bool = True,
        **gate_options,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        group = in_channels * self.conv.kernel_size[0] * self.conv.kernel_size[1]
        self.gate = L0Gate(out_channels, group, **gate_options) if gated else None

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.conv.bias

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        z = self.current_gates()
        return out if z is None else _apply_per_group(out, z, 1)


class SampleBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that normalises each stacked sample group with its own batch statistics.

    With ``S`` gate samples stacked along the batch, plain BatchNorm would mix the
    statistics of different networks (and the reference implementation ran its second ARM
    pass in eval mode instead). Here each group of ``B`` examples is normalised on its own,
    so every sample sees exactly the statistics it would see alone; running statistics are
    updated with the average over groups.
    """

    num_sample_groups: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.num_sample_groups
        if s == 1 or not self.training:
            return super().forward(x)
        b, c, h, w = x.shape[0] // s, x.shape[1], x.shape[2], x.shape[3]
        grouped = x.reshape(s, b, c, h, w).transpose(0, 1).reshape(b, s * c, h, w)
        weight = self.weight.repeat(s) if self.weight is not None else None
        bias = self.bias.repeat(s) if self.bias is not None else None
        if self.track_running_stats and self.running_mean is not None:
            rm = self.running_mean.repeat(s)
            rv = self.running_var.repeat(s)
        else:
            rm = rv = None
        out = F.batch_norm(grouped, rm, rv, weight, bias, True, self.momentum or 0.1, self.eps)
        if rm is not None:
            with torch.no_grad():
                self.running_mean.copy_(rm.reshape(s, c).mean(0))
                self.running_var.copy_(rv.reshape(s, c).mean(0))
                self.num_batches_tracked += 1
        return out.reshape(b, s, c, h, w).transpose(0, 1).reshape(x.shape)
