"""Flatten and rebuild the tensor structures estimators accept (tensor, list/tuple or dict)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch

Structure = Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]]


def flatten(structure: Any, what: str = "logits") -> tuple[list[torch.Tensor], Callable]:
    """Split a tensor, list/tuple or dict of tensors into a list and a function rebuilding it.

    The rebuild function takes a list of tensors of the same length and returns the same
    kind of container (dict keys and their order are kept).
    """
    if isinstance(structure, torch.Tensor):
        return [structure], lambda leaves: leaves[0]
    if isinstance(structure, Mapping):
        keys = list(structure.keys())
        leaves = [structure[k] for k in keys]
        _check_leaves(leaves, what, keys)
        return leaves, lambda new: dict(zip(keys, new))
    if isinstance(structure, (list, tuple)):
        leaves = list(structure)
        _check_leaves(leaves, what, list(range(len(leaves))))
        kind = type(structure)
        if hasattr(kind, "_fields"):  # a namedtuple takes its fields as arguments
            return leaves, lambda new: kind(*new)
        return leaves, lambda new: kind(new)
    raise TypeError(
        f"{what} must be a torch.Tensor, a list/tuple of tensors or a dict of tensors; "
        f"got {type(structure).__name__}"
    )


def leaf_names(structure: Any, what: str = "logits") -> list[str]:
    """Names of the leaves of ``structure`` for messages: ``logits``, ``logits[1]``,
    ``logits['w']``."""
    if isinstance(structure, torch.Tensor):
        return [what]
    keys = list(structure.keys()) if isinstance(structure, Mapping) else range(len(structure))
    return [f"{what}[{k!r}]" for k in keys]


def _check_leaves(leaves: list, what: str, names: list) -> None:
    if not leaves:
        raise ValueError(f"{what} must hold at least one tensor; got an empty container")
    for name, leaf in zip(names, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{what}[{name!r}] must be a torch.Tensor; got {type(leaf).__name__}")
