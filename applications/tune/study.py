"""Optuna studies of the pruning-rate vs accuracy trade-off of L0-gated networks.

Two modes:

``pareto`` (default)
    Two objectives, both minimised: the validation error (a seeded split carved out of the
    training data) and the kept fraction of FLOPs (or of parameters). The held-out test
    split is evaluated once per trial, at its end, and only recorded (user attribute
    ``test_error``); it never steers the search. Optuna pruners do not work with several
    objectives, so every trial runs to the end.
``target``
    One objective with per-epoch ``trial.report`` / ``should_prune`` and a median or
    successive-halving pruner: either the validation error subject to a kept-fraction
    budget ``B`` (value ``val_error`` when ``kept <= B``, else ``1 + kept - B``, so every
    feasible trial beats every infeasible one) or a scalarised mix
    ``val_error + w * kept``.

Workers and exact trial counts
------------------------------
Several workers (processes on one machine, or machines sharing an RDB) run
:func:`run_worker` on the same study. Each worker, before starting a trial, counts the
trials that use up the budget (every trial except those flagged ``binopt_interrupted``,
``binopt_surplus`` or ``binopt_user_error``, whatever its state, RUNNING and WAITING
included) and asks for a new trial only while the count is below ``n_trials``. For
file-backed storages (journal file, SQLite) the count-and-ask step holds an exclusive file
lock, so the total is exact; for server databases a worker that loses the race flags its
surplus trial (state FAIL, user attribute ``binopt_surplus``; nothing is trained) and
stops. (``optuna.study.MaxTrialsCallback`` alone can overshoot by up to one trial per extra
worker, because it counts finished trials only after each trial.)

Killed workers
--------------
Every running trial records its worker (host, pid) and a heartbeat time stamp (user
attributes ``binopt_worker``, ``binopt_heartbeat``). A RUNNING trial is *interrupted* when
its process is gone (a worker in the same pid namespace: same host, boot and container) or
its heartbeat is older than ``3 * heartbeat + 5`` seconds (a worker elsewhere); the next
worker to look marks it FAIL with ``binopt_interrupted`` (it then no
longer counts) and enqueues a retry with the same parameters and run folder, which the next
``ask`` picks up. So restarting a killed study (``load_if_exists``) finishes exactly the
requested number of trials. A failed trial (an exception in training, a NaN objective) is
recorded FAIL with the error in ``error`` and the study goes on. Ctrl-C (and SIGTERM, in
the command and in the worker processes of :func:`run_study`) marks the running trials
interrupted right away, so the storage never keeps a RUNNING trial of a stopped command.

Changed settings
----------------
A study is resumed only with the mode, kept measure, budget and training settings it was
created with (:func:`open_study`; the machine-specific :data:`MACHINE_SETTINGS` may
differ): trials trained differently could not share a front. A changed search space is
allowed with a warning.

User errors
-----------
The data set is loaded once before any trial (:func:`validate_train_settings`), so a wrong
``--data-root`` stops the command with one line before anything runs. A trial that still
fails on a :class:`~applications.errors.UserError` (say, the data files went away after
the start, or the trial's run folder cannot be created) is recorded FAIL, flagged
``binopt_user_error`` so that it does not use up the budget, and stops its worker with that
error: every other trial would fail the same way, and once the user has fixed the cause,
rerunning the command runs all ``n_trials``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import optuna
from optuna.trial import TrialState

from ..errors import UserError, with_option_names
from .space import SearchSpace

try:  # POSIX only; elsewhere file storages rely on the surplus check alone
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

ATTR = "binopt"  # study user attribute holding the study's settings
JOURNAL_SUFFIXES = (".log", ".jsonl", ".journal")
MODES = ("pareto", "target")
KEPT = ("flops", "params")
PRUNERS = ("median", "halving", "none")
HOST = socket.gethostname()


def _process_namespace() -> str:
    """Who can see this process's pid: host name, kernel boot id and pid namespace.

    Two workers compare process ids only when these agree (containers on one machine and
    machines that share a host name get different identities).
    """
    parts = [HOST]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return "|".join(parts)


PID_NAMESPACE = _process_namespace()

#: Base ``TrainConfig`` fields a study fixes for all trials (the search space adds the rest).
TRAIN_FIELDS = (
    "model", "dataset", "data_root", "epochs", "batch_size", "optimizer", "weight_decay",
    "seed", "device", "amp", "limit", "model_options", "validation_fraction",
)

#: The ``binopt tune`` option of each of :data:`TRAIN_FIELDS` (for error messages).
TRAIN_OPTIONS = {
    **{name: "--" + name.replace("_", "-") for name in TRAIN_FIELDS}, "seed": "--train-seed",
}

#: Fraction of the training data held out for the objective when ``train`` does not say.
DEFAULT_VALIDATION_FRACTION = 0.2

#: Training settings that may differ between the runs and workers of one study: where the
#: data lie and which hardware trains do not change what a trial measures. Any other
#: difference is refused (see :func:`open_study`).
MACHINE_SETTINGS = ("data_root", "device", "amp")


@dataclass
class TuneSettings:
    """Everything a worker needs to run trials of one study (picklable, JSON-able).

    Parameters
    ----------
    storage : str
        ``journal:/abs/path`` or an optuna RDB URL (see :func:`resolve_storage`).
    study_name : str
    n_trials : int
        Total number of trials of the study, across all workers and restarts.
    out : str
        Folder of the study: trial run folders go to ``out/trials/NNNN``, the report next
        to them.
    mode : {"pareto", "target"}
    kept : {"flops", "params"}
        Which kept fraction is the second objective (or the budget's measure).
    budget : float
        Target mode: kept-fraction budget (ignored when ``weight`` is set).
    weight : float, optional
        Target mode: scalarise as ``val_error + weight * kept`` instead of a budget.
    pruner : {"median", "halving", "none"}
        Target mode pruner.
    pruner_warmup : int
        Epochs before the median pruner may stop a trial (``n_warmup_steps``); minimum
        resource of successive halving.
    pruner_startup : int
        Complete trials before the median pruner starts pruning.
    space : SearchSpace
    train : dict
        Fixed ``TrainConfig`` keyword arguments (:data:`TRAIN_FIELDS`).
    seed : int
        Sampler seed; worker ``i`` seeds its sampler from ``(seed, i, trials in the study
        when it starts)``.
    startup_trials : int
        Random trials before TPE models the results.
    heartbeat : float
        Seconds between heartbeats of a running trial.
    jobs : int
        Worker processes started by :func:`run_study`.
    threads : int, optional
        Torch threads per worker (default: CPU cores divided by ``jobs``).
    wait : bool
        When the budget is used up but trials are still running elsewhere, wait for them
        (and replace any that turns out to be interrupted) before returning.
    verbose : bool
        One line per finished trial on stdout.
    worker_index : int
        Index of the first worker this process starts (``worker_index + i`` for the
        ``i``-th of ``jobs``); give each machine its own range.
    """

    storage: str
    study_name: str
    n_trials: int = 20
    out: str = "runs/tune"
    mode: str = "pareto"
    kept: str = "flops"
    budget: float = 0.1
    weight: float | None = None
    pruner: str = "median"
    pruner_warmup: int = 1
    pruner_startup: int = 5
    space: SearchSpace = field(default_factory=SearchSpace)
    train: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    startup_trials: int = 10
    heartbeat: float = 30.0
    jobs: int = 1
    threads: int | None = None
    wait: bool = True
    verbose: bool = True
    worker_index: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.space, SearchSpace):
            raise UserError(f"space must be a SearchSpace; got {type(self.space).__name__}")
        if not isinstance(self.train, Mapping):
            raise UserError(f"train must be a dict of training settings ({', '.join(TRAIN_FIELDS)})"
                            f"; got {type(self.train).__name__}")
        # the objective is the validation error: without a split every trial would fail
        self.train = {"validation_fraction": DEFAULT_VALIDATION_FRACTION, **self.train}
        if self.mode not in MODES:
            raise UserError(f"--mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.kept not in KEPT:
            raise UserError(f"--kept must be one of {', '.join(KEPT)}; got {self.kept!r}")
        if self.pruner not in PRUNERS:
            raise UserError(f"--pruner must be one of {', '.join(PRUNERS)}; got {self.pruner!r}")
        if self.n_trials < 1:
            raise UserError(f"--trials must be >= 1; got {self.n_trials}")
        if self.jobs < 1:
            raise UserError(f"--jobs must be >= 1; got {self.jobs}")
        # counts and seeds that optuna or numpy would refuse with a traceback mid-study
        # (or, for --startup-trials and --threads, silently read as something else)
        for option, value, minimum in (
            ("--seed", self.seed, 0), ("--worker-index", self.worker_index, 0),
            ("--startup-trials", self.startup_trials, 0),
            ("--pruner-warmup", self.pruner_warmup, 0),
            ("--pruner-startup", self.pruner_startup, 0),
            ("--threads", 1 if self.threads is None else self.threads, 1),
        ):
            if value < minimum:
                raise UserError(f"{option} must be >= {minimum}; got {value}")
        if not 0.0 < self.budget <= 1.0:
            raise UserError(f"--budget must lie in (0, 1]; got {self.budget}")
        if self.weight is not None and not 0 <= self.weight < math.inf:
            raise UserError(f"--weight must be a finite number >= 0; got {self.weight}")
        # threading's waits take at most TIMEOUT_MAX seconds (inf crashed the heartbeat)
        if not 0 < self.heartbeat <= threading.TIMEOUT_MAX:
            raise UserError(f"--heartbeat must be a positive number of seconds up to "
                            f"{threading.TIMEOUT_MAX:.0f}; got {self.heartbeat}")
        vf = self.train["validation_fraction"]
        if not isinstance(vf, int | float) or not 0.0 < float(vf) < 1.0:
            raise UserError(
                "--validation-fraction must lie strictly between 0 and 1: the objective is "
                f"the error on a validation split carved from the training data; got {vf}"
            )
        unknown = set(self.train) - set(TRAIN_FIELDS)
        if unknown:
            raise UserError(f"unknown training settings {sorted(unknown)}; the fixed settings "
                            f"of a study are {', '.join(TRAIN_FIELDS)} (the search space "
                            "sets the others)")

    @property
    def grace(self) -> float:
        """Seconds without heartbeat after which a running trial counts as interrupted."""
        return 3.0 * self.heartbeat + 5.0

    @property
    def directions(self) -> list[str]:
        return ["minimize", "minimize"] if self.mode == "pareto" else ["minimize"]

    def study_attrs(self) -> dict[str, Any]:
        """The settings stored in the study (``study.user_attrs["binopt"]``)."""
        return {
            "version": 1,
            "mode": self.mode,
            "kept": self.kept,
            "budget": None if self.weight is not None else self.budget,
            "weight": self.weight,
            "space": _jsonable(self.space.to_dict()),
            "train": _jsonable(self.train),
        }


# ----------------------------------------------------------------------------- storage
def resolve_storage(spec: str | None, out: str | os.PathLike) -> str:
    """Canonical storage spec: ``journal:/abs/path`` or an RDB URL.

    Parameters
    ----------
    spec : str or None
        ``None`` (a journal file ``study.log`` in ``out``), ``journal:PATH``, a path ending
        in ``.log``/``.jsonl``/``.journal`` (journal file), or an optuna RDB URL
        (``sqlite:///study.db``, ``postgresql://user:pass@host/db``, ``mysql+pymysql://...``).
    out : path
        The study folder.

    Raises
    ------
    UserError
        On anything else.
    """
    if spec is None or not str(spec).strip():
        return "journal:" + str((Path(out) / "study.log").resolve())
    spec = str(spec).strip()
    if spec.startswith("journal:"):
        path = spec[len("journal:") :]
        if not path:
            raise UserError("--storage journal: needs a file path, e.g. journal:runs/study.log")
        return "journal:" + str(Path(path).expanduser().resolve())
    if "://" in spec:
        scheme = spec.split("://", 1)[0]
        if not scheme.replace("+", "").replace("_", "").isalnum():
            raise UserError(f"--storage: malformed URL {spec!r}")
        return spec
    if spec.endswith(JOURNAL_SUFFIXES):
        return "journal:" + str(Path(spec).expanduser().resolve())
    raise UserError(
        f"--storage {spec!r} is neither a database URL (sqlite:///study.db, "
        "postgresql://user:password@host/db) nor a journal file (journal:PATH or a path "
        f"ending in {', '.join(JOURNAL_SUFFIXES)})"
    )


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:"):
        return None
    path = urlsplit(url).path
    # sqlite:///rel.db -> "/rel.db" (relative), sqlite:////abs.db -> "//abs.db" (absolute)
    if not path or path in ("/", "/:memory:"):
        return None
    return Path(path[1:])


def open_storage(spec: str) -> optuna.storages.BaseStorage:
    """Open a storage from a spec returned by :func:`resolve_storage`."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if spec.startswith("journal:"):
        path = Path(spec[len("journal:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = {}
    sqlite = _sqlite_path(spec)
    if sqlite is not None:
        sqlite.parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    try:
        return optuna.storages.RDBStorage(spec, **kwargs)
    except ImportError:
        raise
    except Exception as exc:  # bad URL, unreachable server, missing driver
        raise UserError(f"cannot open --storage {spec!r}: {type(exc).__name__}: {exc}") from exc


def _lock_path(spec: str) -> Path | None:
    if spec.startswith("journal:"):
        return Path(spec[len("journal:") :] + ".binopt-lock")
    sqlite = _sqlite_path(spec)
    return None if sqlite is None else sqlite.with_name(sqlite.name + ".binopt-lock")


@contextlib.contextmanager
def storage_lock(spec: str) -> Iterator[None]:
    """Exclusive lock around the count-and-ask step, for file-backed storages."""
    path = _lock_path(spec)
    if path is None or fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- study
def make_sampler(settings: TuneSettings, worker: int = 0, n_existing: int = 0):
    """Seeded multivariate TPE sampler (constant liar for parallel workers).

    The seed is drawn from ``SeedSequence([seed, worker, n_existing])``: a fresh
    single-worker study is reproducible, each worker gets its own stream, and a restarted
    worker does not replay the random start-up points it already tried.
    """
    seed = int(np.random.SeedSequence([settings.seed, worker, n_existing]).generate_state(1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=settings.startup_trials,
            multivariate=True,
            group=True,  # parameterization and k are conditional on the estimator
            constant_liar=True,
        )


def make_pruner(settings: TuneSettings) -> optuna.pruners.BasePruner:
    """The target-mode pruner (``NopPruner`` in pareto mode)."""
    if settings.mode == "pareto" or settings.pruner == "none":
        return optuna.pruners.NopPruner()
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings.pruner_startup, n_warmup_steps=settings.pruner_warmup
        )
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, settings.pruner_warmup))


def open_study(
    settings: TuneSettings, *, worker: int = 0, create: bool = True, warn: bool = True
) -> optuna.Study:
    """Create the study or load it (``load_if_exists``), and check it matches ``settings``.

    Parameters
    ----------
    settings : TuneSettings
    worker : int
        Worker index (seeds the sampler, see :func:`make_sampler`).
    create : bool
        Create the study when the storage does not hold it (else ``KeyError``).
    warn : bool
        Print a warning on stderr when the search space differs from the study's (the
        workers that :func:`run_study` starts leave that to it, so it is said once).

    Returns
    -------
    optuna.Study

    Raises
    ------
    UserError
        When an existing study of that name was made in another mode, with another kept
        measure, budget or weight, with other training settings (any of
        :data:`TRAIN_FIELDS` but :data:`MACHINE_SETTINGS`: its trials and the new ones
        would not be comparable), or by something other than ``binopt tune`` with
        different directions.
    """
    storage = open_storage(settings.storage)
    existing = _existing_trials(storage, settings.study_name)
    kwargs = dict(
        storage=storage,
        study_name=settings.study_name,
        sampler=make_sampler(settings, worker, existing),
        pruner=make_pruner(settings),
    )
    if create:
        study = optuna.create_study(directions=settings.directions, load_if_exists=True, **kwargs)
    else:
        study = optuna.load_study(**kwargs)
    directions = [d.name.lower() for d in study.directions]
    if directions != settings.directions:
        raise UserError(
            f"study {settings.study_name!r} in this storage has directions {directions}, "
            f"but --mode {settings.mode} needs {settings.directions}; pick another --study-name"
        )
    stored = study.user_attrs.get(ATTR)
    mine = settings.study_attrs()
    if stored is None:
        study.set_user_attr(ATTR, mine)
    else:
        for key in ("mode", "kept", "budget", "weight"):
            if stored.get(key) != mine[key]:
                raise UserError(
                    f"study {settings.study_name!r} was created with {key}={stored.get(key)!r}, "
                    f"not {mine[key]!r}; resume it with the same settings or pick another "
                    "--study-name"
                )
        changed = train_differences(stored.get("train") or {}, mine["train"])
        if changed:
            raise UserError(
                f"study {settings.study_name!r} was created with other training settings: "
                f"{'; '.join(changed)}. Its trials and new ones would not be comparable: "
                "resume it with the settings it was created with, or pick another --study-name"
            )
        if warn and stored.get("space") != mine["space"]:
            print(
                f"binopt tune: warning: the search space differs from the one study "
                f"{settings.study_name!r} was created with "
                f"({space_differences(stored.get('space') or {}, settings.space)}); the study "
                "holds trials from both, and the sampler learns from all of them",
                file=sys.stderr,
            )
    return study


def _effective_train(train: Mapping[str, Any]) -> dict[str, Any]:
    """Fixed training settings with the defaults of ``TrainConfig`` filled in (JSON form)."""
    train_mod = importlib.import_module("applications.sparsify.train")
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(train_mod.TrainConfig):
        if f.name in TRAIN_FIELDS:
            missing = f.default is dataclasses.MISSING
            defaults[f.name] = f.default_factory() if missing else f.default  # type: ignore[misc]
    defaults["validation_fraction"] = DEFAULT_VALIDATION_FRACTION
    return _jsonable({**defaults, **train})


def train_differences(stored: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """The training settings in which ``given`` differs from a study's ``stored`` ones.

    Settings left out count as ``TrainConfig``'s defaults (and a validation fraction of
    0.2); :data:`MACHINE_SETTINGS` may differ.

    Parameters
    ----------
    stored : mapping
        ``study.user_attrs["binopt"]["train"]``.
    given : mapping
        The training settings of this command (``TuneSettings.train``).

    Returns
    -------
    list of str
        One entry per difference, ``"--epochs 15 (given: 3)"``; empty when none.
    """
    old, new = _effective_train(stored), _effective_train(given)
    out = []
    for name in TRAIN_FIELDS:
        if name in MACHINE_SETTINGS or old.get(name) == new.get(name):
            continue
        out.append(f"{TRAIN_OPTIONS[name]} {json.dumps(old.get(name))} "
                   f"(given: {json.dumps(new.get(name))})")
    return out


def space_differences(stored: Mapping[str, Any], given: SearchSpace) -> str:
    """``"lam 0.001:1 (log), now 0.5:2 (log)"``: the parts of the space that changed."""
    try:
        before = SearchSpace.from_dict(stored).describe()
    except (TypeError, ValueError):
        return "the stored space cannot be read back"
    now = given.describe()
    return "; ".join(f"{k} {before.get(k)}, now {v}" for k, v in now.items()
                     if before.get(k) != v) or "same parts, other representation"


def _existing_trials(storage: optuna.storages.BaseStorage, name: str) -> int:
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


# ----------------------------------------------------------------------------- bookkeeping
#: User attributes that keep a trial from using up the budget (see the module docstring).
NOT_COUNTED = ("binopt_interrupted", "binopt_surplus", "binopt_user_error")


def counts_toward_budget(trial: optuna.trial.FrozenTrial) -> bool:
    """Every trial uses up the budget except interrupted, surplus and user-error ones."""
    attrs = trial.user_attrs
    return not any(attrs.get(key) for key in NOT_COUNTED)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


#: Tokens (``binopt_worker["token"]``) of the trials this process is running now.
_LIVE_TRIALS: set[str] = set()


def is_stale(trial: optuna.trial.FrozenTrial, grace: float, now: float | None = None) -> bool:
    """Whether a RUNNING trial's worker is gone.

    A trial of this very process is gone unless it is one this process is running now
    (an earlier run in the same process, say a notebook cell stopped with Ctrl-C between
    two steps, left it behind). A worker that shares this process's pid namespace (same
    host, same boot, same container) is gone when its process is; a live process is
    trusted unless its heartbeat is ten grace periods old (pid reuse). Any other worker is
    gone when its heartbeat (or, before the first one, its start) is older than ``grace``
    seconds.

    Parameters
    ----------
    trial : optuna.trial.FrozenTrial
    grace : float
        Seconds without heartbeat after which a worker elsewhere counts as gone.
    now : float, optional
        The current time (``time.time()``).

    Returns
    -------
    bool
        ``False`` for a trial that is not RUNNING.
    """
    if trial.state != TrialState.RUNNING:
        return False
    worker = trial.user_attrs.get("binopt_worker") or {}
    beat = trial.user_attrs.get("binopt_heartbeat")
    if beat is None and trial.datetime_start is not None:
        beat = trial.datetime_start.timestamp()
    now = time.time() if now is None else now
    age = now - float(beat) if beat is not None else 0.0
    pid = worker.get("pid")
    if worker.get("ns") == PID_NAMESPACE and isinstance(pid, int):
        if pid == os.getpid():
            return worker.get("token") not in _LIVE_TRIALS
        return not _pid_alive(pid) or age > 10 * grace
    return age > grace


def mark_interrupted(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, *, retry: bool = True
) -> bool:
    """Fail an interrupted trial (flagged ``binopt_interrupted``) and enqueue its retry.

    The retry keeps the parameters and the run folder (training resumes from the folder's
    checkpoint when there is one). A retry that is itself interrupted is not retried again.

    Returns
    -------
    bool
        ``True`` when this call failed the trial (``False``: someone else finished it).
    """
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "binopt_interrupted", True)
        study.tell(trial.number, state=TrialState.FAIL)
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError):
        return False
    if retry and "binopt_retry_of" not in trial.user_attrs:
        attrs: dict[str, Any] = {"binopt_retry_of": trial.number}
        if trial.user_attrs.get("run_dir"):
            attrs["binopt_run_dir"] = trial.user_attrs["run_dir"]
        study.enqueue_trial(dict(trial.params), user_attrs=attrs)
    return True


def reap_stale(study: optuna.Study, grace: float) -> list[int]:
    """Mark every stale RUNNING trial interrupted; returns their numbers."""
    reaped = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if is_stale(t, grace) and mark_interrupted(study, t):
            reaped.append(t.number)
    return reaped


class _Heartbeat:
    """Background thread that stamps ``binopt_heartbeat`` on a running trial."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int, interval: float):
        self._storage, self._trial_id, self._interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="binopt-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._storage.set_trial_user_attr(self._trial_id, "binopt_heartbeat", time.time())
            except Exception:  # trial finished meanwhile, storage hiccup: try again later
                pass

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ----------------------------------------------------------------------------- objective
def target_value(val_error: float, kept: float, settings: TuneSettings) -> float:
    """Target-mode objective: budget-constrained error, or ``val_error + weight * kept``."""
    if settings.weight is not None:
        return float(val_error) + settings.weight * float(kept)
    excess = float(kept) - settings.budget
    return float(val_error) if excess <= 1e-12 else 1.0 + excess


def load_study_data(train: Mapping[str, Any]) -> Any:
    """Load the data set every trial of the study trains on.

    Parameters
    ----------
    train : mapping
        The study's fixed training settings (``dataset``, ``data_root``, ``limit``).

    Returns
    -------
    applications.sparsify.data.DatasetSplits

    Raises
    ------
    UserError
        When the data set cannot be loaded (files missing, ``data_root`` not a folder,
        unreadable files): one line naming ``--dataset`` and ``--data-root``.
    """
    from applications.sparsify.data import DatasetNotFoundError, load_dataset

    name, root = train.get("dataset", "mnist5k"), train.get("data_root")
    try:
        return load_dataset(name, data_root=root, seed=int(train.get("data_seed", 0)),
                            limit=train.get("limit"))
    except (DatasetNotFoundError, ValueError, TypeError) as exc:
        given = f"--dataset {name}" + ("" if root is None else f" --data-root {root}")
        message = " ".join(str(exc).split())  # one line, whatever the reader wrote
        raise UserError(f"cannot load the data of {given}: {message}") from None


def gated_layer_names(train: Mapping[str, Any]) -> list[str]:
    """Names of the gated layers of the model ``train`` describes (keys of a per-layer lam).

    Raises
    ------
    UserError
        When the data set cannot be loaded (:func:`load_study_data`).
    """
    from applications.sparsify.models import build_model
    from applications.sparsify.network import GatedNetwork

    splits = load_study_data(train)
    options = dict(train.get("model_options") or {})
    # one drop rate for every layer: the MLP's per-layer default assumes two hidden layers
    options.setdefault("init_drop_rate", 0.5)
    model = build_model(
        train.get("model", "mlp"), input_shape=splits.input_shape,
        num_classes=splits.num_classes, **options,
    )
    return list(GatedNetwork(model).gated_layers())


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _jsonable(obj: Any) -> Any:
    """A JSON-serialisable copy (tuples -> lists, paths/others -> str, NaN kept as None)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    return str(obj)


#: Summary keys copied to the trial's user attributes (the whole summary is kept too).
SUMMARY_KEYS = (
    "val_error", "test_error", "architecture", "kept_units", "params_kept_fraction",
    "flops_kept_fraction", "expected_kept_fraction",
)


def _kept_item(metrics: Mapping[str, Any], kept: str) -> tuple[str, float] | None:
    """``(name, value)`` of the kept fraction: exact (summary) or, per epoch, a proxy.

    The summary has the exact ``flops_kept_fraction`` / ``params_kept_fraction`` of the
    exported network; the per-epoch metrics only the ``gated_weights_kept_fraction`` under
    the test-time gates (or the ``expected_kept_fraction``).
    """
    keys = (f"{kept}_kept_fraction", "gated_weights_kept_fraction", "expected_kept_fraction")
    for key in keys:
        v = _finite(metrics.get(key))
        if v is not None:
            return key, v
    return None


def _kept_from(metrics: Mapping[str, Any], kept: str) -> float | None:
    """The kept fraction: exact (summary) or, per epoch, the gated-weights proxy."""
    item = _kept_item(metrics, kept)
    return None if item is None else item[1]


def run_trial_config(trial: optuna.trial.Trial, settings: TuneSettings,
                     layer_names: Sequence[str] | None) -> Any:
    """The ``TrainConfig`` of one trial (samples the search space)."""
    train_mod = importlib.import_module("applications.sparsify.train")
    params = settings.space.suggest(trial, layer_names)
    run_dir = trial.user_attrs.get("binopt_run_dir")
    resume = run_dir is not None
    if run_dir is None:
        run_dir = str(Path(settings.out).resolve() / "trials" / f"{trial.number:04d}")
    fixed = dict(settings.train)
    if "model_options" in fixed:
        fixed["model_options"] = dict(fixed["model_options"] or {})
    return train_mod.TrainConfig(**fixed, **params, out=run_dir, resume=resume, progress=False)


def objective(trial: optuna.trial.Trial, settings: TuneSettings,
              layer_names: Sequence[str] | None = None) -> float | list[float]:
    """Train one configuration; return ``[val_error, kept]`` (pareto) or the target value.

    Records in the trial's user attributes: ``run_dir``, ``config`` (the full
    ``TrainConfig``), the summary's ``val_error``, ``test_error``, kept fractions,
    ``architecture``, ``kept_units``, and ``summary``.

    Raises
    ------
    optuna.TrialPruned
        Target mode, when the pruner stops the trial.
    ValueError
        When training returns no finite validation error or kept fraction.
    """
    train_mod = importlib.import_module("applications.sparsify.train")
    config = run_trial_config(trial, settings, layer_names)
    trial.set_user_attr("run_dir", str(config.out))
    trial.set_user_attr("config", _jsonable(dataclasses.asdict(config)))

    epochs_seen: list[int] = []

    def callback(epoch: int, metrics: Mapping[str, Any]) -> None:
        if not epochs_seen and config.resume and int(epoch) > 1:
            trial.set_user_attr("resumed_after_epoch", int(epoch) - 1)
        epochs_seen.append(int(epoch))
        if settings.mode != "target":
            return
        val, item = _finite(metrics.get("val_error")), _kept_item(metrics, settings.kept)
        if val is None or item is None:
            return
        kept_key, kept = item
        trial.report(target_value(val, kept, settings), step=int(epoch))
        if trial.should_prune():
            trial.set_user_attr("val_error", val)
            # the per-epoch proxy, under its own name: a pruned trial is never exported, so
            # its kept fraction of FLOPs or parameters is unknown
            trial.set_user_attr(kept_key, kept)
            trial.set_user_attr("pruned_at_epoch", int(epoch))
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    try:
        summary = train_mod.train(config, epoch_callback=callback)
    except optuna.TrialPruned:
        raise
    except Exception as exc:
        if not config.resume or epochs_seen:
            raise
        # The retry of an interrupted trial could not resume from its folder (missing or
        # unreadable checkpoint): train it from scratch rather than lose the slot.
        trial.set_user_attr("resume_error", f"{type(exc).__name__}: {exc}"[:2000])
        config = dataclasses.replace(config, resume=False)
        summary = train_mod.train(config, epoch_callback=callback)
    summary = dict(summary or {})
    for key in SUMMARY_KEYS:
        if key in summary:
            trial.set_user_attr(key, _jsonable(summary[key]))
    if summary.get("out"):
        trial.set_user_attr("run_dir", str(summary["out"]))
    trial.set_user_attr("summary", _jsonable(summary))
    val, kept = _finite(summary.get("val_error")), _kept_from(summary, settings.kept)
    if val is None or kept is None:
        raise ValueError(
            f"training returned val_error={summary.get('val_error')!r}, "
            f"{settings.kept}_kept_fraction={summary.get(f'{settings.kept}_kept_fraction')!r}"
        )
    if settings.mode == "pareto":
        return [val, kept]
    return target_value(val, kept, settings)


# ----------------------------------------------------------------------------- workers
def _log(settings: TuneSettings, msg: str) -> None:
    if settings.verbose:
        print(msg, flush=True)


def _describe(trial: optuna.trial.FrozenTrial, kept: str) -> str:
    a = trial.user_attrs

    def pct(key: str) -> str:
        v = _finite(a.get(key))
        return "-" if v is None else f"{100 * v:.2f}%"

    if trial.state == TrialState.PRUNED:  # stopped early: no test error, no export
        return (f"at epoch {a.get('pruned_at_epoch', '-')}, val {pct('val_error')} gated "
                f"weights kept {pct('gated_weights_kept_fraction')}")
    return (
        f"val {pct('val_error')} test {pct('test_error')} "
        f"{kept} kept {pct(f'{kept}_kept_fraction')} arch {a.get('architecture', '-')}"
    )


def _progress(study: optuna.Study, n_trials: int) -> str:
    """``"4/6 done"``: finished trials that use up the budget, of ``n_trials``."""
    done = sum(1 for t in study.get_trials(deepcopy=False)
               if t.state.is_finished() and counts_toward_budget(t))
    return f"{done}/{n_trials} done"


def execute_trial(study: optuna.Study, trial: optuna.trial.Trial, settings: TuneSettings,
                  layer_names: Sequence[str] | None, worker: int = 0) -> TrialState:
    """Run one asked trial and tell its outcome; exceptions become FAIL (study goes on).

    Raises
    ------
    UserError
        When training stopped on a user error. The trial is recorded FAIL and flagged
        ``binopt_user_error`` (it does not use up the budget); a retry of an interrupted
        trial is queued again, so that no interrupted trial is lost.
    """
    t0 = time.time()
    error: str | None = None
    user_error: UserError | None = None

    def stamp_duration() -> None:  # before tell: a finished trial takes no attributes
        with contextlib.suppress(Exception):
            trial.set_user_attr("duration_s", time.time() - t0)

    retry_of = trial.user_attrs.get("binopt_retry_of")
    _log(settings, f"[tune w{worker}] trial {trial.number} started" + (
        "" if retry_of is None else
        f" (retry of interrupted trial {retry_of})"))
    with _Heartbeat(study._storage, trial._trial_id, settings.heartbeat):
        try:
            values = objective(trial, settings, layer_names)
        except optuna.TrialPruned:
            stamp_duration()
            study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM in a worker process
            mark_interrupted(study, study._storage.get_trial(trial._trial_id))
            raise
        except UserError as exc:
            # Every further trial would fail alike and use up the budget for nothing.
            user_error, error = exc, f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):
                trial.set_user_attr("binopt_user_error", True)
            with contextlib.suppress(Exception):
                trial.set_user_attr("error", error[:2000])
            stamp_duration()
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        except Exception as exc:  # noqa: BLE001 - a failed trial must not stop the study
            error = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):
                trial.set_user_attr("error", error[:2000])
            stamp_duration()
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        else:
            stamp_duration()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # NaN/inf values are recorded as FAIL; a trial another worker wrongly
                # declared interrupted (heartbeat lost) keeps that state
                study.tell(trial, values, skip_if_finished=True)
    frozen = study._storage.get_trial(trial._trial_id)
    if frozen.state == TrialState.FAIL and error is None:
        error = (
            "another worker found no heartbeat and marked it interrupted (it is retried)"
            if frozen.user_attrs.get("binopt_interrupted") else "optuna rejected the values"
        )
    detail = error if frozen.state == TrialState.FAIL else _describe(frozen, settings.kept)
    if settings.verbose:
        _log(settings, f"[tune w{worker}] trial {frozen.number} {frozen.state.name.lower()} "
                       f"({_progress(study, settings.n_trials)}): {detail} "
                       f"({time.time() - t0:.1f}s)")
    if user_error is not None:
        if "binopt_retry_of" in frozen.user_attrs:
            study.enqueue_trial(dict(frozen.params), user_attrs={
                k: frozen.user_attrs[k] for k in ("binopt_retry_of", "binopt_run_dir")
                if k in frozen.user_attrs})
        raise user_error
    return frozen.state


def run_worker(settings: TuneSettings, worker: int = 0, study: optuna.Study | None = None) -> int:
    """Run trials of the study until it holds ``settings.n_trials`` counted trials.

    Parameters
    ----------
    settings : TuneSettings
    worker : int
        Worker index (seeds the sampler; shown in logs and in ``binopt_worker``).
    study : optuna.Study, optional
        An already opened study (else it is created or loaded).

    Returns
    -------
    int
        Number of trials this worker ran.

    Raises
    ------
    UserError
        When a trial stopped on a user error (see :func:`execute_trial`) or the data set
        cannot be loaded.
    """
    if study is None:
        study = open_study(settings, worker=worker)
    layer_names = gated_layer_names(settings.train) if settings.space.lam_per_layer else None
    ran = 0
    poll = max(0.2, min(2.0, settings.heartbeat / 2))
    while True:
        trial = None
        # marks the trial as this process's own live one from the moment it exists
        token = uuid.uuid4().hex
        _LIVE_TRIALS.add(token)
        try:
            with storage_lock(settings.storage):
                reaped = reap_stale(study, settings.grace)
                if reaped:
                    _log(settings, f"[tune w{worker}] trial(s) {reaped} were interrupted; "
                                   "retrying them")
                trials = [t for t in study.get_trials(deepcopy=False)
                          if counts_toward_budget(t)]
                waiting = any(t.state == TrialState.WAITING for t in trials)
                running = any(t.state == TrialState.RUNNING for t in trials)
                if len(trials) < settings.n_trials or waiting:
                    trial = study.ask()
                    trial.set_user_attr(
                        "binopt_worker",
                        {"host": HOST, "pid": os.getpid(), "worker": worker,
                         "ns": PID_NAMESPACE, "token": token},
                    )
                    trial.set_user_attr("binopt_heartbeat", time.time())
            if trial is None:
                if running and settings.wait:
                    time.sleep(poll)
                    continue
                break
            counted = sorted(
                t.number for t in study.get_trials(deepcopy=False) if counts_toward_budget(t)
            )
            if trial.number not in counted[: settings.n_trials]:
                # Lost a race with another worker (server storages only): nothing trained.
                trial.set_user_attr("binopt_surplus", True)
                study.tell(trial, state=TrialState.FAIL)
                break
            execute_trial(study, trial, settings, layer_names, worker)
            ran += 1
        finally:
            _LIVE_TRIALS.discard(token)
    return ran


def validate_train_settings(settings: TuneSettings) -> None:
    """Check the fixed training settings and load the data once, before any trial.

    Raises
    ------
    UserError
        On an invalid setting or a data set that cannot be loaded (a wrong ``--data-root``
        would otherwise fail every trial).
    """
    train_mod = importlib.import_module("applications.sparsify.train")
    fixed = dict(settings.train)
    fixed["model_options"] = dict(fixed.get("model_options") or {})
    config = train_mod.TrainConfig(**fixed, out=str(Path(settings.out) / "trials"))
    validate = getattr(config, "validate", None)
    if callable(validate):
        try:
            validate()
        except (UserError, ValueError) as exc:  # name the option (seed is --train-seed here)
            raise with_option_names(exc, TRAIN_OPTIONS) from None
    load_study_data(settings.train)


def no_complete_trial_message(study: optuna.Study, n_trials: int) -> str | None:
    """Why the study has nothing to report, or ``None`` when a trial completed.

    ``None`` as well while trials still run or wait (``--no-wait`` with other workers): they
    may yet complete.

    Parameters
    ----------
    study : optuna.Study
    n_trials : int
        The ``--trials`` the command ran with (the message says how to run more).

    Returns
    -------
    str or None
        One line: the counts of the trials' states, the first error, and that failed trials
        count towards ``--trials``, so that the same command would not train again.
    """
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    if TrialState.COMPLETE in states or TrialState.RUNNING in states or \
            TrialState.WAITING in states:
        return None
    counts: dict[str, int] = {}
    for state in states:
        counts[state.name.lower()] = counts.get(state.name.lower(), 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in counts.items()) or "no trials"
    errors = [t.user_attrs["error"] for t in trials if t.user_attrs.get("error")]
    first = f"; first error: {' '.join(str(errors[0]).split())[:300]}" if errors else ""
    counted = sum(counts_toward_budget(t) for t in trials)
    return (
        f"no trial of study {study.study_name!r} completed ({summary}{first}). Failed trials "
        f"count towards --trials ({counted} of {n_trials} used), so rerunning the same "
        f"command trains nothing: after fixing the cause, raise --trials above {counted} to "
        "add trials, or pick another --study-name"
    )


