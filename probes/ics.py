"""Internal covariate shift (ICS), both definitions.

**Optimization ICS** (Santurkar, Tsipras, Ilyas & Madry 2018, "How does batch normalization help
optimization?", Definition 2.1): for layer i with parameters W_i,

    G  = ∇_{W_i} L(W_1, …, W_k; x, y)
    G' = ∇_{W_i} L(W'_1, …, W'_{i−1}, W_i, …, W_k; x, y)

where W'_j is what the optimizer's next step makes of W_j from the current gradient, and (x, y) is the
same batch for both. ICS_i = ‖G − G'‖₂; :func:`ics_gradient_change` also reports ‖G − G'‖/‖G‖ and
cos(G, G'). The step is simulated: a deep copy of the optimizer (its state and hyperparameters) steps
cloned tensors, so the real optimizer, its state and the model are untouched.

**Distributional ICS** (Ioffe & Szegedy 2015, "Batch normalization: accelerating deep network
training by reducing internal covariate shift"): the change, between two moments of training, of the
distribution of each layer's input on a fixed probe batch. :func:`layer_input_statistics` takes the
per-unit statistics at one moment, :func:`distribution_shift` compares two of them (change of mean, of
variance, and the 1-Wasserstein distance between each unit's empirical input distributions).

**What is a layer.** A *parameterized layer* is a module that directly owns (``recurse=False``) a
weight with two or more dimensions (:func:`probes.activations.layer_weight_names`): a weight matrix or
kernel (``nn.Linear``, ``nn.Conv*``, ``nn.Embedding``, whybn's weight-normalized wrappers with
``weight_v``, a parametrized or spectrally normalized weight) or several (``nn.LSTM``, ``nn.GRU``,
``nn.MultiheadAttention``). Its parameters W_i are every trainable parameter it owns directly
(weight and bias; ``weight_v``, ``weight_g`` and bias; all of a recurrent layer's matrices and biases;
an attention's input projection and its ``out_proj``, which it reads without calling it:
:func:`probes.activations.layer_parameters`). Norm layers own only one-dimensional affine parameters
(γ, β), so they are not layers here; their parameters, like every other parameter, are placed by
forward-execution order.

**What "preceding" means.** During the full-gradient evaluation one clock orders two kinds of events:
each module's first forward call (a forward pre-hook) and each parameter's first *read*, the first
torch operation that takes the parameter's values as an argument (a ``TorchFunctionMode``). Uses
of a parameter for its metadata alone are not reads: its size or dtype, a template for another
tensor's dtype and device (``x.type_as(w)``, ``x.to(w)``) or shape (``x.view_as(w)``), or for a
new tensor's (``torch.zeros_like(w)``, ``w.new_zeros(n)``). Layer i starts at
its module's first call; the parameters updated for it are all trainable parameters first read before
that: earlier layers' weights and biases *and* the affine parameters of norm layers (or of any other
module) that ran before it. So a BN layer's γ, β right after layer j < i are part of the network
preceding layer i, while those right after layer i are not. Reads, not owners, place a parameter: a
position embedding that the root module adds after the patch embedding (``x = embed(x) + pos``)
follows the embedding, though its owner (the root) is called first; ``nn.MultiheadAttention`` reads
its ``out_proj`` weight without calling ``out_proj``, inside the attention, so it precedes the layers
after the attention. A parameter that no torch operation reads (a custom kernel outside torch's
function dispatch) is placed at its owner's first call. Layer 1 has nothing before it in a plain net
(G' = G exactly, ICS 0, no gradient spent); a parameterized module that runs before the first layer
(an input norm with affine parameters) does precede it. Parameters the optimizer does not hold never
move (W'_j = W_j).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from probes.activations import (
    capture_layer_inputs,
    feature_axis,
    floating_inputs,
    layer_parameters,
    parameterized_layers,
    select_modules,
)
from probes.functional import (
    FunctionalLoss,
    as_batches,
    in_one_allocation,
    norm_mode,
    optimizer_param_names,
    probe_guard,
    resolve_params,
    simulate_optimizer_step,
)

__all__ = [
    "ICSResult",
    "InputStatistics",
    "LayerICS",
    "LayerInputStatistics",
    "LayerShift",
    "ShiftResult",
    "distribution_shift",
    "ics_gradient_change",
    "layer_input_statistics",
    "parameterized_layers",
    "unit_statistics",
    "wasserstein1",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]
Layers = Sequence[type[nn.Module] | str | nn.Module] | Mapping[str, nn.Module] | None

#: Optimizers whose step :func:`ics_gradient_change` simulates (per-parameter updates only).
SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _select_layers(model: nn.Module, layers: Layers) -> dict[str, nn.Module]:
    """The chosen parameterized layers (``None``: all); an entry that is not one raises ``ValueError``."""
    candidates = parameterized_layers(model)
    if not candidates:
        raise ValueError(
            "model: no parameterized layer (a module owning a weight with ≥ 2 dimensions, such as "
            "Linear or Conv)"
        )
    if layers is None:
        return candidates
    chosen = select_modules(model, layers)
    bad = [n or "<model>" for n, m in chosen.items() if n not in candidates]
    if bad:
        raise ValueError(f"layers: not parameterized layers (no weight with ≥ 2 dims): {', '.join(bad)}")
    if not chosen:
        raise ValueError("layers: the selection is empty")
    return chosen


# ------------------------------------------------------------------------------ optimization ICS


@dataclass(frozen=True)
class LayerICS:
    """Santurkar et al. (2018) Def. 2.1 for one layer: G vs G' (its parameters flattened together).

    ``preceding``: the names of the parameters that were moved by the simulated step for G'.
    """

    layer: str
    l2: float  # ‖G − G'‖₂
    relative_l2: float  # ‖G − G'‖₂ / ‖G‖₂ (nan when G = 0)
    cosine: float  # ⟨G, G'⟩ / (‖G‖ ‖G'‖) (nan when either is 0)
    grad_norm: float = float("nan")  # ‖G‖₂
    preceding: tuple[str, ...] = ()


@dataclass(frozen=True)
class ICSResult:
    """One :class:`LayerICS` per layer in forward-execution order; ``n_gradients`` evaluations spent."""

    layers: tuple[LayerICS, ...]
    n_gradients: int

    def to_records(self) -> list[dict[str, Any]]:
        return [
            {"probe": "ics_gradient_change", "layer": r.layer, "metric": metric, "value": float(value)}
            for r in self.layers
            for metric, value in (
                ("l2", r.l2),
                ("relative_l2", r.relative_l2),
                ("cosine", r.cosine),
                ("grad_norm", r.grad_norm),
            )
        ]

    def __getitem__(self, layer: str) -> LayerICS:
        for r in self.layers:
            if r.layer == layer:
                return r
        raise KeyError(layer)


def _check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        names = ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED_OPTIMIZERS)
        raise ValueError(f"optimizer: only {names} are supported, got {type(optimizer).__name__}")
    if not optimizer_param_names(model, optimizer):  # ValueError for tensors foreign to the model
        raise ValueError("optimizer: holds no parameter of the model")


def _norm(t: Tensor) -> float:
    return float(torch.linalg.vector_norm(t))


def _compare(layer: str, g: Tensor, g2: Tensor, preceding: tuple[str, ...]) -> LayerICS:
    n, n2 = _norm(g), _norm(g2)
    l2 = _norm(g - g2)
    if g2 is g:
        cosine = 1.0 if n > 0 else math.nan
    else:
        cosine = max(-1.0, min(1.0, float(g @ g2) / (n * n2))) if n > 0 and n2 > 0 else math.nan
    return LayerICS(layer, l2, l2 / n if n > 0 else math.nan, cosine, n, preceding)


def ics_gradient_change(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batches,
    optimizer: torch.optim.Optimizer,
    *,
    bn: str = "batch",
    layers: Layers = None,
) -> ICSResult:
    """Internal covariate shift as gradient change (Santurkar et al. 2018, Def. 2.1), per layer.

    For each parameterized layer i (module docstring), in forward-execution order::

        G  = ∇_{W_i} L(W_1, …, W_k)          G' = ∇_{W_i} L(W'_1, …, W'_{i−1}, W_i, …, W_k)

    on the same ``batch`` (an ``(inputs, targets)`` pair, or several: the sample-weighted mean loss).
    W'_j = the step ``optimizer`` (``torch.optim.SGD``/``Adam``/``AdamW``, any momentum, Nesterov,
    weight decay, AMSGrad) would take from the current gradient ∇L and its current state, simulated on
    a deep copy (the update rule alone: no step hook runs, see
    :func:`probes.functional.simulate_optimizer_step`). "Preceding" = every trainable parameter the
    forward pass first reads before layer i runs, wherever it is registered (norm affine parameters
    included; the module docstring). Reports ``l2`` = ‖G − G'‖₂, ``relative_l2`` = ‖G − G'‖/‖G‖
    and ``cosine`` = cos(G, G').

    ``bn``: ``"batch"`` (the training loss, no running-statistic update) or ``"running"`` (eval mode).
    ``layers``: restrict to some parameterized layers (names, modules or types). Cost: one full
    gradient plus one gradient per layer with something before it (≤ layers + 1). The model, its
    gradients, the RNG, the optimizer and its state are left exactly as found.

    ``ValueError``: a model without a parameterized layer, an unsupported optimizer or one holding
    tensors that are not the model's parameters, a ``layers`` entry that is no parameterized layer or
    never ran.
    """
    selected = _select_layers(model, layers)
    _check_optimizer(optimizer, model)
    chosen = resolve_params(model, None)
    f = FunctionalLoss(model, loss_fn, as_batches(batch), chosen, bn)
    params = dict(chosen)
    name_of = {id(p): n for n, p in params.items()}
    owners: dict[str, list[nn.Module]] = {}  # a tied parameter has several owners
    for module in model.modules():
        for p in layer_parameters(module):
            if id(p) in name_of:
                owners.setdefault(name_of[id(p)], []).append(module)

    with probe_guard(model):
        # 1) the full gradient, on one clock: each parameter-owning module's first call and each
        #    parameter's first read (the module docstring: reads, not owners, place a parameter)
        order: dict[int, int] = {}  # id(module) → its first call
        clock = _Clock()

        def stamp(module: nn.Module, _args: tuple) -> None:
            if id(module) not in order:
                order[id(module)] = clock()

        owning = {id(m): m for ms in owners.values() for m in ms} | {id(m): m for m in selected.values()}
        handles = [m.register_forward_pre_hook(stamp) for m in owning.values()]
        try:
            theta = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
            with _FirstReads({id(t): n for n, t in theta.items()}, clock) as reads:
                grads = f.grad_at(theta, list(theta.values()))
        finally:
            for h in handles:
                h.remove()
        n_gradients = 1
        kept = iter(in_one_allocation([t for t in grads if t is not None]))  # held through every pass below
        full = {n: None if t is None else next(kept) for n, t in zip(params, grads, strict=True)}
        del theta, grads

        never = [n or "<model>" for n, m in selected.items() if id(m) not in order]
        if never and layers is not None:
            raise ValueError(f"layers: never ran during the forward pass: {', '.join(never)}")
        ran = sorted(((n, m) for n, m in selected.items() if id(m) in order), key=lambda nm: order[id(nm[1])])
        position = {
            name: reads.first.get(name, min((order[id(m)] for m in ms if id(m) in order), default=math.inf))
            for name, ms in owners.items()
        }

        # 2) W' for everything the optimizer holds, from the current gradient
        updated = simulate_optimizer_step(optimizer, params, full)
        updated = dict(zip(updated, in_one_allocation(list(updated.values())), strict=True))

        # 3) per layer, G' with the preceding parameters moved
        results = []
        for layer_name, module in ran:
            own_ids = {id(p) for p in layer_parameters(module)}
            own = [n for n, p in params.items() if id(p) in own_ids]
            if not own:  # no trainable parameter of its own
                continue
            g = torch.cat([_dense(full[n], params[n]) for n in own])
            start = order[id(module)]
            preceding = tuple(n for n in params if position[n] < start and n not in own and n in updated)
            if not preceding:
                results.append(_compare(layer_name, g, g, preceding))
                continue
            values = {
                n: updated[n] if n in preceding else p.detach() for n, p in params.items() if n not in own
            }
            leaves = {n: params[n].detach().clone().requires_grad_(True) for n in own}
            g_new = f.grad_at({**values, **leaves}, list(leaves.values()))
            n_gradients += 1
            g2 = torch.cat([_dense(t, params[n]) for n, t in zip(own, g_new, strict=True)])
            results.append(_compare(layer_name, g, g2, preceding))
            del leaves, g_new, g2  # freed before the next pass allocates (see in_one_allocation)
    return ICSResult(tuple(results), n_gradients)


class _Clock:
    """A counter: each call returns the next tick."""

    def __init__(self) -> None:
        self.ticks = 0

    def __call__(self) -> int:
        self.ticks += 1
        return self.ticks


#: Tensor methods and properties that read a tensor's metadata, not its values: not a "read".
_METADATA = frozenset({
    "__get__", "size", "dim", "numel", "ndimension", "nelement", "is_floating_point", "is_complex",
    "element_size", "stride", "storage_offset", "is_contiguous", "get_device",
})  # fmt: skip
#: Operations that read the values of their first argument only, the rest as a template (its dtype
#: and device, or its shape).
_FIRST_READ = frozenset({"type_as", "to", "view_as", "reshape_as", "expand_as"})
#: Operations that read their first argument's metadata only (shape, dtype, device), the rest fully.
_FIRST_TEMPLATE = frozenset({"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"})


def _read_arguments(func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """The arguments of ``func`` whose values it reads (for :class:`_FirstReads`)."""
    name = getattr(func, "__name__", None)
    if name in _METADATA:
        return ()
    if name in _FIRST_READ:
        return args[:1]
    if name in _FIRST_TEMPLATE or (name or "").endswith("_like"):  # zeros_like, randn_like, full_like
        return (args[1:], kwargs)
    return (args, kwargs)


class _FirstReads(TorchFunctionMode):
    """Records, for each watched tensor (``{id(tensor): name}``), the tick of ``clock`` at the first
    torch operation that takes it as an argument (nested in lists, tuples or dicts too): ``first``."""

    def __init__(self, watched: dict[int, str], clock: _Clock) -> None:
        super().__init__()
        self.watched, self.clock = watched, clock
        self.first: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tick = None
        for leaf in tree_leaves(_read_arguments(func, args, kwargs)):
            name = self.watched.get(id(leaf)) if isinstance(leaf, Tensor) else None
            if name is not None and name not in self.first:
                tick = tick or self.clock()
                self.first[name] = tick
        return func(*args, **kwargs)


def _dense(grad: Tensor | None, like: Tensor) -> Tensor:
    """A flat gradient; an unused parameter's (``None``) is zero."""
    return (
        torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
        if grad is None
        else grad.detach().reshape(-1)
    )


# ------------------------------------------------------------------------------ distributional ICS


@dataclass(frozen=True)
class LayerInputStatistics:
    """Per-unit statistics of one layer's input (units = dim 1, or the last axis for a layer whose
    weight is a matrix, :func:`probes.activations.feature_axis`; the other axes pooled as samples).

    ``sorted_samples`` ``(units, samples)``: each unit's input values in ascending order, the empirical
    distribution that :func:`wasserstein1` compares. Variances are population variances (ddof = 0, as
    BN normalizes); percentiles use numpy's default linear interpolation.
    """

    layer: str
    mean: np.ndarray  # (units,)
    var: np.ndarray  # (units,)
    percentile_levels: tuple[float, ...]
    percentiles: np.ndarray  # (len(percentile_levels), units)
    sorted_samples: np.ndarray  # (units, samples)

    @property
    def n_units(self) -> int:
        return int(self.mean.shape[0])

    def to_records(self, n_units: int = 0) -> list[dict[str, Any]]:
        """The mean over units of each statistic; with ``n_units`` > 0 also the first units' values."""
        base = {"probe": "layer_input_statistics", "layer": self.layer}
        stats = [("mean", self.mean), ("var", self.var)]
        stats += [
            (f"p{level:g}", row) for level, row in zip(self.percentile_levels, self.percentiles, strict=True)
        ]
        rows = [{**base, "metric": metric, "value": float(values.mean())} for metric, values in stats]
        for u in range(min(n_units, self.n_units)):
            rows += [
                {**base, "metric": metric, "unit": u, "value": float(values[u])} for metric, values in stats
            ]
        return rows


@dataclass(frozen=True)
class InputStatistics:
    """:class:`LayerInputStatistics` per layer, in the order the layers first ran."""

    layers: tuple[LayerInputStatistics, ...]

    def __getitem__(self, layer: str) -> LayerInputStatistics:
        for s in self.layers:
            if s.layer == layer:
                return s
        raise KeyError(layer)

    def to_records(self, n_units: int = 0) -> list[dict[str, Any]]:
        return [row for s in self.layers for row in s.to_records(n_units)]


def _inputs_of(batch: Tensor | Batches) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    return [x for x, _ in as_batches(batch)]


def _per_unit(module: nn.Module, x: Tensor) -> Tensor:
    """``(N, C, *spatial)`` → ``(C, N·S)``: each unit's samples (a 1-D input is one unit); a layer whose
    features are the last axis (:func:`probes.activations.feature_axis`: ``nn.Linear`` on ``(N, T, C)``
    tokens) pools the leading axes instead."""
    if x.dim() == 1:
        return x.reshape(1, -1)
    if feature_axis(module) == -1:
        return x.reshape(-1, x.shape[-1]).T
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def layer_input_statistics(
    model: nn.Module,
    batch: Tensor | Batches,
    *,
    layers: Layers = None,
    bn: str = "batch",
    percentiles: Sequence[float] = (15, 50, 85),
) -> InputStatistics:
    """The distribution of each layer's input on a fixed probe batch (Ioffe & Szegedy 2015).

    For unit c (dim 1, or the last axis for a layer whose weight is a matrix:
    :func:`probes.activations.feature_axis`; the other axes pooled into samples x_{c,1..M}): the mean
    μ_c, the population variance σ²_c = mean_m (x_{c,m} − μ_c)², the requested percentiles (linear
    interpolation), and the sorted samples. ``batch``: inputs, an ``(inputs, targets)`` pair or several
    (their layer inputs are pooled). ``layers``: default every parameterized layer (module docstring)
    except those fed indices (an ``nn.Embedding``: :func:`probes.activations.floating_inputs`);
    names, modules or types select others (any module). ``bn`` as everywhere: ``"batch"`` normalizes
    with the probe batch's statistics, ``"running"`` with the running ones. The model is left as found.
    """
    levels = tuple(float(q) for q in percentiles)
    if any(not 0 <= q <= 100 for q in levels):
        raise ValueError(f"percentiles: expected values in [0, 100], got {levels}")
    modules = parameterized_layers(model) if layers is None else select_modules(model, layers)
    if not modules:
        raise ValueError("model: no parameterized layer (a module owning a weight with ≥ 2 dimensions)")
    xs = _inputs_of(batch)
    order: dict[str, int] = {}
    with probe_guard(model), norm_mode(model, bn), torch.no_grad():

        def stamp(name: str) -> Callable[[nn.Module, tuple], None]:
            def hook(_module: nn.Module, _args: tuple) -> None:  # None: the input is left alone
                order.setdefault(name, len(order))

            return hook

        handles = [m.register_forward_pre_hook(stamp(name)) for name, m in modules.items()]
        try:
            with capture_layer_inputs(model, modules, must_run=layers is not None) as inputs:
                for x in xs:
                    model(x)
        finally:
            for h in handles:
                h.remove()
    inputs = floating_inputs(inputs, named=layers is not None)
    stats = [
        unit_statistics(name, _per_unit(modules[name], inputs[name]), levels)
        for name in sorted(inputs, key=order.__getitem__)
    ]
    return InputStatistics(tuple(stats))


def unit_statistics(layer: str, samples: Tensor, percentiles: Sequence[float]) -> LayerInputStatistics:
    """The statistics of :func:`layer_input_statistics` from ``samples`` ``(units, M)``: each unit's
    mean, population variance, percentiles (linear interpolation) and sorted samples, in float64,
    computed on the samples' device and returned as numpy arrays."""
    levels = tuple(float(q) for q in percentiles)
    if samples.dim() != 2 or samples.shape[0] == 0 or samples.shape[1] == 0:
        raise ValueError(f"samples: expected a non-empty (units, samples) tensor, got {tuple(samples.shape)}")
    samples = samples.double()
    ordered = torch.sort(samples, dim=1).values
    q = torch.tensor(levels, dtype=torch.float64, device=samples.device) / 100
    return LayerInputStatistics(
        layer=layer,
        mean=samples.mean(1).cpu().numpy(),
        var=samples.var(1, unbiased=False).cpu().numpy(),
        percentile_levels=levels,
        percentiles=torch.quantile(ordered, q, dim=1).cpu().numpy().reshape(len(levels), -1),
        sorted_samples=ordered.cpu().numpy(),
    )


def wasserstein1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """W1 between the empirical distributions of each row of ``a`` ``(units, n)`` and ``b`` ``(units, m)``.

    W1(P, Q) = ∫₀¹ |F_P⁻¹(u) − F_Q⁻¹(u)| du with the empirical quantile functions
    F⁻¹(u) = x_(⌈u n⌉) of the sorted samples. Exact for any n, m: the integrand is constant between
    consecutive breakpoints {k/n} ∪ {l/m}; for n = m it is mean_k |a_(k) − b_(k)|. Rows are sorted
    here where they are not (the ``sorted_samples`` of :class:`LayerInputStatistics` are).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"expected (units, samples) arrays with the same units, got {a.shape} and {b.shape}")
    if a.shape[1] == 0 or b.shape[1] == 0:
        raise ValueError(f"expected at least one sample per unit, got {a.shape} and {b.shape}")
    a, b = (x if np.all(x[:, 1:] >= x[:, :-1]) else np.sort(x, axis=1) for x in (a, b))
    n, m = a.shape[1], b.shape[1]
    if n == m:
        return np.abs(a - b).mean(1)
    breaks = np.union1d(np.arange(n + 1) / n, np.arange(m + 1) / m)  # sorted, from 0 to 1
    mid = (breaks[:-1] + breaks[1:]) / 2
    ia = np.minimum((mid * n).astype(np.int64), n - 1)
    ib = np.minimum((mid * m).astype(np.int64), m - 1)
    return (np.abs(a[:, ia] - b[:, ib]) * np.diff(breaks)).sum(1)


@dataclass(frozen=True)
class LayerShift:
    """Change of one layer's input distribution between two probe points (means over units)."""

    layer: str
    mean_shift: float  # mean_c |μ'_c − μ_c|
    var_shift: float  # mean_c |σ'²_c − σ²_c|
    wasserstein: float  # mean_c W1(P_c, P'_c)


@dataclass(frozen=True)
class ShiftResult:
    layers: tuple[LayerShift, ...]

    def __getitem__(self, layer: str) -> LayerShift:
        for s in self.layers:
            if s.layer == layer:
                return s
        raise KeyError(layer)

    def to_records(self) -> list[dict[str, Any]]:
        return [
            {"probe": "distribution_shift", "layer": s.layer, "metric": metric, "value": float(value)}
            for s in self.layers
            for metric, value in (
                ("mean_shift", s.mean_shift),
                ("var_shift", s.var_shift),
                ("wasserstein", s.wasserstein),
            )
        ]


def distribution_shift(before: InputStatistics, after: InputStatistics) -> ShiftResult:
    """Distributional ICS between two probe points (Ioffe & Szegedy 2015), per layer in both.

    mean_shift = mean_c |Δμ_c|, var_shift = mean_c |Δσ²_c|, wasserstein = mean_c W1(P_c, P'_c) between
    the empirical distributions of unit c's input (:func:`wasserstein1`, exact on the stored sorted
    samples). Layers present in only one of the two raise ``ValueError``, as do differing unit counts.
    """
    names_a = [s.layer for s in before.layers]
    names_b = {s.layer for s in after.layers}
    if set(names_a) != names_b:
        raise ValueError(f"after: layers differ from before's ({sorted(names_a)} vs {sorted(names_b)})")
    shifts = []
    for a in before.layers:
        b = after[a.layer]
        if a.n_units != b.n_units:
            raise ValueError(f"after: layer {a.layer!r} has {b.n_units} units, before {a.n_units}")
        shifts.append(
            LayerShift(
                layer=a.layer,
                mean_shift=float(np.abs(b.mean - a.mean).mean()),
                var_shift=float(np.abs(b.var - a.var).mean()),
                wasserstein=float(wasserstein1(a.sorted_samples, b.sorted_samples).mean()),
            )
        )
    return ShiftResult(tuple(shifts))
