"""Export a pruned (gated) network as a genuinely smaller dense model that reloads anywhere.

:func:`export` turns a :class:`~applications.sparsify.network.GatedNetwork` (or the module
it wraps, or a plain network) into a :class:`ExportedModel`: a plain ``torch.nn.Module`` with
no gates whose layers hold only the units that still matter, and a JSON-able ``spec`` from
which :func:`build_from_spec` rebuilds the same module without the gated model, so that
``load_state_dict`` works in a fresh process (:func:`save_exported` / :func:`load_exported`).

The exported module computes the eval-mode function of the gated network (test-time gates,
BatchNorm running statistics), up to float rounding.

How a chain is shrunk (``nn.Sequential`` models: the MLP, LeNet-5-Caffe, users' own)
--------------------------------------------------------------------------------------
Test-time gates are folded into the weights first: an :class:`~.layers.L0Linear` input gate
``g`` scales the input columns (``W[:, j] * g_j``), a weight gate scales each weight, an
:class:`~.layers.L0Conv2d` output gate scales the filter and the bias of its channel. Then
two passes over the chain decide which units (features or channels) must be computed:

1. **Constants, forward.** A unit is *constant* when it takes the same value at every
   input and every spatial position: a convolution channel whose gate is 0 outputs exactly 0
   (bias included); a Linear/Conv output whose weights on all non-constant inputs are 0
   equals its bias plus the contribution of constant inputs. The value is pushed through
   BatchNorm (eval: ``(c - mean) / sqrt(var + eps) * gamma + beta``), elementwise
   activations (``relu(c)``), dropout, max/adaptive pooling and Flatten (a channel becomes
   its ``H*W`` columns).
2. **Needed units, backward.** All outputs of the network are needed. An input unit of a
   Linear/Conv is needed when it is not constant and some needed output has a nonzero
   weight on it. Units not needed are removed from the layer that produces them (its
   output rows/channels) and from everything in between (BatchNorm entries).

Removed units that carried a nonzero constant are folded into their consumer exactly:

- Linear consumer: ``bias += W[:, removed] @ c``.
- Convolution without zero padding (``padding=0``, or a padding mode other than
  ``'zeros'``): a constant image gives a constant output, ``bias += sum_j c_j * sum(W[:, j])``.
- Convolution with zero padding: near the borders part of the kernel falls on the padding,
  so the contribution is *not* uniform. The layer becomes a :class:`ConstantChannelConv2d`
  that adds ``conv2d(ones(1, 1, H, W), K)`` with ``K = sum_j c_j W[:, j]`` (one
  single-channel convolution per batch, independent of the batch size): exact for any input
  size.

An average pooling with zero padding counted in the mean makes a nonzero constant
non-uniform: such units are kept (computed) instead of folded. A layer never shrinks to
zero units: when nothing is needed, its first unit is kept with zero weights (zero-width
layers break PyTorch kernels). Unused input features of the network itself are dropped by a leading
:class:`SelectUnits` (the MLP's first-layer input gates).

Wide-ResNet
-----------
In each :class:`~.models.WideBasicBlock` the first convolution's channels with gate 0 are
removed from ``conv1``'s output, from ``bn2`` and from ``conv2``'s input; kept channels carry
their gate in ``conv1``'s filters. A removed channel enters ``conv2`` (3x3, zero padding 1) as
the constant ``relu(beta - gamma * mean / sqrt(var + eps))``, folded exactly by the border
correction above. The residual stream, the stem and the classifier keep their widths.

Anything else (a residual connection in a user's module, grouped convolutions, layers
with parameters export does not know) raises :class:`ExportError` naming the layer.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic_files import atomic_write, write_synced
from .layers import (
    L0Conv2d,
    L0Layer,
    L0Linear,
    SampleBatchNorm1d,
    SampleBatchNorm2d,
    sequence_steps,
)
from .models import WideBasicBlock, WideResNet
from .network import GatedNetwork

SPEC_FORMAT = "binopt-exported"
SPEC_VERSION = 1

__all__ = [
    "ConstantChannelConv2d",
    "ExportError",
    "ExportedModel",
    "PrunedWideBlock",
    "PrunedWideResNet",
    "SelectUnits",
    "build_from_spec",
    "export",
    "load_exported",
    "save_exported",
    "save_exported_file",
    "spec_num_params",
]


class ExportError(ValueError):
    """The network (or one of its layers) cannot be exported as a smaller dense model."""


# ====================================================================== exported modules
class SelectUnits(nn.Module):
    """Keep the units ``index`` of one dimension of the input (unused input features).

    Parameters
    ----------
    in_units : int
        Size of the dimension in the input.
    out_units : int
        Number of units kept.
    dim : int
        ``-1`` for features of a flat input, ``1`` for channels of an image.
    """

    def __init__(self, in_units: int, out_units: int, dim: int = -1) -> None:
        super().__init__()
        self.in_units, self.out_units, self.dim = int(in_units), int(out_units), int(dim)
        self.register_buffer("index", torch.arange(self.out_units, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(self.dim, self.index)

    def extra_repr(self) -> str:
        return f"in_units={self.in_units}, out_units={self.out_units}, dim={self.dim}"


class ConstantChannelConv2d(nn.Conv2d):
    """``nn.Conv2d`` plus the exact contribution of removed constant input channels.

    A removed input channel ``j`` that carried the constant ``c_j`` contributes
    ``c_j * conv2d(ones, W[:, j])`` to the output: uniform in the interior but smaller near
    the borders, where part of the kernel falls on the zero padding. With
    ``K = sum_j c_j W[:, j]`` stored in the buffer ``const_kernel`` (``(out, 1, kh, kw)``),
    the forward adds ``conv2d(ones(1, 1, H, W), K)``, computed once per batch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or self.groups != 1:
            raise ValueError("ConstantChannelConv2d needs zero padding and groups=1")
        kh, kw = self.kernel_size
        self.register_buffer(
            "const_kernel",
            torch.zeros(self.out_channels, 1, kh, kw, dtype=self.weight.dtype,
                        device=self.weight.device),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        ones = x.new_ones((1, 1, x.shape[-2], x.shape[-1]))
        border = F.conv2d(ones, self.const_kernel, None, self.stride, self.padding, self.dilation)
        if x.dim() == 3:  # unbatched input
            border = border[0]
        return out + border


class PrunedWideBlock(nn.Module):
    """Exported pre-activation wide residual block (same forward as ``WideBasicBlock``)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.bn1 = _build_layer(spec["bn1"])
        self.conv1 = _build_layer(spec["conv1"])
        self.bn2 = _build_layer(spec["bn2"])
        p = float(spec.get("dropout", 0.0))
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.conv2 = _build_layer(spec["conv2"])
        self.has_shortcut = spec.get("shortcut") is not None
        self.shortcut = _build_layer(spec["shortcut"]) if self.has_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.has_shortcut else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + shortcut


class PrunedWideResNet(nn.Module):
    """Exported Wide-ResNet: stem, :class:`PrunedWideBlock` s, BN-ReLU, global pool, fc."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.conv1 = _build_layer(spec["stem"])
        self.blocks = nn.Sequential(*[PrunedWideBlock(b) for b in spec["blocks"]])
        self.bn = _build_layer(spec["bn"])
        self.fc = _build_layer(spec["fc"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv1(x))
        out = torch.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


# ====================================================================== results
@dataclass
class ExportedModel:
    """What :func:`export` returns.

    Attributes
    ----------
    module : nn.Module
        The smaller dense network (eval mode), on the device and dtype of the source.
    spec : dict
        JSON-able architecture: ``{"format", "version", "kind": "sequential" | "wide_resnet",
        "layers"`` (or ``"stem"``, ``"blocks"``, ``"bn"``, ``"fc"``) ``, "input_shape",
        "widths", "num_params", "source_num_params", "dtype"}`` (``dtype``: the source's,
        e.g. ``"float64"``). :func:`build_from_spec` rebuilds ``module`` from it.
    max_abs_diff : float or None
        Largest difference between the exported and the gated model's eval outputs on a
        random batch, when :func:`export` could check it (``input_shape`` known).
    """

    module: nn.Module
    spec: dict
    max_abs_diff: float | None = None

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The exported module's state dict."""
        return self.module.state_dict()


# ====================================================================== layer specs
_ACTIVATIONS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "ReLU": (nn.ReLU, ()),
    "ReLU6": (nn.ReLU6, ()),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope",)),
    "ELU": (nn.ELU, ("alpha",)),
    "GELU": (nn.GELU, ("approximate",)),
    "SiLU": (nn.SiLU, ()),
    "Tanh": (nn.Tanh, ()),
    "Sigmoid": (nn.Sigmoid, ()),
    "Hardtanh": (nn.Hardtanh, ("min_val", "max_val")),
    "Softplus": (nn.Softplus, ("beta", "threshold")),
    "Identity": (nn.Identity, ()),
}
_DROPOUTS: dict[str, type[nn.Module]] = {
    "Dropout": nn.Dropout,
    "Dropout1d": nn.Dropout1d,
    "Dropout2d": nn.Dropout2d,
}


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def _conv_spec(conv: nn.Conv2d, in_ch: int, out_ch: int, bias: bool, correction: bool) -> dict:
    padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
    return {
        "type": "conv2d",
        "in_channels": int(in_ch),
        "out_channels": int(out_ch),
        "kernel_size": _pair(conv.kernel_size),
        "stride": _pair(conv.stride),
        "padding": padding,
        "dilation": _pair(conv.dilation),
        "padding_mode": conv.padding_mode,
        "bias": bool(bias),
        "border_correction": bool(correction),
    }


def _linear_spec(in_f: int, out_f: int, bias: bool) -> dict:
    return {"type": "linear", "in_features": int(in_f), "out_features": int(out_f),
            "bias": bool(bias)}


def _bn_spec(bn: nn.modules.batchnorm._BatchNorm, num: int) -> dict:
    return {
        "type": "batchnorm2d" if isinstance(bn, nn.BatchNorm2d) else "batchnorm1d",
        "num_features": int(num),
        "eps": float(bn.eps),
        "momentum": None if bn.momentum is None else float(bn.momentum),
        "affine": bool(bn.affine),
    }


def _build_layer(s: dict[str, Any]) -> nn.Module:
    """One plain layer from its spec entry."""
    t = s["type"]
    if t == "linear":
        return nn.Linear(s["in_features"], s["out_features"], bias=s["bias"])
    if t == "conv2d":
        cls = ConstantChannelConv2d if s.get("border_correction") else nn.Conv2d
        padding = s["padding"] if isinstance(s["padding"], str) else tuple(s["padding"])
        return cls(
            s["in_channels"], s["out_channels"], tuple(s["kernel_size"]),
            stride=tuple(s["stride"]), padding=padding, dilation=tuple(s["dilation"]),
            bias=s["bias"], padding_mode=s.get("padding_mode", "zeros"),
        )
    if t in ("batchnorm1d", "batchnorm2d"):
        cls = nn.BatchNorm2d if t == "batchnorm2d" else nn.BatchNorm1d
        return cls(s["num_features"], eps=s["eps"], momentum=s["momentum"], affine=s["affine"])
    if t == "activation":
        cls, _ = _ACTIVATIONS[s["name"]]
        return cls(**s.get("options", {}))
    if t == "dropout":
        return _DROPOUTS[s.get("name", "Dropout")](p=s["p"])
    if t == "maxpool2d":
        return nn.MaxPool2d(tuple(s["kernel_size"]), tuple(s["stride"]), tuple(s["padding"]),
                            tuple(s["dilation"]), ceil_mode=s["ceil_mode"])
    if t == "avgpool2d":
        return nn.AvgPool2d(tuple(s["kernel_size"]), tuple(s["stride"]), tuple(s["padding"]),
                            ceil_mode=s["ceil_mode"], count_include_pad=s["count_include_pad"],
                            divisor_override=s["divisor_override"])
    if t == "adaptive_avgpool2d":
        return nn.AdaptiveAvgPool2d(_output_size(s["output_size"]))
    if t == "adaptive_maxpool2d":
        return nn.AdaptiveMaxPool2d(_output_size(s["output_size"]))
    if t == "flatten":
        return nn.Flatten(s.get("start_dim", 1), s.get("end_dim", -1))
    if t == "select":
        return SelectUnits(s["in_units"], s["out_units"], s.get("dim", -1))
    raise ExportError(f"unknown layer type {t!r} in export spec")


def _output_size(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(None if t is None else int(t) for t in v)
    return v


def _layer_params(s: dict[str, Any]) -> int:
    t = s["type"]
    if t == "linear":
        return s["in_features"] * s["out_features"] + (s["out_features"] if s["bias"] else 0)
    if t == "conv2d":
        kh, kw = s["kernel_size"]
        return s["out_channels"] * (s["in_channels"] * kh * kw + (1 if s["bias"] else 0))
    if t in ("batchnorm1d", "batchnorm2d"):
        return 2 * s["num_features"] if s["affine"] else 0
    return 0


def spec_num_params(spec: dict[str, Any]) -> int:
    """Parameter count implied by an export spec (kept widths); buffers not counted."""
    if spec["kind"] == "sequential":
        return sum(_layer_params(s) for s in spec["layers"])
    if spec["kind"] == "wide_resnet":
        total = _layer_params(spec["stem"]) + _layer_params(spec["bn"]) + _layer_params(spec["fc"])
        for b in spec["blocks"]:
            total += sum(_layer_params(b[k]) for k in ("bn1", "conv1", "bn2", "conv2"))
            if b.get("shortcut") is not None:
                total += _layer_params(b["shortcut"])
        return total
    raise ExportError(f"unknown export spec kind {spec['kind']!r}")


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild the exported module (fresh parameters) from its spec.

    Parameters
    ----------
    spec : dict
        ``ExportedModel.spec`` (or the parsed ``spec.json``).

    Returns
    -------
    nn.Module
        In eval mode, on the CPU, in the spec's ``dtype`` (float32 for a spec without one,
        written before binopt recorded it); ``load_state_dict`` with the exported state
        dict restores the weights.
    """
    if spec.get("format", SPEC_FORMAT) != SPEC_FORMAT:
        raise ExportError(f"not a binopt export spec (format {spec.get('format')!r})")
    if int(spec.get("version", SPEC_VERSION)) > SPEC_VERSION:
        raise ExportError(
            f"export spec version {spec['version']} is newer than this binopt ({SPEC_VERSION})"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        if spec["kind"] == "sequential":
            module: nn.Module = nn.Sequential(*[_build_layer(s) for s in spec["layers"]])
        elif spec["kind"] == "wide_resnet":
            module = PrunedWideResNet(spec)
        else:
            raise ExportError(f"unknown export spec kind {spec['kind']!r}")
    return module.to(_spec_dtype(spec)).eval()


def _spec_dtype(spec: dict[str, Any]) -> torch.dtype:
    """The floating dtype a spec records (``"float64"``, ...); float32 when it has none."""
    name = spec.get("dtype", "float32")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ExportError(f"export spec dtype must name a floating torch dtype such as "
                          f"'float32' or 'float64'; got {name!r}")
    return dtype


# ====================================================================== analysis of a chain
@dataclass
class _Op:
    name: str
    module: nn.Module
    kind: str  # linear, conv, bn, act, dropout, pool, flatten
    weight: torch.Tensor | None = None  # effective (gate-folded) weight, float64
    bias: torch.Tensor | None = None  # effective bias, float64
    conv: nn.Conv2d | None = None
    source_units: tuple[int, int] | None = None  # original (in, out) widths, for reports

    @property
    def in_count(self) -> int | None:
        if self.kind in ("linear", "conv"):
            return int(self.weight.shape[1])
        if self.kind == "bn":
            return int(self.module.num_features)
        return None


def _gate_values(layer: L0Layer) -> torch.Tensor | None:
    if layer.gate is None:
        return None
    with torch.no_grad():
        return layer.gate.deterministic().detach().to("cpu", torch.float64)


def _layer_name(name: str, m: nn.Module) -> str:
    return f"'{name}' ({type(m).__name__})"


def _unsupported(name: str, m: nn.Module, why: str) -> ExportError:
    return ExportError(
        f"cannot export layer {_layer_name(name, m)}: {why}. Export shrinks nn.Sequential "
        "chains of Linear/L0Linear, Conv2d/L0Conv2d (groups=1), BatchNorm1d/2d, elementwise "
        "activations, dropout, max/avg/adaptive pooling and Flatten, and WideResNet"
    )


def _to_op(name: str, m: nn.Module) -> _Op:
    if isinstance(m, L0Linear) or type(m) is nn.Linear:
        w = m.weight.detach().to("cpu", torch.float64)
        b = None if m.bias is None else m.bias.detach().to("cpu", torch.float64)
        if isinstance(m, L0Linear):
            g = _gate_values(m)
            if g is not None:
                w = w * (g.unsqueeze(0) if m.gate_target == "input" else g.reshape(w.shape))
        return _Op(name, m, "linear", w, b, source_units=(w.shape[1], w.shape[0]))
    if isinstance(m, L0Conv2d) or type(m) is nn.Conv2d:
        conv = m.conv if isinstance(m, L0Conv2d) else m
        if conv.groups != 1:
            raise _unsupported(name, m, f"grouped convolution (groups={conv.groups})")
        w = conv.weight.detach().to("cpu", torch.float64)
        b = None if conv.bias is None else conv.bias.detach().to("cpu", torch.float64)
        if isinstance(m, L0Conv2d):
            g = _gate_values(m)
            if g is not None:
                w = w * g[:, None, None, None]
                b = None if b is None else b * g
        return _Op(name, m, "conv", w, b, conv=conv, source_units=(w.shape[1], w.shape[0]))
    if isinstance(m, L0Layer):
        raise _unsupported(name, m, "unknown gated layer type")
    # to_l0 turns BatchNorm1d/2d into the sample-aware ones; in eval mode they are the same
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, SampleBatchNorm1d, SampleBatchNorm2d):
        if not m.track_running_stats or m.running_mean is None:
            raise _unsupported(name, m, "BatchNorm without running statistics")
        return _Op(name, m, "bn")
    if type(m).__name__ in _ACTIVATIONS and type(m) is _ACTIVATIONS[type(m).__name__][0]:
        return _Op(name, m, "act")
    if type(m).__name__ in _DROPOUTS and type(m) is _DROPOUTS[type(m).__name__]:
        return _Op(name, m, "dropout")
    if type(m) in (nn.MaxPool2d, nn.AdaptiveMaxPool2d):
        if m.return_indices:
            raise _unsupported(name, m, "pooling with return_indices=True")
        return _Op(name, m, "pool")
    if type(m) in (nn.AvgPool2d, nn.AdaptiveAvgPool2d):
        return _Op(name, m, "pool")
    if type(m) is nn.Flatten:
        if m.start_dim != 1 or m.end_dim != -1:
            raise _unsupported(name, m, "only Flatten(start_dim=1, end_dim=-1) is supported")
        return _Op(name, m, "flatten")
    if len(list(m.children())) > 0:
        raise _unsupported(
            name, m, "a container other than nn.Sequential (its forward may not be a chain)"
        )
    if len(list(m.parameters())) > 0 or len(list(m.buffers())) > 0:
        raise _unsupported(name, m, "a layer with parameters or buffers export does not know")
    raise _unsupported(name, m, "a layer export does not know how to shrink")


def _chain(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The layers of ``module`` in call order, nested Sequentials flattened; a module reused
    at several positions is listed (and exported) at each of them."""
    if type(module) is nn.Sequential:
        out: list[tuple[str, nn.Module]] = []
        for child_name, child in sequence_steps(module):
            out += _chain(child, f"{prefix}.{child_name}" if prefix else child_name)
        return out
    return [(prefix or type(module).__name__, module)]


def _zero_padding(conv: nn.Conv2d) -> bool:
    if isinstance(conv.padding, str):
        return conv.padding == "valid" or all(
            d * (k - 1) == 0 for k, d in zip(_pair(conv.kernel_size), _pair(conv.dilation))
        )
    return all(int(p) == 0 for p in _pair(conv.padding))


def _uniform_fold(conv: nn.Conv2d) -> bool:
    """Whether a constant input image gives a constant output image."""
    return _zero_padding(conv) or conv.padding_mode != "zeros"


def _bn_const(bn: nn.modules.batchnorm._BatchNorm, val: torch.Tensor) -> torch.Tensor:
    rm = bn.running_mean.detach().to("cpu", torch.float64)
    rv = bn.running_var.detach().to("cpu", torch.float64)
    out = (val - rm) / torch.sqrt(rv + bn.eps)
    if bn.affine:
        weight = bn.weight.detach().to("cpu", torch.float64)
        out = out * weight + bn.bias.detach().to("cpu", torch.float64)
    return out


def _keep_nonempty(mask: torch.Tensor) -> torch.Tensor:
    if mask.numel() and not bool(mask.any()):
        mask = mask.clone()
        mask[0] = True
    return mask


def _flatten_columns(ops: list[_Op], i: int) -> int | None:
    """Units after the Flatten ``ops[i]``: read from the next layer that declares its input."""
    for op in ops[i + 1 :]:
        if op.in_count is not None:
            return op.in_count
        if op.kind in ("act", "dropout"):
            continue
        return None
    return None


def _export_sequential(
    module: nn.Module, input_shape: Sequence[int] | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    ops = [_to_op(name, m) for name, m in _chain(module)]
    n_pos = len(ops) + 1
    count: list[int | None] = [None] * n_pos
    const: list[torch.Tensor | None] = [None] * n_pos
    val: list[torch.Tensor | None] = [None] * n_pos
    layout: list[str | None] = [None] * n_pos  # "flat" | "spatial" | None (unknown)
    hw: dict[int, int] = {}

    # ---- forward: unit counts and constant units at every position
    for i, op in enumerate(ops):
        need = op.in_count
        if need is not None:
            if count[i] is None:
                count[i] = need
                const[i] = torch.zeros(need, dtype=torch.bool)
                val[i] = torch.zeros(need, dtype=torch.float64)
            elif count[i] != need:
                raise ExportError(
                    f"layer {_layer_name(op.name, op.module)} expects {need} input units but "
                    f"the layers before it give {count[i]}"
                )
        wants = {"linear": "flat", "conv": "spatial", "pool": "spatial"}.get(op.kind)
        if op.kind == "bn":
            wants = "spatial" if isinstance(op.module, nn.BatchNorm2d) else "flat"
        if wants is not None and layout[i] is not None and layout[i] != wants:
            raise _unsupported(op.name, op.module, f"it receives a {layout[i]} activation")
        layout[i + 1] = wants if wants is not None else layout[i]
        c, v = const[i], val[i]
        if op.kind in ("linear", "conv"):
            w = op.weight.flatten(2) if op.kind == "conv" else op.weight.unsqueeze(2)
            nonconst_w = w[:, ~c] if c is not None else w
            out_const = ~(nonconst_w != 0).flatten(1).any(1)
            contrib = torch.einsum("oik,i->ok", w[:, c], v[c])  # (out, kernel positions)
            out_val = contrib.sum(1) + (0.0 if op.bias is None else op.bias)
            if op.kind == "conv" and not _uniform_fold(op.conv):
                out_const &= ~(contrib != 0).any(1)  # not uniform near the borders
            count[i + 1], const[i + 1] = int(w.shape[0]), out_const
            val[i + 1] = torch.where(out_const, out_val, torch.zeros_like(out_val))
            layout[i + 1] = "flat" if op.kind == "linear" else "spatial"
        elif op.kind == "flatten":
            layout[i + 1] = "flat"
            cols = _flatten_columns(ops, i)
            if count[i] is None or cols is None:
                continue  # unknown widths: everything before it is kept
            if cols % count[i] != 0:
                raise ExportError(
                    f"layer {_layer_name(op.name, op.module)}: {count[i]} channels cannot "
                    f"flatten into the {cols} inputs of the next layer"
                )
            hw[i] = cols // count[i]
            count[i + 1] = cols
            const[i + 1] = c.repeat_interleave(hw[i])
            val[i + 1] = v.repeat_interleave(hw[i])
        elif count[i] is not None:  # per-unit ops
            count[i + 1] = count[i]
            new_v = v
            if op.kind == "bn":
                new_v = _bn_const(op.module, v)
            elif op.kind == "act":
                new_v = op.module(v.clone())
            new_c = c
            if isinstance(op.module, nn.AvgPool2d):
                m = op.module
                uniform = (_pair(m.padding) == [0, 0] or not m.count_include_pad) and (
                    m.divisor_override is None
                )
                if not uniform:
                    new_c = c & (v == 0)
            const[i + 1] = new_c
            val[i + 1] = torch.where(new_c, new_v, torch.zeros_like(new_v))

    # ---- backward: which units must be computed. A layer never shrinks to zero units: when
    # nothing is needed, unit 0 is kept as a "don't care" unit (its producer row and its
    # consumer column are zeroed, so its value does not matter and needs no inputs).
    needed: list[torch.Tensor | None] = [None] * n_pos
    dont_care: list[torch.Tensor | None] = [None] * n_pos
    if count[-1] is not None:
        needed[-1] = torch.ones(count[-1], dtype=torch.bool)
        dont_care[-1] = torch.zeros(count[-1], dtype=torch.bool)
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        if op.kind in ("linear", "conv"):
            if needed[i + 1] is None:
                needed[i + 1] = torch.ones(op.weight.shape[0], dtype=torch.bool)
                dont_care[i + 1] = torch.zeros(op.weight.shape[0], dtype=torch.bool)
            rows = needed[i + 1] & ~dont_care[i + 1]
            used = (op.weight[rows] != 0).transpose(0, 1).flatten(1).any(1)
            needed[i] = used & ~const[i]
            dont_care[i] = torch.zeros_like(needed[i])
            if not bool(needed[i].any()):
                needed[i][0] = dont_care[i][0] = True
        elif op.kind == "flatten":
            if count[i] is None:
                continue
            if needed[i + 1] is None or i not in hw:
                needed[i] = torch.ones(count[i], dtype=torch.bool)
                dont_care[i] = torch.zeros(count[i], dtype=torch.bool)
            else:
                per_channel = needed[i + 1].reshape(count[i], hw[i])
                real = (needed[i + 1] & ~dont_care[i + 1]).reshape(count[i], hw[i])
                needed[i] = per_channel.any(1)
                dont_care[i] = needed[i] & ~real.any(1)
        else:
            if needed[i + 1] is None and count[i] is not None:
                needed[i + 1] = torch.ones(count[i], dtype=torch.bool)
                dont_care[i + 1] = torch.zeros(count[i], dtype=torch.bool)
            needed[i], dont_care[i] = needed[i + 1], dont_care[i + 1]

    # ---- build the spec and the state dict
    layers: list[dict[str, Any]] = []
    tensors: list[dict[str, torch.Tensor]] = []
    widths: list[dict[str, Any]] = []
    first_known = next((i for i in range(n_pos) if count[i] is not None), None)
    for i, op in enumerate(ops):
        if i == first_known and needed[i] is not None and not bool(needed[i].all()):
            idx = needed[i].nonzero().flatten()
            dim = 1 if layout[i + 1] == "spatial" or op.kind == "conv" else -1
            layers.append({"type": "select", "in_units": int(count[i]),
                           "out_units": int(idx.numel()), "dim": dim})
            tensors.append({"index": idx})
        spec, params = _export_op(op, const, val, needed, dont_care, i)
        layers.append(spec)
        tensors.append(params)
        if op.kind == "flatten" and i in hw and needed[i + 1] is not None:
            # the kept channels bring all their H*W columns; keep only the columns used
            present = needed[i].repeat_interleave(hw[i])
            if not bool((present == needed[i + 1]).all()):
                idx = (present.cumsum(0) - 1)[needed[i + 1]]
                layers.append({"type": "select", "in_units": int(present.sum()),
                               "out_units": int(idx.numel()), "dim": -1})
                tensors.append({"index": idx})
        if op.kind in ("linear", "conv"):
            key = ("in_features", "out_features") if op.kind == "linear" else (
                "in_channels", "out_channels")
            widths.append({
                "layer": op.name,
                "type": type(op.module).__name__,
                "in": [spec[key[0]], op.source_units[0]],
                "out": [spec[key[1]], op.source_units[1]],
            })
    state = {f"{j}.{k}": t for j, params in enumerate(tensors) for k, t in params.items()}
    spec = {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "kind": "sequential",
        "layers": layers,
        "input_shape": _infer_input_shape(ops, input_shape),
        "widths": widths,
    }
    return spec, state


def _infer_input_shape(ops: list[_Op], input_shape: Sequence[int] | None) -> list[int] | None:
    if input_shape is not None:
        return [int(s) for s in input_shape]
    for op in ops:
        if op.kind == "linear":
            return [int(op.weight.shape[1])]
        if op.kind not in ("act", "dropout", "flatten"):
            return None
    return None


def _export_op(
    op: _Op,
    const: list[torch.Tensor | None],
    val: list[torch.Tensor | None],
    needed: list[torch.Tensor | None],
    dont_care: list[torch.Tensor | None],
    i: int,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    m = op.module
    if op.kind in ("linear", "conv"):
        rows, cols = needed[i + 1], needed[i]
        row_dc, col_dc = dont_care[i + 1][rows], dont_care[i][cols]
        fold = const[i] & (~cols | dont_care[i])  # removed or "don't care" constants
        w = op.weight[rows].clone()
        w[row_dc] = 0.0
        kept_w = w[:, cols].clone()
        kept_w[:, col_dc] = 0.0
        b = None if op.bias is None else op.bias[rows].clone()
        if b is not None:
            b[row_dc] = 0.0
        extra = torch.einsum("oi...,i->o...", w[:, fold], val[i][fold])  # (out,) or (out,kh,kw)
        correction = None
        has_extra = bool((extra != 0).any())
        if op.kind == "conv" and has_extra and not _uniform_fold(op.conv):
            correction = extra.unsqueeze(1)
        elif has_extra:
            extra = extra.sum((1, 2)) if op.kind == "conv" else extra
            b = extra if b is None else b + extra
        params: dict[str, torch.Tensor] = {"weight": kept_w}
        if b is not None:
            params["bias"] = b
        if correction is not None:
            params["const_kernel"] = correction
        if op.kind == "linear":
            spec = _linear_spec(kept_w.shape[1], kept_w.shape[0], b is not None)
        else:
            spec = _conv_spec(op.conv, kept_w.shape[1], kept_w.shape[0], b is not None,
                              correction is not None)
        return spec, params
    if op.kind == "bn":
        keep = needed[i]
        spec = _bn_spec(m, int(keep.sum()))
        params = {
            "running_mean": m.running_mean.detach().cpu()[keep],
            "running_var": m.running_var.detach().cpu()[keep],
            "num_batches_tracked": m.num_batches_tracked.detach().cpu().clone(),
        }
        if m.affine:
            params["weight"] = m.weight.detach().cpu()[keep]
            params["bias"] = m.bias.detach().cpu()[keep]
        return spec, params
    if op.kind == "act":
        name = type(m).__name__
        options = {a: getattr(m, a) for a in _ACTIVATIONS[name][1]}
        return {"type": "activation", "name": name, "options": options}, {}
    if op.kind == "dropout":
        return {"type": "dropout", "name": type(m).__name__, "p": float(m.p)}, {}
    if op.kind == "flatten":
        return {"type": "flatten", "start_dim": 1, "end_dim": -1}, {}
    if isinstance(m, nn.MaxPool2d):
        return {"type": "maxpool2d", "kernel_size": _pair(m.kernel_size),
                "stride": _pair(m.stride), "padding": _pair(m.padding),
                "dilation": _pair(m.dilation), "ceil_mode": bool(m.ceil_mode)}, {}
    if isinstance(m, nn.AvgPool2d):
        return {"type": "avgpool2d", "kernel_size": _pair(m.kernel_size),
                "stride": _pair(m.stride), "padding": _pair(m.padding),
                "ceil_mode": bool(m.ceil_mode), "count_include_pad": bool(m.count_include_pad),
                "divisor_override": m.divisor_override}, {}
    size = m.output_size
    size = list(size) if isinstance(size, (tuple, list)) else size
    kind = "adaptive_avgpool2d" if isinstance(m, nn.AdaptiveAvgPool2d) else "adaptive_maxpool2d"
    return {"type": kind, "output_size": size}, {}


# ====================================================================== Wide-ResNet
def _plain_conv_params(conv: nn.Conv2d) -> dict[str, torch.Tensor]:
    params = {"weight": conv.weight.detach().to("cpu", torch.float64)}
    if conv.bias is not None:
        params["bias"] = conv.bias.detach().to("cpu", torch.float64)
    return params


def _bn_params(bn: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor | None = None) -> dict:
    sl = slice(None) if keep is None else keep
    params = {
        "running_mean": bn.running_mean.detach().cpu()[sl],
        "running_var": bn.running_var.detach().cpu()[sl],
        "num_batches_tracked": bn.num_batches_tracked.detach().cpu().clone(),
    }
    if bn.affine:
        params["weight"] = bn.weight.detach().cpu()[sl]
        params["bias"] = bn.bias.detach().cpu()[sl]
    return params


def _export_wide_resnet(
    wrn: WideResNet, input_shape: Sequence[int] | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    state: dict[str, torch.Tensor] = {}

    def put(prefix: str, params: dict[str, torch.Tensor]) -> None:
        for k, t in params.items():
            state[f"{prefix}.{k}"] = t

    for name, bn in (("bn", wrn.bn),):
        if not bn.track_running_stats or bn.running_mean is None:
            raise _unsupported(name, bn, "BatchNorm without running statistics")
    stem = wrn.conv1
    put("conv1", _plain_conv_params(stem))
    blocks: list[dict[str, Any]] = []
    widths: list[dict[str, Any]] = []
    for bi, block in enumerate(wrn.blocks):
        name = f"blocks.{bi}"
        if not isinstance(block, WideBasicBlock):
            raise _unsupported(name, block, "WideResNet blocks must be WideBasicBlock")
        for bn_name in ("bn1", "bn2"):
            bn = getattr(block, bn_name)
            if not bn.track_running_stats or bn.running_mean is None:
                raise _unsupported(f"{name}.{bn_name}", bn, "BatchNorm without running statistics")
        c1 = block.conv1.conv if isinstance(block.conv1, L0Conv2d) else block.conv1
        if c1.groups != 1 or block.conv2.groups != 1:
            raise _unsupported(name, block, "grouped convolution")
        w1 = c1.weight.detach().to("cpu", torch.float64)
        b1 = None if c1.bias is None else c1.bias.detach().to("cpu", torch.float64)
        g = _gate_values(block.conv1) if isinstance(block.conv1, L0Layer) else None
        if g is None:
            g = torch.ones(w1.shape[0], dtype=torch.float64)
        w1 = w1 * g[:, None, None, None]
        b1 = None if b1 is None else b1 * g
        keep = _keep_nonempty(g != 0)
        removed = ~keep
        # a removed channel is 0 after conv1, then relu(bn2(0)); dropout is the identity in eval
        zero_out = torch.zeros(w1.shape[0], dtype=torch.float64)
        r = torch.relu(_bn_const(block.bn2, zero_out))
        c2 = block.conv2
        w2 = c2.weight.detach().to("cpu", torch.float64)
        extra = torch.einsum("oihw,i->ohw", w2[:, removed], r[removed])
        correction = bool((extra != 0).any()) and not _uniform_fold(c2)
        b2 = None if c2.bias is None else c2.bias.detach().to("cpu", torch.float64)
        if bool((extra != 0).any()) and not correction:
            b2 = extra.sum((1, 2)) + (0.0 if b2 is None else b2)
        n_keep = int(keep.sum())
        conv1_params = {"weight": w1[keep]}
        if b1 is not None:
            conv1_params["bias"] = b1[keep]
        conv2_params = {"weight": w2[:, keep]}
        if b2 is not None:
            conv2_params["bias"] = b2
        if correction:
            conv2_params["const_kernel"] = extra.unsqueeze(1)
        has_shortcut = not isinstance(block.shortcut, nn.Identity)
        dropout = float(block.dropout.p) if isinstance(block.dropout, nn.Dropout) else 0.0
        bspec = {
            "bn1": _bn_spec(block.bn1, block.bn1.num_features),
            "conv1": _conv_spec(c1, c1.in_channels, n_keep, b1 is not None, False),
            "bn2": _bn_spec(block.bn2, n_keep),
            "dropout": dropout,
            "conv2": _conv_spec(c2, n_keep, c2.out_channels, b2 is not None, correction),
            "shortcut": _conv_spec(block.shortcut, block.shortcut.in_channels,
                                   block.shortcut.out_channels, block.shortcut.bias is not None,
                                   False) if has_shortcut else None,
        }
        blocks.append(bspec)
        put(f"blocks.{bi}.bn1", _bn_params(block.bn1))
        put(f"blocks.{bi}.conv1", conv1_params)
        put(f"blocks.{bi}.bn2", _bn_params(block.bn2, keep))
        put(f"blocks.{bi}.conv2", conv2_params)
        if has_shortcut:
            put(f"blocks.{bi}.shortcut", _plain_conv_params(block.shortcut))
        widths.append({"layer": f"{name}.conv1", "type": type(block.conv1).__name__,
                       "in": [c1.in_channels, c1.in_channels], "out": [n_keep, w1.shape[0]]})
    put("bn", _bn_params(wrn.bn))
    fc_params = {"weight": wrn.fc.weight.detach().to("cpu", torch.float64)}
    if wrn.fc.bias is not None:
        fc_params["bias"] = wrn.fc.bias.detach().to("cpu", torch.float64)
    put("fc", fc_params)
    spec = {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "kind": "wide_resnet",
        "stem": _conv_spec(stem, stem.in_channels, stem.out_channels, stem.bias is not None,
                           False),
        "blocks": blocks,
        "bn": _bn_spec(wrn.bn, wrn.bn.num_features),
        "fc": _linear_spec(wrn.fc.in_features, wrn.fc.out_features, wrn.fc.bias is not None),
        "input_shape": None if input_shape is None else [int(s) for s in input_shape],
        "widths": widths,
    }
    return spec, state


# ====================================================================== public API
def _reference(net: nn.Module) -> tuple[nn.Module, torch.dtype, torch.device]:
    module = net.module if isinstance(net, GatedNetwork) else net
    first = next(iter(module.parameters()), None)
    if first is None:
        raise ExportError(f"{type(module).__name__} has no parameters: nothing to export")
    return module, first.dtype, first.device


@torch.no_grad()
def export(
    net: GatedNetwork | nn.Module,
    input_shape: Sequence[int] | None = None,
    verify: bool = True,
) -> ExportedModel:
    """Export a gated network as a smaller dense model with the test-time gates folded in.

    Parameters
    ----------
    net : GatedNetwork or nn.Module
        The trained network (a :class:`GatedNetwork`, the module it wraps, or a plain
        network). It is not modified. Supported: ``nn.Sequential`` chains (MLP,
        LeNet-5-Caffe, users' own; nested Sequentials are flattened) and
        :class:`~.models.WideResNet`.
    input_shape : sequence of int, optional
        Shape of one example (without the batch dimension); recorded in the spec and used
        to check the export. Inferred for chains whose first weight layer is Linear.
    verify : bool
        Compare the exported and the gated model's eval outputs on a random batch of 4
        (needs the input shape) and raise :class:`ExportError` on a mismatch.

    Returns
    -------
    ExportedModel
        ``module`` (eval mode, source device and dtype) and its JSON-able ``spec``.

    Raises
    ------
    ExportError
        A layer or structure that cannot be shrunk (the message names the layer).
    """
    module, dtype, device = _reference(net)
    if isinstance(module, WideResNet):
        spec, state = _export_wide_resnet(module, input_shape)
    else:
        spec, state = _export_sequential(module, input_shape)
    spec["num_params"] = spec_num_params(spec)
    spec["source_num_params"] = _count_source_params(module)
    spec["dtype"] = str(dtype).removeprefix("torch.")  # load_exported rebuilds in it
    exported = build_from_spec(spec).to(device=device)
    state = {
        k: (t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device))
        for k, t in state.items()
    }
    exported.load_state_dict(state, strict=True)
    exported.eval()
    result = ExportedModel(exported, spec)
    if verify and spec["input_shape"] is not None:
        result.max_abs_diff = _verify(net, exported, spec["input_shape"], dtype, device)
    return result


def _count_source_params(module: nn.Module) -> int:
    from .flops import count_params

    return count_params(module)


def _verify(net: nn.Module, exported: nn.Module, input_shape: Sequence[int],
            dtype: torch.dtype, device: torch.device) -> float:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((4, *input_shape), generator=gen, dtype=torch.float64).to(device, dtype)
    modes = [(m, m.training) for m in net.modules()]
    try:
        net.eval()
        ref = net(x)
    finally:
        for m, mode in modes:
            m.training = mode
    out = exported(x)
    diff = float((out - ref).abs().max()) if out.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    tol = (1e-4 if dtype in (torch.float32, torch.float64) else 1e-2) * max(1.0, scale)
    if not diff <= tol:
        raise ExportError(
            f"the exported model differs from the gated model by {diff:.3g} (> {tol:.3g}) on a "
            "random batch; the network probably has a structure export does not model"
        )
    return diff


def _to_cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


_FOLDER_FILES = ("spec.json", "state_dict.pt")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns ``False`` where that is not available (other systems, old C libraries, file
    systems without the flag); the caller then falls back to two renames.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _replace_folder(new: Path, folder: Path) -> Path | None:
    """Move the complete folder ``new`` to ``folder``; return where the previous one went."""
    try:
        os.rename(new, folder)  # folder missing or empty: one atomic rename
        return None
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if _exchange(new, folder):
        return new  # now holds the previous export
    # two renames: a reader may briefly find no folder, never a mix of two exports
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    os.rename(folder, old)
    os.rename(new, folder)
    return old


def save_exported(exported: ExportedModel, folder: str | Path) -> None:
    """Write ``folder/spec.json`` and ``folder/state_dict.pt`` (CPU tensors), atomically.

    Both files are written to a hidden folder next to ``folder``, which then replaces
    ``folder`` (on Linux in one atomic exchange), so that a reader, or a kill at any moment,
    sees the previous export or the new one, never the spec of one with the weights of the
    other. A kill can leave a hidden ``.NAME.tmp-PID`` folder behind. Reload with
    :func:`load_exported` (no binopt model code or gated checkpoint needed beyond
    ``applications.sparsify.export``).

    Parameters
    ----------
    exported : ExportedModel
        What :func:`export` returned.
    folder : str or Path
        A new or empty folder, or one holding an earlier export (nothing else: the whole
        folder is replaced).

    Raises
    ------
    NotADirectoryError
        ``folder`` is an existing file.
    FileExistsError
        ``folder`` holds files other than ``spec.json`` and ``state_dict.pt``.
    OSError
        The folder cannot be written.
    """
    folder = Path(folder)
    if folder.is_symlink():  # replace the folder it points to, not the link
        folder = folder.resolve()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "expected a folder for spec.json and "
                                 "state_dict.pt, found a file", str(folder))
    if folder.is_dir():
        other = sorted(set(os.listdir(folder)) - set(_FOLDER_FILES))
        if other:
            shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
            raise FileExistsError(
                errno.EEXIST, f"the folder holds files other than an export ({shown}); "
                "expected a new or empty folder or one holding only spec.json and "
                "state_dict.pt, since the whole folder is replaced", str(folder))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = None
    try:
        if tmp.exists():  # left by an earlier, killed process with the same id
            shutil.rmtree(tmp)
        tmp.mkdir()
        text = (json.dumps(exported.spec, indent=2) + "\n").encode()
        write_synced(tmp / "spec.json", lambda fh: fh.write(text))
        state = _to_cpu_state(exported.module)
        write_synced(tmp / "state_dict.pt", lambda fh: torch.save(state, fh))
        if folder.is_dir():  # the new folder keeps the permissions of the one it replaces
            shutil.copymode(folder, tmp)
        old = _replace_folder(tmp, folder)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def save_exported_file(exported: ExportedModel, path: str | Path) -> None:
    """Write one file holding ``{"spec": spec, "state_dict": state_dict}`` (CPU tensors).

    The file is written under a temporary name in the same folder and renamed into place
    (``os.replace``): a kill leaves the previous file or the new one, never a truncated one.

    Raises
    ------
    OSError
        The file cannot be written (for instance ``path`` is an existing folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"spec": exported.spec, "state_dict": _to_cpu_state(exported.module)}
    atomic_write(path, lambda fh: torch.save(blob, fh))


def _read_folder(folder: Path) -> tuple[bytes, bytes]:
    """``spec.json`` and ``state_dict.pt`` of the same export, even while it is replaced."""
    if os.open not in os.supports_dir_fd:  # Windows: no handle on a folder
        return (folder / "spec.json").read_bytes(), (folder / "state_dict.pt").read_bytes()
    for attempt in range(3):
        # both files are opened relative to one handle on the folder: a concurrent
        # save_exported that swaps in a new folder cannot pair the old spec with new weights
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            blobs = []
            for name in _FOLDER_FILES:
                with os.fdopen(os.open(name, os.O_RDONLY, dir_fd=dir_fd), "rb") as fh:
                    blobs.append(fh.read())
            return blobs[0], blobs[1]
        except FileNotFoundError:
            # the folder we opened was replaced and deleted between the two files: retry
            if attempt == 2:
                raise
        finally:
            os.close(dir_fd)
    raise AssertionError("unreachable")  # pragma: no cover


def _torch_load(data: bytes | Path, where: Path, map_location: Any) -> Any:
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:  # empty, truncated, foreign or unsafe pickle
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"cannot read {where}: expected a file written by torch.save (binopt export or "
            f"save_exported); {detail}"
        ) from None


def load_exported(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported model from :func:`save_exported`'s folder or a ``model.pt`` file.

    Parameters
    ----------
    path : str or Path
        A folder with ``spec.json`` and ``state_dict.pt``, or a file written by
        :func:`save_exported_file` / ``binopt export``.
    map_location : str or torch.device
        Where to put the weights.

    Returns
    -------
    nn.Module
        The exported module with its weights, in eval mode, in the dtype of the network it
        was exported from (the spec's ``dtype``; float32 for specs without one).

    Raises
    ------
    FileNotFoundError
        Nothing at ``path``, or a folder without ``spec.json`` and ``state_dict.pt``.
    ExportError
        A file that is not an export (empty, truncated, not written by ``torch.save``,
        another object), an invalid spec, or weights that do not match the spec.
    """
    path = Path(path)
    if path.is_dir():
        try:
            spec_bytes, state_bytes = _read_folder(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} holds no spec.json and state_dict.pt") from None
        try:
            spec = json.loads(spec_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExportError(f"cannot read {path / 'spec.json'}: expected the JSON spec of "
                              f"an export; {exc}") from None
        state = _torch_load(state_bytes, path / "state_dict.pt", map_location)
    elif path.is_file():
        blob = _torch_load(path, path, map_location)
        if not isinstance(blob, dict) or "spec" not in blob or "state_dict" not in blob:
            raise ExportError(f"{path} is not an exported model (no 'spec' and 'state_dict')")
        spec, state = blob["spec"], blob["state_dict"]
    else:
        raise FileNotFoundError(f"no exported model at {path}")
    if not isinstance(spec, dict) or not isinstance(state, dict):
        raise ExportError(f"{path} is not an exported model: expected a spec dict and a "
                          f"state dict, got {type(spec).__name__} and {type(state).__name__}")
    try:
        module = build_from_spec(spec)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ExportError):
            raise
        raise ExportError(f"{path} holds an invalid export spec ({type(exc).__name__}: "
                          f"{exc})") from None
    module.to(map_location)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [s.strip() for s in str(exc).strip().splitlines() if s.strip()]
        raise ExportError(f"{path}: the weights do not match the spec: "
                          f"{lines[-1] if lines else exc}") from None
    return module.eval()