_INTERRUPTED = threading.Event()


def _interrupt_once(signum: int, frame: Any) -> None:
    """Signal handler of the workers: the first SIGINT or SIGTERM interrupts the running
    trial (which is then recorded as interrupted); later ones are ignored, so that the
    recording is not cut short (Ctrl-C reaches a worker both from the terminal and, as
    SIGTERM, from :func:`run_study`). The handler stays installed: switching to SIG_IGN
    here would make Python raise ``OSError`` for a signal already pending."""
    if _INTERRUPTED.is_set():
        return
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def _worker_main(settings: TuneSettings, worker: int, threads: int) -> None:
    """Entry point of a spawned worker process."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt_once)
    import torch

    torch.set_num_threads(max(1, threads))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        # run_study has warned about a changed search space already
        run_worker(settings, worker, open_study(settings, worker=worker, warn=False))
    except UserError as exc:
        print(f"binopt: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


#: Seconds :func:`run_study` gives interrupted workers to record their running trials.
STOP_GRACE = 30.0


def _stop_workers(procs: Sequence[multiprocessing.process.BaseProcess],
                  grace: float = STOP_GRACE) -> None:
    """Stop worker processes after Ctrl-C, letting them record their running trials.

    Each worker turns the first SIGINT (from the terminal) or SIGTERM (sent here) into an
    interruption of its trial, records it and exits; a worker still alive after ``grace``
    seconds, or after a second Ctrl-C, is killed.
    """
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.join(max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:  # asked again: stop waiting
            deadline = time.monotonic()
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def check_workers(exits: list[tuple[str, int | None]]) -> None:
    """Report worker processes that failed: a warning when some did, an error when all did.

    When every worker fails, no trial ran and a report of the study would be empty, so this
    raises: :class:`~applications.errors.UserError` when they all stopped on a user error
    (exit code 2, the message is printed by each worker), ``RuntimeError`` otherwise.
    """
    bad = [(name, code) for name, code in exits if code != 0]
    if not bad:
        return
    if len(bad) < len(exits):
        print(f"binopt tune: warning: worker(s) exited with errors: {bad}", file=sys.stderr)
        return
    message = (f"all {len(exits)} worker processes failed (name, exit code: {bad}); their "
               "messages are above")
    if all(code == 2 for _, code in bad):
        raise UserError(message)
    raise RuntimeError(
        message + ". Started from a script? The workers are spawned processes that import "
        "the script again: call run_study under `if __name__ == \"__main__\":`"
    )


def run_study(settings: TuneSettings) -> optuna.Study:
    """Create or resume the study and run it with ``settings.jobs`` worker processes.

    With ``jobs == 1`` the trials run in this process; otherwise ``jobs`` processes are
    spawned (``multiprocessing`` "spawn" context), each with its own sampler seed and
    ``threads`` torch threads, all sharing the storage.

    Returns
    -------
    optuna.Study
        The study, reloaded after the workers finished.
    """
    Path(settings.out).mkdir(parents=True, exist_ok=True)
    validate_train_settings(settings)
    study = open_study(settings, worker=settings.worker_index)
    (Path(settings.out) / "settings.json").write_text(
        json.dumps({"storage": settings.storage, "study_name": settings.study_name,
                    "n_trials": settings.n_trials, **settings.study_attrs()}, indent=2) + "\n"
    )
    if settings.jobs == 1:
        if settings.threads:
            import torch

            torch.set_num_threads(settings.threads)
        run_worker(settings, settings.worker_index, study)
        return study
    if _sqlite_path(settings.storage) is not None:
        print("binopt tune: warning: several processes on one SQLite file contend for its "
              "write lock; a journal file (the default) suits --jobs > 1 better",
              file=sys.stderr)
    threads = settings.threads or max(1, (os.cpu_count() or 1) // settings.jobs)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_main, args=(settings, settings.worker_index + i, threads),
                    name=f"binopt-tune-{settings.worker_index + i}")
        for i in range(settings.jobs)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        _stop_workers(procs)
        # a worker killed before it could record its trial leaves it RUNNING: record it
        # now (its process is gone), so that the journal says what happened
        with contextlib.suppress(Exception), storage_lock(settings.storage):
            reap_stale(study, settings.grace)
        raise
    check_workers([(p.name, p.exitcode) for p in procs])
    return optuna.load_study(study_name=settings.study_name, storage=open_storage(settings.storage))
