"""Training loop for L0-gated networks (L0-ARM, L0-HC and friends) and the dense baseline.

:func:`train` is the one entry point used by the ``binopt sparsify`` command, the benchmark
and the optuna tuner::

    from applications.sparsify.train import TrainConfig, train
    summary = train(TrainConfig(model="mlp", dataset="mnist5k", lam=0.1, epochs=15,
                                out="runs/quickstart"))
    summary["architecture"], summary["test_error"]

What a run writes to ``OUT/``
-----------------------------
``metrics.jsonl``
    One JSON object per epoch (losses, training/validation/test error, expected kept
    fraction, kept units and architecture, timings).
``checkpoint.pt``
    Model, optimizer, scheduler and every random state after the last finished epoch,
    replaced atomically (written to a temporary file in the same folder, then
    ``os.replace``). ``resume=True`` continues from it and reaches exactly the same final
    state as an uninterrupted run with the same settings on the same device; ``lr``,
    ``gate_lr`` and ``lam`` may change on resume (e.g. after a NaN loss). A resume on
    another device type (a CUDA run continued on the CPU or the reverse) works too, but
    the random streams are then reseeded (see Randomness), so its results differ from an
    uninterrupted run's.
``summary.json``, ``summary.png``
    The final results (see :func:`train`) and a plot of the kept units per layer and the
    error per epoch.
``exported/``
    The pruned network as a genuinely smaller dense module (when
    :mod:`applications.sparsify.export` is available).
``dense/``
    The dense baseline's metrics and checkpoint when ``baseline="dense"``.

Randomness
----------
Everything is seeded from ``config.seed``: the weights (torch's global generator, seeded
just before the model is built, so the dense baseline starts from the same weights), the
minibatch order (a dedicated ``torch.Generator`` for the data loader) and the gate samples
(a dedicated generator handed to the estimator). The train/test split of ``mnist5k``, the
validation split and ``limit`` subsampling are seeded by ``config.data_seed`` so that runs
with different seeds are evaluated on the same examples.

A checkpoint stores the state of every generator and the device type they ran on. A random
state of one device type cannot be loaded into a generator of another (a CPU generator's
state is 5056 bytes, a CUDA generator's 16), so a resume on another device type reseeds the
gate samples' generator and torch's global generators (CPU and CUDA) deterministically from
``config.seed`` and the number of finished epochs (:func:`_resume_seed`), and prints one
warning on stderr: the run goes on, but its random stream, and therefore its results,
differ from an uninterrupted run's. The batch order depends only on the seed and the epoch
and is unchanged. A checkpoint whose random states cannot be restored on the same device
type (e.g. written by another torch version) is treated the same way. Checkpoints of
earlier versions, which do not store the device type, are judged by the size of the gate
generator's state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import binopt
from applications.errors import UserError

from ..atomic_files import atomic_write
from .denormals import flush_denormals
from .distributed import (
    DistributedContext,
    ShardedBatchSampler,
    env_requests_distributed,
    init_distributed,
    shutdown,
    wrap_ddp,
)
from .network import GatedNetwork
from .step_log import NonFiniteLoss, StepLog, host_read_interval

__all__ = [
    "CHECKPOINT_NAME",
    "ConfigError",
    "TrainConfig",
    "TrainingDivergedError",
    "evaluate",
    "load_checkpoint",
    "train",
    "train_dense",
]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
PLOT_NAME = "summary.png"
EXPORT_DIR = "exported"
DENSE_DIR = "dense"
# what save_exported writes (export.py); only these are removed, never a user's own files
EXPORT_FILES = ("spec.json", "state_dict.pt")
_CHECKPOINT_FORMAT = 2
# The process's place in a data-parallel run; set by train() (rank 0 of 1 otherwise).
_CTX = DistributedContext()

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine", "step")
BASELINES = ("dense",)
PARAMETERIZATIONS = ("scaled_sigmoid", "hard_sigmoid", "sigmoid")
# Louizos et al. keep log a of hard-concrete gates inside [log 1e-2, log 1e2].
_HC_LOG_A_RANGE = (math.log(1e-2), math.log(1e2))


class ConfigError(UserError, ValueError):
    """An invalid training setting (a :class:`UserError`: one line on the command line)."""


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is left intact.

    Attributes
    ----------
    epoch, step : int
        Where it happened (1-based epoch, 1-based step within the epoch).
    checkpoint : str or None
        Path of the last good checkpoint, ``None`` if no epoch had finished.
    """

    def __init__(self, message: str, *, epoch: int, step: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.epoch, self.step, self.checkpoint = epoch, step, checkpoint


@dataclass
class TrainConfig:
    """Settings of one sparsification run (all JSON-serialisable).

    Attributes
    ----------
    model : str
        ``"mlp"`` (784-300-100-10), ``"lenet5"`` (LeNet-5-Caffe) or ``"wrn"``
        (Wide-ResNet, 28-10 unless ``model_options`` say otherwise).
    dataset : str
        ``"mnist5k"`` and ``"mnist1d"`` work offline; ``"mnist"``, ``"cifar10"`` and
        ``"cifar100"`` are read from ``data_root``.
    data_root : str or None
        Folder with the full data sets in torchvision's layout.
    estimator : str
        Gradient estimator for the gates: ``"arm"`` (L0-ARM), ``"hard_concrete"``
        (L0-HC), ``"disarm"``, ``"straight_through"``, ``"reinforce_loo"``, ... Any name
        of :func:`binopt.available_estimators` except ``"exact"`` on large networks.
    estimator_options : dict
        Extra keyword arguments of the estimator (e.g. ``{"temperature": 0.5}``).
    lam : float or dict
        L0 strength ``lambda``, one value for every gated layer or a dict gated-layer name
        -> value (missing layers get 0). The penalty is ``sum_l lam_l / N * sum_j
        P(z_j != 0) |g_j|`` with ``N`` the number of training examples.
    parameterization : str
        Gate parameterization ``pi = g(phi)``: ``"scaled_sigmoid"`` (``sigmoid(k phi)``,
        the L0-ARM default), ``"hard_sigmoid"`` or ``"sigmoid"``. Ignored by
        ``"hard_concrete"``, whose parameters are always ``log a``
        (``parameterization="sigmoid"``, as in Louizos et al.); ``log a`` is also clamped
        to ``[log 1e-2, log 1e2]`` after each step as in their code.
    k : float
        Slope of the scaled / hard sigmoid.
    init_drop_rate : float or None
        Initial probability that a gate is off; ``None`` keeps the model's default
        (MLP: 0.2 for the first layer, 0.5 elsewhere; LeNet-5: 0.5; WRN: 0.3). For hard
        concrete it initialises ``log a = logit(1 - init_drop_rate)``.
    epochs, batch_size, lr : int, int, float
    optimizer : str
        ``"adam"`` (weights and gates, as in the reference) or ``"sgd"`` (momentum 0.9,
        Nesterov, as for Wide-ResNets).
    lr_schedule : str
        ``"constant"``, ``"cosine"`` or ``"step"`` (x0.2 at 30%, 60% and 80% of the epochs,
        the Wide-ResNet schedule).
    gate_lr : float or None
        Learning rate of the gate parameters ``phi`` (``None``: ``lr``, as in the
        reference). With Adam, ``phi`` moves about ``gate_lr`` per step whatever the
        gradient's scale, so the logits move about ``k * gate_lr``: a larger ``gate_lr``
        lets the gates settle in fewer steps.
    weight_decay : float
        L2 on the weights (never on the gate parameters).
    seed, data_seed : int
        Seed of the weights, batch order and gate samples; seed of the data splits.
    device : str
        ``"auto"`` (``cuda`` when present, else ``cpu``), ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
    amp : bool
        Mixed precision (bfloat16 autocast, or float16 with loss scaling), CUDA only.
    distributed : bool
        Data-parallel training with DistributedDataParallel across the processes that
        ``torchrun`` started (also switched on automatically when ``WORLD_SIZE > 1``):
        gloo on CPU, NCCL on CUDA. ``batch_size`` is the GLOBAL batch, so a run gives the
        same result, up to rounding, with any number of processes (see
        :mod:`.distributed`). Only rank 0 writes files.
    num_threads : int or None
        ``torch.set_num_threads`` for this run on CPU (restored afterwards). Small models on
        a busy machine often run much faster with 1.
    out : str
        Output folder.
    resume : bool
        Continue from ``OUT/checkpoint.pt`` if it exists (else start afresh, first deleting
        every output of an earlier run in ``OUT``). The settings must be those of the
        checkpoint, except ``epochs`` (at least the epochs it has finished), ``lr``,
        ``gate_lr`` and ``lam``: new values of these apply from the next epoch and are
        recorded as ``setting_changes`` (in that epoch's metrics and in the summary).
        ``device`` may change too, also to another device type (the random streams are
        then reseeded, see the module docstring; recorded as ``"device": [old type, new
        type]`` in ``setting_changes``).
    baseline : str or None
        ``"dense"``: also train the ungated network with the same budget (epochs, batch
        size, optimizer, seed) and report ``dense_test_error``.
    validation_fraction : float
        ``> 0``: move this fraction of the training set (seeded by ``data_seed``) to a
        validation set and report ``val_error`` every epoch (for tuning; the test set is
        never used to choose anything).
    limit : int or None
        Keep at most this many training and test examples (tests, smoke runs).
    model_options : dict
        Extra arguments of the model builder, e.g. ``{"hidden": [100, 50]}`` for the MLP or
        ``{"depth": 16, "width": 4}`` for the WRN.
    progress : bool
        Progress bar (on a terminal) or one line per epoch; ``False`` prints nothing.
    """

    model: str = "mlp"
    dataset: str = "mnist5k"
    data_root: str | None = None
    estimator: str = "arm"
    lam: float | dict[str, float] = 0.1
    parameterization: str = "scaled_sigmoid"
    k: float = 7.0
    init_drop_rate: float | None = None
    epochs: int = 10
    batch_size: int = 100
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    out: str = "runs/sparsify"
    resume: bool = False
    baseline: str | None = None
    validation_fraction: float = 0.0
    limit: int | None = None
    model_options: dict = field(default_factory=dict)
    progress: bool = True
    # --- additions beyond the shared contract (all optional)
    estimator_options: dict = field(default_factory=dict)
    lr_schedule: str = "constant"
    gate_lr: float | None = None
    data_seed: int = 0
    num_threads: int | None = None
    distributed: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the settings."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build a config from a dict, rejecting unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {', '.join(unknown)}")
        return cls(**dict(data))

    @property
    def effective_parameterization(self) -> str:
        """The parameterization actually used (``"sigmoid"`` for hard concrete)."""
        if is_hard_concrete(self.estimator):
            return "sigmoid"
        return _norm(self.parameterization)

    def validate(self, *, custom_model: bool = False, custom_data: bool = False) -> None:
        """Check every setting; raise :class:`ConfigError` with a clear message.

        ``custom_model`` / ``custom_data``: the model / data are passed to :func:`train`
        directly, so ``model`` / ``dataset`` are only labels and are not checked.
        """
        from .data import available_datasets
        from .models import MODELS

        if not custom_model:
            _check_choice("model", self.model, MODELS, aliases=_MODEL_ALIASES)
        if not custom_data:
            _check_choice("dataset", self.dataset, available_datasets())
        names = binopt.available_estimators()
        if isinstance(self.estimator_options, Mapping) and "generator" in self.estimator_options:
            raise ConfigError(
                "estimator_options cannot set 'generator': the gate samples come from a "
                "generator seeded by seed; drop it (and set seed instead)"
            )
        try:
            binopt.get_estimator(self.estimator, **dict(self.estimator_options))
        except ValueError as exc:
            if "unknown estimator" in str(exc):
                raise ConfigError(
                    f"unknown estimator {self.estimator!r}; choose one of {', '.join(names)}"
                ) from None
            raise ConfigError(f"bad estimator options {self.estimator_options}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"bad estimator options {self.estimator_options}: {exc}") from None
        if not is_hard_concrete(self.estimator):
            _check_choice("parameterization", self.parameterization, PARAMETERIZATIONS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.baseline is not None:
            _check_choice("baseline", self.baseline, BASELINES)
        _check_lam(self.lam)
        _check_number("k", self.k, positive=True)
        if self.init_drop_rate is not None:
            v = _check_number("init_drop_rate", self.init_drop_rate)
            if not 0.0 < v < 1.0:
                raise ConfigError(f"init_drop_rate must be in (0, 1); got {self.init_drop_rate}")
        _check_int("epochs", self.epochs, minimum=1)
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_number("lr", self.lr, positive=True)
        if self.gate_lr is not None:
            _check_number("gate_lr", self.gate_lr, positive=True)
        _check_number("weight_decay", self.weight_decay, nonnegative=True)
        _check_int("seed", self.seed, minimum=0, maximum=2**63 - 1)
        _check_int("data_seed", self.data_seed, minimum=0, maximum=2**63 - 1)
        v = _check_number("validation_fraction", self.validation_fraction, nonnegative=True)
        if not v < 1.0:
            raise ConfigError(f"validation_fraction must be in [0, 1); got {v}")
        if self.limit is not None:
            _check_int("limit", self.limit, minimum=2)
        if self.num_threads is not None:
            _check_int("num_threads", self.num_threads, minimum=1)
        if not isinstance(self.model_options, Mapping):
            raise ConfigError(f"model_options must be a dict; got {self.model_options!r}")
        if not isinstance(self.estimator_options, Mapping):
            raise ConfigError(f"estimator_options must be a dict; got {self.estimator_options!r}")
        if not isinstance(self.out, (str, os.PathLike)) or not str(self.out):
            raise ConfigError(f"out must be a folder path; got {self.out!r}")
        _resolve_device(self.device, self.amp)


# =============================================================================== helpers
_MODEL_ALIASES = {"lenet5_caffe": "lenet5", "lenet": "lenet5", "wide_resnet": "wrn",
                  "wideresnet": "wrn"}


def _norm(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def is_hard_concrete(estimator: object) -> bool:
    """Whether ``estimator`` (a name, class or instance) is hard concrete, whose own gate
    makes the parameterization settings (``parameterization``, ``k``) do nothing."""
    try:
        return isinstance(binopt.get_estimator(estimator), binopt.HardConcrete)
    except (ValueError, TypeError):
        return False


def _check_choice(what: str, value: object, choices, aliases: Mapping[str, str] | None = None):
    if isinstance(value, str):
        key = _norm(value)
        key = (aliases or {}).get(key, key)
        if key in choices:
            return key
    raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _check_number(what: str, value: object, *, positive: bool = False,
                  nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number; got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{what} must be finite; got {value}")
    if positive and not v > 0:
        raise ConfigError(f"{what} must be > 0; got {value}")
    if nonnegative and not v >= 0:
        raise ConfigError(f"{what} must be >= 0; got {value}")
    return v


def _check_int(what: str, value: object, *, minimum: int | None = None,
               maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer; got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{what} must be >= {minimum}; got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{what} must be <= {maximum}; got {value}")
    return value


def _check_lam(lam: object) -> None:
    if isinstance(lam, Mapping):
        if not lam:
            raise ConfigError("lam is an empty per-layer dict; give at least one layer=value")
        for name, value in lam.items():
            v = _check_number(f"lam[{name!r}]", value)
            if v < 0:
                raise ConfigError(f"lam must be >= 0; got lam[{name!r}] = {value}")
        return
    v = _check_number("lam", lam)
    if v < 0:
        raise ConfigError(f"lam must be >= 0; got {lam}")


def _resolve_device(device: str, amp: bool) -> torch.device:
    if not isinstance(device, str):
        raise ConfigError(f"device must be a string like 'auto', 'cpu' or 'cuda'; got {device!r}")
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise ConfigError(
                f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
            ) from None
        if dev.type not in ("cpu", "cuda"):
            raise ConfigError(f"unsupported device {device!r}; use 'auto', 'cpu' or 'cuda'")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"device {device!r} requested but CUDA is not available")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ConfigError(
                    f"device {device!r} does not exist; {torch.cuda.device_count()} CUDA "
                    "device(s) present"
                )
    if amp and dev.type != "cuda":
        raise ConfigError("amp (mixed precision) needs a CUDA device; drop --amp on CPU")
    return dev


def _versions() -> dict[str, str]:
    return {
        "binopt": str(binopt.__version__),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# =============================================================================== data/model
def _custom_data(data: Any, config: TrainConfig):
    from .data import DatasetSplits

    if isinstance(data, DatasetSplits):
        splits = data
    else:
        try:
            train_ds, test_ds = data
        except (TypeError, ValueError):
            raise ConfigError("data must be a DatasetSplits or a (train, test) pair of "
                              "TensorDatasets") from None
        for name, ds in (("train", train_ds), ("test", test_ds)):
            if not isinstance(ds, TensorDataset) or len(ds.tensors) != 2:
                raise ConfigError(f"data {name} must be a TensorDataset of (inputs, labels)")
            if ds.tensors[1].dtype != torch.int64 or ds.tensors[1].dim() != 1:
                raise ConfigError(f"data {name} labels must be a 1-d int64 tensor")
        labels = torch.cat([train_ds.tensors[1], test_ds.tensors[1]])
        if len(labels) == 0 or int(labels.min()) < 0:
            raise ConfigError("data labels must be class indices 0 .. C-1")
        splits = DatasetSplits(train=train_ds, test=test_ds,
                               input_shape=tuple(int(d) for d in train_ds.tensors[0].shape[1:]),
                               num_classes=int(labels.max()) + 1, name=str(config.dataset))
    if config.limit is not None:
        gen = torch.Generator().manual_seed(config.data_seed)

        def cut(ds: TensorDataset) -> TensorDataset:
            if len(ds) <= config.limit:
                return ds
            idx = torch.randperm(len(ds), generator=gen)[: config.limit].sort().values
            return TensorDataset(*(t[idx] for t in ds.tensors))

        splits = DatasetSplits(cut(splits.train), cut(splits.test), splits.input_shape,
                               splits.num_classes, splits.name)
    return splits


@torch.no_grad()
def _check_data_fits(net: GatedNetwork, datasets: tuple, device: torch.device) -> None:
    """Raise :class:`ConfigError` unless the user's data can go through the user's network.

    Checks the input dtype against the parameters' and the largest label against the
    number of outputs, found by one forward pass of one example (test-time gates). Without
    this a mismatch surfaces mid-step as a raw dtype RuntimeError, or an IndexError (on CUDA
    a device-side assert) in the loss.
    """
    datasets = [ds for ds in datasets if ds is not None and len(ds)]
    param = next((p for p in net.module.parameters() if p.is_floating_point()), None)
    for ds in datasets:
        x = ds.tensors[0]
        # integer inputs may be meant for an embedding; the forward pass below judges them
        if param is not None and x.is_floating_point() and x.dtype != param.dtype:
            raise ConfigError(
                f"data inputs must have the model's dtype {param.dtype}; got {x.dtype} "
                f"(convert them, e.g. x.to({param.dtype}))"
            )
    x = datasets[0].tensors[0][:1].to(device)
    was_training = net.training
    net.eval()
    try:
        out = net(x)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        # (a wrong dtype or shape, a module handed a tuple, a token id beyond an embedding)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"the model cannot take the data's inputs of shape "
                          f"{tuple(x.shape[1:])}: {first}") from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        return  # not (batch, classes) logits: the output size cannot be read off
    outputs = int(out.shape[1])
    largest = max(int(ds.tensors[1].max()) for ds in datasets)
    if largest >= outputs:
        raise ConfigError(f"data labels must be class indices 0 .. {outputs - 1} for a model "
                          f"with {outputs} outputs; got labels up to {largest}")


def _load_data(config: TrainConfig, data: Any = None):
    """Return ``(train, val | None, test, input_shape, num_classes)``."""
    from .data import DatasetNotFoundError, load_dataset

    if data is not None:
        return _split(_custom_data(data, config), config)
    options: dict[str, Any] = {}
    if config.limit is not None:
        options["limit"] = int(config.limit)
    try:
        splits = load_dataset(config.dataset, data_root=config.data_root,
                              seed=config.data_seed, **options)
    except DatasetNotFoundError as exc:
        raise ConfigError(str(exc).strip().replace("\n", " ")) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    return _split(splits, config)


def _split(splits, config: TrainConfig):
    train_ds, val_ds = splits.train, None
    if config.validation_fraction > 0:
        try:
            train_ds, val_ds = splits.validation_split(config.validation_fraction,
                                                       seed=config.data_seed)
        except ValueError as exc:
            raise ConfigError(f"validation split: {exc}") from None
    return train_ds, val_ds, splits.test, tuple(splits.input_shape), splits.num_classes


def _gate_options(config: TrainConfig) -> dict[str, Any]:
    param = config.effective_parameterization
    opts: dict[str, Any] = {"parameterization": param}
    if param in ("scaled_sigmoid", "hard_sigmoid"):
        opts["k"] = float(config.k)
    if config.init_drop_rate is not None:
        opts["init_drop_rate"] = float(config.init_drop_rate)
    return opts


def _has_gates(module: nn.Module) -> bool:
    from .layers import L0Layer

    return any(isinstance(m, L0Layer) and m.gate is not None for m in module.modules())


def _custom_module(config: TrainConfig, user_module: nn.Module, gated: bool) -> nn.Module:
    """The user's network with gates (``to_l0``) or its dense twin (same weights)."""
    import copy

    from .models import to_l0

    torch.manual_seed(config.seed)
    if _has_gates(user_module):
        module = copy.deepcopy(user_module)
        if gated:
            return module
        from .layers import L0Layer

        for m in module.modules():  # the dense twin: the same layers without gates
            if isinstance(m, L0Layer) and m.gate is not None:
                m.gate = None
        return module
    opts = _gate_options(config)
    try:
        return to_l0(user_module, gate_linear=gated, gate_conv=gated, **opts)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot add L0 gates to the model: {exc}") from None


def _build_module(config: TrainConfig, input_shape, num_classes: int, gated: bool,
                  user_module: nn.Module | None = None) -> nn.Module:
    from .models import build_model

    if user_module is not None:
        return _custom_module(config, user_module, gated)
    options = dict(config.model_options)
    options.update(_gate_options(config))
    if "hidden" in options:
        try:
            list(options["hidden"])
        except TypeError:
            raise ConfigError(f"model option hidden must be a list of widths; got "
                              f"{options['hidden']!r}") from None
    torch.manual_seed(config.seed)
    try:
        return build_model(config.model, input_shape=input_shape, num_classes=num_classes,
                           gated=gated, **options)
    except (ValueError, TypeError) as exc:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if unknown and unknown.group(1) in config.model_options:
            from .models import model_options

            raise ConfigError(
                f"the {config.model} model takes no option {unknown.group(1)!r} (--model-options"
                f"); its options: {', '.join(model_options(config.model))}, and those of its L0 "
                "layers and gates") from None
        raise ConfigError(f"cannot build model {config.model!r}: {exc}") from None


def _make_optimizer(config: TrainConfig, net: GatedNetwork) -> torch.optim.Optimizer:
    weights = list(net.weight_parameters())
    gates = list(net.gate_parameters())
    groups = [{"params": weights, "weight_decay": float(config.weight_decay)}]
    if gates:
        gate_lr = config.lr if config.gate_lr is None else float(config.gate_lr)
        groups.append({"params": gates, "weight_decay": 0.0, "lr": gate_lr})
    # The fused (single-kernel) implementations update all tensors in one pass; on a CPU
    # the per-tensor Adam costs about half of a dense MLP step, the fused one a fifth
    # (docs/sparsify/performance.md). Same update rule; float rounding differs slightly.
    if _norm(config.optimizer) == "sgd":
        return _fused_or_plain(torch.optim.SGD, groups, lr=config.lr, momentum=0.9,
                               nesterov=True)
    return _fused_or_plain(torch.optim.Adam, groups, lr=config.lr)


def _fused_or_plain(cls: type[torch.optim.Optimizer], groups, **options):
    """``cls(groups, fused=True, **options)`` where this torch and device support it."""
    params = [p for g in groups for p in g["params"]]
    if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                      for p in params):
        try:
            return cls(groups, fused=True, **options)
        except (RuntimeError, TypeError, ValueError):
            pass
    return cls(groups, **options)


def _make_scheduler(config: TrainConfig, opt: torch.optim.Optimizer):
    kind = _norm(config.lr_schedule)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    if kind == "step":
        milestones = sorted({max(1, round(config.epochs * f)) for f in (0.3, 0.6, 0.8)})
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.2)
    return None


def _loader(ds: TensorDataset, batch_size: int, seed: int) -> tuple[Any, ShardedBatchSampler]:
    """The training minibatches: an iterable of ``(x, y)`` with ``len`` = steps per epoch,
    and the sampler (call ``set_epoch`` before each epoch).

    The permutation depends only on (seed, epoch): resuming needs no loader state, and every
    number of processes sees the same global batches. Data on the CPU go through a
    ``DataLoader`` whose sampler yields this rank's shard of each global batch as a list of
    indices (a ``TensorDataset`` indexes its tensors once per step with it, no per-example
    collation); data on an accelerator through :class:`_DeviceBatches`, which yields the
    same batches without a host-device synchronisation per step.
    """
    sampler = ShardedBatchSampler(len(ds), batch_size, seed, _CTX.rank, _CTX.world_size)
    if _on_accelerator(ds):
        return _DeviceBatches(ds.tensors, sampler), sampler
    return DataLoader(ds, sampler=sampler, batch_size=None), sampler


def _on_accelerator(ds: TensorDataset) -> bool:
    return any(t.device.type != "cpu" for t in ds.tensors)


class _DeviceBatches:
    """The batches of ``sampler`` gathered from ``tensors`` (on a device) by ``index_select``.

    Indexing a CUDA tensor with a Python list (what a ``DataLoader`` over a ``TensorDataset``
    does) builds the index on the host and copies it with a blocking copy: a host-device
    synchronisation per step and tensor. Here the epoch's indices are copied to the device
    once (:meth:`ShardedBatchSampler.local_indices`) and each step selects with a slice of
    them, which needs no synchronisation. The batches, and their order, are those of the
    ``DataLoader``.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], sampler: ShardedBatchSampler) -> None:
        self.tensors = tuple(tensors)
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        indices, sizes = self.sampler.local_indices()
        on_device: dict[torch.device, torch.Tensor] = {}
        for t in self.tensors:
            if t.device not in on_device:
                on_device[t.device] = indices.to(t.device)  # the epoch's one copy
        start = 0
        for n in sizes:
            yield tuple(t.index_select(0, on_device[t.device][start:start + n])
                        for t in self.tensors)
            start += n


def _channels_last(net: nn.Module, device: torch.device) -> bool:
    """Whether to keep convolution weights and inputs channels-last: on CUDA, where cuDNN's
    fastest (tensor-core) kernels use that layout, whenever the network has a Conv2d. The
    layout changes no result beyond float rounding."""
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in net.modules())


def _to_device(ds: TensorDataset | None, device: torch.device) -> TensorDataset | None:
    if ds is None or device.type == "cpu":
        return ds
    nbytes = sum(t.element_size() * t.numel() for t in ds.tensors)
    if nbytes > 2 * 1024**3:
        return ds
    return TensorDataset(*(t.to(device) for t in ds.tensors))


@torch.no_grad()
def evaluate(net: nn.Module, dataset: TensorDataset, device: torch.device | str = "cpu",
             batch_size: int = 1000, amp_dtype: torch.dtype | None = None,
             channels_last: bool | None = None) -> dict[str, float]:
    """Error and mean cross-entropy of ``net`` in eval mode (test-time gates).

    Parameters
    ----------
    net : nn.Module
        Typically a :class:`GatedNetwork`; its ``forward`` applies the deterministic gates.
    dataset : TensorDataset
        ``(x, y)`` pairs.
    device : torch.device or str, default "cpu"
        Where the batches are evaluated (``net`` must already be there).
    batch_size : int, default 1000
    amp_dtype : torch.dtype, optional
        Autocast to this dtype (mixed precision).
    channels_last : bool, optional
        Feed image batches channels-last; ``None``: on CUDA when ``net`` has a Conv2d.

    Returns
    -------
    dict
        ``{"error": fraction misclassified, "loss": mean cross-entropy}``.
    """
    device = torch.device(device)
    if channels_last is None:
        channels_last = _channels_last(net, device)
    was_training = net.training
    net.eval()
    x_all, y_all = dataset.tensors[0], dataset.tensors[1]
    n = len(y_all)
    # summed on the device and read once: no host-device synchronisation per batch
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for i in range(0, n, batch_size):
            x = x_all[i:i + batch_size].to(device, non_blocking=True)
            y = y_all[i:i + batch_size].to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            ctx = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                   else contextlib.nullcontext())
            with ctx:
                out = net(x)
            out = out.float()
            totals[0] += nn.functional.cross_entropy(out, y, reduction="sum").double()
            totals[1] += (out.argmax(1) != y).sum()
    finally:
        net.train(was_training)
    loss, wrong = totals.tolist()
    return {"error": int(wrong) / max(n, 1), "loss": loss / max(n, 1)}


# =============================================================================== checkpoints
# Never part of a fingerprint: bookkeeping, where the run happens, and the settings that a
# resume may change (``_retunable``), e.g. to continue a diverged run with a smaller step.
_NOT_FINGERPRINTED = frozenset({"out", "resume", "progress", "device", "num_threads",
                                "baseline", "distributed", "lr", "gate_lr", "lam"})
# Settings that only shape the gates: the dense baseline is the same network without them.
_GATE_ONLY = frozenset({"estimator", "estimator_options", "lam", "parameterization", "k",
                        "init_drop_rate", "gate_lr"})


def _fingerprint(config: TrainConfig, phase: str = "l0") -> dict[str, Any]:
    """Settings that determine the training trajectory of ``phase`` (must match to resume)."""
    d = _fingerprint_of(config.to_dict(), phase)
    d.pop("epochs", None)
    if _norm(config.lr_schedule) != "constant":  # the schedule depends on the epoch count
        d["epochs"] = config.epochs
    return d


def _fingerprint_of(stored: Mapping[str, Any], phase: str) -> dict[str, Any]:
    """``stored`` (settings or a checkpoint's fingerprint) less what does not matter to
    ``phase``; checkpoints of earlier versions also fingerprinted lr, gate_lr and lam."""
    skip = _NOT_FINGERPRINTED | (_GATE_ONLY if phase == "dense" else frozenset())
    return {k: v for k, v in stored.items() if k not in skip}


def _retunable(settings: Mapping[str, Any], phase: str) -> dict[str, Any]:
    """The settings a resume of ``phase`` may change, as effective values."""
    values = {"lr": settings.get("lr")}
    if phase != "dense":
        gate_lr = settings.get("gate_lr")
        values["gate_lr"] = values["lr"] if gate_lr is None else gate_lr
        values["lam"] = settings.get("lam")
    return values


def _set_base_lrs(opt: torch.optim.Optimizer, scheduler, base_lrs: list[float]) -> None:
    """Make ``base_lrs`` the per-group learning rates of a restored optimizer.

    A schedule keeps its own copy of the base rates, and both schedules here multiply the
    current rate by a factor per epoch, so the current rate is rescaled by new / old base:
    the run continues where the schedule stands, from the new base.
    """
    for i, (group, new) in enumerate(zip(opt.param_groups, base_lrs)):
        old = scheduler.base_lrs[i] if scheduler is not None else group["lr"]
        if new == old:
            continue
        group["lr"] = new if scheduler is None else group["lr"] * (new / old)
        if scheduler is not None:
            group["initial_lr"] = new
            scheduler.base_lrs[i] = new
    if scheduler is not None:
        scheduler._last_lr = [group["lr"] for group in opt.param_groups]


def _estimator_state(est: binopt.Estimator) -> dict[str, Any]:
    return {k: v for k, v in vars(est).items() if k != "generator"}


def _remove_files(folder: Path, names: tuple[str, ...]) -> None:
    """Delete ``folder/name`` for each name, then ``folder`` if that left it empty."""
    for name in names:
        (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # missing, or holding files that are not ours
        folder.rmdir()


def _remove_previous_run(out: Path) -> None:
    """Delete every output of an earlier run in ``out`` (see the module docstring).

    A fresh run replaces some of them only at its end (``exported/``, ``summary.png``) and
    others not at all (``dense/`` without a baseline): left in place, they would pass for
    this run's results, e.g. ``load_exported(OUT/exported)`` would load the earlier model.
    """
    for name in (SUMMARY_NAME, PLOT_NAME, METRICS_NAME, CHECKPOINT_NAME):
        (out / name).unlink(missing_ok=True)
    _remove_files(out / EXPORT_DIR, EXPORT_FILES)
    _remove_files(out / DENSE_DIR, (METRICS_NAME, CHECKPOINT_NAME))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`train` (``OUT/checkpoint.pt``).

    Returns
    -------
    dict
        Keys ``epoch`` (finished epochs), ``model`` (state dict of the
        :class:`GatedNetwork`), ``optimizer``, ``history`` (metrics per epoch), ``config``
        (the settings), ``rng`` and more.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # corrupt or foreign file
        raise ConfigError(f"cannot read checkpoint {path}: {exc}") from None


def _rng_state(est_gen: torch.Generator | None, device: torch.device) -> dict[str, Any]:
    """Every random state of the run, and the device types they belong to."""
    return {
        "torch": torch.get_rng_state(),
        # Only the run's own device: every rank seeds every device alike and draws the same
        # amounts on its own one, so rank 0's device state (the one saved) is each rank's.
        # (Saving all devices gave rank r the untouched state of a device rank 0 never used.)
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "estimator": est_gen.get_state() if est_gen is not None else None,
        # the device type of the run (whose global generator drives e.g. dropout) and of
        # the gate samples' generator: random states do not carry over to another type
        "device": device.type,
        "estimator_device": est_gen.device.type if est_gen is not None else None,
    }


def _stored_device_type(rng: Mapping[str, Any]) -> str | None:
    """The device type a checkpoint's random streams ran on; ``None``: unknown.

    Checkpoints of earlier versions do not store it: a gate generator state of a CPU
    generator's size (5056 bytes) is a CPU one, any other (16 bytes on CUDA) is not.
    """
    stored = rng.get("estimator_device") or rng.get("device")
    if stored is not None:
        return str(stored)
    state = rng.get("estimator")
    if isinstance(state, torch.Tensor):
        return "cpu" if state.numel() == torch.Generator().get_state().numel() else "cuda"
    return None


def _resume_seed(seed: int, epoch: int, stream: str) -> int:
    """The seed of random ``stream`` (``"estimator"`` or ``"torch"``) of a run resumed after
    ``epoch`` finished epochs whose random states cannot be restored: a 64-bit hash of
    ``(seed, epoch, stream)``, the same on every rank and machine."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _restore_rng(rng: Mapping[str, Any], est_gen: torch.Generator | None,
                 device: torch.device, seed: int, epoch: int, printer: _Printer | None,
                 folder: Path) -> str | None:
    """Restore a checkpoint's random states; returns the checkpoint's device type when it
    is not this run's (the streams were then reseeded), else ``None``.

    On another device type (or when a state does not load), the gate generator and
    torch's global generators are reseeded with :func:`_resume_seed` and one warning goes
    to stderr: the run continues, but not with the random stream an uninterrupted run
    would have used.
    """
    stored = _stored_device_type(rng)
    if stored is not None and stored != device.type:
        _reseed(est_gen, seed, epoch)
        _warn(printer,
              f"the checkpoint in {folder} was written on {stored}, this run continues on "
              f"{device.type}: its random stream (gate samples, dropout) cannot carry over and "
              "is reseeded from the seed and the epoch, so its results differ from those of "
              "an uninterrupted run")
        return stored
    try:
        torch.set_rng_state(rng["torch"])
        if est_gen is not None and rng.get("estimator") is not None:
            est_gen.set_state(rng["estimator"])
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:
        _reseed(est_gen, seed, epoch)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _warn(printer,
              f"cannot restore the random state of the checkpoint in {folder} ({first}): the "
              "run continues with its random stream reseeded from the seed and the epoch, so "
              "its results differ from those of an uninterrupted run")
        return None
    cuda = rng.get("cuda")
    if cuda is not None and device.type == "cuda":
        with contextlib.suppress(RuntimeError, IndexError):  # e.g. fewer GPUs now
            if isinstance(cuda, torch.Tensor):  # this run's device (see _rng_state)
                torch.cuda.set_rng_state(cuda, device)
            else:  # older checkpoints stored the state of every device
                torch.cuda.set_rng_state_all(cuda)
    return None


def _warn(printer: _Printer | None, text: str) -> None:
    if printer is not None:
        printer.warn_once("rng", text)


def _reseed(est_gen: torch.Generator | None, seed: int, epoch: int) -> None:
    torch.manual_seed(_resume_seed(seed, epoch, "torch"))  # the CPU and every CUDA device
    if est_gen is not None:
        est_gen.manual_seed(_resume_seed(seed, epoch, "estimator"))


# =============================================================================== one phase
@dataclass
class _Phase:
    name: str  # "l0" or "dense"
    net: GatedNetwork
    folder: Path
    estimator_generator: torch.Generator | None


class _Printer:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = enabled and _isatty()
        self.warned: set[str] = set()

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def warn_once(self, key: str, text: str) -> None:
        """One line on stderr (rank 0, whatever ``progress`` says), once per ``key``."""
        if _CTX.is_main and key not in self.warned:
            self.warned.add(key)
            print(f"binopt: warning: {text}", file=sys.stderr, flush=True)


def _isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _run_phase(
    phase: _Phase,
    config: TrainConfig,
    data: tuple,
    device: torch.device,
    printer: _Printer,
    epoch_callback: Callable[[int, dict], None] | None,
) -> tuple[list[dict], float, list[dict[str, Any]]]:
    """Train one network for ``config.epochs`` epochs (resuming if asked).

    Returns the metrics history, the accumulated training wall time and the settings that
    resumes changed (``[{"epoch": first epoch with the new values, name: [old, new]}]``).
    """
    train_ds, val_ds, test_ds = data
    net = phase.net
    folder = phase.folder
    label = "L0" if phase.name == "l0" else "dense"  # in the lines printed
    folder.mkdir(parents=True, exist_ok=True)
    ckpt_path = folder / CHECKPOINT_NAME
    metrics_path = folder / METRICS_NAME
    opt = _make_optimizer(config, net)
    scheduler = _make_scheduler(config, opt)
    amp_dtype = None
    scaler = None
    if config.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if amp_dtype == torch.float16:
            scaler = torch.amp.GradScaler("cuda")
    est_gen = phase.estimator_generator
    is_hc = isinstance(net.estimator, binopt.HardConcrete) and bool(net.gated_layers())
    fingerprint = _fingerprint(config, phase.name)

    history: list[dict] = []
    # [{"epoch": first epoch with the new values, setting: [old, new], ...}] over all resumes
    changes: list[dict[str, Any]] = []
    start_epoch = 0
    train_time = 0.0
    torch.manual_seed(config.seed)
    if config.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        if ckpt.get("format") != _CHECKPOINT_FORMAT or ckpt.get("phase") != phase.name:
            raise ConfigError(f"{ckpt_path} is not a {phase.name} checkpoint of this version")
        old = _fingerprint_of(ckpt.get("fingerprint", {}), phase.name)
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in diff)
            raise ConfigError(
                f"cannot resume from {ckpt_path}: it was written with other settings ({details}); "
                "use the same settings or a new --out"
            )
        start_epoch = int(ckpt["epoch"])
        if start_epoch > config.epochs:
            raise ConfigError(
                f"the checkpoint in {folder} has {start_epoch} finished epochs, more than "
                f"--epochs {config.epochs}; resume with --epochs >= {start_epoch}"
            )
        try:
            net.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"cannot resume from {ckpt_path}: the network does not match "
                              f"the checkpoint ({first})") from None
        if scheduler is not None and ckpt.get("scheduler") is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        for key, value in ckpt.get("estimator_state", {}).items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
            setattr(net.estimator, key, value)
        # (no warning when no epoch is left to train: then nothing random happens)
        moved_from = _restore_rng(ckpt["rng"], est_gen, device, config.seed, start_epoch,
                                  printer if start_epoch < config.epochs else None, folder)
        history = list(ckpt["history"])
        train_time = float(ckpt.get("train_time_s", 0.0))
        changes = list(ckpt.get("setting_changes", []))
        printer.line(f"[{label}] resumed from {ckpt_path} after epoch {start_epoch}")
        # The restored optimizer and schedule carry the checkpoint's learning rates, and the
        # network was built with this run's lam, so only the rates need setting here.
        before = _retunable(ckpt.get("config", {}), phase.name)
        now = _retunable(config.to_dict(), phase.name)
        changed = {k: [before[k], now[k]] for k in now if before[k] != now[k]}
        if changed:
            lrs = [float(now["lr"])] + ([float(now["gate_lr"])] if len(opt.param_groups) > 1
                                        else [])
            _set_base_lrs(opt, scheduler, lrs)
        if moved_from is not None:
            changed["device"] = [moved_from, device.type]
        if changed and start_epoch < config.epochs:
            changes.append({"epoch": start_epoch + 1, **changed})
            printer.line(f"[{label}] from epoch {start_epoch + 1}: " + ", ".join(
                f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    else:
        if config.resume:
            # a warning, not a progress line: with --no-progress a mistyped --out would
            # otherwise look like a successful resume
            printer.warn_once(f"fresh-{phase.name}", f"--resume: no checkpoint in {folder}; "
                              f"the {label} phase starts from scratch")
        # a fresh run must not leave a stale checkpoint of an earlier run behind
        if _CTX.is_main:
            ckpt_path.unlink(missing_ok=True)
    # metrics.jsonl always mirrors the checkpoint's history (lines written after the last
    # checkpoint by an interrupted run are dropped).
    if _CTX.is_main:
        with open(metrics_path, "w", encoding="utf-8") as fh:
            for row in history:
                fh.write(json.dumps(row) + "\n")
    _CTX.barrier()

    loader, sampler = _loader(train_ds, config.batch_size, config.seed)
    steps_per_epoch = len(loader)
    step_fn = wrap_ddp(net, _CTX, device)
    channels_last = _channels_last(net, device)
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.perf_counter()
        net.train()
        sampler.set_epoch(epoch)
        global_sizes = [len(b) for b in sampler.global_batches()]
        log = StepLog(host_read_interval(device))
        bar = None
        iterator: Any = loader
        if printer.bar:
            from tqdm.auto import tqdm

            bar = tqdm(loader, desc=f"{label} epoch {epoch}/{config.epochs}", leave=False,
                       dynamic_ncols=True, file=sys.stderr)
            iterator = bar
        try:
            for step, (x, y) in enumerate(iterator, start=1):
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                ctx = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                       else contextlib.nullcontext())
                # Each rank's data loss is scaled so that DDP's mean over ranks is the loss
                # of the global batch, even when it does not split evenly.
                scale = y.shape[0] * _CTX.world_size / global_sizes[step - 1]
                with ctx:
                    out = step_fn(x, y, scale)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(out.loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    out.loss.backward()
                    opt.step()
                if is_hc:
                    with torch.no_grad():
                        for p in net.gate_parameters():
                            p.clamp_(*_HC_LOG_A_RANGE)
                bad = log.add(step, out.loss, out.data_loss, out.penalty,
                              (out.logits.argmax(1) != y).sum(), int(y.shape[0]), scale)
                if bad is None and step == steps_per_epoch:
                    bad = log.flush()
                if bad is not None:
                    _diverged(label, epoch, bad, steps_per_epoch, ckpt_path)
                # the bar shows what was read; on the CPU every 5th step is enough
                if bar is not None and log.pending == 0 and log.seen and (
                        log.every > 1 or step % 5 == 0 or step == steps_per_epoch):
                    bar.set_postfix(loss=f"{log.sums['loss'] / log.seen:.4f}",
                                    err=f"{log.wrong / log.seen:.4f}",
                                    kept=f"{net.expected_kept_fraction():.3f}", refresh=False)
        finally:
            if bar is not None:
                bar.close()
        if scheduler is not None:
            scheduler.step()
        sums, wrong, seen = log.sums, log.wrong, log.seen
        if _CTX.enabled:
            sums, wrong, seen = _all_reduce_sums(sums, wrong, seen, device)
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        row = _epoch_metrics(net, epoch, sums, wrong, seen, val_ds, test_ds, device, amp_dtype,
                             opt, epoch_time, train_time)
        if changes and changes[-1]["epoch"] == epoch:
            row["setting_changes"] = {k: v for k, v in changes[-1].items() if k != "epoch"}
        history.append(row)
        payload = {
            "format": _CHECKPOINT_FORMAT,
            "phase": phase.name,
            "epoch": epoch,
            "config": config.to_dict(),
            "fingerprint": fingerprint,
            "model": net.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "estimator_state": _estimator_state(net.estimator),
            "rng": _rng_state(est_gen, device),
            "history": history,
            "setting_changes": changes,
            "train_time_s": train_time,
            "versions": _versions(),
        }
        if _CTX.is_main:
            atomic_write(ckpt_path, functools.partial(torch.save, payload))
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        _CTX.barrier()
        printer.line(_epoch_line(label, row, config.epochs))
        if epoch_callback is not None and _CTX.is_main:
            epoch_callback(epoch, dict(row))
    return history, train_time, changes


def _diverged(label: str, epoch: int, bad: NonFiniteLoss, steps_per_epoch: int,
              ckpt_path: Path) -> None:
    if ckpt_path.exists():
        where = (f"the last good checkpoint {ckpt_path} (after epoch {epoch - 1}) is intact; "
                 "continue from it with --resume and a smaller --lr or --lam")
    else:
        where = "no epoch had finished, so there is no checkpoint; try a smaller --lr or --lam"
    raise TrainingDivergedError(
        f"training diverged: the {label} loss is {bad.value} at epoch {epoch}, "
        f"step {bad.step}/{steps_per_epoch}; {where}.",
        epoch=epoch, step=bad.step,
        checkpoint=str(ckpt_path) if ckpt_path.exists() else None,
    )


def _all_reduce_sums(sums: dict[str, float], wrong: int, seen: int, device: torch.device):
    """Epoch totals over all ranks (one all-reduce per epoch, outside the steps)."""
    import torch.distributed as dist

    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [wrong, seen], dtype=torch.float64,
                     device=device)
    dist.all_reduce(t)
    values = t.tolist()
    return dict(zip(keys, values[: len(keys)])), int(values[-2]), int(values[-1])


def _epoch_metrics(net, epoch, sums, wrong, seen, val_ds, test_ds, device, amp_dtype, opt,
                   epoch_time, train_time) -> dict[str, Any]:
    row: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": sums["loss"] / max(seen, 1),
        "train_data_loss": sums["data_loss"] / max(seen, 1),
        "penalty": sums["penalty"] / max(seen, 1),
        "train_error": wrong / max(seen, 1),
    }
    if val_ds is not None:
        val = evaluate(net, val_ds, device, amp_dtype=amp_dtype)
        row["val_error"], row["val_loss"] = val["error"], val["loss"]
    test = evaluate(net, test_ds, device, amp_dtype=amp_dtype)
    row["test_error"], row["test_loss"] = test["error"], test["loss"]
    kept = net.kept_units()
    row["expected_kept_fraction"] = net.expected_kept_fraction()
    row["kept_units"] = kept
    row["architecture"] = _architecture(kept)
    row["gated_weights_kept_fraction"] = _gated_weights_kept(net)
    row["lr"] = opt.param_groups[0]["lr"]
    row["epoch_time_s"] = epoch_time
    row["train_time_s"] = train_time
    return row


