"""Conditioning probes: covariance spectra, condition numbers, whiteness, rank collapse, whitening
stochasticity, K-FAC factor conditioning and the least-squares picture of normalization vs whitening.

Conventions used throughout (all spectra in float64, eigenvalues clipped below at 0, descending):

* covariance of a data matrix X ``(N, d)``: C = (X − μ)ᵀ(X − μ)/N (biased; ``center=False``: the
  second moment XᵀX/N). Inputs ``(N, C, *spatial)`` pool the spatial positions as extra samples
  (features = channels, dim 1), the convention of BN and DBN statistics.
* rank tolerance: τ = max(λ_max·d·ε₆₄, (max(N, d)·ε_data)²·(λ_max + ‖μ‖²)); ``numerical_rank`` =
  #{λᵢ > τ}; ``condition_number`` κ = λ_max/λ_min, ``inf`` when λ_min ≤ τ (a singular covariance),
  ``nan`` for an all-zero one. The first term is numpy's ``matrix_rank`` rule for the float64
  eigensolver. The second is the same rule for the data matrix X, known only to the precision
  ε_data of its dtype (float32 activations: 1.2e-7; for float64 data the first term dominates): a
  direction whose singular value in X is below max(N, d)·ε_data·‖X‖₂ cannot be told from rounding,
  and λ = s²/N; ‖X‖₂²/N ≤ λ_max + ‖μ‖² (C + μμᵀ is X's second moment), since data are rounded
  relative to their uncentered size. Without it the float32 rounding of an exactly singular
  covariance (BN's centered outputs with N ≤ d) reads as a genuine direction: κ ≈ 10¹²
  instead of ``inf``, rank d instead of d − 1.
* ``effective_rank`` (participation ratio) = tr(C)²/‖C‖_F² = (Σλᵢ)²/Σλᵢ² ∈ [1, rank C]; the lower
  bound on rank(C) that Daneshmand et al. (2020) use as a soft rank.
* ``stable_rank`` = ‖X_c‖_F²/‖X_c‖₂² = tr(C)/λ_max ∈ [1, rank C] (of the centered data matrix X_c;
  ``center=False``: of X). Both are 1 for rank-one data and d for isotropic data.
* ``whiteness`` = ‖C/mean(diag C) − I‖_F (0 iff C ∝ I).

Every model probe runs under :func:`probes.functional.probe_guard` and
:func:`probes.functional.norm_mode` (``bn="batch"``: batch statistics, no running-statistic update;
``bn="running"``: eval-mode norms), so the model is left exactly as found.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from probes.activations import (
    capture_layer_inputs,
    feature_axis,
    floating_inputs,
    input_reader,
    parameterized_layers,
    select_modules,
)
from probes.functional import as_batches, as_int, check_bn, check_loss, norm_mode, probe_guard

__all__ = [
    "CovarianceStats",
    "DisturbanceResult",
    "GDRun",
    "KFACConditioning",
    "KFACFactors",
    "LayerConditioning",
    "RankCollapse",
    "covariance_spectrum",
    "data_eps",
    "default_layers",
    "gd_iterations_to_tolerance",
    "iternorm_whitening",
    "kfac_factor_conditioning",
    "layer_input_conditioning",
    "least_squares_conditioning",
    "make_least_squares",
    "normalization_disturbance",
    "rank_collapse",
    "spectrum_stats",
    "whitening_transform",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]
Layers = Sequence[type[nn.Module] | str | nn.Module] | None
WHITENING_METHODS = ("bn", "zca", "pca", "iternorm", "cholesky")


# ------------------------------------------------------------------------------ covariance spectra


@dataclass(frozen=True)
class CovarianceStats:
    """The spectrum of a covariance (or second-moment) matrix and the scalars derived from it.

    ``eigenvalues`` descending (float64, clipped at 0); see the module docstring for the definitions
    of ``condition_number``, ``effective_rank``, ``stable_rank``, ``numerical_rank`` and ``whiteness``.
    """

    eigenvalues: np.ndarray
    condition_number: float
    effective_rank: float
    stable_rank: float
    numerical_rank: int
    whiteness: float
    trace: float
    n_samples: int
    layer: str = ""
    probe: str = "covariance_spectrum"

    @property
    def dim(self) -> int:
        return int(self.eigenvalues.shape[0])

    def to_records(self) -> list[dict[str, Any]]:
        base = {"probe": self.probe, "layer": self.layer}
        rows = [
            {**base, "metric": "eigenvalue", "index": i, "value": float(v)}
            for i, v in enumerate(self.eigenvalues)
        ]
        for metric in ("condition_number", "effective_rank", "stable_rank", "whiteness", "trace"):
            rows.append({**base, "metric": metric, "value": float(getattr(self, metric))})
        rows.append({**base, "metric": "numerical_rank", "value": float(self.numerical_rank)})
        rows.append({**base, "metric": "n_samples", "value": float(self.n_samples)})
        return rows


def _as_matrix(x: Tensor | np.ndarray) -> Tensor:
    """``(N, d)`` float64 data matrix; ``(N, C, *spatial)`` → ``(N·spatial, C)``; ``(N,)`` → ``(N, 1)``."""
    t = torch.as_tensor(x).detach().to(torch.float64)
    if t.dim() == 1:
        return t[:, None]
    if t.dim() > 2:
        t = t.movedim(1, -1).reshape(-1, t.shape[1])  # (N, *spatial, C) -> (N·spatial, C)
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"X: expected a non-empty (N, d) or (N, C, *spatial) array, got {tuple(t.shape)}")
    return t


def _second_moment(x: Tensor, center: bool) -> Tensor:
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    return x.T @ x / x.shape[0]


def data_eps(x: Tensor | np.ndarray) -> float | None:
    """The machine epsilon of data ``x``'s dtype (None for integers, which are exact): the ε_data of the
    rank tolerance (module docstring)."""
    dtype = torch.as_tensor(x).dtype  # a tensor as it is; a numpy array shared, not copied
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else None


def spectrum_stats(
    matrix: Tensor | np.ndarray,
    *,
    n_samples: int = 0,
    layer: str = "",
    probe: str = "covariance_spectrum",
    eps: float | None = None,
    mean_sq_norm: float = 0.0,
) -> CovarianceStats:
    """:class:`CovarianceStats` of a symmetric positive semi-definite ``matrix`` ``(d, d)``.

    λ = eigvalsh(sym(M)) clipped at 0; κ = λ_max/λ_min (inf if λ_min ≤ τ); effective rank
    (Σλ)²/Σλ²; stable rank Σλ/λ_max; whiteness ‖M/mean(diag M) − I‖_F. τ = λ_max·d·ε₆₄, or, when
    M was computed from ``n_samples`` data of precision ``eps`` (:func:`data_eps`) with mean μ
    (``mean_sq_norm`` = ‖μ‖²; 0 for a second moment), the module docstring's τ.
    """
    # d × d is small: its spectrum is computed on the CPU, whatever device the matrix comes from
    m = torch.as_tensor(matrix).detach().to(device="cpu", dtype=torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"matrix: expected a non-empty square matrix, got {tuple(m.shape)}")
    m = (m + m.T) / 2
    d = m.shape[0]
    lam = torch.linalg.eigvalsh(m).flip(0).clamp_min(0.0).numpy()  # descending
    lam_max, total = float(lam[0]), float(lam.sum())
    tol = lam_max * d * np.finfo(np.float64).eps
    if eps is not None:
        tol = max(tol, (max(n_samples, d) * eps) ** 2 * (lam_max + mean_sq_norm))
    if lam_max == 0.0:
        kappa, eff, stable, rank = float("nan"), float("nan"), float("nan"), 0
    else:
        rank = int((lam > tol).sum())
        kappa = float("inf") if lam[-1] <= tol else lam_max / float(lam[-1])
        eff = total**2 / float((lam**2).sum())
        stable = total / lam_max
    scale = float(m.diagonal().mean())
    if scale > 0:
        whiteness = float(torch.linalg.matrix_norm(m / scale - torch.eye(d, dtype=m.dtype)))
    else:
        whiteness = float("nan")
    return CovarianceStats(
        eigenvalues=lam,
        condition_number=kappa,
        effective_rank=eff,
        stable_rank=stable,
        numerical_rank=rank,
        whiteness=whiteness,
        trace=total,
        n_samples=n_samples,
        layer=layer,
        probe=probe,
    )


def covariance_spectrum(
    X: Tensor | np.ndarray, *, center: bool = True, layer: str = "", probe: str = "covariance_spectrum"
) -> CovarianceStats:
    """Spectrum of the covariance C = (X − μ)ᵀ(X − μ)/N of data ``X`` ``(N, d)`` (``center=False``:
    the second moment XᵀX/N); ``(N, C, *spatial)`` pools spatial positions as samples.

    Condition number κ(C) = λ_max/λ_min governs gradient descent on a layer fed with these inputs
    (LeCun, Bottou, Orr & Müller 1998, *Efficient BackProp*, §4–5: centered, decorrelated, equal-variance
    inputs make the Hessian of a linear unit well conditioned); whiteness ‖C/mean(diag C) − I‖_F
    measures the distance from what decorrelated BN (Huang et al. 2018) enforces.
    """
    x = _as_matrix(X)
    mean_sq = float(x.mean(dim=0).square().sum()) if center else 0.0
    return spectrum_stats(
        _second_moment(x, center),
        n_samples=x.shape[0],
        layer=layer,
        probe=probe,
        eps=data_eps(X),
        mean_sq_norm=mean_sq,
    )


# ------------------------------------------------------------------------------ layer conditioning


def default_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The parameterized layers of ``model`` (:func:`probes.activations.parameterized_layers`);
    ``ValueError`` if it has none."""
    chosen = parameterized_layers(model)
    if not chosen:
        raise ValueError("layers: the model has no parameterized (weight-matrix) layer to probe")
    return chosen


