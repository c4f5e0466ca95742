"""The training loop every study shares: optimizer, learning-rate schedule, probe schedule, divergence.

``train(model, train_set, config=..., probes=[...])`` runs ``config.steps`` optimizer steps and returns
tidy records, one row per measurement::

    {"step": int, "probe": str, "layer": str, "metric": str, "value": float}

Step ``t`` means *the state after t updates*: step 0 is the initialization, step ``config.steps`` the
trained model. At each step ``t < steps`` the loop, in this order,

1. draws the minibatch ``B_t`` that update ``t`` will use,
2. runs the probes due at ``t`` (they see the parameters θ_t and ``B_t``),
3. evaluates on the test set if ``t % eval_every == 0`` (probe ``"eval"``),
4. computes the loss on ``B_t``, records it every ``log_every`` steps (probe ``"train"``), and updates.

After the last update the probes due at ``steps`` run (with the batch that would come next) and the
final evaluation is made. Rows written by the loop:

=========  ==============================================  ==============================================
probe      metric                                          when
=========  ==============================================  ==============================================
train      loss, accuracy, lr (minibatch of update t)      every ``log_every`` steps and the last update
train      diverged (value 1.0)                            once, when the run diverges (then it stops)
eval       test_loss, test_accuracy                        every ``eval_every`` steps and at the end
eval       train_loss, train_accuracy (whole train set)    same, if ``config.eval_train``
<name>     failed (value nan, extra keys ``error`` and     when probe ``<name>`` raised (its other rows of
           ``reason``)                                     that step are dropped; training goes on)
=========  ==============================================  ==============================================

A failed row's ``error`` is ``repr(exception)``; its ``reason`` is a short sentence for people,
``str(exception)`` (the exception's class name if that is empty). A probe that ran but cannot vouch for
its measurement raises :class:`ProbeFailure` with the reason, e.g. "Lanczos did not converge: the top
Hessian eigenvalue (estimate 12.3) did not reach tol 0.001 within 40 matvecs".

``accuracy`` rows are written only for classification (integer targets, logits with one more dimension).

Determinism: on CPU the same seed gives bit-identical records. ``train`` calls
``torch.manual_seed(seed)`` at its start (for dropout, noisy norms) and shuffles with its own
``torch.Generator`` seeded with ``seed``; the caller builds the model under its own seed *before*
calling ``train`` (``torch.manual_seed(seed); model = make_net(...)``). Probes run under a forked RNG,
so adding or removing a probe never changes the trajectory. On CUDA, kernels may be non-deterministic.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset, default_collate
from tqdm import tqdm

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "ProbeContext",
    "ProbeFailure",
    "ProbeSchedule",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "failure_reason",
    "lr_at",
    "lr_factor",
    "make_optimizer",
    "make_scheduler",
    "require_converged",
    "set_seed",
    "train",
]

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step", "linear")

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]


# ----------------------------------------------------------------------------------------------------
# configuration


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimizer, learning-rate schedule, batches, and how often to log and evaluate.

    ``lr`` is the peak learning rate; the rate used by update ``t`` is ``lr_at(t, config)``.
    ``weight_decay`` is L2 added to the gradient for ``sgd``/``adam`` and decoupled for ``adamw``; it
    applies to every trainable parameter, norm gains and biases included (PyTorch's default).
    """

    optimizer: str = "sgd"  # "sgd" | "adam" | "adamw"
    lr: float = 0.1
    momentum: float = 0.0  # sgd only
    nesterov: bool = False  # sgd only, needs momentum > 0
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw only
    eps: float = 1e-8  # adam/adamw only
    weight_decay: float = 0.0
    batch_size: int = 64
    steps: int = 1000  # optimizer updates; epochs wrap around with a fresh shuffle
    schedule: str = "constant"  # "constant" | "cosine" | "step" | "linear"
    warmup_steps: int = 0  # linear warmup: factor (t + 1) / warmup_steps for t < warmup_steps
    min_lr_fraction: float = 0.0  # cosine/linear decay to lr * min_lr_fraction
    milestones: tuple[int, ...] = ()  # "step": lr *= gamma at each; () = (steps // 2, 3 * steps // 4)
    gamma: float = 0.1  # "step" decay factor
    max_grad_norm: float | None = None  # clip the global gradient norm (None: no clipping)
    eval_every: int = 100  # test-set evaluation every N steps, and at the end
    eval_batch_size: int = 1000
    eval_train: bool = False  # also evaluate on the whole training set
    log_every: int = 10  # "train" rows every N updates, and the last
    full_batch: bool = False  # every update uses the whole training set (batch_size is ignored)
    drop_last: bool = True  # drop each epoch's last, smaller batch

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        if isinstance(self.milestones, list):
            object.__setattr__(self, "milestones", tuple(self.milestones))

        def fail(name: str, expected: str) -> None:
            raise ValueError(f"TrainConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        if self.optimizer not in OPTIMIZERS:
            fail("optimizer", f"one of {', '.join(OPTIMIZERS)}")
        if not _is_real(self.lr) or not (math.isfinite(self.lr) and self.lr > 0):
            fail("lr", "a finite number > 0")
        if not _is_real(self.momentum) or not 0 <= self.momentum < 1:
            fail("momentum", "a number in [0, 1)")
        if not isinstance(self.nesterov, bool):
            fail("nesterov", "a bool")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            fail("nesterov", "False unless optimizer='sgd' with momentum > 0")
        if self.momentum != 0 and self.optimizer != "sgd":
            fail("momentum", "0 unless optimizer='sgd' (adam uses betas)")
        if not (
            isinstance(self.betas, tuple)
            and len(self.betas) == 2
            and all(_is_real(b) and 0 <= b < 1 for b in self.betas)
        ):
            fail("betas", "a pair of numbers in [0, 1)")
        if not _is_real(self.eps) or not self.eps > 0:
            fail("eps", "a number > 0")
        if not _is_real(self.weight_decay) or not (
            math.isfinite(self.weight_decay) and self.weight_decay >= 0
        ):
            fail("weight_decay", "a finite number >= 0")
        for name in ("batch_size", "eval_every", "eval_batch_size", "log_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "an int >= 1")
        if not _is_int(self.steps) or self.steps < 0:
            fail("steps", "an int >= 0")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"one of {', '.join(SCHEDULES)}")
        if not _is_int(self.warmup_steps) or not 0 <= self.warmup_steps <= self.steps:
            fail("warmup_steps", f"an int in [0, steps={self.steps}]")
        if not _is_real(self.min_lr_fraction) or not 0 <= self.min_lr_fraction <= 1:
            fail("min_lr_fraction", "a number in [0, 1]")
        if not (
            isinstance(self.milestones, tuple)
            and all(_is_int(m) and m > 0 for m in self.milestones)
            and list(self.milestones) == sorted(set(self.milestones))
        ):
            fail("milestones", "a strictly increasing tuple of ints > 0")
        if not _is_real(self.gamma) or not 0 < self.gamma <= 1:
            fail("gamma", "a number in (0, 1]")
        if self.max_grad_norm is not None and (
            not _is_real(self.max_grad_norm)
            or not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0)
        ):
            fail("max_grad_norm", "None or a finite number > 0")
        for name in ("eval_train", "full_batch", "drop_last"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "a bool")

    @property
    def resolved_milestones(self) -> tuple[int, ...]:
        """The "step" schedule's milestones: ``milestones``, or (steps // 2, 3 * steps // 4) if empty."""
        return self.milestones or tuple(sorted({max(1, self.steps // 2), max(1, 3 * self.steps // 4)}))


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of ``config.lr`` used by update ``step`` (0-based): warmup(t) · decay(t).

    warmup(t) = min(1, (t + 1) / W) with W = ``warmup_steps`` (1 if W = 0). With p = (t − W) / (T − W),
    clipped to [0, 1], T = ``steps`` and m = ``min_lr_fraction``:
    ``constant`` 1; ``cosine`` m + (1 − m)(1 + cos πp) / 2; ``linear`` 1 − (1 − m) p;
    ``step`` γ^(number of milestones ≤ t).
    """
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    span = config.steps - config.warmup_steps
    p = min(1.0, max(0.0, (step - config.warmup_steps) / span)) if span > 0 else 0.0
    m = config.min_lr_fraction
    if config.schedule == "constant":
        decay = 1.0
    elif config.schedule == "cosine":
        decay = m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
    elif config.schedule == "linear":
        decay = 1 - (1 - m) * p
    else:  # "step"
        decay = config.gamma ** sum(1 for milestone in config.resolved_milestones if milestone <= step)
    return warmup * decay


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of update ``step``: ``config.lr * lr_factor(step, config)``."""
    return config.lr * lr_factor(step, config)


def make_optimizer(
    params: Iterable[nn.Parameter] | Iterable[dict], config: TrainConfig
) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, at the peak learning rate ``config.lr``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` with ``lr_factor``: after ``k`` calls of ``.step()`` the rate is ``lr_at(k)``.

    Assumes the optimizer's rates are the peak rates (as ``make_optimizer`` sets them).
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))


def set_seed(seed: int) -> np.random.Generator:
    """Seed torch's global generators (CPU and CUDA) and return a fresh numpy ``Generator(seed)``.

    The global ``numpy.random`` and ``random`` states are left alone: use the returned generator.
    """
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------------
# probes


@dataclass(frozen=True)
class ProbeContext:
    """What a probe sees at step ``step`` (the state after ``step`` updates), before update ``step``.

    ``batch`` is the minibatch that update ``step`` is about to use (at ``step == config.steps``, the one
    that would come next), and ``optimizer``'s rate is the schedule's for update ``step`` (at
    ``config.steps`` the rate the schedule would give next: 0 at the end of a cosine or linear decay
    to 0, so a probe that simulates the next update, ICS or update ratios, measures a zero step
    there). ``train_set`` and ``test_set`` hold their tensors on ``device``.
    A probe may compute gradients (the loop zeroes them before its own backward pass) and use the RNG
    (the loop restores it), and should leave parameters, buffers and the optimizer as it found them;
    the loop restores the modules' ``training`` flags after each probe.
    """

    step: int
    model: nn.Module
    batch: Batch
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    train_set: TensorDataset
    test_set: TensorDataset | None
    device: torch.device
    config: TrainConfig


@dataclass(frozen=True)
class ProbeSchedule:
    """A probe ``fn(ctx) -> Iterable[dict]`` and the steps it runs at: ``steps`` and/or every ``every``.

    Each row ``fn`` yields needs ``metric`` and a numeric ``value``; ``probe`` defaults to ``name`` and
    ``layer`` to ""; the loop sets ``step``; other keys are kept. If ``fn`` raises (or yields a bad row)
    its rows of that step are dropped and one row ``{probe: name, metric: "failed", value: nan,
    error: repr(exception), reason: failure_reason(exception)}`` is recorded instead; training goes on.
    Raise :class:`ProbeFailure` to report a measurement that cannot be trusted (e.g. not converged).
    """

    fn: Callable[[ProbeContext], Iterable[dict[str, Any]]]
    steps: frozenset[int] | Iterable[int] | None = None
    every: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ValueError(f"ProbeSchedule.fn: expected a callable, got {self.fn!r}")
        if self.steps is not None:
            steps = frozenset(self.steps)
            if not all(_is_int(s) and s >= 0 for s in steps):
                raise ValueError(f"ProbeSchedule.steps: expected ints >= 0, got {sorted(steps, key=str)!r}")
            object.__setattr__(self, "steps", frozenset(int(s) for s in steps))
        if self.every is not None and (not _is_int(self.every) or self.every < 1):
            raise ValueError(f"ProbeSchedule.every: expected None or an int >= 1, got {self.every!r}")
        if self.steps is None and self.every is None:
            raise ValueError("ProbeSchedule: give steps, every, or both")
        if not self.name:
            object.__setattr__(self, "name", getattr(self.fn, "__name__", "probe"))

    def due(self, step: int) -> bool:
        """Whether the probe runs at ``step``."""
        return (self.steps is not None and step in self.steps) or (
            self.every is not None and step % self.every == 0
        )


class ProbeFailure(RuntimeError):
    """A probe ran but could not produce a measurement it vouches for (e.g. Lanczos did not converge).

    Its message is the human-readable reason, with the numbers that matter (budget spent, tolerance).
    The training loop records it as the probe's ``failed`` row (``reason`` = the message) and goes on.
    """


def require_converged(result: Any, what: str, tol: float) -> Any:
    """``result`` (an eigenvalue result with ``values``, ``converged`` and ``n_matvecs``) if Lanczos
    converged, else :class:`ProbeFailure` naming ``what``, the estimate, ``tol`` and the matvecs spent."""
    if not result.converged:
        estimate = f"{result.values[0]:.6g}" if len(result.values) else "none"
        raise ProbeFailure(
            f"Lanczos did not converge: {what} (estimate {estimate}) "
            f"did not reach tol {tol:g} within {result.n_matvecs} matvecs"
        )
    return result


def failure_reason(error: BaseException) -> str:
    """The ``reason`` of a failed probe's row: ``str(error)``, or the exception's class name if empty."""
    return str(error) or type(error).__name__


def _run_probe(schedule: ProbeSchedule, ctx: ProbeContext) -> list[dict[str, Any]]:
    modes = [(module, module.training) for module in ctx.model.modules()]
    cuda = [ctx.device] if ctx.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            rows = []
            for row in schedule.fn(ctx):
                if "metric" not in row or "value" not in row:
                    raise ValueError(f"probe row without 'metric' or 'value': {row!r}")
                row = {"step": ctx.step, "probe": schedule.name, "layer": "", **row}
                value = row["value"]
                row["step"], row["value"] = (
                    ctx.step,
                    float(value.detach() if isinstance(value, Tensor) else value),
                )
                rows.append(row)
        return rows
    except Exception as error:
        log.warning("probe %r failed at step %d: %r", schedule.name, ctx.step, error)
        return [
            _row(ctx.step, schedule.name, "failed", math.nan, error=repr(error), reason=failure_reason(error))
        ]
    finally:
        for module, training in modes:
            module.training = training


# ----------------------------------------------------------------------------------------------------
# evaluation


def _accuracy_count(outputs: Tensor, targets: Tensor) -> int | None:
    """Correct predictions for classification (integer targets, logits over the last dim), else None."""
    if targets.is_floating_point() or targets.is_complex() or outputs.ndim != targets.ndim + 1:
        return None
    return int((outputs.argmax(dim=-1) == targets).sum())


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: LossFn = F.cross_entropy,
    *,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Mean loss (and accuracy, for classification) over ``dataset``, in eval mode under ``no_grad``.

    loss = Σ_b n_b · loss_fn(batch b) / Σ_b n_b (``loss_fn`` is a mean over its batch). Eval mode means
    norm layers use their running statistics and dropout is off. Every module's ``training`` flag is
    restored afterwards. ``device`` defaults to that of the model's first parameter.
    """
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    x, y = _tensors(dataset, torch.device(device))
    if len(x) == 0:
        raise ValueError("evaluate: empty dataset")
    modes = [(module, module.training) for module in model.modules()]
    total, correct, count = 0.0, 0, 0
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                xb, yb = x[start : start + batch_size], y[start : start + batch_size]
                outputs = model(xb)
                total += float(loss_fn(outputs, yb)) * len(xb)
                hits = _accuracy_count(outputs, yb)
                correct = None if hits is None or correct is None else correct + hits
                count += len(xb)
    finally:
        for module, training in modes:
            module.training = training
    result = {"loss": total / count}
    if correct is not None:
        result["accuracy"] = correct / count
    return result


# ----------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    """What ``train`` returns.

    ``final``: the last value of every metric of the ``train`` and ``eval`` rows (``loss``, ``accuracy``,
    ``lr``, ``test_loss``, ``test_accuracy``, …). ``steps_done``: updates made. ``stopped_early``: an
    ``on_step`` callback asked to stop. ``seconds``: wall-clock time of the whole call.
    """

    records: list[dict[str, Any]]
    diverged: bool
    steps_done: int
    final: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    stopped_early: bool = False


def _row(step: int, probe: str, metric: str, value: float, layer: str = "", **extra: Any) -> dict[str, Any]:
    return {"step": step, "probe": probe, "layer": layer, "metric": metric, "value": float(value), **extra}


def _tensors(dataset: Dataset, device: torch.device) -> Batch:
    """(inputs, targets) of the whole dataset on ``device``: a TensorDataset's tensors, else collated."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[:2]
    else:
        x, y = default_collate([dataset[i] for i in range(len(dataset))])[:2]  # type: ignore[arg-type]
    return x.to(device), y.to(device)


class _Batches:
    """Minibatches of (x, y): a fresh permutation from ``generator`` each epoch, or the whole set."""

    def __init__(self, x: Tensor, y: Tensor, config: TrainConfig, generator: torch.Generator) -> None:
        self.x, self.y, self.config, self.generator = x, y, config, generator
        n, bs = len(x), config.batch_size
        if n == 0:
            raise ValueError("train: empty training set")
        if not config.full_batch and config.drop_last and bs > n:
            raise ValueError(
                f"TrainConfig.batch_size: expected at most len(train_set)={n} with drop_last=True, got {bs}"
            )
        self.per_epoch = n // bs if config.drop_last else math.ceil(n / bs)
        self.order: Tensor = torch.empty(0, dtype=torch.long)
        self.position = self.per_epoch

    def __next__(self) -> Batch:
        if self.config.full_batch:
            return self.x, self.y
        if self.position == self.per_epoch:
            self.order = torch.randperm(len(self.x), generator=self.generator).to(self.x.device)
            self.position = 0
        bs = self.config.batch_size
        index = self.order[self.position * bs : (self.position + 1) * bs]
        self.position += 1
        return self.x[index], self.y[index]


def _all_finite(params: Sequence[Tensor]) -> bool:
    if not params:
        return True
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def _nonfinite_state(model: nn.Module, params: Sequence[Tensor]) -> str | None:
    """Why the model's state is not finite (None if it is): a parameter, or a floating buffer such as
    BN's running variance, which overflows to inf while the batch-normalized training loss stays finite
    (the eval-mode network then outputs nan)."""
    buffers = [(name, b) for name, b in model.named_buffers() if b.is_floating_point()]
    if _all_finite([*params, *(b for _, b in buffers)]):
        return None
    if not _all_finite(params):
        return "non-finite parameters"
    return "non-finite buffer " + next(name for name, b in buffers if not _all_finite([b]))


def train(
    model: nn.Module,
    train_set: Dataset,
    *,
    config: TrainConfig,
    loss_fn: LossFn = F.cross_entropy,
    test_set: Dataset | None = None,
    probes: Sequence[ProbeSchedule] = (),
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str | None = None,
    on_step: Callable[[ProbeContext, float], bool | None] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``config.steps`` updates; measure with ``probes`` along the way.

    The model is moved to ``device`` and trained in the mode it is in (``nn.Module`` starts in train
    mode; put chosen submodules in eval mode beforehand to freeze, e.g., BN statistics).
    ``on_step(ctx, loss)`` is called after each update ``ctx.step`` with its batch and loss; returning
    True stops the run (``stopped_early``; the probes due at the next step and the final evaluation
    still run). A non-finite training loss, or non-finite parameters after an update, end the run
    without an exception: a row ``{probe: "train", metric: "diverged", value: 1.0}`` at the number of
    updates made, ``diverged=True``, and no further probes or evaluation.
    See the module docstring for the order of events and the record schema.
    """
    start_time = time.perf_counter()
    device = torch.device(device)
    if any(not isinstance(p, ProbeSchedule) for p in probes):
        raise TypeError("train: probes must be ProbeSchedule instances")
    late = {p.name: sorted(s for s in p.steps if s > config.steps) for p in probes if p.steps}
    late = {name: steps for name, steps in late.items() if steps}
    if late:
        raise ValueError(f"train: probe steps beyond config.steps={config.steps}: {late}")

    torch.manual_seed(seed)
    model.to(device)
    x, y = _tensors(train_set, device)
    train_tensors = TensorDataset(x, y)
    test_tensors = TensorDataset(*_tensors(test_set, device)) if test_set is not None else None
    batches = _Batches(x, y, config, torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    scheduler = make_scheduler(optimizer, config)

    records: list[dict[str, Any]] = []

    def context(step: int, batch: Batch) -> ProbeContext:
        return ProbeContext(
            step, model, batch, optimizer, loss_fn, train_tensors, test_tensors, device, config
        )

    def checkpoint(step: int, batch: Batch | None, end: bool) -> bool:
        """Probes due at ``step`` (drawing ``batch`` if none is given), then evaluation if due. Returns
        whether an evaluation loss was not finite (the run diverged; a ``diverged`` row says why)."""
        due = [p for p in probes if p.due(step)]
        if due:
            ctx = context(step, batch if batch is not None else next(batches))
            for schedule in due:
                records.extend(_run_probe(schedule, ctx))
        if end or step % config.eval_every == 0:
            sets = [("test_", test_tensors)] + ([("train_", train_tensors)] if config.eval_train else [])
            for prefix, dataset in sets:
                if dataset is not None:
                    metrics = evaluate(
                        model, dataset, loss_fn, batch_size=config.eval_batch_size, device=device
                    )
                    records.extend(_row(step, "eval", prefix + k, v) for k, v in metrics.items())
                    if not math.isfinite(metrics["loss"]):
                        reason = f"non-finite {prefix}loss in evaluation (eval mode)"
                        records.append(_row(step, "train", "diverged", 1.0, reason=reason))
                        return True
        return False

    diverged = stopped_early = False
    step = 0
    bar = tqdm(total=config.steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    try:
        while step < config.steps:
            batch = next(batches)
            if checkpoint(step, batch, end=False):
                diverged = True
                break
            lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            inputs, targets = batch
            try:
                outputs = model(inputs)
            except torch.linalg.LinAlgError as error:  # e.g. a whitening layer's eigh on exploded inputs
                records.append(_row(step, "train", "diverged", 1.0, reason=f"LinAlgError: {error}"[:300]))
                diverged = True
                break
            loss = loss_fn(outputs, targets)
            loss_value = loss.detach().item()
            if not math.isfinite(loss_value):
                records.append(_row(step, "train", "diverged", 1.0))
                diverged = True
                break
            if step % config.log_every == 0 or step == config.steps - 1:
                records.append(_row(step, "train", "loss", loss_value))
                hits = _accuracy_count(outputs.detach(), targets)
                if hits is not None:
                    records.append(_row(step, "train", "accuracy", hits / len(targets)))
                records.append(_row(step, "train", "lr", lr))
                bar.set_postfix(loss=f"{loss_value:.4g}", refresh=False)
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update()
            if (why := _nonfinite_state(model, params)) is not None:
                records.append(_row(step, "train", "diverged", 1.0, reason=why))
                diverged = True
                break
            if on_step is not None and on_step(context(step - 1, batch), loss_value):
                stopped_early = True
                break
        if not diverged:
            diverged = checkpoint(step, None, end=True)
    finally:
        bar.close()

    final = {r["metric"]: r["value"] for r in records if r["probe"] in ("train", "eval")}
    return TrainResult(
        records=records,
        diverged=diverged,
        steps_done=step,
        final=final,
        seconds=time.perf_counter() - start_time,
        stopped_early=stopped_early,
    )
