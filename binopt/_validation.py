"""Argument checks at the public boundary.

Checks that need the values of a tensor (finiteness) synchronise the host with the device,
so like ``torch.distributions`` they can be switched off globally with
:func:`set_validate_args` or per estimator with ``validate_args=False``; shape, dtype and
device checks are always on because they cost nothing.
"""

from __future__ import annotations

import math

import torch

_VALIDATE_ARGS = True


def set_validate_args(value: bool) -> None:
    """Turn value checks (NaN/inf in logits and in ``f``'s output) on or off globally."""
    global _VALIDATE_ARGS
    if not isinstance(value, bool):
        raise TypeError(f"set_validate_args expects a bool; got {type(value).__name__}")
    _VALIDATE_ARGS = value


def validate_args_enabled() -> bool:
    """Whether value checks are on globally (default ``True``)."""
    return _VALIDATE_ARGS


def check_logits(leaves: list[torch.Tensor], check_values: bool, what: str = "logits",
                 names: list[str] | None = None) -> None:
    """dtype, device and (``check_values``) finiteness of the logits; ``names`` name the
    leaves in messages (default ``logits``, ``logits[i]``)."""
    device = leaves[0].device
    if names is None:
        names = [what] if len(leaves) == 1 else [f"{what}[{i}]" for i in range(len(leaves))]
    # dtype and device of every leaf first: a value check on a leaf from another device
    # (or on a 'meta' tensor, which has no values) would fail with a less helpful error.
    for name, leaf in zip(names, leaves):
        if not leaf.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype; got {leaf.dtype}")
        if leaf.device != device:
            raise ValueError(
                f"all {what} must be on one device; {names[0]} is on {device} "
                f"but {name} is on {leaf.device}"
            )
    if not check_values or device.type == "meta":
        return
    for name, leaf in zip(names, leaves):
        if not bool(torch.isfinite(leaf).all()):
            bad = int((~torch.isfinite(leaf)).sum())
            raise ValueError(
                f"{name} must be finite; got {bad} NaN/inf value(s) in a tensor of shape "
                f"{tuple(leaf.shape)}"
            )


def check_num_samples(num_samples: object, what: str = "num_samples") -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(f"{what} must be a positive int; got {type(num_samples).__name__}")
    if num_samples < 1:
        raise ValueError(f"{what} must be >= 1; got {num_samples}")
    return num_samples


def check_finite_number(name: str, value: object) -> float:
    """An option that must be a finite real number, as a float (numbers of any kind, numpy's
    and 0-d tensors included, and strings that spell one)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number; got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number; got {number}")
    return number


def check_f_output(value: object, num_samples: int, device: torch.device, check_values: bool):
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"f must return a torch.Tensor of shape ({num_samples},), one value per sample; "
            f"got {type(value).__name__}"
        )
    if value.shape != (num_samples,):
        raise ValueError(
            f"f must return one value per sample: expected shape ({num_samples},) for "
            f"samples with leading dimension {num_samples}; got shape {tuple(value.shape)}"
        )
    if not value.is_floating_point():
        raise TypeError(
            f"f must return a floating-point tensor (one value per sample); got dtype {value.dtype}"
        )
    if value.device != device:
        raise ValueError(f"f returned a tensor on {value.device}; expected {device}")
    if check_values and device.type != "meta" and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(
            f"f must return finite values; got {bad} NaN/inf value(s) among its "
            f"{num_samples} outputs"
        )
    return value


def check_generator(generator: object, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None; got {type(generator).__name__}"
        )
    if generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but the logits are on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )
