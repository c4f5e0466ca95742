"""The state every probe must leave alone, and the guard that checks it.

This module also turns a model, a loss and batches into a pure function of chosen parameters
(:func:`functional_loss`), the object every curvature probe differentiates.

A probe may run the model in another mode, but afterwards parameters, buffers (BN running statistics,
``num_batches_tracked``), ``training`` flags, ``requires_grad``, ``.grad`` and the global RNG state are
exactly as before. :class:`ModelState` snapshots all of them; :func:`preserved` restores them on exit.
"""

from __future__ import annotations

import copy
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

__all__ = [
    "BN_MODES",
    "FunctionalLoss",
    "ModelState",
    "as_batches",
    "as_int",
    "check_bn",
    "check_loss",
    "eval_mode",
    "functional_loss",
    "grads_or_none",
    "in_one_allocation",
    "is_batch_dependent",
    "norm_mode",
    "optimizer_param_names",
    "outside_callers_modes",
    "preserved",
    "probe_guard",
    "resolve_params",
    "simulate_optimizer_step",
    "tensor_slots",
    "twice_differentiable",
]

#: How batch-dependent norm layers normalize during a probe (DESIGN.md).
BN_MODES = ("batch", "running")


def _rng_state() -> dict[str, Any]:
    """The global RNG states: torch's CPU generator, numpy's, Python's and, once CUDA is initialized
    (a model or tensor on the GPU), every CUDA device's. Before that no CUDA generator has been used,
    and reading its state would initialize CUDA, so it is not saved."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - the global state is what a probe must not touch
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Put back the global RNG states :func:`_rng_state` read."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def tensor_slots(model: nn.Module) -> list[tuple[str, nn.Module, str, str, Tensor]]:
    """Every place a parameter or buffer lives: ``(qualified name, module, "_parameters" or "_buffers",
    attribute, tensor)``, each (module, attribute) once, under its module's first name.

    A submodule registered twice (``self.c = self.a``) is one set of slots; a parameter shared by two
    modules (``c.weight = a.weight``) is two slots holding one tensor."""
    slots = []
    for prefix, module in model.named_modules():  # each module instance once, under its first name
        for kind in ("_parameters", "_buffers"):
            for attr, t in getattr(module, kind).items():
                if t is not None:
                    slots.append((f"{prefix}.{attr}" if prefix else attr, module, kind, attr, t))
    return slots


@dataclass(frozen=True)
class ModelState:
    """A deep snapshot of everything a probe must not change.

    ``slots`` holds the tensor objects themselves (not copies): a probe must leave every parameter
    and buffer *object* in place, not only its values, since optimizers and user code hold them.
    ``grad_objects`` likewise holds each ``.grad`` object (``grads`` its values): code that kept a
    reference to a gradient (a gradient bucket's view, a hook's list) still sees the model's."""

    parameters: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    training: dict[str, bool]
    requires_grad: dict[str, bool]
    grads: dict[str, torch.Tensor | None]
    rng: dict[str, Any]
    slots: tuple[tuple[str, nn.Module, str, str, Tensor], ...] = ()
    grad_objects: dict[str, torch.Tensor | None] = field(default_factory=dict)

    @classmethod
    def capture(cls, model: nn.Module) -> ModelState:
        params = dict(model.named_parameters(remove_duplicate=False))
        return cls(
            parameters={n: p.detach().clone() for n, p in params.items()},
            buffers={n: b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)},
            training={n: m.training for n, m in model.named_modules()},
            requires_grad={n: p.requires_grad for n, p in params.items()},
            grads={n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()},
            rng=_rng_state(),
            slots=tuple(tensor_slots(model)),
            grad_objects={n: p.grad for n, p in params.items()},
        )

    def differences(self, model: nn.Module) -> list[str]:
        """What differs between this snapshot and ``model`` now (empty when nothing changed)."""
        diffs = [
            f"{kind.strip('_')}: {name} is another tensor object"
            for name, module, kind, attr, t in self.slots
            if getattr(module, kind).get(attr) is not t
        ]
        params = dict(model.named_parameters(remove_duplicate=False))
        diffs += [
            f"grads: {name} is another tensor object"
            for name, g in self.grad_objects.items()
            if g is not None and name in params and params[name].grad is not g
        ]
        now = ModelState.capture(model)
        for kind in ("parameters", "buffers", "grads"):
            before, after = getattr(self, kind), getattr(now, kind)
            if before.keys() != after.keys():
                diffs.append(f"{kind}: names changed")
                continue
            for name in before:
                a, b = before[name], after[name]
                if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                    diffs.append(f"{kind}: {name}")
        for kind in ("training", "requires_grad"):
            before, after = getattr(self, kind), getattr(now, kind)
            diffs += [f"{kind}: {n}" for n in before if before[n] != after.get(n)]
        if not torch.equal(self.rng["torch"], now.rng["torch"]):
            diffs.append("rng: torch")
        a, b = self.rng["numpy"], now.rng["numpy"]
        if a[0] != b[0] or not np.array_equal(a[1], b[1]) or a[2:] != b[2:]:
            diffs.append("rng: numpy")
        if self.rng["python"] != now.rng["python"]:
            diffs.append("rng: python")
        if "cuda" in self.rng and (
            len(self.rng["cuda"]) != len(now.rng.get("cuda", []))
            or not all(torch.equal(a, b) for a, b in zip(self.rng["cuda"], now.rng["cuda"], strict=True))
        ):
            diffs.append("rng: cuda")
        return diffs

    def restore(self, model: nn.Module) -> None:
        """Put ``model`` and the global RNGs back exactly as captured (the original tensor objects into
        their slots first, should anything have replaced them, then their values)."""
        for _, module, kind, attr, t in self.slots:
            slot = getattr(module, kind)
            if slot.get(attr) is not t:
                slot[attr] = t
        with torch.no_grad():
            params = dict(model.named_parameters(remove_duplicate=False))
            for name, p in params.items():
                p.copy_(self.parameters[name])
                if p.requires_grad != self.requires_grad[name]:
                    p.requires_grad_(self.requires_grad[name])
                saved, original = self.grads[name], self.grad_objects.get(name)
                if original is None:  # a snapshot without gradient objects: their values
                    original = None if saved is None else saved.clone()
                if p.grad is not original:
                    p.grad = original
                if saved is not None:
                    original.copy_(saved)  # a probe may have written into the object itself
            for name, b in model.named_buffers(remove_duplicate=False):
                b.copy_(self.buffers[name])
        for name, m in model.named_modules():
            if m.training != self.training[name]:  # Module.__setattr__ is slow: set only what changed
                m.training = self.training[name]
        _set_rng_state(self.rng)


@contextmanager
def preserved(model: nn.Module) -> Iterator[ModelState]:
    """Run a block, then restore the model's state and the RNGs exactly as they were before it."""
    state = ModelState.capture(model)
    try:
        yield state
    finally:
        state.restore(model)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every module in eval mode for the block; each module's own flag restored afterwards."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def as_int(value: Any) -> Any:
    """A numpy integer (``np.int64``, as ``len(np.unique(labels))``-style code gives) as a Python int;
    anything else unchanged, for the argument check that follows to accept or name."""
    return int(value) if isinstance(value, np.integer) else value


def check_bn(bn: str) -> None:
    """``bn`` must name one of :data:`BN_MODES` (ValueError otherwise)."""
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")


def is_batch_dependent(module: nn.Module) -> bool:
    """A layer that normalizes with batch statistics in training: torch's BatchNorm and whybn's zoo alike.

    Both follow torch.nn.BatchNorm's convention of a ``track_running_stats`` attribute. A module with
    ``running_mean``/``running_var`` buffers but no such attribute is not recognized: :func:`norm_mode`
    warns, naming its class, and runs it in eval mode under ``bn="batch"``.
    """
    return hasattr(module, "track_running_stats")


_RUNNING_BUFFERS = {"running_mean", "running_var"}
_ABSENT = object()  # a module without the attribute


def _warn_unrecognized_norm(module: nn.Module) -> None:
    cls = type(module).__name__
    warnings.warn(
        f"bn='batch': {cls} has running-statistics buffers but no track_running_stats attribute, so "
        "whybn cannot tell that it normalizes with batch statistics and runs it in eval mode (with its "
        f"running statistics). If {cls} is a batch norm, give it torch's convention: an attribute "
        "track_running_stats (normalize with the batch while training; update the running statistics "
        "only if it is True).",
        UserWarning,
        stacklevel=4,
    )


@contextmanager
def norm_mode(model: nn.Module, bn: str = "batch") -> Iterator[nn.Module]:
    """Run the block with batch-dependent norms in mode ``bn`` and every random layer off.

    ``bn="batch"``: batch-dependent layers normalize with the current batch's statistics (the loss the
    optimizer sees) and update no running statistic (``training=True, track_running_stats=False``);
    ``bn="running"``: they use their running statistics (eval mode). All other modules are in eval mode
    (dropout and injected noise off). Flags are restored on exit. A forward pass in the block on a
    batch of one sample under ``bn="batch"`` (no batch statistics) raises a ``ValueError`` that names
    ``batches`` and the way out, for every probe alike.
    """
    check_bn(bn)
    saved = [(m, m.training, getattr(m, "track_running_stats", _ABSENT)) for m in model.modules()]
    # object.__setattr__: Module.__setattr__ first looks for a parameter, buffer or submodule of the
    # name, which these flags never are, and cost 0.12 ms more a call on a 41-module MLP; a functional
    # probe enters this once per forward pass (ICS: layers + 1) and per bound() call (each HVP)
    set_flag = object.__setattr__
    try:
        for m, training, track in saved:
            batch = bn == "batch" and track is not _ABSENT  # is_batch_dependent(m)
            if bn == "batch" and track is _ABSENT and m._buffers and _RUNNING_BUFFERS & m._buffers.keys():
                _warn_unrecognized_norm(m)
            if training != batch:
                set_flag(m, "training", batch)
            if batch:
                set_flag(m, "track_running_stats", False)
        try:
            yield model
        except ValueError as error:  # a probe's own forward pass (hooks, captures) on a batch of one
            if bn == "batch" and "value per channel" in str(error):  # torch's BatchNorm on one sample
                raise ValueError(
                    "batches: a batch of 1 sample(s) gives a batch-dependent norm layer one value per "
                    f"channel under bn='batch'; use larger batches or bn='running' ({error})"
                ) from error
            raise
    finally:
        for m, training, track in saved:
            if m.training != training:
                set_flag(m, "training", training)
            if track is not _ABSENT:
                set_flag(m, "track_running_stats", track)