def _epoch_line(label: str, row: dict, epochs: int) -> str:
    parts = [f"[{label}] epoch {row['epoch']:>3}/{epochs}", f"loss {row['train_loss']:.4f}",
             f"train err {100 * row['train_error']:.2f}%"]
    if "val_error" in row:
        parts.append(f"val err {100 * row['val_error']:.2f}%")
    parts.append(f"test err {100 * row['test_error']:.2f}%")
    if row.get("kept_units"):
        parts.append(f"E[kept] {100 * row['expected_kept_fraction']:.1f}%")
        parts.append(f"arch {row['architecture']}")
    parts.append(f"{row['epoch_time_s']:.1f}s")
    return "  ".join(parts)


def _architecture(units: Mapping[str, int]) -> str:
    return "-".join(str(int(v)) for v in units.values())


@torch.no_grad()
def _gated_weights_kept(net: GatedNetwork) -> float:
    kept = total = 0
    for layer in net.gated_layers().values():
        g = layer.gate
        kept += int((g.deterministic() > 0).sum()) * g.group_size
        total += g.num_units * g.group_size
    return kept / total if total else 1.0


# =============================================================================== compression
def _estimate_counts(net: GatedNetwork, input_shape, device,
                     input_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Fallback params/FLOPs counts from the test-time gates (no export module needed).

    Counts the weights (and multiply-accumulates) of every Linear/Conv2d; for a gated
    layer only the groups of its kept units. Units whose removal is implied in a
    neighbouring layer are not removed, so this slightly overestimates what an export keeps.
    The dummy example has ``input_dtype`` (that of the data: integer token ids for a model
    starting with an embedding), by default the dtype of the first floating parameter.
    """
    from .layers import L0Conv2d, L0Linear

    counts = {"params": 0, "params_dense": 0, "flops": 0, "flops_dense": 0}
    hooks = []

    def hook(module, inputs, output):
        if isinstance(module, L0Linear):
            full = module.in_features * module.out_features
            kept_frac = _unit_fraction(module)
            counts["params"] += round(full * kept_frac)
            counts["params_dense"] += full
            counts["flops"] += round(full * kept_frac)
            counts["flops_dense"] += full
        elif isinstance(module, (L0Conv2d, nn.Conv2d)):
            conv = module.conv if isinstance(module, L0Conv2d) else module
            full = conv.weight.numel()
            kept_frac = _unit_fraction(module) if isinstance(module, L0Conv2d) else 1.0
            spatial = int(output.shape[-1] * output.shape[-2])
            counts["params"] += round(full * kept_frac)
            counts["params_dense"] += full
            counts["flops"] += round(full * kept_frac) * spatial
            counts["flops_dense"] += full * spatial
        elif isinstance(module, nn.Linear):
            counts["params"] += module.weight.numel()
            counts["params_dense"] += module.weight.numel()
            counts["flops"] += module.weight.numel()
            counts["flops_dense"] += module.weight.numel()

    for m in net.module.modules():
        if isinstance(m, (L0Linear, L0Conv2d, nn.Conv2d, nn.Linear)):
            if isinstance(m, nn.Conv2d) and any(
                isinstance(p, L0Conv2d) and p.conv is m for p in net.module.modules()
            ):
                continue
            hooks.append(m.register_forward_hook(hook))
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            if input_dtype is None:
                param = next((p for p in net.module.parameters() if p.is_floating_point()),
                             None)
                input_dtype = param.dtype if param is not None else torch.get_default_dtype()
            net(torch.zeros((1, *input_shape), dtype=input_dtype, device=device))
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    return counts


def _unit_fraction(layer) -> float:
    if layer.gate is None:
        return 1.0
    return float((layer.gate.deterministic() > 0).float().mean())


def _compression(net: GatedNetwork, dense: nn.Module, input_shape, device,
                 folder: Path, input_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """``params_kept_fraction`` and ``flops_kept_fraction``, from the exported module when
    :mod:`.export` and :mod:`.flops` exist, else estimated from the kept units.
    ``input_dtype`` is that of the data (the dummy examples that count FLOPs)."""
    result: dict[str, Any] = {}
    if _CTX.is_main:  # a failed export below must not leave the previous one looking current
        _remove_files(folder / EXPORT_DIR, EXPORT_FILES)
    try:
        from .export import export, save_exported
        from .flops import count_flops, count_params
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("applications.sparsify"):
            raise
    else:
        try:
            net_cpu_state = net.training
            net.eval()
            exported = export(net, input_shape=tuple(input_shape))
            net.train(net_cpu_state)
            dense.eval()
            params = count_params(exported.module)
            params_dense = count_params(dense)
            flops = count_flops(exported.module, tuple(input_shape), input_dtype)
            flops_dense = count_flops(dense, tuple(input_shape), input_dtype)
            if _CTX.is_main:
                save_exported(exported, folder / EXPORT_DIR)
            result.update(
                params_kept=int(params), params_dense=int(params_dense),
                flops_kept=int(flops), flops_dense=int(flops_dense),
                params_kept_fraction=params / params_dense if params_dense else 1.0,
                flops_kept_fraction=flops / flops_dense if flops_dense else 1.0,
                compression_method="export",
                exported=str(folder / EXPORT_DIR),
            )
            return result
        except Exception as exc:  # an export bug must not lose a finished training run
            warnings.warn(f"export of the pruned network failed ({type(exc).__name__}: {exc}); "
                          "params/FLOPs kept are estimated from the kept units instead",
                          RuntimeWarning, stacklevel=2)
            result["export_error"] = f"{type(exc).__name__}: {exc}"
    c = _estimate_counts(net, input_shape, device, input_dtype)
    result.update(
        params_kept=c["params"], params_dense=c["params_dense"],
        flops_kept=c["flops"], flops_dense=c["flops_dense"],
        params_kept_fraction=c["params"] / c["params_dense"] if c["params_dense"] else 1.0,
        flops_kept_fraction=c["flops"] / c["flops_dense"] if c["flops_dense"] else 1.0,
        compression_method="estimate",
    )
    return result


# =============================================================================== entry point
def train(config: TrainConfig, *,
          epoch_callback: Callable[[int, dict], None] | None = None,
          module: nn.Module | None = None,
          data: Any = None,
          _dense_only: bool = False) -> dict[str, Any]:
    """Train an L0-gated network (and the dense baseline if asked); write ``OUT/``.

    Parameters
    ----------
    config : TrainConfig
        The settings (validated here; invalid ones raise :class:`ConfigError`).
    epoch_callback : callable, optional
        ``epoch_callback(epoch, metrics)`` after every epoch of the gated network, once its
        checkpoint and metrics line are written; ``metrics`` holds ``test_error``,
        ``val_error`` (when ``validation_fraction > 0``), ``expected_kept_fraction``,
        ``kept_units``, ``architecture``, losses and timings. Exceptions it raises (e.g.
        ``optuna.TrialPruned``) propagate to the caller; the checkpoint stays valid.
    module : nn.Module, optional
        Your own network instead of ``config.model`` (which then only labels the run).
        Without L0 layers it is converted by :func:`~.models.to_l0` (gates on the inputs
        of every Linear and the output channels of every Conv2d; tied weights stay tied;
        the layers it keeps ungated are listed there); with L0 layers it is used as it
        is. It is copied, never modified. The dense baseline is the same network without
        gates, starting from the same weights. A network that export cannot shrink still
        trains: the summary then holds ``export_error`` and estimated counts.
    data : DatasetSplits or (TensorDataset, TensorDataset), optional
        Your own ``(train, test)`` data instead of ``config.dataset``: inputs in the
        model's dtype (or integer token ids for a model starting with an embedding) and
        int64 class labels ``0 .. C-1``.

    Returns
    -------
    dict
        The summary also written to ``OUT/summary.json``: ``test_error``, ``val_error``
        (if any), ``dense_test_error`` (if ``baseline="dense"``), ``architecture`` (kept
        units per gated layer, e.g. ``"20-25-45-462"``), ``dense_architecture``,
        ``kept_units``, ``total_units``, ``params_kept_fraction``,
        ``flops_kept_fraction``, ``expected_kept_fraction``, ``estimator``, ``lambda``,
        ``parameterization``, ``k``, ``model``, ``dataset``, ``epochs``, ``seed``,
        ``data_seed``, ``versions``, ``device``, ``wall_time_s``, ``out`` and the config;
        ``setting_changes`` (``dense_setting_changes`` for the baseline) when a resume
        changed ``lr``, ``gate_lr``, ``lam`` or the device type: ``[{"epoch": first epoch
        with the new values, "lr": [old, new], ...}]`` (``"device": ["cuda", "cpu"]``).

    Raises
    ------
    ConfigError
        Invalid settings, missing data, data that does not fit ``module`` (input dtype,
        labels beyond its outputs), or a checkpoint that does not match the settings or
        has finished more than ``epochs`` epochs. Invalid settings are reported before
        any output of an earlier run in ``OUT`` is deleted.
    TrainingDivergedError
        The loss became NaN/inf; the last good checkpoint is intact.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig; got {type(config).__name__}")
    if module is not None and not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module; got {type(module).__name__}")
    config = dataclasses.replace(config)
    config.validate(custom_model=module is not None, custom_data=data is not None)
    if isinstance(config.lam, Mapping):
        config.lam = {str(k): float(v) for k, v in config.lam.items()}
    else:
        config.lam = float(config.lam)
    device = _resolve_device(config.device, config.amp)
    global _CTX
    ctx = DistributedContext()
    if config.distributed or env_requests_distributed():
        try:
            ctx = init_distributed(device.type)
        except RuntimeError as exc:
            raise ConfigError(str(exc)) from None
        config.distributed = True
        if device.type == "cuda":
            device = torch.device("cuda", ctx.local_rank)
    out = Path(config.out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
        why = (f"{blocker} is a file, not a folder" if blocker is not None
               else exc.strerror or str(exc))
        raise ConfigError(f"cannot create output folder {out}: {why}") from None
    old_threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(int(config.num_threads))
    t_start = time.perf_counter()
    previous_ctx, _CTX = _CTX, ctx
    try:
        # pruned units' Adam moments decay through the subnormal range (denormals.py)
        with flush_denormals(device.type == "cpu"):
            return _train(config, device, out, epoch_callback, t_start, dense_only=_dense_only,
                          user_module=module, user_data=data)
    finally:
        _CTX = previous_ctx
        if config.num_threads is not None:
            torch.set_num_threads(old_threads)
        shutdown(ctx)


def train_dense(config: TrainConfig, *,
                epoch_callback: Callable[[int, dict], None] | None = None,
                module: nn.Module | None = None,
                data: Any = None) -> dict[str, Any]:
    """Train only the dense (ungated) twin of ``config.model`` with the same budget.

    Writes ``OUT/metrics.jsonl``, ``OUT/checkpoint.pt`` (resumable like :func:`train`),
    ``OUT/summary.json`` and ``OUT/summary.png``. The gate settings (``estimator``,
    ``lam``, ...) are ignored; the summary reports ``estimator="dense"``,
    ``params_kept_fraction = flops_kept_fraction = 1`` and
    ``test_error == dense_test_error``. Used by the benchmark to train one dense baseline
    per seed rather than one per gated run. ``module`` and ``data`` are as in :func:`train`.
    """
    return train(config, epoch_callback=epoch_callback, module=module, data=data,
                 _dense_only=True)


def _make_net(config: TrainConfig, module: nn.Module, num_train: int, gated: bool,
              device: torch.device) -> tuple[GatedNetwork, torch.Generator | None]:
    module = module.to(device)
    if _channels_last(module, device):
        module = module.to(memory_format=torch.channels_last)
    if gated:
        gen = torch.Generator(device=device).manual_seed(config.seed)
        # value checks synchronise host and device every step: off unless asked for
        options = {"validate_args": False, **dict(config.estimator_options)}
        estimator = binopt.get_estimator(config.estimator, generator=gen, **options)
        lam: Any = config.lam
    else:
        gen, estimator, lam = None, binopt.get_estimator("arm", validate_args=False), 0.0
    try:
        net = GatedNetwork(module, estimator, lam=lam, num_train=num_train)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if gated:
        if not net.gated_layers():
            raise ConfigError(f"model {config.model!r} has no gated layers")
        if isinstance(estimator, binopt.Exact):
            total = sum(layer.gate.num_units for layer in net.gated_layers().values())
            if total > estimator.max_dim:
                raise ConfigError(
                    f"the exact estimator enumerates 2^{total} gate states; it works only up "
                    f"to {estimator.max_dim} gates. Choose arm, disarm or hard_concrete"
                )
    return net, gen


def _train(config: TrainConfig, device: torch.device, out: Path,
           epoch_callback, t_start: float, dense_only: bool = False,
           user_module: nn.Module | None = None, user_data: Any = None) -> dict[str, Any]:
    train_ds, val_ds, test_ds, input_shape, num_classes = _load_data(config, user_data)
    num_train = len(train_ds)
    data = (_to_device(train_ds, device), _to_device(val_ds, device), _to_device(test_ds, device))
    printer = _Printer(bool(config.progress) and _CTX.is_main)

    # Everything that can reject the settings runs before an earlier run's files are touched.
    module = _build_module(config, input_shape, num_classes, gated=True, user_module=user_module)
    net, est_gen = _make_net(config, module, num_train, True, device)
    if user_module is not None or user_data is not None:
        _check_data_fits(net, (train_ds, val_ds, test_ds), device)
    dense_module = _build_module(config, input_shape, num_classes, gated=False,
                                 user_module=user_module).to(device)
    dense_net = None
    if config.baseline == "dense" or dense_only:
        dense_net, _ = _make_net(config, dense_module, num_train, False, device)
    if not config.resume and _CTX.is_main:
        _remove_previous_run(out)

    history: list[dict] = []
    train_time = 0.0
    changes: list[dict[str, Any]] = []
    if not dense_only:
        history, train_time, changes = _run_phase(
            _Phase("l0", net, out, est_gen), config, data, device, printer, epoch_callback)

    dense_history: list[dict] = []
    dense_time = 0.0
    dense_changes: list[dict[str, Any]] = []
    if dense_net is not None:
        dense_history, dense_time, dense_changes = _run_phase(
            _Phase("dense", dense_net, out if dense_only else out / DENSE_DIR, None),
            config, data, device, printer, epoch_callback if dense_only else None)
        dense_module = dense_net.module
    if dense_only:
        return _dense_summary(config, net, dense_history, dense_time, dense_module, input_shape,
                              num_train, val_ds, test_ds, device, out, t_start, dense_changes,
                              train_ds.tensors[0].dtype)

    last = history[-1]
    kept = net.kept_units()
    total_units = {name: layer.gate.num_units for name, layer in net.gated_layers().items()}
    summary: dict[str, Any] = {
        "test_error": last["test_error"],
    }
    if "val_error" in last:
        summary["val_error"] = last["val_error"]
    if dense_history:
        summary["dense_test_error"] = dense_history[-1]["test_error"]
        if "val_error" in dense_history[-1]:
            summary["dense_val_error"] = dense_history[-1]["val_error"]
        summary["dense_train_time_s"] = dense_time
        if dense_changes:
            summary["dense_setting_changes"] = dense_changes
    if changes:
        summary["setting_changes"] = changes
    summary.update(
        architecture=_architecture(kept),
        dense_architecture=_architecture(total_units),
        kept_units=kept,
        total_units=total_units,
    )
    summary.update(_compression(net, dense_module, input_shape, device, out,
                                train_ds.tensors[0].dtype))
    summary.update(
        expected_kept_fraction=net.expected_kept_fraction(),
        gated_weights_kept_fraction=_gated_weights_kept(net),
        estimator=config.estimator,
        estimator_options=_jsonable(dict(config.estimator_options)),
        **{"lambda": config.lam},
        parameterization=config.effective_parameterization,
        k=float(config.k),
        init_drop_rate=config.init_drop_rate,
        lr=float(config.lr),
        gate_lr=float(config.lr if config.gate_lr is None else config.gate_lr),
        **_run_fields(config, num_train, val_ds, test_ds, device, train_time, t_start, out),
    )
    return _finish(summary, out, history, dense_history, kept, total_units,
                   f"{config.model} on {config.dataset}: {config.estimator}, lam={config.lam}")


def _dense_summary(config, gated_net, history, train_time, dense_module, input_shape, num_train,
                   val_ds, test_ds, device, out, t_start, changes,
                   input_dtype: torch.dtype | None = None) -> dict[str, Any]:
    from .flops import count_flops, count_params

    last = history[-1]
    total_units = {n: layer.gate.num_units for n, layer in gated_net.gated_layers().items()}
    params = count_params(dense_module)
    flops = count_flops(dense_module, tuple(input_shape), input_dtype)
    summary: dict[str, Any] = {"test_error": last["test_error"]}
    if "val_error" in last:
        summary["val_error"] = last["val_error"]
    if changes:
        summary["setting_changes"] = changes
    summary.update(
        dense_test_error=last["test_error"],
        architecture=_architecture(total_units),
        dense_architecture=_architecture(total_units),
        kept_units=total_units,
        total_units=total_units,
        params_kept=params, params_dense=params, flops_kept=flops, flops_dense=flops,
        params_kept_fraction=1.0, flops_kept_fraction=1.0, compression_method="dense",
        expected_kept_fraction=1.0,
        estimator="dense",
        **{"lambda": 0.0},
        **_run_fields(config, num_train, val_ds, test_ds, device, train_time, t_start, out),
    )
    return _finish(summary, out, [], history, total_units, total_units,
                   f"dense {config.model} on {config.dataset}")


def _run_fields(config, num_train, val_ds, test_ds, device, train_time, t_start, out):
    """Summary fields shared by gated and dense runs."""
    return dict(
        model=config.model,
        dataset=config.dataset,
        num_train=num_train,
        num_val=len(val_ds) if val_ds is not None else 0,
        num_test=len(test_ds),
        epochs=config.epochs,
        seed=config.seed,
        data_seed=config.data_seed,
        versions=_versions(),
        device=str(device),
        world_size=_CTX.world_size,
        amp=bool(config.amp),
        train_time_s=train_time,
        wall_time_s=time.perf_counter() - t_start,
        out=str(out),
        config=config.to_dict(),
    )


def _finish(summary, out, history, dense_history, kept, total_units, title) -> dict[str, Any]:
    """Write ``summary.json`` and the run plot (rank 0); a plotting problem never loses a run."""
    summary = _jsonable(summary)
    _write_summary(summary, out)
    if _CTX.is_main:
        try:
            from .results import plot_run

            plot_run(history, dense_history, kept, total_units, out / PLOT_NAME, title=title)
        except Exception as exc:
            warnings.warn(f"could not write {out / PLOT_NAME}: {exc}", RuntimeWarning,
                          stacklevel=2)
    return summary


def _write_summary(summary: dict[str, Any], out: Path) -> None:
    if not _CTX.is_main:
        return
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / SUMMARY_NAME, lambda fh: fh.write(text.encode("utf-8")))
