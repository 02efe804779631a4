"""Parameter and multiply-accumulate counts of a network, gated or exported.

:func:`count_params` counts the parameters a deployed network needs (L0 gate parameters
``phi`` excluded); :func:`count_flops` counts the multiply-accumulates (MACs) per example of
the Linear and Conv2d layers by running one dummy example through forward hooks. Both count
what the module *is*: a gated network counts its full widths (gates do not skip work at test
time); export it (:func:`~applications.sparsify.export.export`) to count the pruned cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import L0Gate, L0Linear

__all__ = ["count_flops", "count_params"]


def count_params(module: nn.Module) -> int:
    """Number of parameter elements of ``module``, not counting L0 gate parameters.

    Parameters
    ----------
    module : nn.Module
        Any network; shared parameters are counted once, buffers (BatchNorm statistics,
        an exported model's index and border-correction buffers) are not counted.

    Returns
    -------
    int
    """
    gate_ids = {
        id(p) for m in module.modules() if isinstance(m, L0Gate) for p in m.parameters()
    }
    return int(sum(p.numel() for p in module.parameters() if id(p) not in gate_ids))


def count_flops(
    module: nn.Module,
    input_shape: tuple[int, ...] | Sequence[int],
    dtype: torch.dtype | None = None,
) -> int:
    """Multiply-accumulates per example of the Linear and Conv2d layers of ``module``.

    Runs one example of zeros of shape ``(1, *input_shape)`` in eval mode (restored
    afterwards) with forward hooks on ``nn.Linear``, :class:`~.layers.L0Linear` and
    ``nn.Conv2d`` (which also covers :class:`~.layers.L0Conv2d`'s inner convolution and
    the exported :class:`~.export.ConstantChannelConv2d`, whose border correction runs once
    per batch and is not counted).

    A Linear layer costs ``in_features * out_features`` per output row; a convolution
    ``out_channels * H_out * W_out * (in_channels / groups) * kh * kw``. Biases,
    BatchNorm, activations and pooling are not counted.

    Parameters
    ----------
    module : nn.Module
    input_shape : tuple of int
        Shape of one example, without the batch dimension.
    dtype : torch.dtype, optional
        Of the example: that of the inputs (``torch.int64`` for a model that starts with
        an ``nn.Embedding``); default the dtype of the module's first parameter.

    Returns
    -------
    int
    """
    total = 0

    def linear_hook(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        rows = output.numel() // output.shape[-1]
        total += rows * m.in_features * m.out_features

    def conv_hook(m: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += output.numel() * (m.in_channels // m.groups) * kh * kw

    handles = []
    for m in module.modules():
        if isinstance(m, (nn.Linear, L0Linear)):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
    first = next(iter(module.parameters()), None)
    if dtype is None:
        dtype = first.dtype if first is not None else torch.get_default_dtype()
    device = first.device if first is not None else torch.device("cpu")
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            module(torch.zeros((1, *[int(s) for s in input_shape]), dtype=dtype, device=device))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return int(total)
