"""Joint sampling of every gate of a network and the L0-regularised training objective.

:class:`GatedNetwork` wraps a module containing :class:`~.layers.L0Layer` s. Its
:meth:`~GatedNetwork.objective` builds ``f(z)`` = per-sample minibatch loss of the network
under gate sample ``z`` (a dict layer-name -> ``(S, units)``), lets ONE ``binopt`` estimator
sample all gates jointly and returns

    surrogate(E_z[ mean_n L(h(x_n; theta * z), y_n) ])  +  sum_l lam_l / N  sum_j P(z_j != 0) |g_j|

whose backward pass gives the estimator's gradient for the gate parameters ``phi`` and the
ordinary Monte Carlo gradient for the weights, from ONE forward pass over the ``S`` stacked
samples (``S = 2`` for ARM/DisARM, ``1`` for hard concrete / straight-through).

Speed (``docs/sparsify/performance.md``)
----------------------------------------
- ``weight_grad="last"`` (the default for ARM/DisARM): the weights take their gradient from
  the last sample group only (ARM's ``z = 1[u < pi]``, a proper Bernoulli(pi) sample, as in
  the L0-ARM reference); the other group is evaluated without autograd, so a step costs
  two forward passes and ONE backward pass (about 4/3 of a dense step) instead of two.
- ``conditional`` (on by default on CPU): units gated off in every sample are not
  computed, and for ``nn.Sequential`` chains (MLP, LeNet-5) the work both ARM samples
  share is done once. Gradients equal those of the masked computation up to rounding.
- Nothing in :meth:`GatedNetwork.objective` moves data to the host unless conditional
  computation is switched on for a CUDA module (one device-to-host copy of the gate masks
  per step); value checks of the estimator are off by default for the same reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import binopt
from binopt.estimators import ARM, REINFORCELOO, DisARM, Exact, GumbelSigmoid, HardConcrete
from binopt.parameterizations import HardSigmoid, Parameterization, ScaledSigmoid, Sigmoid

from .layers import (
    POOLING,
    Branch,
    L0Conv2d,
    L0Layer,
    L0Linear,
    PassInfo,
    SampleBatchNorm,
    apply_module,
    flatten_branch,
    sequence_steps,
)
from .linear_chain import SlicedLinearChain

#: Modules between two linear layers through which a layer may skip the outputs that the
#: next layer gates off (look-ahead): they act on every feature on its own.
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.Tanh,
    nn.Identity,
)

#: Modules a sliced chain passes through unit by unit: each maps a zero unit to zero and
#: treats every channel/feature (and every example) on its own.
ZERO_PRESERVING: tuple[type[nn.Module], ...] = (*ELEMENTWISE, *POOLING)


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
        ``"reinforce_loo"``, ``"gumbel"``, ... Built from a name or class, it gets
        ``validate_args=False`` unless ``estimator_options`` say otherwise: value checks
        synchronise the host with the device in every step.
    lam : float or mapping
        L0 strength, global or per gated layer name (missing names get 0).
    num_train : int
        Training set size ``N``; the penalty is divided by it, as in the reference
        formulation where the data term is a mean over examples.
    conditional : bool or "auto"
        Skip the units whose gate is 0 in every sample (conditional computation). Exact
        (gradients equal the masked computation's up to rounding) for estimators whose
        gradient does not pass through a zero gate, i.e. all but straight-through and
        hard Gumbel; ``True`` with those raises. ``"auto"`` (default): on for CPU inputs,
        off for CUDA inputs, where finding the active units costs a host-device sync.
    weight_grad : {"auto", "last", "mean"}
        Where the weights take their gradient from when the estimator evaluates ``S > 1``
        samples. ``"mean"``: the average of the per-sample gradients (one stacked pass,
        backward through all samples). ``"last"``: the last sample only, the others are
        evaluated without autograd (ARM/DisARM: ``z = 1[u < pi]``; unbiased, as the
        L0-ARM reference does; only for estimators whose surrogate averages the sample
        values: ARM, DisARM, REINFORCE-LOO). ``"auto"``: ``"last"`` for ARM and DisARM,
        ``"mean"`` otherwise.
    **estimator_options
        Passed to :func:`binopt.get_estimator`.
    """

    def __init__(
        self,
        module: nn.Module,
        estimator: str | binopt.Estimator = "arm",
        lam: float | Mapping[str, float] = 0.1,
        num_train: int = 1,
        *,
        conditional: bool | str = "auto",
        weight_grad: str = "auto",
        **estimator_options,
    ) -> None:
        super().__init__()
        self.module = module
        if not isinstance(estimator, binopt.Estimator):
            estimator_options.setdefault("validate_args", False)
        self.estimator = binopt.get_estimator(estimator, **estimator_options)
        if int(num_train) < 1:
            raise ValueError(f"num_train must be >= 1; got {num_train}")
        self.num_train = int(num_train)
        layers = self.gated_layers()
        if isinstance(lam, Mapping):
            unknown = set(lam) - set(layers)
            if unknown:
                raise ValueError(
                    f"lam names unknown gated layers {sorted(unknown)}; "
                    f"gated layers: {list(layers)}"
                )
            self.lam = {name: float(lam.get(name, 0.0)) for name in layers}
        else:
            self.lam = {name: float(lam) for name in layers}
        bad = {k: v for k, v in self.lam.items() if not v >= 0}
        if bad:
            raise ValueError(f"lam must be >= 0; got {bad}")
        for layer in layers.values():
            layer.gate.estimator = self.estimator
        self._bn = [m for m in module.modules() if isinstance(m, SampleBatchNorm)]
        self.conditional = self._check_conditional(conditional)
        self.weight_grad = self._check_weight_grad(weight_grad)
        self._chain = _chain_plan(module)
        self._linear_chain = SlicedLinearChain.from_module(module)
        self._penalty_weights: tuple | None = None
        # the gated layers are fixed at construction (lam, the estimator hand-off and the
        # BatchNorm list above rely on it too); cached for the per-step hot path
        self._gated = layers
        self._gates = [layer.gate for layer in layers.values()]
        self._sizes = [layer.gate.num_units for layer in layers.values()]
        ends = np.cumsum(self._sizes).tolist()  # each layer's part of a flat gate sample
        self._slices = [slice(e - n, e) for e, n in zip(ends, self._sizes)]
        self._starts = {name: sl.start for name, sl in zip(layers, self._slices)}

    # ------------------------------------------------------------------ options
    def _check_conditional(self, conditional: bool | str) -> bool | str:
        if conditional not in (True, False, "auto"):
            raise ValueError(f"conditional must be True, False or 'auto'; got {conditional!r}")
        if conditional is True and not conditional_is_exact(self.estimator):
            raise ValueError(
                f"conditional computation is not exact for {self.estimator!r}: its gradient "
                "passes through gates sampled at 0; use conditional=False"
            )
        return conditional

    def _check_weight_grad(self, weight_grad: str) -> str:
        if weight_grad not in ("auto", "last", "mean"):
            raise ValueError(f"weight_grad must be 'auto', 'last' or 'mean'; got {weight_grad!r}")
        est = self.estimator
        if weight_grad == "auto":
            return "last" if isinstance(est, (ARM, DisARM)) else "mean"
        averaging = isinstance(est, (ARM, DisARM, REINFORCELOO)) or (
            est.evaluations == 1 and not isinstance(est, Exact)
        )
        if weight_grad == "last" and not averaging:
            raise ValueError(
                f"weight_grad='last' needs an estimator whose surrogate averages its sample "
                f"values (ARM, DisARM, REINFORCE-LOO, single-sample ones); got {est!r}"
            )
        return weight_grad

    def uses_conditional(self, device: torch.device | str) -> bool:
        """Whether a step on ``device`` skips the units gated off in every sample."""
        if self.conditional == "auto":
            return torch.device(device).type == "cpu" and conditional_is_exact(self.estimator)
        return bool(self.conditional)

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
    def sampled(
        self,
        z: Mapping[str, torch.Tensor],
        conditional: bool = False,
        update_running_stats: bool = True,
        active: Mapping[str, torch.Tensor] | None = None,
    ):
        """Run the module with gate samples ``z`` (name -> ``(S, units)``).

        Parameters
        ----------
        z : mapping
            Gate values of every gated layer.
        conditional : bool
            Hand every layer the index of its units active in some sample, so that it
            computes only those (one device-to-host copy of the masks on CUDA).
        update_running_stats : bool
            Whether :class:`~.layers.SampleBatchNorm` layers (1d and 2d) update their
            running statistics.
        active : mapping, optional
            Precomputed indices of the active units (``conditional`` then needs no copy).
        """
        layers = self._gated
        s = next(iter(z.values())).shape[0] if z else 1
        if active is None:
            active = _active_units(layers, [z])[0] if conditional and z else {}
        try:
            for name, layer in layers.items():
                layer.set_gate_values(z[name], active.get(name))
            for bn in self._bn:
                bn.num_sample_groups = s
                bn.update_running_stats = update_running_stats
            yield s
        finally:
            for layer in layers.values():
                layer.set_gate_values(None)
            for bn in self._bn:
                bn.num_sample_groups = 1
                bn.update_running_stats = True

    def objective(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
    ) -> StepOutput:
        """Surrogate training loss for one minibatch (call ``.loss.backward()``).

        ``loss_fn(outputs, targets, reduction="none")`` gives per-example losses. No
        host-device synchronisation happens here unless conditional computation is on for
        a CUDA input.
        """
        layers = self._gated
        conditional = self.uses_conditional(x.device)
        last_only = self.weight_grad == "last"
        last_out: list[torch.Tensor] = []
        # All gates in one flat tensor: the estimator then samples and builds its
        # surrogate with a handful of operations instead of a handful per layer.
        names, sizes = list(layers), self._sizes
        flat = self._flat_logits() if names else None
        chain = self._linear_chain if (
            conditional and x.device.type == "cpu" and not self.estimator.reparameterized
            and not _cpu_autocast()) else None

        def f(zflat: torch.Tensor | None) -> torch.Tensor:
            if (chain is not None and zflat is not None
                    and zflat.dtype in (torch.float32, torch.float64)
                    and (last_only or zflat.shape[0] == 1)):
                # an MLP: the whole sliced pass as one autograd node (linear_chain.py)
                values, logits = chain.flat_losses(x, y, zflat, self._starts, loss_fn)
                last_out.append(logits)
                return values
            z = dict(zip(names, zflat.split(sizes, 1))) if zflat is not None else {}
            s = zflat.shape[0] if zflat is not None else 1
            outs = self._sample_outputs(x, z, s, conditional, last_only and s > 1, zflat)
            last_out.append(outs[-1].detach())
            cache: dict[int, torch.Tensor] = {}
            values = []
            for out in outs:
                if id(out) not in cache:
                    cache[id(out)] = loss_fn(out, y, reduction="none").mean()
                values.append(cache[id(out)])
            if last_only and s > 1:
                # value unchanged; gradient s * grad(last), so that the estimator's mean over
                # the s values hands the weights the gradient of the last sample
                v = values[-1]
                values = [u.detach() for u in values[:-1]] + [v + (s - 1) * (v - v.detach())]
            return torch.stack(values)

        if flat is not None:
            data = self.estimator.surrogate(f, flat)
            penalty = self._flat_penalty(flat, layers)
        else:  # a dense network: nothing to sample
            data = f(None).mean()
            penalty = self.penalty()
        return StepOutput(
            loss=data + penalty,
            data_loss=data.detach(),
            penalty=penalty.detach(),
            logits=last_out[-1],
        )

    def _flat_logits(self) -> torch.Tensor:
        """The logits of all gated layers, concatenated."""
        gates = self._gates
        shared = _shared_parameterization([g.parameterization for g in gates])
        if shared is not None:  # one elementwise transform for all layers, not one each
            # (the parameter dicts: nn.Module.__getattr__ costs a microsecond a call)
            return shared.logits(torch.cat([g._parameters["phi"] for g in gates]))
        return torch.cat([g.logits() for g in gates])

    def _flat_penalty(self, flat: torch.Tensor, layers: Mapping[str, L0Layer]) -> torch.Tensor:
        """:meth:`penalty` from the concatenated logits of all gated layers."""
        # the gated layers (hence units and group sizes) are fixed at construction
        key = (tuple(map(self.lam.__getitem__, layers)), self.num_train, flat.device,
               flat.dtype)
        if self._penalty_weights is None or self._penalty_weights[0] != key:
            per_unit = [
                torch.full(
                    (layer.gate.num_units,),
                    self.lam[n] * layer.gate.group_size / self.num_train,
                    dtype=flat.dtype,
                )
                for n, layer in layers.items()
            ]
            self._penalty_weights = (key, torch.cat(per_unit).to(flat.device))
        if not any(key[0]):
            return flat.new_zeros(())
        return torch.dot(self.estimator.prob_nonzero(flat), self._penalty_weights[1])

    def _sample_outputs(
        self,
        x: torch.Tensor,
        z: dict[str, torch.Tensor],
        s: int,
        conditional: bool,
        last_only: bool,
        zflat: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Network outputs ``(B, ...)`` under each of the ``s`` sample groups of ``z``.

        Groups whose output is the same tensor (a sliced pass where the samples agree) are
        evaluated once; with ``last_only`` all groups but the last run without autograd.
        ``zflat`` optionally holds all gates concatenated (the sliced pass reads them once).
        """
        sliced = conditional and z and self._chain is not None and x.device.type == "cpu"
        if sliced and next(iter(z.values())).dtype in (torch.float32, torch.float64):
            info = PassInfo(s, last_only, binary=not self.estimator.reparameterized)
            if zflat is not None:
                zf = zflat.detach().numpy()
                zn = {n: zf[:, sl] for n, sl in zip(self._gated, self._slices)}
            else:
                zn = {name: v.detach().numpy() for name, v in z.items()}
            return _run_chain(self._chain, x, z, zn, info)
        if last_only:
            head_z = {k: v[:-1] for k, v in z.items()}
            tail_z = {k: v[-1:] for k, v in z.items()}
            head_a = tail_a = None
            if conditional:  # both passes' active units in one device-to-host copy
                head_a, tail_a = _active_units(self._gated, [head_z, tail_z])
            with torch.no_grad():
                head = self._run_module(x, head_z, conditional, False, head_a)
            tail = self._run_module(x, tail_z, conditional, True, tail_a)
            return [*head.chunk(s - 1), tail]
        return list(self._run_module(x, z, conditional, True).chunk(s))

    def _run_module(
        self,
        x: torch.Tensor,
        z: dict[str, torch.Tensor],
        conditional: bool,
        stats: bool,
        active: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        with self.sampled(z, conditional, stats, active) as s:
            xs = x if s == 1 else x.repeat((s,) + (1,) * (x.dim() - 1))
            return self.module(xs)

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


# ---------------------------------------------------------------------- helpers
#: Parameterizations that act elementwise and are fully described by their type and ``k``.
_ELEMENTWISE_PARAMETERIZATIONS = (Sigmoid, ScaledSigmoid, HardSigmoid)


def _shared_parameterization(params: list[Parameterization]) -> Parameterization | None:
    """The parameterization when all of ``params`` compute the same elementwise map, else
    ``None`` (a user callable may not be elementwise)."""
    first = params[0]
    if type(first) not in _ELEMENTWISE_PARAMETERIZATIONS:
        return None
    k = getattr(first, "k", None)
    for p in params[1:]:
        if type(p) is not type(first) or getattr(p, "k", None) != k:
            return None
    return first


def _cpu_autocast() -> bool:
    """Whether CPU autocast is on (the fused MLP pass then steps aside)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()


def conditional_is_exact(estimator: binopt.Estimator) -> bool:
    """Whether skipping gates sampled at 0 leaves every gradient unchanged.

    True when no gradient passes through a zero gate: sampling estimators (the samples
    carry no gradient), hard concrete (clamped at 0, zero derivative) and the soft binary
    concrete; False for straight-through and hard Gumbel, whose backward treats a zero
    gate as ``pi``.
    """
    if not estimator.reparameterized:
        return True
    if isinstance(estimator, HardConcrete):
        return True
    return isinstance(estimator, GumbelSigmoid) and not estimator.hard


def _active_units(
    layers: Mapping[str, L0Layer], groups: list[Mapping[str, torch.Tensor]]
) -> list[dict[str, torch.Tensor]]:
    """For each gate mapping in ``groups``: indices of the units non-zero in some of its
    samples, per layer that can use them.

    On CUDA all masks travel to the host together: ONE synchronisation for all groups.
    """
    names = [n for n, layer in layers.items() if layer.supports_conditional()]
    names = [n for n in names if all(n in z for z in groups)]
    if not names:
        return [{} for _ in groups]
    masks = [(z[n] != 0).any(0) for z in groups for n in names]
    if masks[0].device.type == "cpu":
        flat_idx = [m.nonzero().squeeze(1) for m in masks]
    else:
        device = masks[0].device
        flat = torch.cat(masks).cpu()
        flat_idx, start = [], 0
        for m in masks:
            part = flat[start : start + m.numel()]
            start += m.numel()
            flat_idx.append(part.nonzero().squeeze(1).to(device, non_blocking=True))
    n = len(names)
    return [dict(zip(names, flat_idx[i * n : (i + 1) * n])) for i in range(len(groups))]



_Step = tuple[str, "str | None", nn.Module, "str | None"]


def _chain_plan(module: nn.Module) -> list[_Step] | None:
    """The steps of a sliced pass through ``module``, or ``None`` when it has none.

    Supported: an ``nn.Sequential`` of :class:`L0Linear` (input gates or none),
    :class:`L0Conv2d`, ``nn.Flatten()`` and the unit-wise modules of
    :data:`ZERO_PRESERVING` (not in-place). A step is ``(kind, gated name, module,
    look-ahead)``; the look-ahead of a linear layer names the input-gated linear layer that
    reads its outputs through :data:`ELEMENTWISE` modules only. Every position of the chain
    is a step, a module reused at several positions (one ``nn.ReLU()`` instance) included;
    a layer with weights reused that way has no sliced pass (``None``).
    """
    if type(module) is not nn.Sequential:
        return None
    steps: list[_Step] = []
    seen_layers: set[int] = set()
    for name, child in sequence_steps(module):
        if isinstance(child, (L0Linear, L0Conv2d)):
            if id(child) in seen_layers:  # its gates are named after its first position
                return None
            seen_layers.add(id(child))
        gated = name if isinstance(child, L0Layer) and child.gate is not None else None
        if isinstance(child, L0Linear):
            if gated and child.gate_target != "input":
                return None
            steps.append(("layer", gated, child, None))
        elif isinstance(child, L0Conv2d):
            steps.append(("layer", gated, child, None))
        elif type(child) is nn.Flatten:
            if child.start_dim != 1 or child.end_dim != -1:
                return None
            steps.append(("flatten", None, child, None))
        elif type(child) in ZERO_PRESERVING and not getattr(child, "inplace", False):
            steps.append(("unit", None, child, None))
        else:
            return None
    for i, (kind, name, m, _) in enumerate(steps):
        if kind != "layer" or not isinstance(m, L0Linear):
            continue
        for _kind, nxt_name, nxt, _ in steps[i + 1 :]:
            if type(nxt) in ELEMENTWISE:
                continue
            if isinstance(nxt, L0Linear) and nxt_name is not None:
                steps[i] = (kind, name, m, nxt_name)
            break
    return steps


def _run_chain(
    steps: list[_Step],
    x: torch.Tensor,
    z: Mapping[str, torch.Tensor],
    zn: Mapping[str, np.ndarray],
    info: PassInfo,
) -> list[torch.Tensor]:
    """Sliced pass: one :class:`Branch` shared by all samples until their gates differ.

    ``z`` holds the gate values per gated layer and ``zn`` the same as NumPy arrays.
    """
    branches = [Branch(x, None, int(x.shape[1]) if x.dim() > 1 else 1)]
    for kind, name, m, look in steps:
        if kind == "layer":
            needed = None if look is None else zn[look] != 0
            if name is None:
                branches = m._forward_branches(branches, None, None, info, needed)
            else:
                branches = m._forward_branches(branches, z[name], zn[name], info, needed)
        elif kind == "flatten":
            branches = [flatten_branch(br) for br in branches]
        elif len(branches) == 1:
            branches = [apply_module(m, branches[0])]
        else:
            new = []
            for s, br in enumerate(branches):
                with info.grad_mode(s):
                    new.append(apply_module(m, br))
            branches = new
    if len(branches) == 1:
        return [branches[0].dense()] * info.samples
    outs = []
    for s, br in enumerate(branches):
        with info.grad_mode(s):
            outs.append(br.dense())
    return outs
