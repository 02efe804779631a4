"""``binopt export``: turn a ``binopt sparsify`` run into a smaller dense model.

Example::

    binopt export --run runs/quickstart --out model.pt

reads ``runs/quickstart/checkpoint.pt``, rebuilds the gated network, exports it
(:func:`~applications.sparsify.export.export`) and writes ``model.pt`` holding
``{"spec": ..., "state_dict": ...}``; ``--out`` naming a folder (an existing folder, a
path ending in ``/``, or no ``.pt``/``.pth`` suffix) writes ``spec.json`` and
``state_dict.pt`` there instead. Either loads with::

    from applications.sparsify.export import load_exported
    model = load_exported("model.pt")

``--run DIR/dense`` (the dense baseline of ``--baseline dense``) exports the dense network
at its full width. A run trained on a user module (``train(config, module=...)``) cannot be
rebuilt from its folder; export it from Python with ``load_run(DIR, module=my_net)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from applications.errors import UserError

from .export import ExportedModel, ExportError, export, save_exported, save_exported_file
from .flops import count_flops, count_params
from .network import GatedNetwork

__all__ = ["UnfinishedRunWarning", "load_run", "register", "run"]


class UnfinishedRunWarning(UserWarning):
    """The checkpoint is from before the run's last epoch (interrupted or still training)."""

# one example's shape for the data sets binopt knows (checkpoints do not record it)
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
                   "state_dict.pt: an existing folder, a path ending in /, or a name without "
                   ".pt/.pth); default: DIR/exported.pt")
    p.set_defaults(func=run)
    return p


def _dataset_key(name: str) -> str:
    return str(name).strip().lower().replace("-", "").replace("_", "")