def _resolve_layers(model: nn.Module, layers: Layers) -> dict[str, nn.Module]:
    return default_layers(model) if layers is None else select_modules(model, layers)


@dataclass(frozen=True)
class LayerConditioning:
    """Per layer (qualified name → :class:`CovarianceStats`) conditioning of the layer's input."""

    layers: dict[str, CovarianceStats] = field(default_factory=dict)

    def __getitem__(self, name: str) -> CovarianceStats:
        return self.layers[name]

    def to_records(self) -> list[dict[str, Any]]:
        return [row for stats in self.layers.values() for row in stats.to_records()]


def _feature_rows(module: nn.Module, a: Tensor) -> Tensor:
    """A layer's input with its features (:func:`probes.activations.feature_axis`) as the columns of a
    matrix; inputs ``(N, C, *spatial)`` keep the convention of :func:`covariance_spectrum`."""
    return a.reshape(-1, a.shape[-1]) if feature_axis(module) == -1 else a


def layer_input_conditioning(
    model: nn.Module,
    batches: Batches,
    *,
    layers: Layers = None,
    bn: str = "batch",
    center: bool = True,
) -> LayerConditioning:
    """Covariance spectrum of every selected layer's input, pooled over all ``batches``.

    For layer ℓ with inputs a (``(N, d)``; conv inputs ``(N, C, H, W)`` pool the H·W positions as
    samples, features = channels; ``nn.Linear`` inputs ``(N, T, d)`` pool the T tokens):
    C_ℓ = Cov(a), its eigenvalues, κ(C_ℓ), effective rank and whiteness ‖C_ℓ/mean(diag C_ℓ) − I‖_F
    (DESIGN.md). Ill-conditioned layer inputs make the layer's Hessian block ill-conditioned (LeCun et
    al. 1998); BN standardizes the diagonal, DBN/IterNorm whiten C (Huang et al. 2018, 2019).
    ``layers=None``: :func:`default_layers`, less those fed indices (an ``nn.Embedding``'s token ids:
    :func:`probes.activations.floating_inputs`). ``bn`` as in DESIGN.md.
    """
    check_bn(bn)
    pairs = as_batches(batches)
    modules = _resolve_layers(model, layers)
    with probe_guard(model), torch.no_grad(), norm_mode(model, bn):
        with capture_layer_inputs(model, modules, must_run=layers is not None) as inputs:
            for x, _ in pairs:
                model(x)
    inputs = floating_inputs(inputs, named=layers is not None)
    return LayerConditioning(
        {
            name: covariance_spectrum(
                _feature_rows(module, inputs[name]),
                center=center,
                layer=name,
                probe="layer_input_conditioning",
            )
            for name, module in modules.items()
            if name in inputs
        }
    )


