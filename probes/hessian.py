"""Hessian probes: extreme eigenvalues, trace, spectral density and outliers of the loss Hessian.

Every function takes ``(model, loss_fn, batches)`` as DESIGN.md describes and measures the Hessian of
the sample-weighted mean loss over ``batches`` with respect to ``params`` (None: all trainable; a
submodule, names or parameters: that diagonal block, e.g. one layer; a block the loss does not use has a
zero Hessian and gradient). A block the loss is *invariant* to where it is measured, such as the bias of
a layer followed by batch-statistics BN, has a zero Hessian mathematically but is computed as rounding
noise (eigenvalues of order 1e-32 in float64 on a small MLP): its values, and the outlier measures of
them, are noise, not curvature. ``bn="batch"`` measures the loss the optimizer trains (batch
statistics, no running-statistic update), ``bn="running"`` the inference network. The model is left
exactly as found (:func:`probes.functional.probe_guard`).

Unlike PyHessian, which puts the model in eval mode (so it measures the ``bn="running"`` network) and
reports the largest-*magnitude* eigenvalue from power iteration as the "top" one, ``which="LA"``
here is the largest algebraic eigenvalue, found by Lanczos.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from probes import spectral
from probes.functional import as_int
from probes.hvp import HessianOperator, hessian_operator
from probes.spectral import EigenResult, SpectralDensity, TraceResult

__all__ = [
    "START_METHODS",
    "EigenResult",
    "HessianOperator",
    "OutlierResult",
    "SpectralDensity",
    "TraceResult",
    "default_start",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_operator",
    "hessian_outliers",
    "hessian_trace",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]
Params = nn.Module | Sequence[str] | Sequence[nn.Parameter] | None
START_METHODS = ("gradient", "random")


def _layer_name(params: Params) -> str:
    """How ``params`` is named in records: "all", a list of names, or a module's class."""
    if params is None:
        return "all"
    if isinstance(params, nn.Module):
        return type(params).__name__
    names = [p for p in params if isinstance(p, str)]
    return ",".join(names) if names else f"{len(list(params))} tensors"


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    k: int = 1,
    which: str = "LA",
    tol: float = 1e-3,
    params: Params = None,
    bn: str = "batch",
    method: str = "lanczos",
    hvp: str = "auto",
    cache_graphs: bool | None = None,
    max_matvecs: int | None = None,
    seed: int = 0,
    return_vectors: bool = False,
    block_size: int | None = None,
    start: str | None = None,
    layer: str | None = None,
) -> EigenResult:
    """The ``k`` extreme eigenvalues of ∇²L by Lanczos (``method="lanczos"``, torch, full
    reorthogonalization; ``"scipy"``: ARPACK ``eigsh``; ``"power"``: power iteration with deflation,
    kept for comparison).

    ``which``: ``"LA"`` largest algebraic (descending), ``"SA"`` smallest algebraic (ascending),
    ``"LM"`` largest magnitude. ``tol``: the relative accuracy of the values (Lanczos stops when every
    wanted Ritz residual is ``≤ tol·|θ|``, so an eigenvalue lies within ``tol·|θ|`` of each value; see
    :func:`probes.spectral.eigenvalues`).
    ``hvp`` picks the Hessian-vector product and ``cache_graphs`` whether each batch's gradient graph
    is kept for all products (:func:`probes.hvp.hessian_operator`; default: kept for one batch, the
    faster choice, while ``cache_graphs=False`` needs less memory: on ResNet-20, 2.1× a gradient's
    tensor bytes instead of 3.0×, at 2.9× a gradient's time per product instead of 1.7–1.9×;
    ``benchmarks/README.md``).
    ``block_size``: block Lanczos; default 1 for ``k = 1`` and 2 for ``k ≥ 2``, where one start vector
    missed one of a near-degenerate pair of wanted eigenvalues in 1–2% of seeds on a BN MLP's Hessian
    (:func:`probes.spectral.default_block_size`). Larger blocks are for eigenvalues repeated *exactly* up
    to that multiplicity, e.g. the K − 1 equal top eigenvalues of a softmax classifier whose last layer
    is initialized to zero. A block of ``b`` start vectors sees ``b`` copies of such an eigenvalue: the
    rest of the top-k is then taken from further down the spectrum, accurate eigenvalues all, so
    ``converged`` cannot flag it.
    ``start``: ``"gradient"`` adds the loss gradient, normalized, to the first seeded random start vector
    (``guess`` of :func:`probes.spectral.eigenvalues`); ``"random"`` starts at random only; default
    (None): :func:`default_start`, the gradient for ``k = 1`` and random for ``k ≥ 2``. The gradient of a
    network's loss lies largely in the Hessian's top eigenspace (Gur-Ari, Roberts & Dyer 2018, "Gradient
    descent happens in a tiny subspace"), so the top eigenvalue converges in fewer products, while the
    random part keeps every eigenvector in the start. The gradient comes with the cached graph at no
    cost; otherwise it costs one gradient pass over ``batches``. A zero or non-finite gradient leaves the
    start random. Returned vectors then carry small errors correlated with the gradient: measure the
    gradient's alignment with ``start="random"`` vectors (as :func:`hessian_outliers` does).
    """
    if start is None:
        start = default_start(k)
    if start not in START_METHODS:
        raise ValueError(f"start must be one of {START_METHODS} or None, got {start!r}")
    with hessian_operator(
        model, loss_fn, batches, params=params, bn=bn, method=hvp, cache_graphs=cache_graphs
    ) as op:
        result = spectral.eigenvalues(
            op,
            k=k,
            which=which,
            tol=tol,
            method=method,
            max_matvecs=max_matvecs,
            seed=seed,
            return_vectors=return_vectors,
            block_size=block_size,
            guess=_gradient_guess(op) if start == "gradient" else None,
        )
    return _relabel(result, layer or _layer_name(params), "hessian_eigenvalues")