def _weights_2d(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [t for k, t in state.items() if k.endswith("weight") and t.dim() == 2]


def _python_call(run_dir: Path) -> str:
    done = (" (or load its exported/ folder, written when training finished)"
            if (run_dir / "exported").is_dir() else "")
    return ("from applications.sparsify.export_cli import load_run; "
            "from applications.sparsify.export import export, save_exported_file; "
            f"net, shape, _ = load_run({json.dumps(str(run_dir))}, module=my_net); "
            'save_exported_file(export(net, input_shape=shape), "model.pt") '
            f"with my_net the module given to train(){done}")


def _input_shape(config: dict, state: dict[str, torch.Tensor], run_dir: Path) -> tuple[int, ...]:
    # checkpoints store no shapes: they come from the data set's name, or from the MLP's
    # first weight (it flattens its input, so only the size matters)
    key = _dataset_key(config.get("dataset", ""))
    if key in _DATASET_SHAPES:
        return _DATASET_SHAPES[key]
    model = str(config.get("model", "")).strip().lower()
    weights = _weights_2d(state)
    if model == "mlp" and weights:
        return (int(weights[0].shape[1]),)
    raise UserError(
        f"cannot tell the input shape of data set {config.get('dataset')!r} for model "
        f"{config.get('model')!r}: the checkpoint does not record it and binopt does not know "
        f"that data set; export it from Python with load_run({json.dumps(str(run_dir))}, "
        "input_shape=(C, H, W))"
    )


def _num_classes(state: dict[str, torch.Tensor]) -> int:
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


def _is_builtin_model(name: Any) -> bool:
    from .models import MODELS
    from .train import _MODEL_ALIASES, _norm

    key = _norm(name)
    return key in MODELS or key in _MODEL_ALIASES


def _mismatch_detail(exc: RuntimeError) -> str:
    # load_state_dict's first line is only "Error(s) in loading state_dict for ...:";
    # the cause (missing keys, a size mismatch) is on the next one
    lines = [s.strip() for s in str(exc).strip().splitlines() if s.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
    return detail if len(detail) <= 200 else detail[:197] + "..."


def load_run(
    run_dir: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    module: torch.nn.Module | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> tuple[GatedNetwork, tuple[int, ...] | None, dict[str, Any]]:
    """Rebuild the network of a ``binopt sparsify`` run from ``DIR/checkpoint.pt``.

    Parameters
    ----------
    run_dir : str or Path
        The run folder, or its ``dense/`` subfolder (the dense baseline).
    map_location : str or torch.device
        Where to put the weights.
    module : nn.Module, optional
        The network the run was trained on when it was a user module
        (``train(config, module=my_net)``): the run folder does not hold its code. Its
        weights are not used; it is not modified.
    input_shape : tuple of int, optional
        Shape of one example, for data sets binopt does not know (user data).

    Returns
    -------
    net : GatedNetwork
        With the trained weights and gates and the run's estimator (which defines the
        test-time gate), in eval mode. For a dense baseline (checkpoint phase ``"dense"``)
        the wrapped module has no gates.
    input_shape : tuple of int or None
        Shape of one example; ``None`` only for a user module on user data without
        ``input_shape`` (:func:`~.export.export` then infers it for chains starting with a
        Linear).
    config : dict
        The run's settings.

    Raises
    ------
    UserError
        Missing folder or checkpoint, a run trained on a user module without ``module``, or
        a checkpoint that does not match its settings.

    Warns
    -----
    UnfinishedRunWarning
        The checkpoint is from before the last configured epoch (the run was interrupted or
        is still training).
    """
    from .train import TrainConfig, _build_module, load_checkpoint

    run_dir = Path(run_dir)
    if run_dir.is_file():  # typically DIR/checkpoint.pt itself
        raise UserError(f"expected the run folder that holds checkpoint.pt; got the file "
                        f"{run_dir} (its folder is {run_dir.parent})")
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise UserError(f"{run_dir} holds no checkpoint.pt; is it a `binopt sparsify` output?")
    ckpt = _read_checkpoint(path, map_location, load_checkpoint)
    if not isinstance(ckpt, dict) or "config" not in ckpt:
        raise UserError(f"{path} is not a `binopt sparsify` checkpoint (no 'config')")
    state = ckpt.get("model")
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no model state")
    phase = ckpt.get("phase", "l0")  # checkpoints before format 2 hold only gated runs
    if phase not in ("l0", "dense"):
        raise UserError(f"{path} is a checkpoint of phase {phase!r}; expected 'l0' (a gated "
                        "run) or 'dense' (its dense baseline)")
    config_dict = dict(ckpt["config"])
    config = TrainConfig.from_dict(config_dict)
    if module is None and not _is_builtin_model(config.model):
        raise UserError(
            f"{run_dir} was trained on a user module (model {config.model!r}), which cannot "
            f"be rebuilt from the run folder; export it from Python: {_python_call(run_dir)}"
        )
    module_state = {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}
    if input_shape is not None:
        shape: tuple[int, ...] | None = tuple(int(s) for s in input_shape)
    elif module is not None and _dataset_key(config.dataset) not in _DATASET_SHAPES:
        shape = None  # user data: only export's inference (Linear first) can tell
    else:
        shape = _input_shape(config_dict, module_state, run_dir)
    num_classes = _num_classes(module_state) if module is None else 0  # unused for modules
    built = _build_module(config, shape, num_classes, gated=phase == "l0", user_module=module)
    net = GatedNetwork(built, config.estimator, **dict(config.estimator_options))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        hint = ("" if module is not None else
                f"; if it was trained on a user module, export it from Python: "
                f"{_python_call(run_dir)}")
        raise UserError(f"{path} does not match the model its settings describe "
                        f"({_mismatch_detail(exc)}){hint}") from None
    epoch = ckpt.get("epoch")
    if isinstance(epoch, int) and epoch < config.epochs:
        warnings.warn(f"{path} holds epoch {epoch} of {config.epochs}: the run did not finish "
                      f"(interrupted, or still training); exporting the network after epoch "
                      f"{epoch}", UnfinishedRunWarning, stacklevel=2)
    net.to(map_location)
    return net.eval(), shape, config_dict


def _summary(exported: ExportedModel, net: GatedNetwork,
             input_shape: tuple[int, ...] | None) -> str:
    lines = []
    for w in exported.spec["widths"]:
        lines.append(f"  {w['layer']:<18} {w['type']:<10} in {w['in'][0]:>5}/{w['in'][1]:<5} "
                     f"out {w['out'][0]:>5}/{w['out'][1]:<5}")
    dense_p, kept_p = count_params(net), count_params(exported.module)
    lines.append(f"  parameters {kept_p:,} of {dense_p:,} ({kept_p / max(dense_p, 1):.2%})")
    if input_shape is not None:
        dense_f = count_flops(net, input_shape)
        kept_f = count_flops(exported.module, input_shape)
        lines.append(f"  MACs/example {kept_f:,} of {dense_f:,} ({kept_f / max(dense_f, 1):.2%})")
    if exported.max_abs_diff is not None:
        lines.append(f"  max |exported - gated| on a random batch: {exported.max_abs_diff:.2e}")
    return "\n".join(lines)


def _folder_target(out: str) -> bool:
    """Whether ``--out`` names a folder (spec.json + state_dict.pt) rather than one file."""
    if out.endswith(("/", os.sep)) or Path(out).is_dir():
        return True
    return Path(out).suffix not in (".pt", ".pth")


def run(args: argparse.Namespace) -> int:
    """Export ``args.run`` to ``args.out``."""
    if args.out is not None and not args.out.strip():  # was silently DIR/exported.pt
        raise UserError(f"--out must be a .pt/.pth file or a folder; got {args.out!r}")
    out = Path(args.out) if args.out else Path(args.run) / "exported.pt"
    folder = _folder_target(args.out) if args.out else False
    if folder and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} names a folder (no .pt/.pth suffix) but is an existing "
                        "file; expected a folder or a path ending in .pt/.pth")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnfinishedRunWarning)
        net, input_shape, config = load_run(args.run)
    for w in caught:
        if issubclass(w.category, UnfinishedRunWarning):  # one line, like the errors
            print(f"binopt: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    try:
        exported = export(net, input_shape=input_shape)
    except ExportError as exc:
        raise UserError(str(exc)) from None
    try:
        if folder:
            save_exported(exported, out)
        else:
            save_exported_file(exported, out)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    kind = exported.spec["kind"]
    if net.gated_layers():
        what = f"{config.get('model')} ({kind})"
    else:
        what = f"the dense baseline {config.get('model')} ({kind}, no gates: full width)"
    print(f"exported {what} of {args.run} to {out}")
    print(_summary(exported, net, input_shape))
    print(f"load it with: applications.sparsify.export.load_exported({json.dumps(str(out))})")
    return 0
