"""Per-layer gradients: their norms and growth with depth, update sizes, effective learning rates,
and the scale invariance that normalization gives the weights before it.

A *parameterized layer* is a module that owns (directly) a parameter ``weight_v`` (a weight-normalized
layer, W = g·V/‖V‖: its direction parameter V is measured) or a parameter ``weight`` with at least two
dimensions (linear and convolution kernels; the per-channel scales γ of norm layers are 1-D and are
not layers here), or several weight matrices (``nn.MultiheadAttention``'s input and output
projections, an ``nn.LSTM``'s ``weight_ih_l*`` and ``weight_hh_l*``), which together are its W
(:func:`probes.activations.layer_weight_names`). Layers are listed in forward order: the order in
which they are first called in a forward pass of the first batch. ``layers`` options take qualified
module names or modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from probes.activations import layer_weight_names
from probes.functional import (
    FunctionalLoss,
    as_batches,
    check_bn,
    norm_mode,
    optimizer_param_names,
    probe_guard,
    resolve_params,
    simulate_optimizer_step,
)

__all__ = [
    "EffectiveLearningRates",
    "GradientNorms",
    "ScaleInvariance",
    "UpdateRatios",
    "effective_learning_rates",
    "layer_gradient_norms",
    "ordered_layers",
    "scale_invariance",
    "update_to_weight_ratios",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]
Layers = Sequence[str | nn.Module] | None

#: Yang et al. 2019, Thm. 3.10: per-layer backward gradient-norm growth of a BN–ReLU net at init, √(π/(π−1)).
BN_RELU_GRADIENT_GROWTH = math.sqrt(math.pi / (math.pi - 1))


# ------------------------------------------------------------------------------------------ layers


def _first_calls(model: nn.Module, names: list[str], x: Tensor, bn: str) -> dict[str, int]:
    """{name: rank of its module's first call} in one (guarded, gradient-free) forward pass; a module
    never called (an auxiliary head the forward pass skips) is absent."""
    modules = dict(model.named_modules())
    order: dict[str, int] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:  # returns None: a forward hook's return value replaces the output
            order.setdefault(name, len(order))

        return hook

    handles = [modules[n].register_forward_hook(record(n)) for n in names]
    try:
        with probe_guard(model), torch.no_grad(), norm_mode(model, bn):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order


def ordered_layers(
    model: nn.Module,
    layers: Layers = None,
    *,
    example: Tensor | None = None,
    bn: str = "batch",
) -> list[tuple[str, tuple[str, ...]]]:
    """``(module name, weight names)`` of each parameterized layer (see the module docstring): the
    names, relative to the module, of the parameters that make its weight W
    (:func:`probes.activations.layer_weight_names`; one but for layers such as ``nn.LSTM``).

    ``layers=None``: every parameterized layer of ``model``, in forward order when ``example`` inputs
    are given, less those the forward pass never calls (else registration order): an auxiliary head;
    never ``nn.MultiheadAttention``'s ``out_proj``, whose weight is part of the attention's
    (name it to measure it alone); otherwise the named modules or modules: in forward order when
    ``example`` is given (named layers the forward pass never calls last, in the order given), else
    in the order given. ``ValueError`` when the model has none, or a requested layer is unknown or
    owns no weight.
    """
    check_bn(bn)
    named = dict(model.named_modules())
    if layers is None:
        found = [(n, p) for n, m in named.items() if (p := layer_weight_names(m))]
        found = [(n, p) for n, p in found if not _inside_an_ancestors_weight(named, n, p)]
        if not found:
            raise ValueError(
                "layers: the model has no parameterized layer (a module owning `weight_v` or a weight "
                "with ≥ 2 dimensions)"
            )
        if example is not None:
            order = _first_calls(model, [n for n, _ in found], example, bn)
            if not order:
                raise ValueError(
                    f"layers: none of the model's parameterized layers ran: {', '.join(n for n, _ in found)}"
                )
            found = sorted((layer for layer in found if layer[0] in order), key=lambda nk: order[nk[0]])
        return found
    if isinstance(layers, str | nn.Module) or not isinstance(layers, Iterable):
        raise ValueError(f"layers: expected a list of module names or modules, got {layers!r}")
    by_id = {id(m): n for n, m in named.items()}
    result: list[tuple[str, tuple[str, ...]]] = []
    for entry in layers:
        if isinstance(entry, str):
            if entry not in named:
                raise ValueError(f"layers: the model has no module named {entry!r}")
            name = entry
        elif isinstance(entry, nn.Module):
            if id(entry) not in by_id:
                raise ValueError(f"layers: a {type(entry).__name__} that is not part of the model")
            name = by_id[id(entry)]
        else:
            raise ValueError(f"layers: expected module names or modules, got {entry!r}")
        kind = layer_weight_names(named[name])
        if not kind:
            raise ValueError(
                f"layers: {name!r} ({type(named[name]).__name__}) owns no `weight_v` or ≥2-D `weight`"
            )
        result.append((name, kind))
    if not result:
        raise ValueError("layers: empty selection")
    if len({n for n, _ in result}) != len(result):
        raise ValueError(f"layers: duplicate layers {[n for n, _ in result]}")
    if example is not None:
        order = _first_calls(model, [n for n, _ in result], example, bn)
        result.sort(key=lambda nk: order.get(nk[0], math.inf))  # stable: never-called ones keep their order
    return result


def _inside_an_ancestors_weight(named: dict[str, nn.Module], name: str, kinds: tuple[str, ...]) -> bool:
    """Whether every weight of layer ``name`` is part of an enclosing layer's weight (an
    ``nn.MultiheadAttention``'s ``out_proj``): it is measured there, not twice."""
    if not name:  # the root has no ancestor
        return False
    own = {id(named[name].get_parameter(k)) for k in kinds}
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        ancestor = ".".join(parts[:i])
        module = named[ancestor]
        if own <= {id(module.get_parameter(k)) for k in layer_weight_names(module)}:
            return True
    return False


def _weight_names(model: nn.Module, chosen: list[tuple[str, tuple[str, ...]]]) -> list[tuple[str, ...]]:
    """The model's names for each layer's weight parameters: the names ``named_parameters`` lists them
    under, so a weight shared by several layers (``b.weight = a.weight``) has one name, its first."""
    first = {id(p): n for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    return [tuple(first[id(modules[m].get_parameter(p))] for p in kinds) for m, kinds in chosen]


def _joint_norm(tensors: Iterable[Tensor]) -> float:
    """‖(t₁, …, t_k)‖₂: the Frobenius norm of a layer's weight matrices taken together (for one
    matrix exactly its own norm, not the square root of its square)."""
    norms = [_norm(t) for t in tensors]
    return norms[0] if len(norms) == 1 else math.sqrt(sum(n * n for n in norms))


def _common_lr(lrs: list[float]) -> float:
    """The learning rate of a layer whose weight matrices may sit in several param groups; ``nan``
    if the groups' rates differ (η/‖W‖² then has no single η)."""
    return lrs[0] if all(lr == lrs[0] for lr in lrs) else math.nan


def _gradient(
    model: nn.Module, loss_fn: LossFn, pairs: list[tuple[Tensor, Tensor]], names: list[str], bn: str
) -> tuple[float, dict[str, Tensor | None]]:
    """(L(θ), {name: ∇_name L}) of the sample-weighted mean loss, ``None`` for a parameter L does not
    depend on (an auxiliary head the forward pass skips: autograd gives it no gradient, and an
    optimizer's ``step`` leaves it alone); call inside ``probe_guard``."""
    f = FunctionalLoss(model, loss_fn, pairs, resolve_params(model, names), bn)
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in f.unflatten(f.theta0).items()}
    loss, grads = f.value_and_grad_at(leaves, list(leaves.values()))
    return loss, {n: None if g is None else g.detach() for n, g in zip(leaves, grads, strict=True)}


def _dense(grads: dict[str, Tensor | None], name: str, like: Tensor) -> Tensor:
    """``grads[name]``, or zeros shaped like the parameter where L does not depend on it."""
    g = grads[name]
    return torch.zeros_like(like.detach()) if g is None else g


def _norm(t: Tensor) -> float:
    return float(torch.linalg.vector_norm(t))


# ------------------------------------------------------------------------------ gradient norms


@dataclass(frozen=True)
class GradientNorms:
    """Per-layer ‖∇_W L‖_F and ‖W‖_F in forward order, and their geometric growth with depth.

    ``ratios[i]`` = ‖∇W_i‖/‖∇W_{i+1}‖ (length L − 1; > 1 where the gradient grows towards the input).
    ``growth_rate`` r: the least-squares fit log‖∇W_l‖ = a + l·log r with l = L − 1 − i the depth
    counted from the output (l = 0 the last layer), so r > 1 is gradient explosion, to compare with
    Yang et al. 2019's √(π/(π−1)) ≈ 1.21 (``BN_RELU_GRADIENT_GROWTH``); ``nan`` with one layer or a
    zero gradient.
    """

    layers: tuple[str, ...]
    grad_norms: np.ndarray
    weight_norms: np.ndarray
    ratios: np.ndarray
    growth_rate: float
    loss: float

    def to_records(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for i, layer in enumerate(self.layers):
            base = {"probe": "gradient_norms", "layer": layer, "depth": i}
            rows += [
                {**base, "metric": "grad_norm", "value": float(self.grad_norms[i])},
                {**base, "metric": "weight_norm", "value": float(self.weight_norms[i])},
            ]
            if i < len(self.ratios):
                rows.append({**base, "metric": "grad_norm_ratio_to_next", "value": float(self.ratios[i])})
        rows += [
            {"probe": "gradient_norms", "layer": "all", "metric": "growth_rate", "value": self.growth_rate},
            {"probe": "gradient_norms", "layer": "all", "metric": "loss", "value": self.loss},
        ]
        return rows


def growth_rate(grad_norms: np.ndarray) -> float:
    """r from the least-squares fit log‖∇W_l‖ = a + l·log r, l counted from the output layer."""
    g = np.asarray(grad_norms, dtype=np.float64)
    if g.size < 2 or not np.all(g > 0) or not np.all(np.isfinite(g)):
        return math.nan
    depth_from_output = np.arange(g.size)[::-1].astype(np.float64)
    slope = np.polyfit(depth_from_output, np.log(g), 1)[0]
    return float(np.exp(slope))


def layer_gradient_norms(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    bn: str = "batch",
    layers: Layers = None,
) -> GradientNorms:
    """‖∇_{W_l} L‖_F and ‖W_l‖_F per parameterized layer, and the growth rate of gradients with depth.

    Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz 2019 ("A mean field theory of batch
    normalization"): at init, a BN–ReLU MLP's gradients explode backwards, ‖∇W_l‖/‖∇W_{l+1}‖ → √(π/(π−1))
    ≈ 1.21 per layer for large width and batch. The fit log‖∇W_l‖ = a + l·log r (l the depth counted
    from the output) gives r; the input and output layers have other fan-in/fan-out, so pass the hidden
    layers in ``layers`` to compare with theory. L is the weighted mean loss over ``batches`` in norm
    mode ``bn``; the model is left exactly as found. One extra gradient-free forward pass of the
    first batch puts the layers in forward order, those named in ``layers`` too (the fit reads their
    order as depth: the same layers listed output first would give 1/r).
    """
    pairs = as_batches(batches)
    chosen = ordered_layers(model, layers, example=pairs[0][0], bn=bn)
    names = _weight_names(model, chosen)
    params = dict(model.named_parameters())
    with probe_guard(model):
        loss, grads = _gradient(model, loss_fn, pairs, list(dict.fromkeys(n for ns in names for n in ns)), bn)
    g = np.array([_joint_norm(_dense(grads, n, params[n]) for n in ns) for ns in names])
    w = np.array([_joint_norm(params[n].detach() for n in ns) for ns in names])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = g[:-1] / g[1:]
    return GradientNorms(
        layers=tuple(m for m, _ in chosen),
        grad_norms=g,
        weight_norms=w,
        ratios=ratios,
        growth_rate=growth_rate(g),
        loss=loss,
    )


# ------------------------------------------------------------------------------- update ratios


@dataclass(frozen=True)
class UpdateRatios:
    """‖ΔW‖_F/‖W‖_F per layer for the update the optimizer would take now (ΔW = W_next − W)."""

    layers: tuple[str, ...]
    update_norms: np.ndarray
    weight_norms: np.ndarray
    ratios: np.ndarray
    loss: float

    def to_records(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for i, layer in enumerate(self.layers):
            base = {"probe": "update_ratio", "layer": layer}
            rows += [
                {**base, "metric": "update_norm", "value": float(self.update_norms[i])},
                {**base, "metric": "weight_norm", "value": float(self.weight_norms[i])},
                {**base, "metric": "update_to_weight", "value": float(self.ratios[i])},
            ]
        return rows


def _owned_layers(
    model: nn.Module, chosen: list[tuple[str, tuple[str, ...]]], layers: Layers, owned: dict[int, str]
) -> tuple[list[tuple[str, tuple[str, ...]]], list[tuple[str, ...]]]:
    """The layers an optimizer-based probe reports, and their weights' qualified names.

    ``layers=None``: the parameterized layers whose weight (all its parameters) ``optimizer`` holds
    (a layer left out of it, frozen or trained by another optimizer, has no step to report);
    ``ValueError`` if there is none. Layers named explicitly must all be the optimizer's
    (``ValueError`` naming the weight parameters it does not hold)."""
    names = _weight_names(model, chosen)
    held = set(owned.values())
    if layers is not None:
        missing = sorted({n for ns in names for n in ns} - held)
        if missing:
            raise ValueError(f"optimizer: does not own the layer parameters {missing}")
        return chosen, names
    kept = [(layer, ns) for layer, ns in zip(chosen, names, strict=True) if held.issuperset(ns)]
    if not kept:
        raise ValueError("optimizer: holds the weight of none of the model's parameterized layers")
    return [layer for layer, _ in kept], [name for _, name in kept]


def simulated_step(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    *,
    bn: str = "batch",
) -> tuple[float, dict[str, Tensor]]:
    """(L(w), {name: ΔW}) for the step ``optimizer`` would take from the gradient of L on ``batches``.

    The step runs on clones: a fresh optimizer of the same class over detached copies of the
    parameters, with the param groups' hyperparameters and a deep copy of the state (momentum
    buffers, Adam moments, step counts), so the real optimizer and the model are untouched. Works
    for any closure-free ``torch.optim`` optimizer (SGD, Adam, AdamW, …).
    """
    pairs = as_batches(batches)
    owned = optimizer_param_names(model, optimizer)
    params = dict(model.named_parameters())
    trainable = [n for n in dict.fromkeys(owned.values()) if params[n].requires_grad]
    with probe_guard(model):
        if trainable:
            loss, grads = _gradient(model, loss_fn, pairs, trainable, bn)
        else:
            loss, grads = math.nan, {}
    named = {name: params[name] for name in dict.fromkeys(owned.values())}
    stepped = simulate_optimizer_step(optimizer, named, grads)
    updates = {
        name: (stepped[name] - p.detach()) if name in stepped else torch.zeros_like(p.detach())
        for name, p in named.items()
    }
    return loss, updates


def update_to_weight_ratios(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    *,
    bn: str = "batch",
    layers: Layers = None,
) -> UpdateRatios:
    """‖ΔW_l‖_F/‖W_l‖_F per parameterized layer, ΔW the step ``optimizer`` would take now.

    The relative update size that governs the effective learning rate of scale-invariant weights
    (van Laarhoven 2017; Arora, Li & Lyu 2019; Hoffer et al. 2018): for SGD, ΔW = −η(∇L + λW + μ·buf).
    The gradient is that of the weighted mean loss over ``batches`` in norm mode ``bn``; the step is
    simulated (:func:`simulated_step`) on copies of the parameters and of the optimizer's state.
    ``layers=None``: every parameterized layer whose weight the optimizer holds, in forward order (a
    layer left out of the optimizer is skipped; a frozen layer the optimizer holds is listed, with
    the update its step gives it: none for SGD and Adam, which skip a parameter without gradient).
    A parameter the loss does not depend on (an auxiliary head the forward pass skips) gets no
    gradient, as in ``loss.backward()`` after ``zero_grad()``, and no update. ``ValueError`` if the
    optimizer holds a parameter that is not the model's, holds no layer's weight, or misses a layer
    named in ``layers``.
    """
    pairs = as_batches(batches)
    chosen = ordered_layers(model, layers, example=pairs[0][0] if layers is None else None, bn=bn)
    chosen, names = _owned_layers(model, chosen, layers, optimizer_param_names(model, optimizer))
    loss, updates = simulated_step(model, loss_fn, pairs, optimizer, bn=bn)
    params = dict(model.named_parameters())
    u = np.array([_joint_norm(updates[n] for n in ns) for ns in names])
    w = np.array([_joint_norm(params[n].detach() for n in ns) for ns in names])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = u / w
    return UpdateRatios(tuple(m for m, _ in chosen), u, w, ratios, loss)


# ------------------------------------------------------------------------ effective learning rate


@dataclass(frozen=True)
class EffectiveLearningRates:
    """η_eff = η/‖W‖²_F per layer, η the learning rate of the param group holding W."""

    layers: tuple[str, ...]
    learning_rates: np.ndarray
    weight_norms: np.ndarray
    effective_lrs: np.ndarray

    def to_records(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for i, layer in enumerate(self.layers):
            base = {"probe": "effective_lr", "layer": layer}
            rows += [
                {**base, "metric": "lr", "value": float(self.learning_rates[i])},
                {**base, "metric": "weight_norm", "value": float(self.weight_norms[i])},
                {**base, "metric": "effective_lr", "value": float(self.effective_lrs[i])},
            ]
        return rows


def effective_learning_rates(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, layers: Layers = None
) -> EffectiveLearningRates:
    """η_eff = η/‖W‖²_F per layer (van Laarhoven 2017; Arora, Li & Lyu 2019, "Theoretical analysis of
    auto rate-tuning by batch normalization").

    For a scale-invariant W (L(cW) = L(W), e.g. followed by BN), ∇L(cW) = ∇L(W)/c, so SGD on W with
    rate η moves the direction W/‖W‖ as SGD with rate η/‖W‖² would: that is the rate that matters.
    η is the current ``lr`` of the param group holding W (a scheduler's value included; ``nan`` for a
    layer whose weight matrices, as an LSTM's, sit in groups of different rates). The formula
    is only meaningful for scale-invariant layers (check with :func:`scale_invariance`) and SGD-like
    updates; ``layers=None`` lists every parameterized layer whose weight the optimizer holds (a
    layer left out of the optimizer is skipped), in registration order: with no batch to run, also
    a layer the forward pass never calls. Reads only.
    """
    chosen = ordered_layers(model, layers)
    owned = optimizer_param_names(model, optimizer)
    chosen, names = _owned_layers(model, chosen, layers, owned)
    lr_of = {owned[id(p)]: float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
    params = dict(model.named_parameters())
    lrs = np.array([_common_lr([lr_of[n] for n in ns]) for ns in names])
    w = np.array([_joint_norm(params[n].detach() for n in ns) for ns in names])
    with np.errstate(divide="ignore"):
        eff = lrs / w**2
    return EffectiveLearningRates(tuple(m for m, _ in chosen), lrs, w, eff)


# ---------------------------------------------------------------------------- scale invariance


@dataclass(frozen=True)
class ScaleInvariance:
    """Whether L is invariant to the scale of one layer's weight W.

    ``loss_changes[k]`` = |L(c_k W) − L(W)| for ``scales[k]``; ``cosine`` = ⟨∇_W L, W⟩/(‖∇_W L‖‖W‖)
    (Euler: d/dc L(cW)|_{c=1} = ⟨∇_W L, W⟩ = 0 for scale-invariant L, so ∇L ⟂ W); ``invariant`` when
    every |ΔL| ≤ tol·max(1, |L|) and |cosine| ≤ tol.
    """

    layer: str
    scales: np.ndarray
    loss_changes: np.ndarray
    cosine: float
    loss: float
    grad_norm: float
    invariant: bool
    tol: float

    def to_records(self) -> list[dict[str, Any]]:
        base = {"probe": "scale_invariance", "layer": self.layer}
        rows = [
            {**base, "metric": "loss_change", "scale": float(c), "value": float(d)}
            for c, d in zip(self.scales, self.loss_changes, strict=True)
        ]
        rows += [
            {**base, "metric": "grad_weight_cosine", "value": self.cosine},
            {**base, "metric": "invariant", "value": float(self.invariant)},
        ]
        return rows


def scale_invariance(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    layer: str | nn.Module,
    scales: Sequence[float] = (0.5, 2.0),
    bn: str = "batch",
    tol: float = 1e-4,
) -> ScaleInvariance:
    """|L(cW) − L(W)| for c in ``scales`` and cos∠(∇_W L, W) for one layer's weight W.

    A weight followed by batch normalization (a bias in between does not matter: BN subtracts the
    batch mean) is scale-invariant, L(cW) = L(W) for c > 0, up to BN's ε (Ioffe & Szegedy 2015; Arora, Li &
    Lyu 2019); hence ⟨∇_W L, W⟩ = 0. The default ``tol`` = 1e-4 absorbs ε = 1e-5 at unit-scale
    pre-activations. For a weight-normalized layer W is its direction parameter V. The model is left
    exactly as found.
    """
    if isinstance(layer, str | nn.Module):
        ((module, kind),) = ordered_layers(model, [layer])
    else:
        raise ValueError(f"layer: expected a module name or a module, got {layer!r}")
    cs = np.asarray(scales, dtype=np.float64)
    if cs.ndim != 1 or cs.size == 0 or not np.all(np.isfinite(cs)) or not np.all(cs > 0):
        raise ValueError(f"scales: expected a non-empty sequence of positive finite numbers, got {scales!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be ≥ 0, got {tol!r}")
    pairs = as_batches(batches)
    (names,) = _weight_names(model, [(module, kind)])
    with probe_guard(model):
        loss, grads = _gradient(model, loss_fn, pairs, list(names), bn)
        f = FunctionalLoss(model, loss_fn, pairs, resolve_params(model, list(names)), bn)
        with torch.no_grad():
            changes = np.array([abs(float(f(float(c) * f.theta0)) - loss) for c in cs])
    params = dict(model.named_parameters())
    grad = torch.cat([_dense(grads, n, params[n]).reshape(-1) for n in names])
    w = torch.cat([params[n].detach().reshape(-1) for n in names])
    grad_norm = _norm(grad)
    denom = grad_norm * _norm(w)
    cosine = float(grad @ w) / denom if denom > 0 else 0.0
    invariant = bool(np.all(changes <= tol * max(1.0, abs(loss))) and abs(cosine) <= tol)
    return ScaleInvariance(module, cs, changes, cosine, loss, grad_norm, invariant, tol)
