"""A chain of input-gated linear layers evaluated sliced, as ONE autograd node.

For an MLP that has thinned out, a sliced L0-ARM step does little arithmetic: with 80% of
the units of every layer gated off the products shrink 25-fold, and what remains is the
cost of issuing small operations (about 5-10 microseconds each on a CPU). The generic
sliced pass (:func:`.network._run_chain`) issues many: per layer and sample, gathers, their
autograd nodes, a product, an activation, then a backward pass through all those nodes.

:class:`SlicedLinearChain` computes the per-sample losses of ``Flatten? -> L0Linear -> ReLU
-> ... -> L0Linear`` for ``S`` binary gate samples in one :class:`torch.autograd.Function`.

Forward (no autograd). Each layer works on the UNION over the samples of its active input
units, and multiplies only the weight block ``W[rows][:, cols]`` (``cols``: that union;
``rows``: the next layer's union). The samples share one activation tensor until their
gates differ; from there on they are stacked, ``(S, B, units)``, and each sample's inactive
units in the union are zeroed by a mask, so every layer is one product for all samples
(ARM's two samples usually differ in a handful of units). The first layer, whose input is
shared, multiplies the columns every sample keeps once and adds each sample's few extra
columns when that is cheaper than two products.

Backward, for the last sample only: the convention of ``weight_grad="last"`` in
:class:`~.network.GatedNetwork`, where the weights take the gradient of the last sample's
loss, scaled by the sum of the gradients flowing into the ``S`` losses (1 when the estimator
averages them). The gradient with respect to the outputs comes from autograd (so any
``loss_fn`` works), the chain is differentiated by hand (two products per layer) and each
weight gradient is written into a zero tensor of the weight's shape at the block.

The result equals the masked computation's up to float rounding: a unit gated off in the
last sample gets exactly zero gradient in both (its activation is zero, so is the gradient
reaching it). ``tests/applications/sparsify/test_linear_chain.py`` checks this against
:class:`~.network.GatedNetwork` without conditional computation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_extension
from .layers import DENSE_FRACTION, L0Linear, _take, sequence_steps
from .layers import _tensor as _index

__all__ = ["SlicedLinearChain"]

#: First-layer products smaller than this many multiply-adds per example are computed for
#: every sample on the union of their columns (one product); larger ones are computed once
#: on the shared columns plus a small product per sample over its own extra columns. Below
#: the threshold the saved arithmetic costs less than the extra operations (about 5 us
#: each, where one multiply-add costs about 0.015 ns on one core).
SHARED_FIRST_LAYER_MACS = 30_000

_NUMPY_FLOAT = {torch.float32: np.float32, torch.float64: np.float64}

#: Blocks of at most this many weights are gathered and scattered through one flat index;
#: larger ones by rows then columns, which needs no index as large as the block.
FLAT_INDEX_LIMIT = 16_384


def _flat_index(rows: np.ndarray | None, cols: np.ndarray | None,
                width: int) -> torch.Tensor | None:
    """Row-major positions of the block ``[rows][:, cols]`` when both are partial and the
    block is small (:data:`FLAT_INDEX_LIMIT`)."""
    if rows is None or cols is None or len(rows) * len(cols) > FLAT_INDEX_LIMIT:
        return None
    return _index((rows[:, None] * width + cols[None, :]).reshape(-1))


def _block(w: torch.Tensor, rows: np.ndarray | None, cols: np.ndarray | None,
           flat: torch.Tensor | None) -> torch.Tensor:
    """``w[rows][:, cols]`` (``None``: all, in order; ``flat``: see :func:`_flat_index`)."""
    if flat is not None:
        return w.reshape(-1).index_select(0, flat).view(len(rows), len(cols))
    return _take(_take(w, 0, rows), 1, cols)


def _scatter(block: torch.Tensor, shape: torch.Size, rows: np.ndarray | None,
             cols: np.ndarray | None, flat: torch.Tensor | None) -> torch.Tensor:
    """A zero tensor of ``shape`` holding ``block`` at ``[rows][:, cols]``."""
    if rows is None and cols is None:
        return block
    out = block.new_zeros(shape)
    if flat is not None:
        return out.view(-1).index_copy_(0, flat, block.reshape(-1)).view(shape)
    if cols is not None:
        wide = block.new_zeros((block.shape[0], shape[1])) if rows is not None else out
        block = wide.index_copy_(1, _index(cols), block)
        if rows is None:
            return out
    return out.index_copy_(0, _index(rows), block)


@dataclass
class _Plan:
    """Index bookkeeping of one step, per layer (NumPy only).

    A layer stores the union of the samples' active input units (gathered), or all its
    inputs when the union covers at least :data:`~.layers.DENSE_FRACTION` of them
    (gathering most of a weight matrix costs more than multiplying a few zero columns).
    ``masks[i][s]`` zeroes the stored positions that sample ``s`` gates off in that
    sample's copy of the input.
    """

    samples: int
    cols: list[np.ndarray | None]        # stored input units (None: all)
    masks: list[torch.Tensor | None]     # (S, 1, stored) 0/1 per sample (None: all ones)
    first_off: list[np.ndarray] | None = None  # first layer: per sample, stored positions
                                               # gated off (None: none in any sample)
    shared_off: np.ndarray | None = None  # split first layer: positions off in SOME sample
    extra: list[np.ndarray] | None = None  # split first layer: each sample's positions
                                           # that some other sample gates off


class SlicedLinearChain:
    """Sliced per-sample losses of a chain of input-gated :class:`~.layers.L0Linear` layers.

    Build it with :meth:`from_module`; :class:`~.network.GatedNetwork` does, and uses it for
    binary gate samples when the weights take their gradient from the last sample (L0-ARM's
    default on the CPU).

    Parameters
    ----------
    layers : sequence of L0Linear
        The linear layers in order; gated ones have input gates.
    names : sequence of str or None
        Each layer's name among the gated layers (``None``: ungated).
    flatten : bool
        Whether the chain starts with ``nn.Flatten()``.
    """

    def __init__(self, layers: Sequence[L0Linear], names: Sequence[str | None],
                 flatten: bool) -> None:
        self.layers = list(layers)
        self.names = list(names)
        self.flatten = bool(flatten)

    @classmethod
    def from_module(cls, module: nn.Module) -> SlicedLinearChain | None:
        """The chain of ``module``, or ``None`` unless it is an ``nn.Sequential`` of an
        optional ``nn.Flatten()``, then :class:`L0Linear` layers (input gates or none)
        separated by one ``nn.ReLU()`` each, with at least one gated layer, none of them at
        two positions (a ``nn.ReLU()`` instance may be reused)."""
        if type(module) is not nn.Sequential:
            return None
        children = sequence_steps(module)
        flatten = False
        if children and type(children[0][1]) is nn.Flatten:
            f = children[0][1]
            if f.start_dim != 1 or f.end_dim != -1:
                return None
            flatten, children = True, children[1:]
        if len(children) % 2 != 1:
            return None
        layers, names = [], []
        for i, (name, child) in enumerate(children):
            if i % 2 == 1:
                if type(child) is not nn.ReLU:
                    return None
                continue
            if type(child) is not L0Linear:
                return None
            gated = child.gate is not None
            if gated and child.gate_target != "input":
                return None
            layers.append(child)
            names.append(name if gated else None)
        for a, b in zip(layers[:-1], layers[1:]):
            if a.out_features != b.in_features:
                return None
        if not any(n is not None for n in names):
            return None
        if len({id(layer) for layer in layers}) != len(layers):  # a layer applied twice
            return None
        return cls(layers, names, flatten)

    def plan(self, masks: Mapping[str, np.ndarray], dtype: torch.dtype = torch.float32) -> _Plan:
        """Index bookkeeping of one step: masks are gate name -> ``(S, in)`` booleans;
        ``dtype`` is that of the activations (for the per-sample masks)."""
        s_all = next(iter(masks.values())).shape[0]
        plan = _Plan(s_all, [], [])
        first_keep = None
        np_dtype = _NUMPY_FLOAT.get(dtype)
        for name in self.names:
            if name is None:
                plan.cols.append(None)
                plan.masks.append(None)
                continue
            m = masks[name]
            if s_all == 2:  # (ARM's pair: two elementwise operations beat two reductions)
                union, every = m[0] | m[1], m[0] & m[1]
            else:
                union, every = m.any(0), m.all(0)
            u = union.nonzero()[0]  # np.flatnonzero, without its wrappers
            if len(u) >= DENSE_FRACTION * len(union):
                u = None  # all units stored: those off in every sample are zeroed too
                units = (~every).nonzero()[0]
                positions = units
            else:
                units = (union ^ every).nonzero()[0]  # kept by some samples, not all
                positions = np.searchsorted(u, units)
            plan.cols.append(u)
            if len(units) == 0:
                plan.masks.append(None)
                continue
            keep = m[:, units]  # (S, positions): which samples keep them
            if len(plan.cols) == 1:
                first_keep = positions, keep
            mask = np.ones((s_all, 1, len(union) if u is None else len(u)),
                           dtype=np_dtype or bool)
            for row, k in zip(mask, keep):
                row[0, positions[~k]] = 0
            plan.masks.append(_index(mask) if np_dtype is not None else _index(mask).to(dtype))
        if first_keep is not None:
            positions, keep = first_keep
            plan.first_off = [positions[~k] for k in keep]
            first = self.layers[0]
            width = first.in_features if plan.cols[0] is None else len(plan.cols[0])
            rows = first.out_features if len(self.layers) == 1 or plan.cols[1] is None else len(
                plan.cols[1])
            if width * rows > SHARED_FIRST_LAYER_MACS:
                plan.shared_off = positions
                plan.extra = [positions[k] for k in keep]
        return plan

    def losses(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        masks: Mapping[str, np.ndarray],
        loss_fn: Callable[..., torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses ``(S,)`` and the last sample's outputs ``(B, classes)``.

        Parameters
        ----------
        x, y : torch.Tensor
            The minibatch (CPU).
        masks : mapping
            Gate name -> ``(S, in_features)`` booleans: the units gated on in each sample.
        loss_fn : callable
            ``loss_fn(outputs, y, reduction="none")``; a sample's loss is its mean.

        The losses carry the gradient of the LAST sample's loss to every weight and bias,
        scaled by the sum of the gradients flowing into the ``S`` losses.
        """
        plan = self.plan(masks, x.dtype)
        return _ChainLosses.apply(self, plan, loss_fn, x, y, *self._flat_params())

    def flat_losses(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        z: torch.Tensor,
        starts: Mapping[str, int],
        loss_fn: Callable[..., torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`losses` from the flat gate sample ``z`` (``(S, units)``, 0/1, no gradient)
        of which gate ``name``'s units start at column ``starts[name]``.

        With the compiled kernel (:mod:`.cpu_extension`) the bookkeeping of :meth:`plan`
        is done there too, from ``z`` itself; otherwise this is :meth:`losses`.
        """
        ext = cpu_extension.load() if x.device.type == "cpu" else None
        if ext is None:
            zn = z.detach().numpy() != 0
            masks = {n: zn[:, starts[n]:starts[n] + layer.in_features]
                     for n, layer in zip(self.names, self.layers) if n is not None}
            return self.losses(x, y, masks, loss_fn)
        cols, masks, shared_off, extra, first_off = ext.plan(
            z.detach(), [-1 if n is None else starts[n] for n in self.names],
            [layer.in_features for layer in self.layers],
            [layer.out_features for layer in self.layers], x, float(DENSE_FRACTION),
            int(SHARED_FIRST_LAYER_MACS))
        plan = _KernelPlan(z.shape[0], cols, masks, shared_off, extra, first_off)
        return _ChainLosses.apply(self, plan, loss_fn, x, y, *self._flat_params())

    # ------------------------------------------------------------------ internals
    def _flat_params(self) -> list[torch.Tensor]:
        params = []
        for layer in self.layers:  # the parameter dicts: nn.Module.__getattr__ is slow
            p = layer._parameters
            params.append(p["weight"])
            if p.get("bias") is not None:
                params.append(p["bias"])
        return params

    def _params(self, flat: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        it = iter(flat)
        return [(next(it), next(it) if layer._parameters.get("bias") is not None else None)
                for layer in self.layers]

    def _first_layer_split(self, h: torch.Tensor, plan: _Plan, w, b, rows) -> torch.Tensor:
        """The first layer's stacked ``(S * B, rows)`` outputs from its stored input ``h``:
        the positions every sample keeps multiplied once (the others zeroed), plus each
        sample's product over its own remaining positions."""
        cols, width = plan.cols[0], w.shape[1]
        common = h.clone()
        common.index_fill_(1, _index(plan.shared_off), 0)
        wb = _block(w, rows, cols, _flat_index(rows, cols, width))
        out = F.linear(common, wb, _take(b, 0, rows))
        per = []
        for extra in plan.extra:
            if len(extra) == 0:
                per.append(out)
                continue
            per.append(out.addmm(h.index_select(1, _index(extra)),
                                 wb.index_select(1, _index(extra)).t()))
        return torch.cat(per)

    def _forward(self, x: torch.Tensor, plan: _Plan, params, transpose_out: bool):
        """The outputs and, per layer, ``(input, weight block, block index)``.

        The outputs are ``(B, n)`` when all samples agree, else stacked ``(S * B, n)``;
        ``transpose_out`` gives their transpose (contiguous), for the loss. A stacked
        input has each sample's gated-off columns zeroed; a split first layer saves
        ``(None, None, None)``.
        """
        inputs: list[tuple] = []
        last = len(self.layers) - 1
        batch = x.shape[0]
        h, stacked = x, False
        for i, (w, b) in enumerate(params):
            rows = plan.cols[i + 1] if i < last else None
            if i == 0:
                h = _take(x, 1, plan.cols[0])
            if i == 0 and plan.extra is not None:
                a = self._first_layer_split(h, plan, w, b, rows)
                stacked = True
                inputs.append((h, None, None))
                if i == last and transpose_out:
                    a = a.t().contiguous()
            else:
                mask = plan.masks[i]
                if mask is not None:  # (the samples part ways here if not before)
                    n = h.shape[1]
                    h, stacked = (h.reshape(-1, batch, n) * mask).view(-1, n), True
                flat = _flat_index(rows, plan.cols[i], w.shape[1])
                wb = _block(w, rows, plan.cols[i], flat)
                inputs.append((h, wb, flat))
                bb = _take(b, 0, rows)
                if i == last and transpose_out:
                    a = wb.mm(h.t()) if bb is None else torch.addmm(bb.unsqueeze(1), wb, h.t())
                else:
                    a = F.linear(h, wb, bb)
            h = a if i == last else a.relu_()
        return h, inputs, stacked


    def _backward(self, g: torch.Tensor, transposed: bool, batch: int, plan: _Plan, params,
                  inputs) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per layer (in order), the last sample's ``(weight, bias)`` gradients, full size
        and zero outside the blocks, from ``g``, the gradient with respect to its outputs
        (``(classes, B)`` when ``transposed``, else ``(B, classes)``)."""
        last = len(self.layers) - 1
        per_layer = []
        for i in range(last, -1, -1):
            w, b = params[i]
            rows = plan.cols[i + 1] if i < last else None
            h, wb, flat = inputs[i]
            cols = plan.cols[i]
            if i == 0 and plan.extra is not None:  # split: the last sample's input
                h = h.clone().index_fill_(1, _index(plan.first_off[-1]), 0)
                flat = _flat_index(rows, cols, w.shape[1])
            elif h.shape[0] != batch:
                h = h[-batch:]
            gt = g if transposed else g.t()  # (outputs, B)
            gw = _scatter(gt.mm(h), w.shape, rows, cols, flat)
            gb = None if b is None else _scatter(gt.sum(1), b.shape, rows, None, None)
            per_layer.append((gw, gb))
            if i:
                # relu's derivative read off its output with the gates applied: a unit
                # gated off in the last sample or below zero passes no gradient
                g = torch.ops.aten.threshold_backward(
                    g.t().mm(wb) if transposed else g.mm(wb), h, 0)
                transposed = False
        return per_layer[::-1]

def _is_cross_entropy(loss_fn: Callable, y: torch.Tensor) -> bool:
    """Whether the loss is plain cross-entropy on class indices (its gradient is then
    written directly instead of taken by autograd, unless a label is out of range)."""
    return loss_fn is F.cross_entropy and y.dtype == torch.int64 and y.dim() == 1


class _KernelPlan:
    """A step's index bookkeeping in the form the compiled kernel takes (tensors; ``None``:
    all units; see ``csrc/linear_chain.cpp``): made by the kernel's own ``plan`` from the
    flat gate sample (:meth:`SlicedLinearChain.flat_losses`), or converted from a
    :class:`_Plan` (:meth:`SlicedLinearChain.losses`)."""

    __slots__ = ("samples", "cols", "masks", "shared_off", "extra", "first_off")

    def __init__(self, samples, cols, masks, shared_off, extra, first_off) -> None:
        self.samples = samples
        self.cols, self.masks = cols, masks
        self.shared_off, self.extra, self.first_off = shared_off, extra, first_off

    @classmethod
    def from_plan(cls, plan: _Plan) -> _KernelPlan:
        split = plan.extra is not None
        return cls(
            plan.samples, [None if c is None else _index(c) for c in plan.cols], plan.masks,
            _index(plan.shared_off) if split else None,
            [_index(e) for e in plan.extra] if split else [],
            _index(plan.first_off[-1]) if split else None,
        )


class _ChainLosses(torch.autograd.Function):
    """See :meth:`SlicedLinearChain.losses`."""

    @staticmethod
    def forward(ctx, chain: SlicedLinearChain, plan: _Plan, loss_fn, x, y, *flat_params):
        ctx.set_materialize_grads(False)  # the logits take no gradient: no zeros for them
        if chain.flatten:
            x = x.flatten(1)
        params = chain._params(flat_params)
        fast = _is_cross_entropy(loss_fn, y)
        ext = cpu_extension.load() if x.device.type == "cpu" else None
        s_all, batch = plan.samples, x.shape[0]
        # plain cross-entropy works on the transposed outputs: log-softmax over a short
        # leading dimension is several times faster than over a short last one
        if ext is not None:  # compiled (cpu_extension.py)
            kp = plan if isinstance(plan, _KernelPlan) else _KernelPlan.from_plan(plan)
            weights, biases = [w for w, _ in params], [b for _, b in params]
            out, hs, blocks, stacked = ext.chain_forward(
                x, weights, biases, kp.cols, kp.masks, kp.shared_off, kp.extra, fast)
            inputs = list(zip(hs, blocks))
            ctx.kernel_args = kp, weights, biases
        else:
            out, inputs, stacked = chain._forward(x, plan, params, transpose_out=fast)
        if fast and ext is not None:
            values, ctx.g_ce, fast = ext.ce_forward(out, y, s_all, stacked)
            if fast:
                logits = out[:, -batch:].t()
            else:  # a label out of range, e.g. ignore_index -100: F.cross_entropy knows
                out = out.t()
        elif fast:
            ys = torch.cat([y] * s_all) if stacked else y
            logp = F.log_softmax(out, 0)
            try:
                picked_index = ys.unsqueeze(0)
                picked = logp.gather(0, picked_index)
            except (RuntimeError, IndexError):  # a label out of range, e.g. ignore_index
                fast, out = False, out.t()      # -100: F.cross_entropy knows what to do
            if fast:
                nll = picked.view(-1, batch).sum(1).mul_(-1.0 / batch)
                values = nll if stacked else nll.repeat(s_all)
                ctx.logp, ctx.y_row = logp[:, -batch:], picked_index[:, -batch:]
                logits = out[:, -batch:].t()
        if not fast:
            ys = torch.cat([y] * s_all) if stacked else y
            with torch.enable_grad():  # the loss's own graph, for its gradient in backward
                ctx.leaf = out.detach().requires_grad_()
                per = loss_fn(ctx.leaf, ys, reduction="none").view(-1, batch).mean(1)
                ctx.last_loss = per[-1]
            values = per.detach() if stacked else per.detach().repeat(s_all)
            logits = out[-batch:]
        ctx.fast_ce, ctx.ext = fast, ext
        ctx.chain, ctx.plan, ctx.x, ctx.inputs, ctx.params = chain, plan, x, inputs, params
        ctx.mark_non_differentiable(logits)
        return values, logits

    @staticmethod
    def backward(ctx, grad_values, _grad_logits):
        chain, plan, params = ctx.chain, ctx.plan, ctx.params
        need = ctx.needs_input_grad[5:]
        grads: list[torch.Tensor | None] = [None] * len(need)
        if grad_values is not None and any(need):
            transposed, ext = ctx.fast_ce, ctx.ext
            batch = ctx.x.shape[0]
            factor = None  # the compiled kernel scales ce_forward's gradient itself
            if not transposed:
                (g,) = torch.autograd.grad(ctx.last_loss, ctx.leaf, grad_values.sum())
                g = g[-batch:]
            elif ext is not None:  # ce_forward's softmax - onehot, times the sum of grads / B
                g = ctx.g_ce
                factor = grad_values, _ce_constants(grad_values.shape[0], batch, g.dtype)[1]
            else:  # d mean CE / d logits = (softmax - onehot) / B, transposed
                g = ctx.logp.exp()
                minus_one, scale = _ce_constants(grad_values.shape[0], batch, g.dtype)
                g.scatter_add_(0, ctx.y_row, minus_one)
                g = g.mul_(torch.dot(grad_values, scale))  # sum of the gradients / B
            if ext is not None:  # (cpu_extension.py)
                kp, weights, biases = ctx.kernel_args
                out_grads = ext.chain_backward(
                    g, *(factor or (None, None)), transposed, weights, biases, kp.cols,
                    [h for h, _ in ctx.inputs], [wb for _, wb in ctx.inputs], kp.first_off,
                    batch)
                per_layer = list(zip(out_grads[::2], out_grads[1::2]))
            else:
                per_layer = chain._backward(g, transposed, batch, plan, params, ctx.inputs)
            flat_grads = []
            for (gw, gb), layer in zip(per_layer, chain.layers):
                flat_grads.append(gw)
                if layer._parameters.get("bias") is not None:
                    flat_grads.append(gb)
            grads = [gr if n else None for gr, n in zip(flat_grads, need)]
        ctx.x = ctx.inputs = ctx.params = ctx.logp = ctx.leaf = ctx.last_loss = None
        ctx.g_ce = ctx.kernel_args = None
        return (None, None, None, None, None, *grads)


_CE_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _ce_constants(samples: int, batch: int, dtype: torch.dtype):
    """``-1`` of shape ``(1, batch)`` and ``1 / batch`` of shape ``(samples,)`` (read only),
    kept between steps: two tensor constructions less in every backward pass."""
    key = (samples, batch, dtype)
    if key not in _CE_CONSTANTS:
        if len(_CE_CONSTANTS) > 64:
            _CE_CONSTANTS.clear()
        _CE_CONSTANTS[key] = (torch.full((1, batch), -1.0, dtype=dtype),
                              torch.full((samples,), 1.0 / batch, dtype=dtype))
    return _CE_CONSTANTS[key]
