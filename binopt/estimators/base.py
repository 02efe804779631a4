"""The estimator contract shared by every family.

An :class:`Estimator` turns a black-box objective ``f`` of binary samples into gradient
estimates with respect to the Bernoulli logits ``alpha`` (``pi = sigmoid(alpha)``).

The contract for ``f``
----------------------
``f`` receives samples with the same structure as the logits (one tensor, a list or a dict
of tensors) where every tensor has one extra *leading* sample dimension ``S``:
``samples[k].shape == (S, *logits[k].shape)``. It returns a tensor of shape ``(S,)``: one
value per sample. Samples must be treated independently (value ``s`` may depend only on
sample ``s``), which lets one call evaluate many samples in a vectorized way. Parameters
``theta`` used inside ``f`` receive ordinary autograd gradients.

Subclasses implement :meth:`Estimator._estimate`, which receives the logits expanded to
``(N, *shape)`` (one copy per independent estimate) and returns ``N`` surrogate values
whose *value* is a Monte Carlo estimate of ``E[f]`` and whose *gradient* with respect to
the n-th copy of the logits is the n-th gradient estimate. Everything else (validation,
structures, averaging, detached per-estimate gradients) is shared here.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
from collections.abc import Callable
from typing import Any, ClassVar, Union

import torch

from .._structure import Structure, flatten, leaf_names
from .._validation import (
    check_f_output,
    check_generator,
    check_logits,
    check_num_samples,
    validate_args_enabled,
)

ObjectiveFn = Callable[[Any], torch.Tensor]
SampleShape = Union[tuple[int, ...], torch.Size, int]


class Estimator(abc.ABC):
    """Abstract gradient estimator for ``E_{z ~ Bernoulli(sigmoid(alpha))}[f(z)]``.

    Class attributes declare what an estimator is:

    Attributes
    ----------
    name : str
        Registry name used by :func:`binopt.get_estimator`.
    unbiased : bool
        Whether the estimate is unbiased for the gradient of the *Bernoulli* objective.
    evaluations : int
        Evaluations of ``f`` per estimate (instances may override via
        :attr:`evaluations_per_estimate`, e.g. leave-one-out with K samples).
    requires_differentiable_f : bool
        Whether ``f`` must be differentiable in ``z`` (relaxations, straight-through).
    reparameterized : bool
        Whether samples are differentiable functions of the logits.

    Parameters
    ----------
    generator : torch.Generator, optional
        Source of randomness; must live on the logits' device. ``None`` uses torch's
        default generator for that device.
    validate_args : bool, optional
        Check logits and ``f``'s output for NaN/inf (costs a host-device sync) and, for
        estimators that differentiate ``f`` through its samples, that ``f``'s values depend
        on them (a walk of ``f``'s autograd graph). ``None`` follows
        :func:`binopt.set_validate_args` (default on).
    """

    name: ClassVar[str] = "estimator"
    unbiased: ClassVar[bool] = False
    evaluations: ClassVar[int] = 1
    requires_differentiable_f: ClassVar[bool] = False
    reparameterized: ClassVar[bool] = False
    #: Whether :meth:`surrogate_rows` (independent problems per row) is available.
    supports_rows: ClassVar[bool] = True

    def __init__(
        self,
        *,
        generator: torch.Generator | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None; got {type(generator).__name__}"
            )
        if validate_args is not None and not isinstance(validate_args, bool):
            raise TypeError(f"validate_args must be a bool or None; got {validate_args!r}")
        self.generator = generator
        self._validate_args = validate_args

    # ------------------------------------------------------------------ declared properties
    @property
    def evaluations_per_estimate(self) -> int:
        """Evaluations of ``f`` that one gradient estimate costs."""
        return self.evaluations

    @property
    def validate_args(self) -> bool:
        return validate_args_enabled() if self._validate_args is None else self._validate_args

    def prob_nonzero(self, logits: torch.Tensor) -> torch.Tensor:
        """Probability that the gate is non-zero (what the L0 penalty counts), differentiable."""
        return torch.sigmoid(logits)

    def deterministic_gate(self, logits: torch.Tensor) -> torch.Tensor:
        """Test-time gate value for each unit.

        Bernoulli gates follow the L0-ARM reference: keep a unit when ``pi >= 1/2`` and
        let it carry its probability ``pi`` (which an export folds into the weights).
        """
        pi = torch.sigmoid(logits)
        return torch.where(pi >= 0.5, pi, torch.zeros_like(pi))

    def sample(self, logits: torch.Tensor, sample_shape: SampleShape = ()) -> torch.Tensor:
        """Draw gate samples (no gradient) of shape ``sample_shape + logits.shape``, in the
        logits' dtype (``sample_shape`` may be an int ``n``, meaning ``(n,)``)."""
        shape = self._check_sample_args(logits, sample_shape)
        u = self._uniform(shape + tuple(logits.shape), logits)
        return (u < torch.sigmoid(logits.detach().to(u.dtype))).to(logits.dtype)

    # ------------------------------------------------------------------ public interface
    def surrogate(self, f: ObjectiveFn, logits: Structure, num_samples: int = 1) -> torch.Tensor:
        """Scalar whose value estimates ``E[f]`` and whose gradient estimates ``grad E[f]``.

        ``loss.backward()`` leaves the estimate (averaged over ``num_samples`` independent
        estimates) in ``logits.grad`` and Monte Carlo gradients on any parameter inside
        ``f``.
        """
        leaves, _, n = self._prepare(f, logits, num_samples)
        if n == 1:  # (an expand and a mean are two more autograd nodes per step)
            alphas = [leaf.unsqueeze(0) for leaf in leaves]
        else:
            alphas = [leaf.unsqueeze(0).expand((n,) + tuple(leaf.shape)) for leaf in leaves]
        values = self._run(f, logits, alphas)
        self._after_surrogate(values)
        return values.sum() if n == 1 else values.mean()

    def surrogate_rows(self, f: ObjectiveFn, logits: torch.Tensor) -> torch.Tensor:
        """One surrogate value per row of ``logits``: ``N`` independent problems at once.

        For amortized models (a VAE encoder gives each example its own logits and each
        example has its own objective ``f_n``), averaging one surrogate over the batch would
        give every example the learning signal of the whole batch. Here row ``n`` of
        ``logits`` (shape ``(N, *shape)``) is problem ``n``: ``f`` receives samples of shape
        ``(S, *shape)`` where sample ``s`` belongs to problem ``s % N``, and returns ``(S,)``.

        Returns
        -------
        torch.Tensor
            ``(N,)``; value ``n`` estimates ``E[f_n]`` and its gradient w.r.t. ``logits[n]``
            estimates ``grad E[f_n]``. Sum or average them into a loss.
        """
        if not isinstance(logits, torch.Tensor):
            raise TypeError(
                f"logits must be a torch.Tensor of shape (N, ...); got {type(logits).__name__}"
            )
        if logits.dim() < 1 or logits.shape[0] < 1:
            raise ValueError(
                "logits must have a leading row dimension N >= 1; "
                f"got shape {tuple(logits.shape)}"
            )
        if not self.supports_rows:
            raise ValueError(f"{type(self).__name__} does not support independent rows")
        self._prepare(f, logits[0], 1)
        self._prepare(f, logits, 1)  # value checks on every row
        values = self._run(f, logits[0], [logits])
        self._after_surrogate(values)
        return values

    def grad(self, f: ObjectiveFn, logits: Structure, num_samples: int = 1) -> Structure:
        """Detached gradient estimates: the logits' structure, each with a leading dim ``N``.

        All ``num_samples`` estimates are computed in one vectorized call to ``f``.
        """
        leaves, rebuild, n = self._prepare(f, logits, num_samples)
        # (inference mode would make every tensor here an inference tensor, which autograd
        # refuses; enable_grad alone does not leave it)
        with torch.inference_mode(False), torch.enable_grad():
            alphas = [
                leaf.detach().unsqueeze(0).expand((n,) + tuple(leaf.shape)).clone().requires_grad_()
                for leaf in leaves
            ]
            values = self._run(f, logits, alphas)
            # the backward pass outside autocast (as PyTorch recommends): inside it, its
            # matrix products would run in bf16 again whatever the forward pass chose
            with no_autocast(alphas[0].device.type):
                grads = torch.autograd.grad(values.sum(), alphas, allow_unused=True)
        out = [torch.zeros_like(a) if g is None else g.detach() for a, g in zip(alphas, grads)]
        return rebuild(out)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"

    def _options(self) -> dict[str, Any]:
        return {}

    def _after_surrogate(self, values: torch.Tensor) -> None:
        """Hook run after every training estimate (e.g. to update a baseline)."""
        return None

    # ------------------------------------------------------------------ subclass hooks
    @abc.abstractmethod
    def _estimate(self, call_f: Callable, alphas: list[torch.Tensor]) -> torch.Tensor:
        """Return ``N`` surrogate values for logits expanded to ``(N, *shape)``.

        ``call_f(samples_list)`` evaluates ``f`` on a list of sample tensors sharing a
        leading dimension ``S`` and returns the validated ``(S,)`` values.
        """

    # ------------------------------------------------------------------ shared machinery
    def _prepare(self, f: ObjectiveFn, logits: Structure, num_samples: int):
        if not callable(f):
            raise TypeError(f"f must be callable; got {type(f).__name__}")
        leaves, rebuild = flatten(logits)
        names = None if isinstance(logits, torch.Tensor) else leaf_names(logits)
        check_logits(leaves, self.validate_args, names=names)
        check_generator(self.generator, leaves[0].device)
        n = check_num_samples(num_samples)
        return leaves, rebuild, n

    def _run(self, f: ObjectiveFn, logits: Structure, alphas: list[torch.Tensor]) -> torch.Tensor:
        _, rebuild = flatten(logits)
        device = alphas[0].device
        check = self.validate_args
        differentiates = (self.requires_differentiable_f and torch.is_grad_enabled()
                          and any(a.requires_grad for a in alphas))
        sample_nodes: list = []

        def call_f(samples: list[torch.Tensor]) -> torch.Tensor:
            if differentiates and check:  # before f: it may modify its samples in place
                sample_nodes.extend(z.grad_fn for z in samples if z.grad_fn is not None)
            s = samples[0].shape[0]
            return check_f_output(f(rebuild(samples)), s, device, check)

        values = self._estimate(call_f, alphas)
        # Values that do not depend on the samples at all; or (a graph walk, so only with
        # validate_args) that depend on parameters inside f but not on the samples, which
        # left a silent zero gradient for the logits.
        if differentiates and (not values.requires_grad or (
                check and sample_nodes and not _reaches(values.grad_fn, sample_nodes))):
            raise ValueError(
                f"{type(self).__name__} differentiates f through its samples, but f's values "
                "do not depend differentiably on them (f is constant in z, thresholds z, or "
                "detaches it); use a score-function estimator such as ARM or DisARM for such "
                "an f"
            )
        return values

    def _check_sample_args(self, logits: object, sample_shape: object,
                           method: str = "sample") -> tuple[int, ...]:
        """Checks of :meth:`sample`'s (or ``rsample``'s) arguments; returns ``sample_shape``
        as a tuple."""
        if not isinstance(logits, torch.Tensor):
            raise TypeError(
                f"{type(self).__name__}.{method} takes one tensor of logits; got "
                f"{type(logits).__name__} (sample each tensor of a structure on its own)"
            )
        check_logits([logits], self.validate_args)
        if isinstance(sample_shape, int) and not isinstance(sample_shape, bool):
            sample_shape = (sample_shape,)
        if (not isinstance(sample_shape, (tuple, list, torch.Size))
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                           for n in sample_shape)):
            raise TypeError(
                "sample_shape must be a tuple of non-negative ints (or one int); "
                f"got {sample_shape!r}"
            )
        return tuple(sample_shape)

    def _uniform(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Uniform noise in the OPEN interval ``(0, 1)``, in :func:`noise_dtype` of ``like``
        (its dtype, but at least float32).

        ``torch.rand`` draws from ``[0, 1)``; its one value 0 is moved below every other
        value it can draw (to ``eps / 4``). Then ``u < pi`` never fires for a gate closed
        by :func:`~binopt.parameterizations.safe_logit` (``pi = sigmoid(-bound)``, about
        1e-38 in float32, not 0), so saturated gates sample deterministically on both sides;
        ``u < 1`` and ``u > 0`` hold for open ones. Without it a closed gate opened with
        probability ``2**-24`` per draw in float32.

        Compare ``u`` with ``sigmoid(alpha)`` computed in ``u.dtype``: in float16 or
        bfloat16 (a 2**-11 or 2**-8 grid near 1, and ``eps / 4`` swallowing every draw
        below 2**-12 or 2**-9) the samples were visibly not Bernoulli(sigmoid(alpha)) and
        the "unbiased" estimators were biased by 10-100% at |alpha| around 5.
        """
        dtype = noise_dtype(like.dtype)
        u = torch.rand(shape, generator=self.generator, device=like.device, dtype=dtype)
        return u.clamp_min_(torch.finfo(dtype).eps / 4)

    def _open_uniform(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Uniform noise bounded away from 0 and 1, for log-odds transforms (in
        :func:`noise_dtype` of ``like``, as :meth:`_uniform`)."""
        u = self._uniform(shape, like)
        eps = torch.finfo(u.dtype).eps
        return u.clamp(eps, 1.0 - eps)


def _reaches(node, targets: list) -> bool:
    """Whether the autograd graph from ``node`` reaches one of the ``targets`` nodes."""
    wanted = set(targets)
    seen = set()
    stack = [node]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node in wanted:
            return True
        seen.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return False


def noise_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype estimators draw their noise and compare it with ``sigmoid(alpha)`` in: the
    logits' own, but at least float32 (float16 and bfloat16 logits sample in float32).

    Samples, surrogate values and gradients still come back in the logits' dtype; only the
    random draws and the coefficients built from them are computed more precisely, so that
    a sample is Bernoulli(sigmoid(alpha)) for the (half-precision) value of ``alpha``.
    """
    return torch.promote_types(dtype, torch.float32)


def no_autocast(device_type: str):
    """A context switching autocast off on ``device_type`` (nothing to do on devices without
    autocast, such as ``meta``)."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def attach_gradient(value: torch.Tensor, coef: list[torch.Tensor], alphas: list[torch.Tensor]):
    """Return ``value`` whose gradient w.r.t. each ``alphas[k]`` is ``coef[k]``.

    ``value`` has shape ``(N,)``; ``coef[k]`` and ``alphas[k]`` have shape ``(N, *shape_k)``
    (``coef[k]`` may be any shape that broadcasts to it). The value is unchanged, so the
    surrogate still reads as an estimate of ``E[f]``; gradients flowing into ``value`` pass
    on to whatever ``value`` depends on, scaled per row; ``coef`` is treated as a constant.
    """
    if not coef:
        return value
    return _AttachGradient.apply(value, len(coef), *(c.detach() for c in coef), *alphas)


class _AttachGradient(torch.autograd.Function):
    """:func:`attach_gradient` as one autograd node: ``value + sum_k (coef_k * alpha_k -
    stop_grad(coef_k * alpha_k))`` written as a sum would cost about eight operations
    forward and six backward, a noticeable share of a small training step."""

    @staticmethod
    def forward(ctx, value, k, *tensors):
        coef, alphas = tensors[:k], tensors[k:]
        ctx.k = k
        ctx.shapes = [a.shape for a in alphas]
        ctx.save_for_backward(*coef)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        grads = []
        for c, shape in zip(ctx.saved_tensors, ctx.shapes):
            g = grad.reshape((-1,) + (1,) * (len(shape) - 1)) * c
            if g.shape != shape:  # a coefficient broadcast against its logits
                g = g.expand(torch.broadcast_shapes(g.shape, shape)).sum_to_size(shape)
            grads.append(g)
        return (grad, None, *([None] * ctx.k), *grads)


def split_samples(values: torch.Tensor, parts: int) -> torch.Tensor:
    """Reshape ``(parts * N,)`` values of stacked sample groups to ``(parts, N)``."""
    return values.reshape(parts, -1)


_REGISTRY: dict[str, type[Estimator]] = {}
_ALIASES: dict[str, str] = {}


def register_estimator(cls: type[Estimator] | None = None, *, aliases: tuple[str, ...] = (),
                       replace: bool = False):
    """Class decorator adding an estimator to the registry under ``cls.name`` (and aliases).

    Parameters
    ----------
    cls : Estimator subclass
        Must set its own ``name`` (an inherited one would register it in its parent's
        place, e.g. a subclass of :class:`ARM` as ``"arm"``).
    aliases : tuple of str
        Further names for :func:`get_estimator`.
    replace : bool
        Allow taking over a name or alias that another estimator holds. Without it that
        is an error, so that a user's class cannot silently replace a built-in one. A class
        defined again under the same module and qualified name (a re-run notebook cell, a
        reloaded module) always replaces its earlier definition.

    Raises
    ------
    TypeError
        ``cls`` is not an :class:`Estimator` subclass.
    ValueError
        ``cls`` sets no ``name`` of its own, or a name or alias is taken (see ``replace``).
    """

    def same_class(a: type, b: type) -> bool:
        return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)

    def wrap(c: type[Estimator]) -> type[Estimator]:
        if not (isinstance(c, type) and issubclass(c, Estimator)):
            raise TypeError(f"register_estimator expects an Estimator subclass; got {c!r}")
        if "name" not in vars(c) or not isinstance(c.name, str) or not c.name.strip():
            raise ValueError(
                f"{c.__qualname__} needs a name of its own to be registered (a class "
                f"attribute, e.g. name = \"{c.__name__.lower()}\"); it inherits "
                f"name = {c.name!r}"
            )
        key = c.name
        for taken in (key, *aliases):
            owner = _REGISTRY.get(_ALIASES.get(taken, taken))
            if owner is not None and not replace and not same_class(owner, c):
                raise ValueError(
                    f"the estimator name {taken!r} is taken by {owner.__module__}."
                    f"{owner.__qualname__}; choose another name for {c.__qualname__}, or "
                    "pass replace=True to take it over"
                )
        _REGISTRY[key] = c
        _ALIASES.pop(key, None)  # the name itself wins over an alias of the same spelling
        for alias in aliases:
            _ALIASES[alias] = key
        return c

    return wrap(cls) if cls is not None else wrap