# ----------------------------------------------------------------------------------- rank collapse


@dataclass(frozen=True)
class RankCollapse:
    """Rank measures of the representation H ``(N, d)`` fed to ``layer`` (Daneshmand et al. 2020).

    * ``singular_values`` of H (descending) and ``numerical_rank`` = #{σᵢ > σ₁·max(N, d)·ε}, ε that of
      H's dtype (numpy's ``matrix_rank`` rule; float32 activations are known to 1.2e-7, not 2.2e-16);
    * ``effective_rank`` = tr(HHᵀ)²/‖HHᵀ‖_F² = (Σσᵢ²)²/Σσᵢ⁴ — the soft rank, a lower bound on rank H,
      that Daneshmand et al. track through depth (uncentered, as in the paper: collapse means all
      samples align, which centering would hide);
    * ``stable_rank`` = ‖H‖_F²/‖H‖₂² = Σσᵢ²/σ₁²;
    * ``mean_cosine`` = mean over pairs i ≠ j of cos(hᵢ, hⱼ) (uncentered; → 1 under collapse);
    * ``centered_effective_rank``: the participation ratio of Cov(H).
    """

    singular_values: np.ndarray
    numerical_rank: int
    effective_rank: float
    stable_rank: float
    mean_cosine: float
    centered_effective_rank: float
    n_samples: int
    layer: str

    def to_records(self) -> list[dict[str, Any]]:
        base = {"probe": "rank_collapse", "layer": self.layer}
        rows = [
            {**base, "metric": "singular_value", "index": i, "value": float(v)}
            for i, v in enumerate(self.singular_values)
        ]
        for metric in (
            "numerical_rank",
            "effective_rank",
            "stable_rank",
            "mean_cosine",
            "centered_effective_rank",
            "n_samples",
        ):
            rows.append({**base, "metric": metric, "value": float(getattr(self, metric))})
        return rows


def _rank_measures(h: Tensor, layer: str, eps: float) -> RankCollapse:
    """The measures of :class:`RankCollapse` of ``h`` ``(N, d)`` (float64), data of precision ``eps``."""
    n, d = h.shape
    s = torch.linalg.svdvals(h).cpu().numpy()
    s1 = float(s[0]) if s.size else 0.0
    s2 = s**2
    if s1 == 0.0:
        rank, eff, stable = 0, float("nan"), float("nan")
    else:
        rank = int((s > s1 * max(n, d) * max(eps, np.finfo(np.float64).eps)).sum())
        eff = float(s2.sum() ** 2 / (s2**2).sum())
        stable = float(s2.sum() / s1**2)
    norms = h.norm(dim=1)
    unit = h[norms > 0] / norms[norms > 0, None]
    k = unit.shape[0]
    if k >= 2:
        gram = unit @ unit.T
        cosine = float((gram.sum() - gram.diagonal().sum()) / (k * (k - 1)))
    else:
        cosine = float("nan")
    centered = covariance_spectrum(h).effective_rank  # no tolerance enters the effective rank
    return RankCollapse(s, rank, eff, stable, cosine, centered, n, layer)