class _CompositeWeightNorm(TorchFunctionMode):
    """``torch._weight_norm(v, g, dim)`` as its composite formula v · g/‖v‖ (norm over every dimension
    but ``dim``); every other call passes through unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g, *rest = args
            dim = rest[0] if rest else kwargs.get("dim", 0)
            return v * (g / torch.norm_except_dim(v, 2, dim))
        return func(*args, **kwargs)


@contextmanager
def twice_differentiable() -> Iterator[None]:
    """Build graphs in the block from kernels whose derivatives can be differentiated again (HVPs).

    Two of torch 2.13's fused kernels cannot, and this swaps in their composite forms:

    * ``torch._weight_norm`` (``torch.nn.utils.parametrizations.weight_norm`` and the older
      ``torch.nn.utils.weight_norm``): the fused kernel's double backward is silently wrong (an HVP 24 %
      off finite differences on a small MLP) and it has no forward-mode derivative. Here it is
      v · g/‖v‖, the same function to rounding.
    * scaled-dot-product attention (``nn.MultiheadAttention``): on CPU it takes the flash kernel, whose
      backward has no derivative. Here it runs on the math backend (``sdpa_kernel``, restored on exit).

    Only the Python-level calls of the forward pass go through the mode, at 1.5–2.5 µs each: a forward
    pass of the MLP-10 of ``benchmarks/`` took 2.78 instead of 2.43 ms, of ResNet-20 106.8 instead of
    105.6 ms. Backward passes run in autograd's engine, untouched, and a cached gradient graph is built
    once.
    """
    with sdpa_kernel(SDPBackend.MATH), _CompositeWeightNorm():
        yield


@contextmanager
def outside_callers_modes() -> Iterator[None]:
    """The block run outside two modes a caller's loop may be in:

    * ``torch.inference_mode``: a probe called inside an evaluation loop's ``torch.inference_mode()``
      makes normal tensors that autograd may differentiate (inference tensors can be neither saved for
      backward nor updated in place outside inference mode);
    * ``torch.autocast`` (CPU, and CUDA where present): a probe called inside a mixed-precision training
      step computes in the model's dtype, as documented, not in bfloat16 or float16 (under a caller's
      CPU autocast a Hessian's top eigenvalue moved 0.2%, a landscape loss 2%, on a small BN MLP).

    Also a decorator: ``@outside_callers_modes()`` runs each call of the function in it.
    """
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


@contextmanager
def probe_guard(model: nn.Module, *, strict: bool = False) -> Iterator[ModelState]:
    """The guard around every probe: snapshot the state, run the block, restore the snapshot.

    The block runs with gradients on, outside inference mode and autocast
    (:func:`outside_callers_modes`), whatever the caller's mode (a probe called in an evaluation loop's
    ``torch.no_grad()`` or ``torch.inference_mode()``, or in a mixed-precision step's
    ``torch.autocast``); a probe that needs no graph turns gradients off again inside. With
    ``strict=True`` (tests) the block must not have changed anything itself: an ``AssertionError``
    lists the differences (the state is restored first either way).
    """
    state = ModelState.capture(model)
    diffs: list[str] = []
    try:
        with outside_callers_modes(), torch.enable_grad():
            yield state
        if strict:
            diffs = state.differences(model)
    finally:
        state.restore(model)
    if diffs:
        raise AssertionError(f"the probe changed the model: {diffs}")


def in_one_allocation(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` as views of one contiguous buffer (when they share dtype and device).

    For tensors held across many forward and backward passes: autograd's gradients are allocated amid
    the activations, and holding them leaves the heap fragmented so that the allocator returns the
    activation memory to the system after each pass and faults it back in on the next. On ResNet-20
    (CPU, glibc) that cost 16–20 thousand page faults and 0.2 gradients per call of
    :func:`probes.smoothness.landscape_along_gradient` (6.7 thousand per call of
    :func:`probes.ics.ics_gradient_change`); one buffer made after the pass, with each pass's own
    gradients freed before the next pass starts, brought both to none."""
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        return [t.clone() for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


# ----------------------------------------------------------------------------------------- inputs


def resolve_params(
    model: nn.Module, params: nn.Module | Sequence[str] | Sequence[nn.Parameter] | None = None
) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs a probe differentiates, in the model's order of registration.

    ``None``: every trainable (``requires_grad``) parameter; a submodule of ``model``: its parameters;
    a list of qualified names or of ``nn.Parameter`` objects of ``model``. A tied parameter
    (``dec.weight = enc.weight``) is one parameter: any of its names selects it, and it is reported under
    its first name, as ``named_parameters()`` lists it. Anything not in the model, an empty selection or
    a duplicate (the same name twice, or two names of one tied parameter) raises ``ValueError``.
    """
    named = list(model.named_parameters())  # shared (tied) parameters once, under their first name
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("params: the model has no trainable (requires_grad) parameters")
        return chosen
    by_id = {id(p): n for n, p in named}
    if isinstance(params, nn.Module):
        if not any(m is params for m in model.modules()):
            raise ValueError(
                f"params: expected a submodule of the model, got a foreign {type(params).__name__}"
            )
        ids = {id(p) for p in params.parameters()}
        chosen = [(n, p) for n, p in named if id(p) in ids]
        if not chosen:
            raise ValueError(f"params: the {type(params).__name__} submodule has no parameters")
        return chosen
    if isinstance(params, str | Tensor) or not isinstance(params, Iterable):
        raise ValueError(
            f"params: expected None, a submodule, or a list of parameter names or parameters, got {params!r}"
        )
    entries = list(params)
    if not entries:
        raise ValueError("params: empty selection; expected parameter names or parameters of the model")
    # every name of a tied parameter (``d.weight = a.weight``) resolves to its first name
    aliases = {n: by_id[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    names: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            if entry not in aliases:
                raise ValueError(f"params: the model has no parameter named {entry!r}")
            names.append(aliases[entry])
        elif isinstance(entry, Tensor):
            if id(entry) not in by_id:
                raise ValueError(
                    f"params: a parameter of shape {tuple(entry.shape)} is not part of the model"
                )
            names.append(by_id[id(entry)])
        else:
            raise ValueError(f"params: expected parameter names or parameters, got {entry!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"params: duplicate parameters {duplicates} (a name twice, or two names of one tied parameter)"
        )
    chosen_names = set(names)
    return [(n, p) for n, p in named if n in chosen_names]


def as_batches(
    batches: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
) -> list[tuple[Tensor, Tensor]]:
    """One ``(inputs, targets)`` pair or an iterable of pairs, as a list (``ValueError`` if empty).

    Iterating draws no random number as far as the caller can tell: a shuffling ``DataLoader`` draws
    its permutation (and its workers' seeds) from the global generators, whose states are put back, so
    a probe inside a training loop leaves the run's later random numbers (dropout masks, the next
    epoch's order) exactly as they would have been without it.
    """
    if (
        isinstance(batches, tuple | list)
        and len(batches) == 2
        and all(isinstance(t, Tensor) for t in batches)
    ):
        return [(_usable(batches[0]), _usable(batches[1]))]
    rng = _rng_state()
    try:
        pairs = [tuple(b) for b in batches]
    except TypeError:
        raise ValueError(
            f"batches: expected an (inputs, targets) pair or an iterable of them, got {batches!r}"
        ) from None
    finally:
        _set_rng_state(rng)
    if not pairs:
        raise ValueError("batches: empty; expected an (inputs, targets) pair or an iterable of them")
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], Tensor):
            raise ValueError("batches: every item must be an (inputs, targets) pair of tensors")
        if pair[0].shape[0] == 0:
            raise ValueError("batches: a batch has no samples")
    return [(_usable(x), _usable(y)) for x, y in pairs]


def _usable(t: Any) -> Any:
    """``t``, or a normal copy of an inference tensor (made under ``torch.inference_mode()``, which
    autograd may not save for backward)."""
    if isinstance(t, Tensor) and t.is_inference():
        with torch.inference_mode(False):
            return t.clone()
    return t


def check_loss(loss: Tensor) -> Tensor:
    """``loss`` if it is a scalar tensor, else ``ValueError`` (probes need the batch mean)."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar (the mean over the batch), got {shape}")
    return loss


def _forward(model: nn.Module, tensors: dict[str, Tensor], x: Tensor, bn: str) -> Tensor:
    """``model(x)`` with ``tensors`` in place of its parameters/buffers, in norm mode ``bn``.

    ``tensors`` has one entry per slot (:func:`tensor_slots`), so ``tie_weights=False``: torch 2.13's
    tying expands a shared submodule's names into several swaps of one slot and then restores the
    slot to the swapped-in tensor, leaving it in the model (pytorch/pytorch#164759)."""
    with norm_mode(model, bn):  # which names a batch of one under bn="batch"
        return functional_call(model, tensors, (x,), tie_weights=False)


class _Closure(nn.Module):
    """A module whose forward runs a callable: ``functional_call(_Closure(model), tensors, (fn,))``
    keeps ``model``'s tensors substituted for the whole of ``fn``, backward passes included."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[], Any]) -> Any:
        return fn()


class FunctionalLoss:
    """L(θ) = Σ_b n_b L_b(θ) / Σ_b n_b: the sample-weighted mean loss as a pure function of θ.

    θ is the chosen parameters flattened and concatenated in order (``names``); every other
    parameter and buffer is frozen at its value when this object was made (cloned, so later changes
    to the model, or the guard restoring it, do not reach here). A tied tensor is one entry, under
    its first name, and every slot that holds it (a shared submodule, a parameter assigned to two
    modules) gets the same value. Call with a flat tensor of
    shape ``(n,)`` or a ``{name: tensor}`` dict; :meth:`batch_loss` gives one batch's term L_b.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        batches: list[tuple[Tensor, Tensor]],
        chosen: list[tuple[str, nn.Parameter]],
        bn: str,
    ) -> None:
        check_bn(bn)
        self.model, self.loss_fn, self.batches, self.bn = model, loss_fn, batches, bn
        self.names = [n for n, _ in chosen]
        self.shapes = [tuple(p.shape) for _, p in chosen]
        self.numels = [p.numel() for _, p in chosen]
        self.dtypes = [p.dtype for _, p in chosen]  # θ has their promoted dtype (float32 and float64: 64)
        chosen_names = set(self.names)
        self.frozen = {
            n: t.detach().clone()
            for n, t in [*model.named_parameters(), *model.named_buffers()]
            if n not in chosen_names
        }
        with torch.inference_mode(False):  # a normal tensor, even if made under inference_mode()
            self.theta0 = torch.cat([p.detach().reshape(-1) for _, p in chosen])  # cat copies: θ₀ is private
        first = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
        self.slots = {slot: first[id(t)] for slot, _, _, _, t in tensor_slots(model)}  # slot → entry
        self.sizes = [int(x.shape[0]) for x, _ in batches]
        self.total = sum(self.sizes)
        self.weights = [n / self.total for n in self.sizes]  # n_b / N
        self._closure = _Closure(model)
        self._bound: Tensor | dict[str, Tensor] | None = None  # the θ of a running bound() call
        self._bound_tensors: tuple[Any, bool, dict[str, Tensor]] | None = None  # θ, grad mode, its slots

    @classmethod
    def of(
        cls,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        batches: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
        *,
        params: nn.Module | Sequence[str] | Sequence[nn.Parameter] | None = None,
        bn: str = "batch",
    ) -> FunctionalLoss:
        """The loss of ``model`` on ``batches`` as a function of ``params`` (validated, not evaluated)."""
        return cls(model, loss_fn, as_batches(batches), resolve_params(model, params), bn)

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Flat θ ``(n,)`` → ``{name: tensor of the parameter's shape and dtype}`` (views, differentiable;
        a parameter of another dtype than θ's, in a model that mixes float32 and float64 layers, is a
        differentiable cast of its view)."""
        if theta.shape != self.theta0.shape:
            raise ValueError(f"theta must have shape {tuple(self.theta0.shape)}, got {tuple(theta.shape)}")
        parts = torch.split(theta, self.numels)
        return {
            n: t.view(shape) if t.dtype == dtype else t.view(shape).to(dtype)
            for n, t, shape, dtype in zip(self.names, parts, self.shapes, self.dtypes, strict=True)
        }

    def _as_dict(self, theta: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        if isinstance(theta, dict):
            if set(theta) != set(self.names):
                raise ValueError(f"theta: expected the parameters {self.names}, got {sorted(theta)}")
            return theta
        return self.unflatten(theta)

    def _tensors(self, theta: Tensor | dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
        values = {**self.frozen, **self._as_dict(theta)}
        return {prefix + slot: values[n] for slot, n in self.slots.items()}

    def batch_loss(self, theta: Tensor | dict[str, Tensor], index: int) -> Tensor:
        """L_b(θ): ``loss_fn(model(x_b), y_b)`` for batch ``index``."""
        x, y = self.batches[index]
        if self._bound is not None:  # inside bound(θ): the model holds θ already
            if theta is not self._bound:
                raise ValueError("theta: inside bound(θ), evaluate the loss at that same θ")
            out = self.model(x)  # bound() holds the norm mode
        else:
            out = _forward(self.model, self._tensors(theta), x, self.bn)
        return check_loss(self.loss_fn(out, y))

    def bound(self, theta: Tensor | dict[str, Tensor], fn: Callable[[], Any]) -> Any:
        """``fn()`` with the model's tensors those of θ (and the frozen ones) and its norm layers in
        mode ``bn`` for the whole call: the forward passes ``fn`` makes (:meth:`batch_loss`, calling
        this object, at this same θ) *and* its backward passes.

        A backward pass may run the forward again: activation checkpointing
        (``torch.utils.checkpoint``) recomputes what it did not save. Outside ``bound`` that
        recomputation would see the model's own parameters, not θ: a gradient at θ ≠ the model's and
        every HVP (even at θ₀, whose graph must lead back to θ) would be silently wrong — 37% and 55%
        on a small MLP. Differentiate inside, as every whybn probe does; a graph kept past ``fn`` is
        differentiated in a later ``bound`` call at the same θ. Not reentrant.
        """
        if self._bound is not None:
            raise RuntimeError("FunctionalLoss.bound: already inside a bound() call")
        self._bound = theta
        try:
            grad = torch.is_grad_enabled()  # an HVP loop binds one θ: its views are made once
            cached = self._bound_tensors
            if cached is None or cached[0] is not theta or cached[1] != grad:
                self._bound_tensors = (theta, grad, self._tensors(theta, "model."))
            with norm_mode(self.model, self.bn):
                return functional_call(self._closure, self._bound_tensors[2], (fn,), tie_weights=False)
        finally:
            self._bound = None

    def check(self) -> None:
        """Evaluate every batch's loss once without gradients, under the state guard: ``ValueError``
        now, not at first use, for a non-scalar loss or a batch of one under ``bn="batch"``."""
        with probe_guard(self.model), torch.no_grad():
            for b in range(len(self.batches)):
                self.batch_loss(self.theta0, b)

    def __call__(self, theta: Tensor | dict[str, Tensor]) -> Tensor:
        """L(θ) = Σ_b (n_b/N) L_b(θ)."""
        return sum(w * self.batch_loss(theta, b) for b, w in enumerate(self.weights))

    def grad_at(
        self, theta: Tensor | dict[str, Tensor], inputs: Sequence[Tensor]
    ) -> tuple[Tensor | None, ...]:
        """∇L(θ) with respect to ``inputs`` (leaves θ is made of; None for one L does not depend on):
        one forward and one backward pass per batch, :meth:`bound` to θ."""
        return self.value_and_grad_at(theta, inputs)[1]

    def value_and_grad_at(
        self, theta: Tensor | dict[str, Tensor], inputs: Sequence[Tensor]
    ) -> tuple[float, tuple[Tensor | None, ...]]:
        """(L(θ), :meth:`grad_at`) from the same forward and backward passes."""

        def forward_backward() -> tuple[Tensor, tuple[Tensor | None, ...]]:
            loss = self(theta)
            return loss, grads_or_none(loss, inputs)

        with torch.enable_grad():
            loss, grads = self.bound(theta, forward_backward)
        return float(loss.detach()), grads

    def value_and_grad(self, theta: Tensor) -> tuple[float, Tensor]:
        """(L(θ), ∇L(θ)) at a flat θ: one forward and one backward pass per batch; a zero gradient
        when the loss does not depend on the chosen parameters."""
        leaf = theta.detach().clone().requires_grad_(True)
        loss, (grad,) = self.value_and_grad_at(leaf, [leaf])
        return loss, torch.zeros_like(leaf) if grad is None else grad.detach()


def grads_or_none(
    loss: Tensor, inputs: Sequence[Tensor], *, create_graph: bool = False
) -> tuple[Tensor | None, ...]:
    """``∇loss`` with respect to each of ``inputs``, None for one the loss does not depend on, also when
    it depends on none of them (a loss that does not require grad: autograd raises "element 0 of tensors
    does not require grad" there even with ``allow_unused``)."""
    if not loss.requires_grad:
        return (None,) * len(inputs)
    return torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)


