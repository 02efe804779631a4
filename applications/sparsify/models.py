"""Reference architectures with L0 gates, and a converter for a user's own network.

- :func:`mlp`: 784-300-100-10 with gates on the input neurons of each layer.
- :func:`lenet5_caffe`: conv 20 and 50 channels (gates on output channels), FC 800-500-10
  (gates on inputs).
- :class:`WideResNet`: WRN-depth-width; gates on the output channels of the FIRST
  convolution of each residual block (as in L0-ARM / Louizos et al.).
- :func:`to_l0`: replace ``nn.Linear`` / ``nn.Conv2d`` / ``nn.BatchNorm1d`` / ``nn.BatchNorm2d``
  of any module by their gated (or sample-aware) counterparts, which take over the weights
  (ties included); layers whose behaviour an L0 layer would not reproduce stay as they are.

MLP and LeNet-5 are plain ``nn.Sequential`` chains, so the same export code serves them and
users' own Sequential models.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from .layers import L0Conv2d, L0Linear, SampleBatchNorm1d, SampleBatchNorm2d


def mlp(
    sizes: Sequence[int] = (784, 300, 100, 10),
    gated: bool = True,
    init_drop_rate: float | Sequence[float] | None = None,
    **gate_options,
) -> nn.Sequential:
    """MLP (default 784-300-100-10) with L0 gates on the input neurons of every layer.

    Parameters
    ----------
    sizes : sequence of int
        Layer widths, input first.
    gated : bool
        ``False`` builds the dense baseline with the same layers.
    init_drop_rate : float or sequence
        Per layer (the reference uses 0.2 for the first layer, 0.5 elsewhere).
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must list at least two positive widths; got {sizes}")
    if init_drop_rate is None:  # the reference: 0.2 on the input layer, 0.5 elsewhere
        init_drop_rate = (0.2,) + (0.5,) * (len(sizes) - 2)
    drops = _per_layer(init_drop_rate, len(sizes) - 1, "init_drop_rate")
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(
            L0Linear(n_in, n_out, gated=gated, init_drop_rate=drops[i], **gate_options)
        )
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def lenet5_caffe(
    in_channels: int = 1,
    num_classes: int = 10,
    input_size: int = 28,
    gated: bool = True,
    init_drop_rate: float | Sequence[float] = 0.5,
    **gate_options,
) -> nn.Sequential:
    """LeNet-5-Caffe: conv(20, 5x5)-pool-conv(50, 5x5)-pool-FC 800-500-classes."""
    drops = _per_layer(init_drop_rate, 4, "init_drop_rate")
    side = ((input_size - 4) // 2 - 4) // 2
    flat = 50 * side * side
    return nn.Sequential(
        L0Conv2d(in_channels, 20, 5, gated=gated, init_drop_rate=drops[0], **gate_options),
        nn.ReLU(),
        nn.MaxPool2d(2),
        L0Conv2d(20, 50, 5, gated=gated, init_drop_rate=drops[1], **gate_options),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        L0Linear(flat, 500, gated=gated, init_drop_rate=drops[2], **gate_options),
        nn.ReLU(),
        L0Linear(500, num_classes, gated=gated, init_drop_rate=drops[3], **gate_options),
    )


class WideBasicBlock(nn.Module):
    """Pre-activation wide residual block; the first convolution is gated."""

    def __init__(
        self, in_planes: int, planes: int, stride: int, dropout: float, gated: bool, **gate_options
    ) -> None:
        super().__init__()
        self.bn1 = SampleBatchNorm2d(in_planes)
        self.conv1 = L0Conv2d(in_planes, planes, 3, 1, 1, bias=False, gated=gated, **gate_options)
        self.bn2 = SampleBatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """Wide residual network WRN-``depth``-``width`` (Zagoruyko & Komodakis, 2016).

    Parameters
    ----------
    depth : int
        ``6n + 4`` (28 for the reference WRN-28-10).
    width : int
        Widening factor ``k``.
    num_classes : int
    dropout : float
    gated : bool
        Gates on the first convolution of every block when ``True``.
    """

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_classes: int = 10,
        dropout: float = 0.0,
        in_channels: int = 3,
        gated: bool = True,
        init_drop_rate: float = 0.3,
        **gate_options,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1; got {depth}")
        if width < 1:
            raise ValueError(f"WideResNet width must be >= 1; got {width}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.depth, self.width = depth, width
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        in_planes = widths[0]
        for stage, planes in enumerate(widths[1:]):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(
                    WideBasicBlock(
                        in_planes, planes, stride, dropout, gated,
                        init_drop_rate=init_drop_rate, **gate_options,
                    )
                )
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = SampleBatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv1(x))
        out = torch.relu(self.bn(out))
        out = torch.nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


#: BatchNorm classes :func:`to_l0` replaces, and their sample-aware counterparts.
_SAMPLE_BATCHNORM: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: SampleBatchNorm1d,
    nn.BatchNorm2d: SampleBatchNorm2d,
}

