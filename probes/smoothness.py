"""The loss landscape along the gradient: loss variation, gradient predictiveness, effective β-smoothness.

Santurkar, Tsipras, Ilyas & Madry 2018 ("How does batch normalization help optimization?", §3.1,
Fig. 4) step from the current weights w along the negative gradient g = ∇L(w) and record, for each
step size η of a grid,

* the loss L(w − ηg) — its spread over the grid is the "variation of the loss";
* the gradient distance ‖∇L(w) − ∇L(w − ηg)‖ — its maximum is the "gradient predictiveness";
* ‖∇L(w) − ∇L(w − ηg)‖ / ‖ηg‖ — its maximum is the "effective β-smoothness" (a lower bound on the
  Lipschitz constant of ∇L on the segment).

Bjorck, Gomes, Selman & Weinberger 2018 ("Understanding batch normalization", §3) compare the
relative loss L(w − ηg)/L(w) after a step of size η, which diverges without BN at large η.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from probes.functional import (
    as_batches,
    check_loss,
    in_one_allocation,
    norm_mode,
    probe_guard,
    resolve_params,
)

__all__ = ["Landscape", "landscape_along_gradient"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]
Params = nn.Module | Sequence[str] | Sequence[nn.Parameter] | None


@dataclass(frozen=True)
class Landscape:
    """The landscape along −∇L(w) at the step sizes η₁ … η_K (Santurkar et al. 2018, Fig. 4).

    Per step size (arrays of shape ``(K,)``, in the order given): ``losses`` L(w − ηg),
    ``relative_losses`` L(w − ηg)/L(w), ``grad_distances`` ‖g − ∇L(w − ηg)‖ and ``betas``
    ‖g − ∇L(w − ηg)‖/(η‖g‖). A point where the loss or its gradient is not finite (the step diverged)
    keeps its inf/nan entries and counts in ``n_diverged``.

    Summaries: ``loss_range`` = max − min of L over {w} ∪ {w − ηg} (the current point is included, so
    a single step size still has a range); ``max_grad_distance`` = max_η ‖g − ∇L(w − ηg)‖ ("gradient
    predictiveness", smaller is more predictive); ``beta_eff`` = max_η ‖g − ∇L(w − ηg)‖/‖ηg‖
    (effective β-smoothness). A summary is ``inf`` when one of the values it takes the range or
    maximum of is not finite: ``loss_range`` when a loss is, ``max_grad_distance`` and ``beta_eff``
    when a gradient is (a point whose loss is finite but whose gradient is not counts in
    ``n_diverged`` and leaves ``loss_range`` finite); ``beta_eff`` is ``nan`` when g = 0.
    ``loss`` = L(w), ``grad_norm`` = ‖g‖, ``n_grad_evals`` = K + 1.
    """

    step_sizes: np.ndarray
    losses: np.ndarray
    grad_distances: np.ndarray
    loss_range: float
    max_grad_distance: float
    beta_eff: float
    relative_losses: np.ndarray
    betas: np.ndarray
    loss: float
    grad_norm: float
    n_diverged: int
    n_grad_evals: int
    layer: str = "all"

    def to_records(self) -> list[dict[str, Any]]:
        """Tidy rows: per step size (with an ``eta`` key) ``loss``, ``relative_loss``,
        ``grad_distance``, ``beta``; then the summaries."""
        base = {"probe": "landscape", "layer": self.layer}
        rows: list[dict[str, Any]] = []
        per_eta = (
            ("loss", self.losses),
            ("relative_loss", self.relative_losses),
            ("grad_distance", self.grad_distances),
            ("beta", self.betas),
        )
        for i, eta in enumerate(self.step_sizes):
            rows += [{**base, "metric": m, "eta": float(eta), "value": float(v[i])} for m, v in per_eta]
        summaries = {
            "loss_range": self.loss_range,
            "max_grad_distance": self.max_grad_distance,
            "beta_eff": self.beta_eff,
            "loss_at_w": self.loss,
            "grad_norm": self.grad_norm,
            "n_diverged": float(self.n_diverged),
            "n_grad_evals": float(self.n_grad_evals),
        }
        rows += [{**base, "metric": m, "value": float(v)} for m, v in summaries.items()]
        return rows


def _check_step_sizes(step_sizes: Sequence[float] | np.ndarray | Tensor) -> np.ndarray:
    try:
        etas = np.asarray(
            step_sizes.detach().cpu() if isinstance(step_sizes, Tensor) else step_sizes, dtype=np.float64
        )
    except (TypeError, ValueError):
        raise ValueError(f"step_sizes: expected a sequence of positive numbers, got {step_sizes!r}") from None
    if etas.ndim != 1 or etas.size == 0:
        raise ValueError(f"step_sizes: expected a non-empty 1-D sequence, got {step_sizes!r}")
    if not np.all(np.isfinite(etas)) or not np.all(etas > 0):
        raise ValueError(f"step_sizes: every step size must be positive and finite, got {etas.tolist()}")
    return etas


def _summary_max(values: np.ndarray) -> float:
    """max of ``values``; inf when any is not finite (a diverged point bounds nothing)."""
    return float(values.max()) if np.all(np.isfinite(values)) else math.inf


def _value_and_grad(
    model: nn.Module,
    loss_fn: LossFn,
    pairs: list[tuple[Tensor, Tensor]],
    weights: list[float],
    ws: list[Tensor],
) -> tuple[float, list[Tensor]]:
    """(L, ∇_w L) of the sample-weighted mean loss at the model's current parameters ``ws``: one forward
    and one backward pass per batch (the model is already in the probe's norm mode)."""
    loss = 0.0
    grads: list[Tensor] | None = None
    for (x, y), weight in zip(pairs, weights, strict=True):
        with torch.enable_grad():
            out = check_loss(loss_fn(model(x), y))
            parts = torch.autograd.grad(out, ws, allow_unused=True, materialize_grads=True)
        loss += weight * float(out.detach())
        if grads is None:  # one batch (the usual case): no accumulation buffers
            grads = list(parts) if weight == 1.0 else list(torch._foreach_mul(parts, weight))
        else:
            torch._foreach_add_(grads, parts, alpha=weight)
    return loss, grads


def _norm(tensors: list[Tensor]) -> float:
    """‖(t₁, …, t_m)‖₂ of the concatenation (one synchronization)."""
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors))))