def rank_collapse(
    model: nn.Module,
    batch: tuple[Tensor, Tensor] | Tensor,
    *,
    layer: str | nn.Module | None = None,
    bn: str = "batch",
) -> RankCollapse:
    """Rank collapse of the last hidden representation (Daneshmand, Kohler, Bach, Hofmann & Lucchi
    2020, *Batch normalization provably avoids rank collapse for randomly initialised deep networks*).

    H ``(N, d)`` is the input of ``layer`` (default: the last parameterized layer to run in the forward
    pass, i.e. the classifier), flattened per sample. Without normalization the soft rank
    r(H) = tr(HHᵀ)²/‖HHᵀ‖_F² of a randomly initialised deep net decays towards 1 with depth (all
    samples map to nearly one direction); with BN it stays Ω(√d) (their Theorem). ``batch`` is an
    ``(inputs, targets)`` pair or the inputs alone.
    """
    check_bn(bn)
    x = batch[0] if isinstance(batch, tuple | list) and batch else batch
    if not isinstance(x, Tensor) or x.dim() == 0:
        got = repr(batch) if x is batch else f"a {type(batch).__name__} of {type(x).__name__}"
        raise ValueError(f"batch: expected one (inputs, targets) pair or an inputs tensor, got {got}")
    if x.shape[0] < 2:
        raise ValueError(f"batch: expected inputs with at least 2 samples, got {x.shape[0]}")
    candidates = default_layers(model) if layer is None else select_modules(model, [layer])
    order: list[str] = []
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            order.append(name)

        return hook

    with probe_guard(model), torch.no_grad(), norm_mode(model, bn):
        try:
            for name, m in candidates.items():
                handles.append(m.register_forward_pre_hook(hook_for(name)))
            with capture_layer_inputs(model, candidates, must_run=layer is not None) as inputs:
                model(x)
        finally:
            for h in handles:
                h.remove()
    name = order[-1]
    h = inputs[name].to(torch.float64).reshape(inputs[name].shape[0], -1)
    return _rank_measures(h, name, data_eps(inputs[name]) or 0.0)


# ------------------------------------------------------------------------- whitening stochasticity


def _group_size(d: int, group_size: int | None) -> int:
    if group_size is None:
        return d
    group_size = as_int(group_size)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    return max(g for g in range(1, min(group_size, d) + 1) if d % g == 0)