def functional_loss(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batches: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
    *,
    params: nn.Module | Sequence[str] | Sequence[nn.Parameter] | None = None,
    bn: str = "batch",
) -> tuple[FunctionalLoss, Tensor]:
    """``(f, θ₀)``: the weighted mean loss f(θ) = Σ_b n_b L_b(θ) / Σ_b n_b of the chosen parameters.

    L_b(θ) = ``loss_fn(model(x_b; θ, rest), y_b)`` evaluated by ``torch.func.functional_call`` inside
    :func:`norm_mode` (``bn="batch"``: statistics-free batch statistics; ``"running"``: eval mode), so
    f is pure: no running statistic moves, no random layer draws, and it composes with ``torch.func``
    transforms (``grad``, ``jvp``, ``hessian``) as well as with ``torch.autograd``. θ₀ is the flat
    current value of the chosen parameters (a detached copy). Validates its inputs (``ValueError``),
    evaluating each batch's loss once (:meth:`FunctionalLoss.check`). For a model that checkpoints
    activations, differentiate inside :meth:`FunctionalLoss.bound` (or use
    :meth:`FunctionalLoss.value_and_grad` / :meth:`FunctionalLoss.grad_at`, which do).
    """
    f = FunctionalLoss.of(model, loss_fn, batches, params=params, bn=bn)
    f.check()
    return f, f.theta0.clone()