def available_estimators() -> list[str]:
    """Names accepted by :func:`get_estimator` (aliases not included)."""
    return sorted(_REGISTRY)


def get_estimator(name: str | type[Estimator] | Estimator, **options: Any) -> Estimator:
    """Build an estimator from a registry name, a class or an instance.

    Examples
    --------
    >>> get_estimator("arm")
    ARM()
    >>> get_estimator("reinforce_loo", num_samples=4)
    REINFORCELOO(num_samples=4)
    """
    if isinstance(name, Estimator):
        if options:
            raise ValueError(f"options {sorted(options)} cannot be applied to an existing {name!r}")
        return name
    if isinstance(name, type) and issubclass(name, Estimator):
        _check_options(name, options)
        return name(**options)
    if not isinstance(name, str):
        raise TypeError(f"estimator must be a name, an Estimator class or instance; got {name!r}")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown estimator {name!r}; expected one of {', '.join(available_estimators())}"
        )
    _check_options(_REGISTRY[key], options)
    return _REGISTRY[key](**options)


def _accepted_options(cls: type) -> set[str] | None:
    """The keyword arguments ``cls(...)`` accepts, following the ``**kwargs`` that binopt's
    own estimators pass on to their base class; ``None`` when that cannot be told (e.g. a
    user's ``__init__`` taking ``**kwargs``, which may consume some of them)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            return None
        try:
            params = list(inspect.signature(init).parameters.values())[1:]
        except (TypeError, ValueError):
            return None
        names.update(p.name for p in params
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
        if not klass.__module__.startswith("binopt."):
            return None
    return None


def _check_options(cls: type, options: dict[str, Any]) -> None:
    """A ``TypeError`` naming the options ``cls`` does not take and those it does (Python's
    own message names only the first unknown one, and none of the accepted)."""
    accepted = _accepted_options(cls)
    unknown = sorted(set(options) - accepted) if accepted is not None else []
    if unknown:
        raise TypeError(
            f"{cls.__name__} takes no option {', '.join(map(repr, unknown))}; its options: "
            f"{', '.join(sorted(accepted)) or 'none'}"
        )