def whitening_transform(
    X: Tensor,
    *,
    method: str = "zca",
    group_size: int | None = None,
    iterations: int = 5,
    eps: float = 1e-5,
) -> Tensor:
    """φ_B(X): the batch-normalizing transform of kind ``method`` applied to the batch ``X`` ``(m, d)``.

    μ = mean of X, per group of g channels (g = the largest divisor of d not above ``group_size``;
    ``None``: all d — DBN's convention) Σ = X_cᵀX_c/m + εI and y = W x_c with
    ``"bn"``: W = diag(Σ)^{-1/2} (Ioffe & Szegedy 2015; groups ignored);
    ``"zca"``: W = Σ^{-1/2} = UΛ^{-1/2}Uᵀ (Huang et al. 2018, DBN);
    ``"pca"``: W = Λ^{-1/2}Uᵀ, λ descending, each eigenvector signed so its largest entry is positive;
    ``"iternorm"``: Newton–Schulz, Σ_N = Σ/tr Σ, P₀ = I, P_k = ½(3P_{k−1} − P_{k−1}³Σ_N), W = P_T/√tr Σ
    (Huang et al. 2019); ``"cholesky"``: W = L⁻¹ with Σ = LLᵀ (CD whitening, Huang et al. 2020).
    Matches ``studies.lab.norms`` DBN/IterNorm with ``affine=False`` in training mode.
    """
    if method not in WHITENING_METHODS:
        raise ValueError(f"method must be one of {WHITENING_METHODS}, got {method!r}")
    if X.dim() != 2:
        raise ValueError(f"X: expected a (m, d) batch, got shape {tuple(X.shape)}")
    m, d = X.shape
    xc = X - X.mean(dim=0, keepdim=True)
    if method == "bn":
        return xc * torch.rsqrt(xc.pow(2).mean(dim=0) + eps)
    g = _group_size(d, group_size)
    xg = xc.T.reshape(d // g, g, m)  # (G, g, m)
    eye = torch.eye(g, dtype=X.dtype, device=X.device)
    sigma = xg @ xg.mT / m + eps * eye  # (G, g, g)
    if method in ("zca", "pca"):
        lam, u = torch.linalg.eigh(sigma)
        lam = lam.clamp_min(eps)  # Σ ⪰ εI: a smaller eigenvalue is float32 rounding (1/√λ would explode)
        if method == "zca":
            w = u @ (lam.rsqrt()[..., :, None] * u.mT)
        else:
            lam, u = lam.flip(-1), u.flip(-1)
            idx = u.abs().argmax(dim=-2, keepdim=True)  # (G, 1, g)
            sign = torch.sign(torch.gather(u, -2, idx))
            u = u * torch.where(sign == 0, torch.ones_like(sign), sign)
            w = lam.rsqrt()[..., :, None] * u.mT
    elif method == "iternorm":
        w = iternorm_whitening(sigma, iterations)
    else:
        chol = torch.linalg.cholesky(sigma)
        w = torch.linalg.solve_triangular(chol, eye.expand_as(sigma), upper=False)
    return (w @ xg).reshape(d, m).T


def iternorm_whitening(sigma: Tensor, iterations: int) -> Tensor:
    """IterNorm's whitening matrix W = P_T/√tr Σ of Huang et al. 2019 for ``sigma`` ``(..., g, g)``:
    Σ_N = Σ/tr Σ, P₀ = I, P_k = ½(3P_{k−1} − P_{k−1}³Σ_N), k = 1..T (T = ``iterations``).

    Computed in the coupled form (Higham 2008, *Functions of Matrices*, §6.7): Y₀ = Σ_N, Z₀ = I,
    M_k = ½(3I − Z_{k−1}Y_{k−1}), Y_k = Y_{k−1}M_k, Z_k = M_k Z_{k−1}. In exact arithmetic Z_k = P_k (all
    are polynomials in Σ_N), at the same three matrix products a step; the paper's one-matrix form
    amplifies rounding by about κ(Σ)/2 a step once P_k nears Σ_N^{-1/2}: at κ = 2·10⁴ it was 90× off at
    T = 11 in float32 and NaN at T = 20 in float64, while the coupled form follows P_T to rounding.
    Plain differentiable torch ops (double backward and ``torch.func`` go through).
    """
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    y = sigma / trace  # Σ_N
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
    z = eye.expand_as(sigma)
    for _ in range(iterations):
        m = 1.5 * eye - 0.5 * (z @ y)
        y, z = y @ m, m @ z
    return z / trace.sqrt()


@dataclass(frozen=True)
class DisturbanceResult:
    """Stochastic normalization disturbance of a batch-normalizing transform (Huang et al. 2019).

    ``per_sample[i]`` = Δ̂(xᵢ); ``mean``/``std`` over samples; ``n_draws``: mini-batches per sample.
    """

    mean: float
    std: float
    per_sample: np.ndarray
    method: str
    batch_size: int
    group_size: int
    n_draws: int

    def to_records(self) -> list[dict[str, Any]]:
        base = {
            "probe": "normalization_disturbance",
            "layer": self.method,
            "batch_size": self.batch_size,
            "group_size": self.group_size,
        }
        return [
            {**base, "metric": "snd_mean", "value": self.mean},
            {**base, "metric": "snd_std", "value": self.std},
        ]


def normalization_disturbance(
    X: Tensor | np.ndarray,
    *,
    method: str = "bn",
    batch_size: int,
    group_size: int | None = None,
    n_batches: int = 50,
    iterations: int = 5,
    eps: float = 1e-5,
    seed: int = 0,
) -> DisturbanceResult:
    """Stochastic normalization disturbance (SND; Huang, Zhou, Zhu, Liu & Shao 2019, *Iterative
    Normalization*, §3.2; Huang et al. 2020, *An investigation into the stochasticity of batch
    whitening*): Δ(x) = E_B ‖φ_B(x) − E_B φ_B(x)‖₂ over mini-batches B ∋ x, estimated as
    Δ̂(x) = (1/s) Σᵢ ‖φ_{Bᵢ}(x) − (1/s) Σⱼ φ_{Bⱼ}(x)‖₂, and averaged over the samples x of ``X``.

    Each of ``n_batches`` rounds partitions a random permutation of ``X`` ``(N, d)`` into mini-batches
    of ``batch_size`` (the < ``batch_size`` left over are dropped that round), so every sample gets
    s ≈ ``n_batches`` draws from random batches containing it; φ is :func:`whitening_transform`.
    ``batch_size = N`` gives Δ = 0 exactly. SND grows as the batch shrinks and, for whitening, as the
    group grows (more statistics to estimate from the same batch); full whitening is noisier than BN.
    """
    x = _as_matrix(X)
    n, d = x.shape
    batch_size, n_batches = as_int(batch_size), as_int(n_batches)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 2 <= batch_size <= n:
        raise ValueError(f"batch_size must be an int in [2, N={n}], got {batch_size!r}")
    if not isinstance(n_batches, int) or isinstance(n_batches, bool) or n_batches < 2:
        raise ValueError(f"n_batches must be an int ≥ 2, got {n_batches!r}")
    if method not in WHITENING_METHODS:
        raise ValueError(f"method must be one of {WHITENING_METHODS}, got {method!r}")
    g = 1 if method == "bn" else _group_size(d, group_size)
    gen = torch.Generator().manual_seed(seed)
    outputs = torch.full((n_batches, n, d), float("nan"), dtype=torch.float64, device=x.device)
    per_round = n // batch_size
    for r in range(n_batches):
        # drawn on the CPU (own generator), so a seed gives the same batches on every device
        perm = torch.randperm(n, generator=gen)[: per_round * batch_size].view(per_round, batch_size)
        perm = perm.to(x.device)
        for idx in perm:
            idx = idx.sort().values  # the same batch always gives bit-identical outputs
            outputs[r, idx] = whitening_transform(
                x[idx], method=method, group_size=g, iterations=iterations, eps=eps
            )
    seen = ~outputs[..., 0].isnan()  # (rounds, N)
    counts = seen.sum(0)
    keep = counts >= 2
    if not bool(keep.any()):
        raise ValueError("n_batches: too few rounds for any sample to be drawn twice")
    # E_B φ_B(x) as the first draw plus the mean offset from it: exact when all draws agree
    first = outputs[seen.to(torch.int8).argmax(0), torch.arange(n, device=x.device)]  # (N, d)
    offsets = torch.where(seen[..., None], outputs - first, 0.0)  # (rounds, N, d)
    centre = offsets.sum(0) / counts.clamp_min(1)[:, None]  # (N, d)
    dist = torch.where(seen, (offsets - centre).norm(dim=-1), 0.0)  # (rounds, N)
    per_sample = (dist.sum(0) / counts.clamp_min(1))[keep].cpu().numpy()
    return DisturbanceResult(
        mean=float(per_sample.mean()),
        std=float(per_sample.std()),
        per_sample=per_sample,
        method=method,
        batch_size=batch_size,
        group_size=g,
        n_draws=int(counts[keep].min()),
    )


# -------------------------------------------------------------------------- K-FAC factor conditioning


@dataclass(frozen=True)
class KFACFactors:
    """The Kronecker factors of one layer's Fisher block F ≈ A ⊗ G (Martens & Grosse 2015) and their
    spectra (:class:`CovarianceStats` of the uncentered matrices).

    A grouped convolution (``groups`` = g > 1) has one pair per group, its block F ≈ ⊕ᵢ Aᵢ ⊗ Gᵢ (the
    weights of different groups never meet): ``A`` is then ``(g, dₐ, dₐ)`` and ``G`` ``(g, d_g, d_g)``,
    and ``a_stats``/``g_stats`` describe the block-diagonal ⊕ᵢ Aᵢ and ⊕ᵢ Gᵢ (the union of the
    groups' spectra).
    """

    layer: str
    A: np.ndarray
    G: np.ndarray
    a_stats: CovarianceStats
    g_stats: CovarianceStats
    groups: int = 1

    @property
    def condition_number(self) -> float:
        """κ of the layer's Kronecker-factored block: κ(A)·κ(G); grouped, κ(⊕ᵢ Aᵢ ⊗ Gᵢ) =
        maxᵢ λmax(Aᵢ)λmax(Gᵢ) / minᵢ λmin(Aᵢ)λmin(Gᵢ) — ``inf`` when some Aᵢ or Gᵢ is singular (the
        rank rule of the module docstring, per factor), ``nan`` when one is all zero."""
        if self.groups == 1:
            return self.a_stats.condition_number * self.g_stats.condition_number
        pairs = [(spectrum_stats(a), spectrum_stats(g)) for a, g in zip(self.A, self.G, strict=True)]
        kappas = [sa.condition_number * sg.condition_number for sa, sg in pairs]
        if not all(np.isfinite(kappas)):
            return float("nan") if any(np.isnan(kappas)) else float("inf")
        top = max(sa.eigenvalues[0] * sg.eigenvalues[0] for sa, sg in pairs)
        bottom = min(sa.eigenvalues[-1] * sg.eigenvalues[-1] for sa, sg in pairs)
        return float(top / bottom)

    def to_records(self) -> list[dict[str, Any]]:
        return self.a_stats.to_records() + self.g_stats.to_records()


@dataclass(frozen=True)
class KFACConditioning:
    """Per layer :class:`KFACFactors`; κ(A ⊗ G) = κ(A)·κ(G) (:attr:`KFACFactors.condition_number`)."""

    layers: dict[str, KFACFactors] = field(default_factory=dict)

    def __getitem__(self, name: str) -> KFACFactors:
        return self.layers[name]

    def to_records(self) -> list[dict[str, Any]]:
        rows = [row for f in self.layers.values() for row in f.to_records()]
        for name, f in self.layers.items():
            rows.append(
                {
                    "probe": "kfac_factor_conditioning",
                    "layer": name,
                    "metric": "condition_number_AxG",
                    "value": f.condition_number,
                }
            )
        return rows


_CONVS = nn.Conv1d | nn.Conv2d | nn.Conv3d


def _conv_padding(module: nn.Module) -> list[tuple[int, int]]:
    """(left, right) padding of each spatial dimension, as the convolution applies it: ``"same"``
    puts the odd element of d·(k − 1) on the right, as torch does."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in module.padding]


def _conv_patches(module: nn.Module, a: Tensor) -> Tensor:
    """The receptive field of every output position of a Conv1d/2d/3d, ``(N·L, groups, C/groups·∏k)``
    from an input ``(N, C, *spatial)``, each row ordered as the flattened weight ``(C/groups, *k)`` of
    its group (KFC, Grosse & Martens 2016). Padding as the layer pads (zeros, reflect, replicate,
    circular; ints or "same")."""
    d = len(module.kernel_size)
    widths = [side for pair in reversed(_conv_padding(module)) for side in pair]  # F.pad: last dim first
    if any(widths):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        a = F.pad(a, widths, mode=mode)
    for i, (k, s, dil) in enumerate(zip(module.kernel_size, module.stride, module.dilation, strict=True)):
        a = a.unfold(2 + i, dil * (k - 1) + 1, s)[..., ::dil]  # appends this dim's window: (..., k)
    fan_in = a.shape[1] // module.groups * math.prod(module.kernel_size)
    return a.movedim(1, 1 + d).reshape(-1, module.groups, fan_in)  # (N, C, *L, *k) -> (N, *L, C, *k)


def _layer_input_rows(module: nn.Module, a: Tensor) -> Tensor:
    """Layer input as rows ``(N·positions, groups, fan_in)``: Linear flattens leading dims (one group);
    convolutions unfold patches (:func:`_conv_patches`)."""
    if isinstance(module, nn.Linear):
        return a.reshape(-1, 1, a.shape[-1])
    return _conv_patches(module, a)


def _output_rows(module: nn.Module, g: Tensor) -> Tensor:
    """Output gradients as rows ``(N·positions, groups, fan_out)``, matching :func:`_layer_input_rows`."""
    if isinstance(module, _CONVS):
        rows = g.flatten(2).transpose(1, 2)  # (N, C_out, *L) -> (N, L, C_out)
        return rows.reshape(-1, module.groups, g.shape[1] // module.groups)
    return g.reshape(-1, 1, g.shape[-1])


def kfac_factor_conditioning(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    layers: Layers = None,
    bn: str = "batch",
) -> KFACConditioning:
    """Condition numbers and spectra of the K-FAC factors (Martens & Grosse 2015, *Optimizing neural
    networks with Kronecker-factored approximate curvature*), per layer with s = W ā:

    A = (1/N) Σₙ āₙ āₙᵀ with ā = [a; 1] when the layer has a bias, and
    G = (1/N) Σₙ gₙ gₙᵀ with gₙ = n_b ∂L_b/∂sₙ, the gradient of the *summed* loss of sample n's batch
    w.r.t. sample n's output (the empirical-Fisher G; with mean losses this is the per-sample gradient).
    N counts all samples of all ``batches``. Convolutions (1-, 2- and 3-d, any stride, dilation and
    padding) use unfolded patches (KFC, Grosse & Martens 2016), each output position an extra row of
    both factors (so A and G are means over positions and samples; the |T| scaling of KFC does not
    change condition numbers); a grouped one has a pair (Aᵢ, Gᵢ) per group (:class:`KFACFactors`).
    ``layers=None``: every ``nn.Linear`` and ``nn.Conv1d/2d/3d``. Gradients come from
    ``torch.autograd.grad`` on the layer outputs, so no ``.grad`` is written; the model is left as
    found. Under ``bn="batch"`` gₙ includes the coupling through the batch statistics.
    """
    check_bn(bn)
    pairs = as_batches(batches)
    if layers is None:
        # the root too: a model that is one nn.Linear (logistic regression)
        modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | _CONVS)}
        if not modules:
            raise ValueError("layers: the model has no nn.Linear or nn.Conv1d/2d/3d layer")
    else:
        modules = select_modules(model, layers)
    for name, m in modules.items():
        if not isinstance(m, nn.Linear | _CONVS):
            raise ValueError(
                f"layers: K-FAC factors need nn.Linear or nn.Conv1d/2d/3d, got {name!r} ({type(m).__name__})"
            )
    a_sums: dict[str, Tensor | None] = {name: None for name in modules}
    g_sums: dict[str, Tensor | None] = {name: None for name in modules}
    rows = {name: 0 for name in modules}
    a_eps: dict[str, float | None] = {}
    g_eps: dict[str, float | None] = {}
    with probe_guard(model), norm_mode(model, bn):
        for x, y in pairs:
            store: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in modules}

            def hook_for(name: str, store: dict[str, list[tuple[Tensor, Tensor]]] = store):
                read_input = input_reader(modules[name])

                def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Tensor) -> None:
                    store[name].append((read_input(args, kwargs).detach(), output))

                return hook

            handles = [m.register_forward_hook(hook_for(n), with_kwargs=True) for n, m in modules.items()]
            # a differentiable input: G is defined for frozen layers too (∂L/∂s needs no trainable W)
            x_in = x.detach().requires_grad_() if x.is_floating_point() else x
            try:
                with torch.enable_grad():
                    loss = check_loss(loss_fn(model(x_in), y))
            finally:
                for h in handles:
                    h.remove()
            never = [n for n, calls in store.items() if not calls]
            if never and (layers is not None or len(never) == len(store)):
                raise ValueError(f"layers never ran during the forward pass: {', '.join(never)}")
            outs = [out for calls in store.values() for _, out in calls]
            if not loss.requires_grad or not all(o.requires_grad for o in outs):
                raise ValueError("layers: a layer output depends on neither the input nor a trainable tensor")
            grads = iter(torch.autograd.grad(loss * x.shape[0], outs, allow_unused=True))
            for name, calls in store.items():
                module = modules[name]
                for a, out in calls:
                    g = next(grads)
                    g = torch.zeros_like(out) if g is None else g.detach()
                    a_eps[name], g_eps[name] = data_eps(a), data_eps(g)  # second moments of these
                    ar = _layer_input_rows(module, a).to(torch.float64)  # (rows, groups, fan_in)
                    if getattr(module, "bias", None) is not None:
                        ar = torch.cat([ar, ar.new_ones(*ar.shape[:2], 1)], dim=2)
                    gr = _output_rows(module, g).to(torch.float64)  # (rows, groups, fan_out)
                    a_sum = ar.permute(1, 2, 0) @ ar.transpose(0, 1)  # (groups, fan_in, fan_in)
                    g_sum = gr.permute(1, 2, 0) @ gr.transpose(0, 1)
                    a_sums[name] = a_sum if a_sums[name] is None else a_sums[name] + a_sum
                    g_sums[name] = g_sum if g_sums[name] is None else g_sums[name] + g_sum
                    rows[name] += ar.shape[0]
    result = {}
    for name in modules:
        if rows[name] == 0:  # never ran, in a default selection (an auxiliary head)
            continue
        a_mat = a_sums[name] / rows[name]
        g_mat = g_sums[name] / rows[name]
        groups, n = a_mat.shape[0], rows[name]
        a_out, g_out = (a_mat[0], g_mat[0]) if groups == 1 else (a_mat, g_mat)
        result[name] = KFACFactors(
            layer=name,
            A=a_out.cpu().numpy(),
            G=g_out.cpu().numpy(),
            a_stats=spectrum_stats(
                torch.block_diag(*a_mat), n_samples=n, layer=name, probe="kfac_A", eps=a_eps[name]
            ),
            g_stats=spectrum_stats(
                torch.block_diag(*g_mat), n_samples=n, layer=name, probe="kfac_G", eps=g_eps[name]
            ),
            groups=groups,
        )
    return KFACConditioning(result)


# ---------------------------------------------------------------------------------- least squares


def make_least_squares(
    n: int,
    d: int,
    *,
    correlated: bool,
    scales: Sequence[float] | np.ndarray | None = None,
    correlation: float = 0.95,
    noise: float = 0.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X, y, w_true)`` for least squares with zero-mean Gaussian features x = D z, Cov(z) = R.

    ``correlated=False``: R = I and D = diag(``scales``) (default logspace(0, 1, d): independent but
    badly scaled, κ(XᵀX/N) ≈ 100); ``correlated=True``: R = (1 − ρ)I + ρ11ᵀ (ρ = ``correlation``,
    κ(R) = (1 + (d − 1)ρ)/(1 − ρ)) and D = diag(``scales``) (default ones). y = X w_true + noise·ε.
    """
    if n < 2 or d < 1:
        raise ValueError(f"n must be ≥ 2 and d ≥ 1, got n={n}, d={d}")
    rng = np.random.default_rng(seed)
    if scales is None:
        scales = np.ones(d) if correlated else np.logspace(0.0, 1.0, d)
    scales = np.asarray(scales, dtype=np.float64)
    if scales.shape != (d,):
        raise ValueError(f"scales: expected {d} values, got shape {scales.shape}")
    z = rng.standard_normal((n, d))
    if correlated:
        if not 0.0 <= correlation < 1.0:
            raise ValueError(f"correlation must be in [0, 1), got {correlation}")
        r = (1 - correlation) * np.eye(d) + correlation * np.ones((d, d))
        z = z @ np.linalg.cholesky(r).T
    x = z * scales
    w_true = rng.standard_normal(d)
    y = x @ w_true + noise * rng.standard_normal(n)
    return x, y, w_true


def _standardize(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / x.std(0)


def _whitened(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(PCA, ZCA)`` whitening of ``x`` from one eigendecomposition of its covariance; ``ValueError``
    unless every feature varies and the centered features have full rank."""
    n, d = x.shape
    if n < 2:
        raise ValueError(f"X: standardizing and whitening need at least 2 samples, got {n}")
    if not np.isfinite(x).all():
        raise ValueError("X: contains NaN or infinite values")
    constant = np.flatnonzero(x.std(0) == 0).tolist()
    if constant:
        raise ValueError(
            f"X: feature(s) {constant} are constant, so they cannot be standardized or whitened; drop "
            "them (an intercept column is not needed: centering removes it)"
        )
    xc = x - x.mean(0)
    lam, u = np.linalg.eigh(xc.T @ xc / n)
    floor = d * np.finfo(np.float64).eps * lam[-1]
    if lam[0] <= floor:
        raise ValueError(
            f"X: the centered features have rank {int(np.sum(lam > floor))} < d = {d} (collinear features, "
            "or fewer samples than features), so whitening is undefined; drop the redundant features"
        )
    pca = xc @ u / np.sqrt(lam)
    return pca, pca @ u.T


def least_squares_conditioning(X: Tensor | np.ndarray) -> dict[str, CovarianceStats]:
    """Spectrum of the Hessian H = XᵀX/N of L(w) = ‖Xw − y‖²/2N for the features ``"raw"``,
    ``"standardized"`` (per feature zero mean, unit variance — what BN does), ``"pca"`` (Λ^{-1/2}Uᵀ(x − μ))
    and ``"zca"`` (UΛ^{-1/2}Uᵀ(x − μ)) — whitening, what DBN does (LeCun et al. 1998; Huang et al. 2018).

    Standardization makes diag H = 1, which cures a diagonal scaling (κ → ~1) but not correlation
    (κ(H) = κ(correlation matrix)); whitening gives H = I (κ = 1) for any full-rank X.
    ``ValueError`` for X that cannot be standardized or whitened: fewer than two samples, a value that
    is not finite, a constant feature (an intercept column: centering already removes it), or centered
    features of rank < d.
    """
    x = _as_matrix(X).cpu().numpy()
    pca, zca = _whitened(x)  # its checks first
    variants = {"raw": x, "standardized": _standardize(x), "pca": pca, "zca": zca}
    return {
        name: covariance_spectrum(v, center=False, layer=name, probe="least_squares_conditioning")
        for name, v in variants.items()
    }


@dataclass(frozen=True)
class GDRun:
    """Gradient descent on least squares: ``iterations`` until the relative excess loss ≤ ``tol``."""

    iterations: int
    converged: bool
    relative_excess_loss: float
    condition_number: float

    def to_records(self) -> list[dict[str, Any]]:
        base = {"probe": "gd_iterations_to_tolerance", "layer": "all"}
        return [
            {**base, "metric": m, "value": float(getattr(self, m))}
            for m in ("iterations", "converged", "relative_excess_loss", "condition_number")
        ]


def gd_iterations_to_tolerance(
    X: Tensor | np.ndarray, y: Tensor | np.ndarray, *, tol: float = 1e-6, max_iter: int = 100_000
) -> GDRun:
    """Gradient descent w ← w − (1/λ_max) ∇L(w) on L(w) = ‖Xw − y‖²/2N from w = 0, counting steps until
    (L(w) − L*)/(L(0) − L*) ≤ ``tol``.

    The error along eigenvector i contracts by (1 − λᵢ/λ_max) per step, so the count is at most
    about (κ/2)·ln(1/tol) with κ = λ_max/λ_min of H = XᵀX/N (Nesterov 2004, Thm. 2.1.15): the worst
    case, reached when the error sits on λ_min's eigenvector; ``condition_number`` is κ, ``inf`` for
    a singular H (the module docstring's rank tolerance).
    """
    x = _as_matrix(X).cpu().numpy()
    y = torch.as_tensor(y).detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y: expected {x.shape[0]} targets, got {y.shape[0]}")
    if not 0 < tol < 1:
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    n = x.shape[0]
    h = x.T @ x / n
    b = x.T @ y / n
    spectrum = spectrum_stats(h, n_samples=n, eps=data_eps(X))
    kappa = spectrum.condition_number  # inf when singular
    w_star = np.linalg.lstsq(x, y, rcond=None)[0]

    def excess(w: np.ndarray) -> float:
        e = w - w_star
        return float(e @ h @ e) / 2

    w = np.zeros(x.shape[1])
    start = excess(w)
    if start == 0.0:
        return GDRun(0, True, 0.0, kappa)
    step = 1.0 / spectrum.eigenvalues[0]
    for k in range(1, max_iter + 1):
        w = w - step * (h @ w - b)
        rel = excess(w) / start
        if rel <= tol:
            return GDRun(k, True, rel, kappa)
    return GDRun(max_iter, False, rel, kappa)