#: Modules whose forward reads the weights of their Linear layers instead of calling them,
#: so that gates on those layers would have no effect: :func:`to_l0` keeps them whole.
#: ``nn.MultiheadAttention`` always passes ``out_proj.weight`` to a functional kernel;
#: ``nn.TransformerEncoderLayer`` does so for ``linear1`` / ``linear2`` too in its
#: inference fast path (eval mode without autograd).
KEPT_WHOLE: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def _reproducible(m: nn.Module, base: type[nn.Module], methods: tuple[str, ...]) -> bool:
    """Whether an L0 layer computes what ``m`` (an instance of ``base``) computes.

    Not so for a subclass that overrides one of ``methods`` (its own ``forward``), a
    parametrized layer (``torch.nn.utils.parametrize``: the weight is computed, e.g. weight
    normalisation) or one with forward hooks (the old hook-based ``weight_norm`` and
    ``spectral_norm``): a copy into an L0 layer would silently drop that behaviour.
    """
    cls = type(m)
    if any(getattr(cls, name) is not getattr(base, name) for name in methods):
        return False
    if torch.nn.utils.parametrize.is_parametrized(m):
        return False
    if m._forward_hooks or m._forward_pre_hooks:
        return False
    return isinstance(m.weight, nn.Parameter)


def to_l0(module: nn.Module, gate_linear: bool = True, gate_conv: bool = True, **gate_options):
    """Return a copy of ``module`` whose Linear/Conv2d/BatchNorm layers are the L0 ones.

    ``nn.Linear`` becomes :class:`L0Linear` (gates on inputs), ``nn.Conv2d`` (groups=1,
    dilation=1) becomes :class:`L0Conv2d` (gates on output channels), ``nn.BatchNorm1d`` /
    ``nn.BatchNorm2d`` become :class:`SampleBatchNorm1d` / :class:`SampleBatchNorm2d`
    (batch statistics per stacked gate sample). The new layers take over the layers'
    parameters (of the copy), so weights tied between layers (a language model's
    embedding and output layer) stay tied, and a layer used at several places stays one
    layer (one set of gates). Every new layer, its gate parameters included, takes the
    device and floating dtype of the layer it replaces, so a float64 or CUDA model stays
    one, and its train/eval mode.

    Anything else is kept as it is, and so are, ungated: layers whose forward an L0 layer
    would not reproduce (a subclass of ``nn.Linear`` / ``nn.Conv2d`` with its own
    ``forward``, a parametrized layer such as ``weight_norm``, a layer with forward hooks),
    subclasses of the BatchNorm classes, and the modules of :data:`KEPT_WHOLE`
    (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``), which read their Linear
    layers' weights without calling them, so that gates there would have no effect.

    Parameters
    ----------
    module : nn.Module
        The network to convert; it is deep-copied and left untouched.
    gate_linear, gate_conv : bool
        Whether the new Linear / Conv2d layers get gates (``False``: dense L0 layers).
    **gate_options
        Passed to :class:`~applications.sparsify.layers.L0Gate`.

    Returns
    -------
    nn.Module
        The converted copy.

    Raises
    ------
    TypeError
        ``module`` is not an ``nn.Module``.
    ValueError
        A ``nn.Conv2d`` with ``groups != 1``, ``dilation != 1`` or a padding mode other
        than ``'zeros'``, or a lazy layer (``nn.LazyLinear``, ...) whose parameters are not
        initialised yet; the message names the layer.
    """
    import copy

    if not isinstance(module, nn.Module):
        raise TypeError(f"to_l0 expects an nn.Module; got {type(module).__name__}")
    module = copy.deepcopy(module)
    done: dict[int, nn.Module] = {}  # a module reused at several places is converted once

    def where(name: str, m: nn.Module) -> str:
        return f"layer {name or '(the model itself)'!r} ({type(m).__name__})"

    def new_layer(name: str, m: nn.Module) -> nn.Module:
        lazy = isinstance(m, nn.modules.lazy.LazyModuleMixin)
        if lazy and m.has_uninitialized_params():
            raise ValueError(
                f"to_l0 cannot convert {where(name, m)}: its parameters are not initialised "
                "yet; run the model on one batch before converting it"
            )
        if isinstance(m, nn.Linear) and not isinstance(m, L0Linear):
            if not _reproducible(m, nn.Linear, ("forward",)):
                return m
            new = _like(L0Linear(
                m.in_features, m.out_features, bias=m.bias is not None, gated=gate_linear,
                **gate_options,
            ), m)
            new.weight, new.bias = m.weight, m.bias
            return new
        if isinstance(m, nn.Conv2d):
            if not _reproducible(m, nn.Conv2d, ("forward", "_conv_forward")):
                return m
            if m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros":
                raise ValueError(
                    f"to_l0 cannot convert {where(name, m)}: L0Conv2d supports groups=1, "
                    f"dilation=1 and padding_mode='zeros'; got groups={m.groups}, "
                    f"dilation={tuple(m.dilation)}, padding_mode={m.padding_mode!r}"
                )
            new = _like(L0Conv2d(
                m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                bias=m.bias is not None, gated=gate_conv, **gate_options,
            ), m)
            new.conv.weight, new.conv.bias = m.weight, m.bias
            return new
        # exact types only: a subclass may change forward in ways a copy would lose
        bn_class = _SAMPLE_BATCHNORM.get(type(m))
        if bn_class is not None:
            new = _like(bn_class(m.num_features, m.eps, m.momentum, m.affine,
                                 m.track_running_stats), m)
            new.load_state_dict(m.state_dict())
            return new
        if not isinstance(m, KEPT_WHOLE):
            for child_name, child in list(m._modules.items()):
                if child is not None:  # every place a child is used, repeats included
                    setattr(m, child_name, convert(f"{name}.{child_name}" if name
                                                   else child_name, child))
        return m

    def convert(name: str, m: nn.Module) -> nn.Module:
        if id(m) not in done:
            done[id(m)] = new_layer(name, m)
        return done[id(m)]

    return convert("", module)


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` moved to the device and floating dtype of ``old``'s own tensors, in ``old``'s
    train/eval mode.

    The layers are built on the CPU in the default dtype; copying the weights into them
    would silently cast a float64 (or CUDA) source to that. ``Module.to`` casts only
    floating tensors, so integer buffers such as ``num_batches_tracked`` keep their dtype.
    """
    new.train(old.training)  # to_l0(model.eval()) stays in eval mode
    tensors = [*old.parameters(recurse=False), *old.buffers(recurse=False)]
    ref = next((t for t in tensors if t.is_floating_point()), None)
    if ref is None:  # nothing to match (e.g. BatchNorm without affine or running stats)
        return new
    return new.to(device=ref.device, dtype=ref.dtype)


def build_model(name: str, *, input_shape: Sequence[int], num_classes: int, gated: bool = True,
                **options) -> nn.Module:
    """Build a reference model by name (``mlp``, ``lenet5``, ``wrn``) for a data set's shapes."""
    key = name.strip().lower().replace("-", "_")
    n_in = 1
    for d in input_shape:
        n_in *= int(d)
    if key == "mlp":
        hidden = options.pop("hidden", (300, 100))
        return mlp((n_in, *hidden, num_classes), gated=gated, **options)
    if key in ("lenet5", "lenet5_caffe", "lenet"):
        if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
            raise ValueError(
                f"lenet5 needs square image inputs (C, H, W); got {tuple(input_shape)}"
            )
        return lenet5_caffe(input_shape[0], num_classes, input_shape[1], gated=gated, **options)
    if key in ("wrn", "wide_resnet", "wideresnet"):
        if len(input_shape) != 3:
            raise ValueError(f"wrn needs image inputs (C, H, W); got {tuple(input_shape)}")
        return WideResNet(num_classes=num_classes, in_channels=input_shape[0], gated=gated,
                          **options)
    raise ValueError(f"unknown model {name!r}; expected one of mlp, lenet5, wrn")


def _per_layer(value, n: int, what: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{what} needs 1 or {n} values; got {len(values)}")
    return values


MODELS = ("mlp", "lenet5", "wrn")

#: What :func:`build_model` sets itself (from the data set and the run), per model.
_SET_BY_BUILD = frozenset({"sizes", "in_channels", "num_classes", "input_size", "gated"})


def model_options(name: str) -> list[str]:
    """The named options of model ``name`` that :func:`build_model` passes on (sorted);
    options of its L0 layers and gates pass through as well."""
    key = name.strip().lower().replace("-", "_")
    builder = {"mlp": mlp, "lenet5": lenet5_caffe, "lenet5_caffe": lenet5_caffe,
               "lenet": lenet5_caffe, "wrn": WideResNet.__init__,
               "wide_resnet": WideResNet.__init__, "wideresnet": WideResNet.__init__}.get(key)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    names = {p.name for p in inspect.signature(builder).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - _SET_BY_BUILD - {"self"}
    if builder is mlp:
        names.add("hidden")
    return sorted(names)
