"""``binopt export``: turn a ``binopt sparsify`` run into a smaller dense model.

Example::

    binopt export --run runs/quickstart --out model.pt

reads ``runs/quickstart/checkpoint.pt``, rebuilds the gated network, exports it
(:func:`~applications.sparsify.export.export`) and writes ``model.pt`` holding
``{"spec": ..., "state_dict": ...}``; ``--out`` naming a folder (no ``.pt``/``.pth``
suffix) writes ``spec.json`` and ``state_dict.pt`` there instead. Either loads with::

    from applications.sparsify.export import load_exported
    model = load_exported("model.pt")
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from applications.errors import UserError

from .export import ExportedModel, ExportError, export, save_exported, save_exported_file
from .flops import count_flops, count_params
from .network import GatedNetwork

__all__ = ["load_run", "register", "run"]

# one example's shape for the data sets binopt knows (used when the checkpoint lacks it)
_DATASET_SHAPES: dict[str, tuple[int, ...]] = {
    "mnist5k": (1, 28, 28),
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
}


def register(subparsers, name: str = "export", help_text: str = "") -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``subparsers``."""
    p = subparsers.add_parser(
        name,
        help=help_text or "export a pruned run as a smaller dense model",
        description="Export the network of a `binopt sparsify` run as a smaller dense model: "
        "removed neurons/channels are cut out, test-time gates and the constant output of "
        "removed units are folded into the weights. The result reloads with "
        "applications.sparsify.export.load_exported(PATH).",
    )
    p.add_argument("--run", required=True, metavar="DIR",
                   help="folder written by `binopt sparsify` (holds checkpoint.pt)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="a .pt/.pth file ({'spec', 'state_dict'}) or a folder (spec.json + "
                   "state_dict.pt); default: DIR/exported.pt")
    p.set_defaults(func=run)
    return p


def _dataset_key(name: str) -> str:
    return str(name).strip().lower().replace("-", "").replace("_", "")


def _weights_2d(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [t for k, t in state.items() if k.endswith("weight") and t.dim() == 2]


def _input_shape(ckpt: dict, config: dict, state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    if ckpt.get("input_shape") is not None:
        return tuple(int(s) for s in ckpt["input_shape"])
    key = _dataset_key(config.get("dataset", ""))
    if key in _DATASET_SHAPES:
        return _DATASET_SHAPES[key]
    model = str(config.get("model", "")).strip().lower()
    weights = _weights_2d(state)
    if model == "mlp" and weights:  # the MLP flattens its input: only the size matters
        return (int(weights[0].shape[1]),)
    raise UserError(
        f"cannot tell the input shape of data set {config.get('dataset')!r} for model "
        f"{config.get('model')!r}; the checkpoint does not record it"
    )


def _num_classes(ckpt: dict, state: dict[str, torch.Tensor]) -> int:
    if ckpt.get("num_classes") is not None:
        return int(ckpt["num_classes"])
    weights = _weights_2d(state)
    if not weights:
        raise UserError("cannot tell the number of classes: the checkpoint has no linear layer")
    return int(weights[-1].shape[0])


def _read_checkpoint(path: Path, map_location: Any, load_checkpoint: Any) -> dict:
    # torch.__version__ (a str subclass) may be stored in the checkpoint's "versions":
    # allow-list it for the weights-only unpickler; nothing else is trusted
    from torch.torch_version import TorchVersion

    with torch.serialization.safe_globals([TorchVersion]):
        return load_checkpoint(path, map_location=map_location)


def load_run(
    run_dir: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[GatedNetwork, tuple[int, ...], dict[str, Any]]:
    """Rebuild the gated network of a ``binopt sparsify`` run from ``DIR/checkpoint.pt``.

    Parameters
    ----------
    run_dir : str or Path
        The run folder.
    map_location : str or torch.device
        Where to put the weights.

    Returns
    -------
    net : GatedNetwork
        With the trained weights and gates and the run's estimator (which defines the
        test-time gate), in eval mode.
    input_shape : tuple of int
        Shape of one example.
    config : dict
        The run's settings.

    Raises
    ------
    UserError
        Missing folder or checkpoint, or a checkpoint that does not match its settings.
    """
    from .train import TrainConfig, _build_module, load_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise UserError(f"{run_dir} holds no checkpoint.pt; is it a `binopt sparsify` output?")
    ckpt = _read_checkpoint(path, map_location, load_checkpoint)
    if not isinstance(ckpt, dict) or "config" not in ckpt:
        raise UserError(f"{path} is not a `binopt sparsify` checkpoint (no 'config')")
    state = ckpt.get("model", ckpt.get("model_state"))
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no model state")
    config_dict = dict(ckpt["config"])
    config = TrainConfig.from_dict(config_dict)
    module_state = {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}
    input_shape = _input_shape(ckpt, config_dict, module_state)
    num_classes = _num_classes(ckpt, module_state)
    module = _build_module(config, input_shape, num_classes, gated=True)
    net = GatedNetwork(module, config.estimator, **dict(config.estimator_options))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path} does not match the model its settings describe: {first}") from None
    net.to(map_location)
    return net.eval(), tuple(input_shape), config_dict


def _summary(exported: ExportedModel, net: GatedNetwork, input_shape: tuple[int, ...]) -> str:
    lines = []
    for w in exported.spec["widths"]:
        lines.append(f"  {w['layer']:<18} {w['type']:<10} in {w['in'][0]:>5}/{w['in'][1]:<5} "
                     f"out {w['out'][0]:>5}/{w['out'][1]:<5}")
    dense_p, kept_p = count_params(net), count_params(exported.module)
    dense_f = count_flops(net, input_shape)
    kept_f = count_flops(exported.module, input_shape)
    lines.append(f"  parameters {kept_p:,} of {dense_p:,} ({kept_p / max(dense_p, 1):.2%})")
    lines.append(f"  MACs/example {kept_f:,} of {dense_f:,} ({kept_f / max(dense_f, 1):.2%})")
    if exported.max_abs_diff is not None:
        lines.append(f"  max |exported - gated| on a random batch: {exported.max_abs_diff:.2e}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Export ``args.run`` to ``args.out``."""
    net, input_shape, config = load_run(args.run)
    try:
        exported = export(net, input_shape=input_shape)
    except ExportError as exc:
        raise UserError(str(exc)) from None
    out = Path(args.out) if args.out else Path(args.run) / "exported.pt"
    try:
        if out.suffix in (".pt", ".pth"):
            save_exported_file(exported, out)
        else:
            save_exported(exported, out)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"exported {config.get('model')} ({exported.spec['kind']}) of {args.run} to {out}")
    print(_summary(exported, net, input_shape))
    print(f"load it with: applications.sparsify.export.load_exported({json.dumps(str(out))})")
    return 0
