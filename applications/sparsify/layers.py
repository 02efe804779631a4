"""L0-gated layers: a stochastic binary gate on every input neuron, output channel or weight.

A gated layer owns its gate parameters ``phi`` (:class:`L0Gate`). It never samples by
itself: the network-level :class:`~applications.sparsify.network.GatedNetwork` draws the
gates of ALL layers jointly through one ``binopt`` estimator and hands each layer a tensor
of gate values of shape ``(S, num_units)``, one row per sample group. The input batch then
holds ``S`` stacked copies of the minibatch (``(S * B, ...)``), and row ``s`` of the gates
applies to the ``s``-th copy: this evaluates both antithetic samples of ARM in ONE forward
pass. Outside such a context (evaluation, export) a layer applies the estimator's
deterministic test-time gate.

Conditional computation
-----------------------
A unit whose gate is 0 in EVERY sample contributes exactly nothing, so it need not be
computed. Two mechanisms use this (see ``docs/sparsify/performance.md``):

- :meth:`L0Layer.set_gate_values` takes an optional index of the units active in at least
  one sample; :class:`L0Linear` then multiplies only those input columns and
  :class:`L0Conv2d` convolves only those output channels (scattered back into a zero
  tensor, so any module may follow). Works for any network.
- For ``nn.Sequential`` chains of gated layers and zero-preserving modules (MLP,
  LeNet-5), :class:`Branch` carries activations *sliced* to their possibly non-zero units
  and one activation shared by all samples for as long as the samples agree. The
  ``_forward_branches`` methods then also skip a convolution's zero input channels (the
  previous layer's gated-off outputs) and compute the part of a layer that both ARM
  samples share once. :class:`~applications.sparsify.network.GatedNetwork` drives it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
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
        Weights removed with each unit (what the L0 penalty counts). Biases are not
        counted, as in the L0-ARM reference: a gated-off conv channel also loses its bias,
        which the penalty (unlike Louizos et al.'s) does not charge for.
    parameterization : str, Parameterization or callable
        ``pi = g(phi)``; default ``ScaledSigmoid(k=7)`` as in L0-ARM. Hard-concrete
        estimators read the logits as ``log a``.
    init_drop_rate : float
        ``d`` in ``(0, 1)``: ``phi`` starts at ``g^-1(1 - d)``. For Bernoulli gates that is
        the initial probability that a gate is off. Hard-concrete estimators read the
        resulting logit as ``log a = logit(1 - d)`` (as Louizos et al.'s code does), so
        their initial ``P(z = 0) = 1 - sigmoid(logit(1 - d) + beta log(-zeta / gamma))``
        is smaller: 0.17 at ``d = 0.5``, 0.05 at ``d = 0.2``.
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
        self._active: torch.Tensor | None = None

    def set_gate_values(self, z: torch.Tensor | None, active: torch.Tensor | None = None) -> None:
        """Gate values ``(S, num_units)`` for the next forward passes (``None`` clears).

        Parameters
        ----------
        z : torch.Tensor or None
            Gate values, one row per stacked sample group.
        active : torch.Tensor, optional
            Sorted 1-D ``int64`` indices of the units whose gate is non-zero in at least
            one row of ``z``. When given, the layer computes only these units
            (conditional computation); every other unit has gate 0 in all rows, so the
            result equals the masked computation. ``None``: masked computation.
        """
        self._z = z
        self._active = active if z is not None else None

    def current_gates(self) -> torch.Tensor | None:
        """``(S, units)`` sampled gates inside a sampling context, else the ``(1, units)``
        deterministic gate; ``None`` for an ungated (dense) layer."""
        if self.gate is None:
            return None
        if self._z is not None:
            return self._z
        return self.gate.deterministic().unsqueeze(0)

    def supports_conditional(self) -> bool:
        """Whether :meth:`set_gate_values` may pass an ``active`` index to this layer."""
        return self.gate is not None


def _apply_per_group(t: torch.Tensor, z: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """Multiply ``t`` (``(S*B, ...)``) by gates ``z`` (``(S, U)``) on dimension ``unit_dim``."""
    s = z.shape[0]
    shape = [1] * t.dim()
    shape[unit_dim] = z.shape[1]
    if s == 1:
        return t * z.reshape(shape).to(t.dtype)
    view = t.reshape((s, t.shape[0] // s) + tuple(t.shape[1:]))
    return (view * z.reshape([s] + shape).to(t.dtype)).reshape(t.shape)


# ---------------------------------------------------------------------- conditional pass
# The sliced pass runs on the CPU only (its shapes depend on the sampled gates), so it keeps
# its index bookkeeping in NumPy, where a small operation costs about a microsecond instead
# of the several a torch operation costs; index tensors share the arrays' memory.


def _tensor(idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(idx)


@dataclass
class Branch:
    """Activations of one sample group (or of all of them, when shared) in a sliced pass.

    Attributes
    ----------
    t : torch.Tensor
        ``(B, k, ...)``: the stored units along dimension 1.
    idx : numpy.ndarray or None
        Sorted distinct ``int64`` indices (out of ``width``) of the stored units; every
        unit not listed is exactly 0, or (look-ahead of :class:`L0Linear`) read by the
        next layer only through a zero gate. ``None``: all ``width`` units are stored.
    width : int
        Number of units of the full (unsliced) activation.
    """

    t: torch.Tensor
    idx: np.ndarray | None
    width: int

    def dense(self) -> torch.Tensor:
        """The full activation, zeros written at the units not stored."""
        if self.idx is None:
            return self.t
        out = self.t.new_zeros((self.t.shape[0], self.width) + tuple(self.t.shape[2:]))
        return out.index_copy(1, _tensor(self.idx), self.t)


@dataclass(frozen=True)
class PassInfo:
    """How a sliced pass treats its ``samples`` stacked sample groups.

    Attributes
    ----------
    samples : int
        Number of sample groups ``S``.
    last_only : bool
        Only the last group needs autograd (the others are evaluated under ``no_grad``).
    binary : bool
        Gate values are exactly 0 or 1 and carry no gradient, so slicing alone applies
        them (no multiplication).
    """

    samples: int
    last_only: bool
    binary: bool

    def grad_mode(self, s: int):
        """Context for computations that only sample group ``s`` uses."""
        if self.last_only and s < self.samples - 1:
            return torch.no_grad()
        return contextlib.nullcontext()

    def for_group(self, shared: torch.Tensor, s: int) -> torch.Tensor:
        """A shared tensor as sample group ``s`` sees it (detached unless it needs grad)."""
        return shared.detach() if self.last_only and s < self.samples - 1 else shared


#: Fraction of a layer's stored input columns from which a sliced pass stops gathering
#: the selected columns and zeroes the unselected ones instead.
DENSE_FRACTION = 0.75


def _take(t: torch.Tensor | None, dim: int, idx: np.ndarray | None) -> torch.Tensor | None:
    """``t.index_select(dim, idx)`` for SORTED distinct ``idx``; skipped when it selects
    everything (then it is the identity)."""
    if t is None or idx is None or len(idx) == t.shape[dim]:
        return t
    return t.index_select(dim, _tensor(idx))


def _float_mask(mask: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(dtype)
    if np_dtype is None:
        return _tensor(mask).to(dtype)
    return _tensor(mask.astype(np_dtype))


def _rows(needed: np.ndarray | None, s: int | None) -> np.ndarray | None:
    """Output units to compute for sample ``s`` (``None``: for every sample)."""
    if needed is None:
        return None
    mask = needed.any(0) if s is None else needed[s]
    rows = np.flatnonzero(mask)
    # computing a few unneeded outputs is cheaper than gathering the weight rows
    return None if len(rows) >= DENSE_FRACTION * len(mask) else rows


def sequence_steps(module: nn.Sequential) -> list[tuple[str, nn.Module]]:
    """``(name, child)`` of every step of ``module``, in the order its forward runs them.

    Unlike ``named_children`` (which lists a module once, under its first name), a child
    that appears at several positions (one ``nn.ReLU()`` instance reused, a layer applied
    twice) is listed at each of them, as ``nn.Sequential.forward`` calls it.
    """
    return [(name, child) for name, child in module._modules.items() if child is not None]


#: Pooling modules: unit-wise over channels only when channels have their own dimension.
POOLING = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)


def apply_module(m: nn.Module, branch: Branch) -> Branch:
    """Apply a unit-wise, zero-preserving module (activation, pooling) to a branch."""
    t = branch.t
    if isinstance(m, POOLING) and t.dim() < 3 and branch.idx is not None:
        return Branch(m(branch.dense()), None, branch.width)  # pools across features
    if t.shape[1] == 0 and t.dim() > 2:  # pooling kernels reject empty channel dimensions
        return Branch(
            m(t.new_zeros((t.shape[0], 1) + tuple(t.shape[2:])))[:, :0], branch.idx, branch.width
        )
    return Branch(m(t), branch.idx, branch.width)


def flatten_branch(branch: Branch) -> Branch:
    """``flatten(1)`` of a branch; channel indices become feature indices."""
    t = branch.t
    inner = 1
    for d in t.shape[2:]:
        inner *= int(d)
    flat = t.reshape(t.shape[0], -1)
    if branch.idx is None:
        return Branch(flat, None, branch.width * inner)
    idx = (branch.idx[:, None] * inner + np.arange(inner, dtype=np.int64)).reshape(-1)
    return Branch(flat, idx, branch.width * inner)


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

    def supports_conditional(self) -> bool:
        # weight gates remove no whole row or column: nothing to slice
        return self.gate is not None and self.gate_target == "input"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.current_gates()
        if z is None:
            return F.linear(x, self.weight, self.bias)
        if self.gate_target == "input":
            idx = self._active if self._z is not None else None
            w = self.weight
            if idx is not None and idx.numel() < self.in_features:
                x, w, z = x.index_select(-1, idx), w.index_select(1, idx), z.index_select(1, idx)
            if z.shape[0] == 1:
                # one gate row: gate the weight columns, (x * z) W^T = x (W diag z)^T; costs
                # a weight-sized product, and the gate's gradient needs no extra matmul
                return F.linear(x, w * z.to(w.dtype), self.bias)
            return F.linear(_apply_per_group(x, z, x.dim() - 1), w, self.bias)
        s = z.shape[0]
        w = self.weight.unsqueeze(0) * z.reshape(s, self.out_features, self.in_features)
        xs = x.reshape(s, -1, self.in_features)
        out = torch.bmm(xs, w.transpose(1, 2).to(xs.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(x.shape[:-1] + (self.out_features,))

    # ------------------------------------------------------------------ sliced pass
    def _weight_block(
        self, rows: np.ndarray | None, cols: np.ndarray | None, cache: dict | None = None
    ) -> torch.Tensor:
        """``W[rows][:, cols]`` in ONE gather (so that its gradient is scattered once).

        ``cache`` reuses a block gathered before for the same rows and columns.
        """
        w = self.weight
        if cols is not None and len(cols) == w.shape[1] and (np.diff(cols) == 1).all():
            cols = None  # all columns, in order
        key = None
        if cache is not None:
            key = (
                None if rows is None else rows.tobytes(),
                None if cols is None else cols.tobytes(),
            )
            if key in cache:
                return cache[key]
        if rows is None:
            block = w if cols is None else w.index_select(1, _tensor(cols))
        elif cols is None:
            block = w.index_select(0, _tensor(rows))
        else:
            flat = (rows[:, None] * w.shape[1] + cols[None, :]).reshape(-1)
            block = w.reshape(-1).index_select(0, _tensor(flat)).view(len(rows), len(cols))
        if cache is not None:
            cache[key] = block
        return block

    def _products(
        self,
        t: torch.Tensor,
        units: np.ndarray | None,
        rows: np.ndarray | None,
        parts: list[tuple[np.ndarray, torch.Tensor | None, bool]],
        cache: dict | None = None,
    ) -> list[torch.Tensor]:
        """``(t * z) @ W[rows][:, cols]^T`` for several column selections ``cols``.

        ``t`` is ``(B, k)``: stored columns, the input units ``units`` (``None``: all, in
        order); ``rows`` the output units to compute (``None``: all). Each part is
        ``(mask, z, bias)``: a boolean ``(k,)`` selection of stored columns, their ``(k,)``
        gate values (``None`` when binary) and whether to add the bias. A dense first
        selection (at least :data:`DENSE_FRACTION` of the columns) zeroes the other
        columns of ``t``; the other selections gather their columns of ``t`` and ``W``,
        all of them at once. Either way a weight outside a selection gets an exactly zero
        gradient from it, as in the masked computation. Autograd follows the caller's
        grad mode.
        """
        k = t.shape[1]
        bias = self.bias
        if rows is not None and bias is not None:
            bias = bias.index_select(0, _tensor(rows))
        out: list[torch.Tensor] = []
        mask0, z0, b0 = parts[0]
        n0 = int(np.count_nonzero(mask0))
        if n0 >= DENSE_FRACTION * k:
            x = t
            if n0 < k:
                keep = _float_mask(mask0, t.dtype)
                x, z0 = (t * keep, None) if z0 is None else (t, z0 * keep)
            w = self._weight_block(rows, units, cache)
            out.append(self._linear(x, w, z0, bias if b0 else None))
            if len(parts) == 1:
                return out
            parts = parts[1:]
        if len(parts) == 1:
            pos = np.flatnonzero(parts[0][0])
            xs = t if len(pos) == k else t.index_select(1, _tensor(pos))
            ws = self._weight_block(rows, pos if units is None else units[pos], cache)
            z = parts[0][1]
            if z is not None:
                z = z.index_select(0, _tensor(pos))
            out.append(self._linear(xs, ws, z, bias if parts[0][2] else None))
            return out
        pos = [np.flatnonzero(p[0]) for p in parts]
        allpos = np.concatenate(pos)
        xs = t.index_select(1, _tensor(allpos))
        ws = self._weight_block(rows, allpos if units is None else units[allpos], cache)
        start = 0
        for (_, z, b), p in zip(parts, pos):
            n = len(p)
            if z is not None:
                z = z.index_select(0, _tensor(p))
            x, w = xs.narrow(1, start, n), ws.narrow(1, start, n)
            out.append(self._linear(x, w, z, bias if b else None))
            start += n
        return out

    @staticmethod
    def _linear(
        x: torch.Tensor, w: torch.Tensor, z: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``(x * z) @ w^T (+ bias)``; gates on the smaller of ``x`` and ``w``."""
        if z is not None:
            if x.requires_grad and x.shape[0] < w.shape[0]:
                x = x * z.to(x.dtype)
            else:  # the gradient for z then needs no extra matrix product
                w = w * z.to(w.dtype)
        return F.linear(x, w, bias)

    def _forward_branches(
        self,
        branches: list[Branch],
        z: torch.Tensor | None,
        zn: np.ndarray | None,
        info: PassInfo,
        needed: np.ndarray | None = None,
    ) -> list[Branch]:
        """Sliced forward of one shared or ``S`` per-sample branches (see :class:`Branch`).

        ``z`` holds the ``(S, in_features)`` gate values and ``zn`` the same as a NumPy
        array. Only the input columns that are stored and gated on are multiplied. With
        one input shared by all samples, the columns that every sample gates on alike are
        multiplied once, and each sample adds the product over its remaining columns.
        ``needed`` (look-ahead): ``(S, out_features)`` booleans, the outputs that the next
        layer reads in each sample (its input gates); the others are not computed.
        """
        n_out = self.out_features
        if z is None or zn is None:
            zn = np.ones((info.samples, self.in_features), dtype=bool)
        elif self.gate_target != "input":
            raise NotImplementedError("sliced passes support input gates only")
        binary = info.binary or z is None
        last = info.samples - 1
        if len(branches) == 1 and info.samples > 1:
            br = branches[0]
            rows = _rows(needed, None)
            zs_n = zn if br.idx is None else zn[:, br.idx]
            zs = [None] * info.samples if binary else list(_take(z, 1, br.idx))
            nz = zs_n != 0
            if info.last_only:
                return self._shared_last_only(br, rows, zs_n, zs, nz, last)
            common = nz.all(0) if binary else nz[0] & (zs_n == zs_n[:1]).all(0)
            rest = nz & ~common
            active = [s for s in range(info.samples) if rest[s].any()]
            parts = [(common, zs[0], True)]
            parts += [(rest[s], zs[s], False) for s in active]
            values = self._products(br.t, br.idx, rows, parts)
            if not active:
                return [Branch(values[0], rows, n_out)]
            corr = dict(zip(active, values[1:]))
            return [
                Branch(values[0] + corr[s] if s in corr else values[0], rows, n_out)
                for s in range(info.samples)
            ]
        # one branch per sample; the last first, so that the others can reuse its weights
        out = [None] * len(branches)
        cache: dict = {}
        for s in reversed(range(len(branches))):
            br = branches[s]
            with info.grad_mode(s):
                rows = _rows(needed, s)
                zs_n = zn[s] if br.idx is None else zn[s][br.idx]
                zs = None if binary else _take(z[s], 0, br.idx)
                (y,) = self._products(br.t, br.idx, rows, [(zs_n != 0, zs, True)], cache)
                out[s] = Branch(y, rows, n_out)
        return out  # type: ignore[return-value]

    def _shared_last_only(
        self,
        br: Branch,
        rows: np.ndarray | None,
        zs_n: np.ndarray,
        zs: list,
        nz: np.ndarray,
        last: int,
    ) -> list[Branch]:
        """Shared input, autograd for the last sample only: the last sample's product is
        computed on its own (so its weight gradient is the masked one); every other sample
        corrects it, without autograd, over the columns where their gates differ."""
        n_out = self.out_features
        (y_last,) = self._products(br.t, br.idx, rows, [(nz[last], zs[last], True)])
        differ = zs_n != zs_n[last]
        if not differ.any():
            return [Branch(y_last, rows, n_out)]
        out = []
        with torch.no_grad():
            for s in range(last):
                y = y_last.detach()
                minus, plus = differ[s] & nz[last], differ[s] & nz[s]
                parts = [(m, zz, False) for m, zz in ((minus, zs[last]), (plus, zs[s])) if m.any()]
                corrections = self._products(br.t, br.idx, rows, parts) if parts else []
                for (m, *_), c in zip(parts, corrections):
                    y = y - c if m is minus else y + c
                out.append(Branch(y, rows, n_out))
        out.append(Branch(y_last, rows, n_out))
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, gate={self.gate_target if self.gate else None}"
        )


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


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
        z = self.current_gates()
        if z is None:
            return self.conv(x)
        if self._z is None:  # deterministic gates: call .conv itself (its hooks fire)
            return _apply_per_group(self.conv(x), z, 1)
        idx = self._active
        if idx is None or idx.numel() == self.out_channels:
            if z.shape[0] == 1:
                return self._gated_conv(x, self.weight, self.bias, z[0])
            return _apply_per_group(self.conv(x), z, 1)
        bias = None if self.bias is None else self.bias.index_select(0, idx)
        if z.shape[0] == 1:
            y = self._gated_conv(x, self.weight.index_select(0, idx), bias, z[0, idx])
        else:
            y = self._conv(x, self.weight.index_select(0, idx), bias)
            y = _apply_per_group(y, z.index_select(1, idx), 1)
        out = y.new_zeros((y.shape[0], self.out_channels) + tuple(y.shape[2:]))
        if (
            x.dim() == 4
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            out = out.contiguous(memory_format=torch.channels_last)
        return out.index_copy_(1, idx, y)

    def _gated_conv(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, z: torch.Tensor
    ) -> torch.Tensor:
        """``conv(x, w, b) * z`` for ONE gate row, as ``conv(x, w z, b z)``: the gate scales
        the (small) weights instead of the (large) output, so gating adds no pass over the
        activations in either direction."""
        z = z.to(w.dtype)
        w = w * z.reshape(-1, 1, 1, 1)
        return self._conv(x, w, None if b is None else b * z)

    # ------------------------------------------------------------------ sliced pass
    def _out_size(self, t: torch.Tensor) -> tuple[int, int]:
        c = self.conv
        size = []
        for i in range(2):
            n, k = int(t.shape[2 + i]), c.kernel_size[i]
            if isinstance(c.padding, str):
                if c.padding == "same":
                    size.append(n)
                    continue
                p = 0
            else:
                p = _pair(c.padding)[i]
            d, st = c.dilation[i], c.stride[i]
            size.append((n + 2 * p - d * (k - 1) - 1) // st + 1)
        return size[0], size[1]

    def _conv(self, t: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``conv(t, w, b)``, also for an empty set of input or output channels."""
        if w.shape[0] and w.shape[1]:
            return self.conv._conv_forward(t, w, b)
        y = t.new_zeros((t.shape[0], w.shape[0]) + self._out_size(t))
        if b is not None and w.shape[0]:
            y = y + b.reshape(1, -1, 1, 1).to(y.dtype)
        return y

    def _scale(
        self, y: torch.Tensor, z: torch.Tensor, units: np.ndarray, info: PassInfo
    ) -> torch.Tensor:
        if info.binary:
            return y
        return y * z.index_select(0, _tensor(units)).reshape(1, -1, 1, 1).to(y.dtype)

    def _forward_branches(
        self,
        branches: list[Branch],
        z: torch.Tensor | None,
        zn: np.ndarray | None,
        info: PassInfo,
        needed: np.ndarray | None = None,
    ) -> list[Branch]:
        """Sliced forward (see :class:`Branch`): only stored input channels are read and
        only output channels gated on are computed.

        With one input shared by all samples, every output channel that some sample gates
        on is computed once (those of the last sample with autograd, the others without
        when only the last sample needs gradients) and each sample takes its channels.
        """
        w, b, n_out = self.weight, self.bias, self.out_channels
        if z is None or zn is None:
            return [
                Branch(self._conv(br.t, _take(w, 1, br.idx), b), None, n_out) for br in branches
            ]
        nz = zn != 0
        s_all = info.samples
        if len(branches) == 1:
            br = branches[0]
            w_in = _take(w, 1, br.idx)
            if s_all == 1 or bool((zn == zn[:1]).all()):
                units = np.flatnonzero(nz[0])
                y = self._conv(br.t, _take(w_in, 0, units), _take(b, 0, units))
                return [Branch(self._scale(y, z[0], units, info), units, n_out)]
            if info.last_only:
                # the last sample's channels with autograd, the others' extra ones without
                g = np.flatnonzero(nz[-1])
                r = np.flatnonzero(nz[:-1].any(0) & ~nz[-1])
                yg = self._conv(br.t, _take(w_in, 0, g), _take(b, 0, g))
                out = []
                with torch.no_grad():
                    pool, where = yg.detach(), np.zeros(n_out, dtype=np.int64)
                    where[g] = np.arange(len(g))
                    if len(r):
                        yr = self._conv(br.t, _take(w_in, 0, r), _take(b, 0, r))
                        pool = torch.cat([pool, yr], 1)
                        where[r] = np.arange(len(g), len(g) + len(r))
                    for s in range(s_all - 1):
                        units = np.flatnonzero(nz[s])
                        y = pool.index_select(1, _tensor(where[units]))
                        out.append(Branch(self._scale(y, z[s], units, info), units, n_out))
                out.append(Branch(self._scale(yg, z[-1], g, info), g, n_out))
                return out
            u = np.flatnonzero(nz.any(0))
            yu = self._conv(br.t, _take(w_in, 0, u), _take(b, 0, u))
            out = []
            for s in range(s_all):
                p = np.flatnonzero(nz[s][u])
                units = u[p]
                out.append(Branch(self._scale(_take(yu, 1, p), z[s], units, info), units, n_out))
            return out
        out = []
        for s, br in enumerate(branches):
            with info.grad_mode(s):
                units = np.flatnonzero(nz[s])
                ws = _take(_take(w, 0, units), 1, br.idx)
                y = self._conv(br.t, ws, _take(b, 0, units))
                out.append(Branch(self._scale(y, z[s], units, info), units, n_out))
        return out


class SampleBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm that normalises each stacked sample group with its own batch statistics.

    Base of :class:`SampleBatchNorm1d` and :class:`SampleBatchNorm2d`, which add the input
    check of ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` (``isinstance`` with those holds).

    With ``S`` gate samples stacked along the batch, plain BatchNorm would mix the
    statistics of different networks (and the reference implementation ran its second ARM
    pass in eval mode instead). Here each group of ``B`` examples is normalised on its own,
    so every sample sees exactly the statistics it would see alone; running statistics are
    updated ONCE per forward pass, with the batch statistics averaged over the groups, and
    ``momentum`` means what it means for ``nn.BatchNorm``: ``None`` is the cumulative
    moving average (factor ``1 / num_batches_tracked``), ``0`` leaves the running
    statistics as they are. Setting ``update_running_stats = False`` (as
    :class:`~applications.sparsify.network.GatedNetwork` does for the sample groups that
    only give a loss value) normalises with the batch statistics and leaves the running
    statistics and ``num_batches_tracked`` untouched.

    Attributes
    ----------
    num_sample_groups : int
        ``S``, the number of stacked sample groups in the next training-mode batches.
    update_running_stats : bool
        Whether training-mode batches update the running statistics.
    """

    num_sample_groups: int = 1
    update_running_stats: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.num_sample_groups
        if not self.training:
            return super().forward(x)
        if not self.update_running_stats:
            self._check_input_dim(x)
            if s == 1:
                return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        elif s == 1 and self.momentum is not None:
            # (momentum=None: nn.BatchNorm reads num_batches_tracked on the host for its
            # cumulative factor, a sync per layer and step on CUDA; the path below keeps it
            # on the device)
            return super().forward(x)
        self._check_input_dim(x)
        if x.shape[0] % s:
            raise ValueError(
                f"{type(self).__name__} expects a batch of {s} equal sample groups; got "
                f"{x.shape[0]} rows"
            )
        update = self.update_running_stats and self.track_running_stats
        update = update and self.running_mean is not None
        # one batch_norm per group on its (contiguous, in NCHW and channels-last alike)
        # slice of the batch: no transposed copies of the activations. With momentum 1 it
        # writes the group's batch mean and unbiased variance into zeroed buffers; the
        # running statistics then take their average in one step below.
        outs, stats = [], []
        for group in x.chunk(s):
            rm = rv = None
            if update:
                rm, rv = torch.zeros_like(self.running_mean), torch.zeros_like(self.running_var)
                stats.append((rm, rv))
            outs.append(
                F.batch_norm(group, rm, rv, self.weight, self.bias, True, 1.0, self.eps)
            )
        if update:
            self._update_running_stats(
                torch.stack([m for m, _ in stats]).mean(0),
                torch.stack([v for _, v in stats]).mean(0),
            )
        return torch.cat(outs)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """One ``nn.BatchNorm`` running-statistics step towards the batch ``mean``/``var``."""
        nbt = self.num_batches_tracked
        if nbt is not None:
            nbt.add_(1)
        if self.momentum is not None:
            factor: float | torch.Tensor = float(self.momentum)
        elif nbt is not None:
            # cumulative average as in nn.BatchNorm, kept on the device: no host sync
            factor = nbt.to(self.running_mean.dtype).reciprocal()
        else:  # nn.BatchNorm's factor without a batch count
            factor = 0.0
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(var.to(self.running_var.dtype), factor)


class SampleBatchNorm1d(SampleBatchNorm, nn.BatchNorm1d):
    """:class:`SampleBatchNorm` for ``(N, C)`` and ``(N, C, L)`` inputs (``nn.BatchNorm1d``)."""


class SampleBatchNorm2d(SampleBatchNorm, nn.BatchNorm2d):
    """:class:`SampleBatchNorm` for ``(N, C, H, W)`` inputs (``nn.BatchNorm2d``)."""