def simulate_optimizer_step(
    optimizer: torch.optim.Optimizer,
    params: dict[str, nn.Parameter],
    grads: dict[str, Tensor | None],
) -> dict[str, Tensor]:
    """W' for every parameter the optimizer holds: its step from ``grads``, run on a deep copy.

    The copy's memo maps each real parameter to a fresh clone, so the copied ``param_groups`` and
    ``state`` (momentum buffers, Adam moments, step counts) refer to the clones only; the real
    optimizer and parameters are not touched. Parameters with no gradient (``None``: the loss does not
    depend on them) are skipped, as ``step`` skips a parameter whose ``.grad`` is None.

    The step is the optimizer's update rule alone: no step hook runs, neither the optimizer's own
    (``register_step_pre_hook``/``register_step_post_hook``) nor torch's global ones
    (``register_optimizer_step_pre_hook``/``_post_hook``), since a hook may log, count or change
    other state, and no real step is taken. A projection done in a post-hook (a max-norm
    constraint) is therefore not part of W'.
    """
    by_id = {id(p): name for name, p in params.items()}
    clones: dict[str, Tensor] = {}
    memo: dict[int, Any] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = by_id.get(id(p))
            clone = p.detach().clone().requires_grad_(p.requires_grad)
            if name is not None and grads.get(name) is not None:
                clone.grad = grads[name].detach().clone()
                clones[name] = clone
            memo[id(p)] = clone
    shadow = copy.deepcopy(optimizer, memo)
    # the class's step without torch's hook wrapper (Optimizer.profile_hook_step, which runs the global
    # and the optimizer's own step hooks); an instance-level wrapper (an LR scheduler's) is bypassed too
    step = type(shadow).step
    update = step.__wrapped__ if getattr(step, "hooked", False) else step
    with torch.no_grad():
        update(shadow)
    return {name: c.detach() for name, c in clones.items()}


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """id(parameter) → the model's name for it, for every tensor ``optimizer`` holds.

    ValueError naming ``optimizer`` if it holds a tensor that is not a parameter of ``model``.
    """
    by_id = {id(p): n for n, p in model.named_parameters()}
    owned: dict[int, str] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise ValueError(
                    f"optimizer: holds a parameter of shape {tuple(p.shape)} that is not part of the model"
                )
            owned[id(p)] = by_id[id(p)]
    return owned