def landscape_along_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    step_sizes: Sequence[float] | np.ndarray | Tensor,
    bn: str = "batch",
    params: Params = None,
    layer: str | None = None,
) -> Landscape:
    """Loss and gradient along the negative gradient direction (Santurkar et al. 2018, §3.1, Fig. 4).

    With g = ∇L(w) (L the sample-weighted mean loss over ``batches`` in norm mode ``bn``, w the
    chosen ``params``) and for each η in ``step_sizes`` (positive, finite):

        L(w − ηg),   L(w − ηg)/L(w) (Bjorck et al. 2018),   d(η) = ‖∇L(w) − ∇L(w − ηg)‖,
        β(η) = d(η)/‖ηg‖,

    and ``loss_range`` = max − min of L over {w, w − η₁g, …}, ``max_grad_distance`` = max_η d(η),
    ``beta_eff`` = max_η β(η). For a quadratic L(w) = ½wᵀAw + bᵀw, d(η) = η‖Ag‖, so β(η) = ‖Ag‖/‖g‖ =
    √(gᵀA²g / gᵀg) for every η (the root of the Rayleigh quotient of A² along g; it equals the Rayleigh
    quotient of A only when g is an eigenvector).

    Cost: exactly ``len(step_sizes) + 1`` gradient evaluations (one forward and backward pass per
    batch each; the loss comes with the gradient). Steps where the loss or its gradient is not
    finite are recorded as inf/nan, not raised. The model is left exactly as found.
    """
    etas = _check_step_sizes(step_sizes)
    chosen = resolve_params(model, params)
    pairs = as_batches(batches)
    weights = [x.shape[0] / sum(x.shape[0] for x, _ in pairs) for x, _ in pairs]  # n_b / N
    with probe_guard(model) as state, norm_mode(model, bn):
        # evaluated in place on the model's own parameters (the guard restores them): a plain forward
        # and backward per point, as cheap as the gradient it is measured in units of
        ws = [p for _, p in chosen]
        for p in ws:
            p.requires_grad_(True)
        w0 = [state.parameters[name] for name, _ in chosen]  # the guard's snapshot: read, never written
        loss0, g = _value_and_grad(model, loss_fn, pairs, weights, ws)
        g = in_one_allocation(g)  # held through every evaluation below
        grad_norm = _norm(g)
        losses = np.empty(etas.size)
        distances = np.empty(etas.size)
        for i, eta in enumerate(etas):
            with torch.no_grad():
                torch._foreach_copy_(ws, w0)
                torch._foreach_add_(ws, g, alpha=-float(eta))
            loss, grad = _value_and_grad(model, loss_fn, pairs, weights, ws)
            losses[i] = loss
            torch._foreach_sub_(grad, g)  # in place: this point's gradient is not needed afterwards
            distances[i] = _norm(grad)
            del grad  # freed before the next pass allocates (see in_one_allocation)
    with np.errstate(divide="ignore", invalid="ignore"):
        betas = distances / (etas * grad_norm)
        relative = losses / loss0
    diverged = ~(np.isfinite(losses) & np.isfinite(distances))
    all_losses = np.concatenate([[loss0], losses])
    finite = bool(np.all(np.isfinite(all_losses)))
    loss_range = float(all_losses.max() - all_losses.min()) if finite else math.inf
    beta_eff = math.nan if grad_norm == 0.0 else _summary_max(betas)
    return Landscape(
        step_sizes=etas,
        losses=losses,
        grad_distances=distances,
        loss_range=loss_range,
        max_grad_distance=_summary_max(distances),
        beta_eff=beta_eff,
        relative_losses=relative,
        betas=betas,
        loss=loss0,
        grad_norm=grad_norm,
        n_diverged=int(diverged.sum()),
        n_grad_evals=etas.size + 1,
        layer=layer or ("all" if params is None else ",".join(n for n, _ in chosen)),
    )