def default_start(k: int) -> str:
    """:func:`hessian_eigenvalues`' start when the caller gives none: ``"gradient"`` for ``k = 1``,
    ``"random"`` for ``k ≥ 2``.

    Measured (tol 1e-3, ``which="LA"``). Top-1 needs fewer products from the gradient: ResNet-20 of
    ``benchmarks/hessian.py``, ``bn="running"``, 18, 16, 14 products for seeds 0–2 → 12, 12, 12 and
    ``bn="batch"`` 30, 31 → 27, 27; its MLP-10 21 (median of 5 seeds) → 16 and 24 → 23; 1990-parameter
    float64 MLPs, median of 100 seeds, 13 → 11 (BN, at init), 10 → 7 (LN, trained), 6 → 5 (no norm,
    trained), and 8 → 9 where the gradient has 6e-4 of its squared norm on the top eigenvector (BN,
    trained). Top-k gains nothing reliable: within ±2 products at k = 5 and 10 on those MLPs,
    36 against 44 and 48 against 52 on the benchmark's running-statistics networks, but 240 and 180
    against 186 and 186 (seeds 0, 1) on ResNet-20's trained loss, whose λmin = −457 dwarfs λ1 = 19. No
    eigenvalue was missed from either start. The default does not depend on ``which``: for k = 1 and
    ``which="SA"``, on float64 MLPs of three hidden layers of 30 (BN, LN, none; at init and after 200
    SGD steps; MNIST-1D, batch 256; 30 seeds each), the gradient start took between 3.7 fewer and 1.9
    more products on average than the random one (13.7 against 17.3, 38.1 against 36.3), and for
    ``"LA"`` (here also ``"LM"``: λmax was the largest in magnitude) it saved 0–3 (medians)."""
    return "gradient" if as_int(k) == 1 else "random"


def _gradient_guess(op: HessianOperator) -> Tensor | None:
    """The operator's gradient as a start direction, or None when it is zero or not finite (a diverged
    loss: the products are then not finite either, and the eigensolver reports that)."""
    g = op.gradient()
    return g if bool(torch.isfinite(g).all()) and bool(g.any()) else None


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    n_probes: int = 100,
    method: str = "hutchpp",
    params: Params = None,
    bn: str = "batch",
    hvp: str = "auto",
    cache_graphs: bool | None = None,
    seed: int = 0,
    layer: str | None = None,
) -> TraceResult:
    """tr(∇²L) by Hutch++ (Meyer et al. 2021) or Hutchinson (1989) with ``n_probes`` matvecs.

    Hutchinson: tr H ≈ (1/m) Σ zᵢᵀ H zᵢ with Rademacher zᵢ; Hutch++ computes the trace of the top
    subspace exactly and applies Hutchinson to the deflated rest. ``stderr`` is the standard error.
    ``hvp``, ``cache_graphs``: as in :func:`hessian_eigenvalues`.
    """
    with hessian_operator(
        model, loss_fn, batches, params=params, bn=bn, method=hvp, cache_graphs=cache_graphs
    ) as op:
        result = spectral.trace(op, n_probes=n_probes, method=method, seed=seed)
    return _relabel(result, layer or _layer_name(params), "hessian_trace")


def hessian_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    n_iter: int = 30,
    n_runs: int = 10,
    sigma: float | None = None,
    grid: np.ndarray | None = None,
    params: Params = None,
    bn: str = "batch",
    hvp: str = "auto",
    cache_graphs: bool | None = None,
    seed: int = 0,
    layer: str | None = None,
) -> SpectralDensity:
    """Spectral density of ∇²L by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    ``n_runs`` Lanczos runs of ``n_iter`` steps from random unit vectors; each gives Ritz values θⱼ
    and weights τⱼ² (squared first components of T's eigenvectors); the density
    φ(t) = (1/runs) Σ τⱼ² N(t; θⱼ, σ²) integrates to 1. ``hvp``, ``cache_graphs``: as in
    :func:`hessian_eigenvalues`.
    """
    with hessian_operator(
        model, loss_fn, batches, params=params, bn=bn, method=hvp, cache_graphs=cache_graphs
    ) as op:
        result = spectral.density(op, n_iter=n_iter, n_runs=n_runs, sigma=sigma, grid=grid, seed=seed)
    return _relabel(result, layer or _layer_name(params), "hessian_density")


@dataclass(frozen=True)
class OutlierResult:
    """Ghorbani, Krishnan & Xiao (2019): the top-K outlier eigenvalues and how the gradient aligns.

    ``ratio`` = λ₁/λ_K (NaN when λ_K ≤ 0: fewer than K positive eigenvalues, so no K outliers);
    ``gradient_fraction`` = ‖Vᵀg‖²/‖g‖² for the top-K eigenvectors V.
    """

    values: np.ndarray
    ratio: float
    gradient_fraction: float
    n_matvecs: int
    converged: bool
    layer: str = "all"

    def to_records(self) -> list[dict[str, Any]]:
        base = {"probe": "hessian_outliers", "layer": self.layer}
        rows = [
            {**base, "metric": "eigenvalue_LA", "index": i, "value": float(v)}
            for i, v in enumerate(self.values)
        ]
        rows += [
            {**base, "metric": "outlier_ratio", "value": self.ratio},
            {**base, "metric": "gradient_fraction_top", "value": self.gradient_fraction},
            {**base, "metric": "n_matvecs", "value": float(self.n_matvecs)},
            {**base, "metric": "converged", "value": float(self.converged)},
        ]
        return rows


def hessian_outliers(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    num_classes: int,
    tol: float = 1e-3,
    params: Params = None,
    bn: str = "batch",
    hvp: str = "auto",
    cache_graphs: bool | None = None,
    seed: int = 0,
    block_size: int | None = None,
    layer: str | None = None,
) -> OutlierResult:
    """The outlier measures of Ghorbani et al. 2019 from the top-``num_classes`` eigenpairs of ∇²L.
    ``num_classes`` K ≥ 2, fewer than the parameters. ``hvp``, ``cache_graphs``, ``block_size``: as in
    :func:`hessian_eigenvalues`; at a symmetric point (a zero-initialized last layer makes the top
    eigenvalue K − 1 times repeated) pass ``block_size=num_classes``, or λ_K comes from below the
    outliers. Lanczos starts at random here (``start="random"`` of :func:`hessian_eigenvalues`): the
    gradient fraction is measured on its vectors, whose unconverged parts would otherwise correlate with
    the gradient."""
    num_classes = as_int(num_classes)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"num_classes must be an integer >= 2 (K of the outlier ratio λ1/λK), got {num_classes!r}"
        )
    with hessian_operator(
        model, loss_fn, batches, params=params, bn=bn, method=hvp, cache_graphs=cache_graphs
    ) as op:
        if num_classes >= op.shape[0]:
            raise ValueError(
                f"num_classes must be smaller than the number of parameters n = {op.shape[0]}, "
                f"got {num_classes}"
            )
        eig = spectral.eigenvalues(
            op, k=num_classes, which="LA", tol=tol, seed=seed, return_vectors=True, block_size=block_size
        )
        gradient = op.gradient()
    # float32 Ritz vectors are orthonormal only to ~1e-6·√k: project on their span through a float64 QR
    span, _ = np.linalg.qr(eig.vectors)
    return OutlierResult(
        values=eig.values,
        ratio=spectral.outlier_ratio(eig.values, num_classes, dtype=op.dtype),
        gradient_fraction=spectral.gradient_fraction_in_top_subspace(gradient, span),
        n_matvecs=eig.n_matvecs,
        converged=eig.converged,
        layer=layer or _layer_name(params),
    )


def _relabel(result: Any, layer: str, probe: str) -> Any:
    """The spectral result, named for the records as a Hessian probe of ``layer``."""
    names = {f.name for f in fields(result)}
    changes = {k: v for k, v in (("layer", layer), ("probe", probe)) if k in names}
    return replace(result, **changes)
