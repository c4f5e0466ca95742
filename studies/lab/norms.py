"""The normalization zoo: one registry, one constructor signature.

Every layer is built as ``make_norm(name, num_features, **options)`` and takes inputs of shape
``(N, C)``, ``(N, C, L)`` or ``(N, C, H, W)``; ``C == num_features``. All of them are plain
differentiable torch code, so double backward and ``torch.func`` transforms work through each.

Batch-dependent layers (``bn``, ``noisy_bn``, ``lp_bn``, ``dbn``, ``iternorm``) follow
``torch.nn.BatchNorm``'s conventions exactly, so probes treat them and torch's own layers alike:

* the attributes ``track_running_stats``, ``momentum``, ``eps`` and the buffer ``num_batches_tracked``;
* batch statistics are used when ``training or not track_running_stats``;
* running statistics are updated (in place, without gradient) only when ``training and track_running_stats``.

Setting ``track_running_stats = False`` on a module in train mode therefore gives the statistics-free
batch norm that the probes' ``bn="batch"`` mode needs.

Weight normalization is not an activation transform: ``make_norm("wn", C)`` is the identity, and its
``wrap_layer(layer)`` re-parameterizes the preceding linear/conv layer. Every norm has ``wrap_layer``
(the identity for all others), so a network builder never special-cases a norm by name.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from probes.conditioning import iternorm_whitening


def _stat_dims(x: Tensor) -> tuple[int, ...]:
    """The batch and spatial dimensions of an ``(N, C, *)`` input: all but the channel dimension."""
    if x.dim() < 2:
        raise ValueError(f"norm input must have shape (N, C, *), got shape {tuple(x.shape)}")
    return (0, *range(2, x.dim()))


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-channel vector ``(C,)`` to broadcast against ``x`` of shape ``(N, C, *)``."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


class Norm(nn.Module):
    """Base of every zoo layer: ``Norm(num_features, **options)`` acting on ``(N, C, *)``."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.num_features = num_features

    def wrap_layer(self, layer: nn.Module) -> nn.Module:
        """The layer that precedes this norm, possibly re-parameterized (weight normalization)."""
        return layer

    def _check_channels(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} expects input (N, {self.num_features}, *), got shape {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return f"{self.num_features}"


class NoNorm(Norm):
    """``none``: the identity, so that "no normalization" is one more name in the registry."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return x


class _Affine(Norm):
    """Per-channel scale ``weight`` (init 1) and shift ``bias`` (init 0) when ``affine``."""

    def __init__(self, num_features: int, *, affine: bool = True) -> None:
        super().__init__(num_features)
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def _affine(self, y: Tensor) -> Tensor:
        if not self.affine:
            return y
        return y * _channel_view(self.weight, y) + _channel_view(self.bias, y)


class BatchStatNorm(_Affine):
    """Shared bookkeeping of the batch-dependent norms (torch.nn.BatchNorm's conventions)."""

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_features, affine=affine)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None (a cumulative average), got {momentum}")
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @property
    def uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    @property
    def updates_running_stats(self) -> bool:
        return self.training and self.track_running_stats

    def _update(self, running: Tensor, batch_value: Tensor) -> None:
        """running ← (1 − momentum)·running + momentum·batch_value, in place and outside autograd.

        ``momentum=None`` is torch's cumulative moving average: the factor is 1/t at the t-th batch
        (``num_batches_tracked`` is counted after the updates, so t = num_batches_tracked + 1).
        """
        factor = self.momentum if self.momentum is not None else 1.0 / (int(self.num_batches_tracked) + 1)
        with torch.no_grad():
            running.lerp_(batch_value.detach().to(running.dtype), factor)

    def _count_batch(self) -> None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)

    def _check_batch(self, x: Tensor) -> None:
        self._check_channels(x)
        if self.uses_batch_stats and x.numel() // x.shape[1] < 2:
            raise ValueError(
                f"{type(self).__name__} with batch statistics needs more than one value per channel, "
                f"got input shape {tuple(x.shape)}"
            )


class BatchNorm(BatchStatNorm):
    """``bn`` — Ioffe & Szegedy 2015: y = γ (x − μ_B) / √(σ²_B + ε) + β per channel.

    μ_B, σ²_B are the mean and biased variance over the batch and spatial dimensions; the running
    variance is updated with the unbiased estimate, exactly as ``torch.nn.BatchNorm{1,2}d``.
    """

    def __init__(self, num_features: int, **options) -> None:
        super().__init__(num_features, **options)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        self._check_batch(x)
        dims = _stat_dims(x)
        if self.uses_batch_stats:
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            if self.updates_running_stats:
                n = x.numel() // x.shape[1]
                self._update(self.running_mean, mean)
                self._update(self.running_var, var * (n / (n - 1)))
                self._count_batch()
        else:
            mean, var = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        y = (x - _channel_view(mean, x)) * _channel_view(torch.rsqrt(var + self.eps), x)
        return self._affine(y)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(at_most, n) + 1) if n % d == 0)


class GroupNorm(_Affine):
    """``gn`` — Wu & He 2018: normalize each sample over groups of C/G channels (and all positions).

    ``groups=1`` is layer normalization over (C, *); ``groups=C`` is instance normalization.
    """

    def __init__(self, num_features: int, *, groups: int = 8, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, affine=affine)
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        # Fall back to the largest divisor of C not above `groups`, so narrow layers still build.
        self.groups = _largest_divisor(num_features, groups)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        self._check_channels(x)
        n = x.shape[0]
        xg = x.reshape(n, self.groups, -1)  # (N, G, C/G · spatial)
        if xg.shape[-1] < 2:  # x − mean = 0: the output would be the bias, whatever the input
            raise ValueError(
                f"{type(self).__name__} with {self.groups} groups normalizes over single values on input "
                f"shape {tuple(x.shape)} (C/G × positions = 1), so its output would not depend on the "
                f"input; use fewer groups, wider layers or inputs with positions"
            )
        var, mean = torch.var_mean(xg, dim=-1, keepdim=True, correction=0)
        y = ((xg - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        return self._affine(y)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}"


class LayerNorm(GroupNorm):
    """``ln`` — Ba et al. 2016: normalize each sample over all its features (C and positions)."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, groups=1, eps=eps, affine=affine)


class InstanceNorm(GroupNorm):
    """``in`` — Ulyanov et al. 2016: normalize each (sample, channel) over its spatial positions.

    Defined only for inputs with positions, ``(N, C, L)`` or ``(N, C, H, W)``.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, groups=num_features, eps=eps, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3:
            raise ValueError(
                f"instance norm ('in') normalizes over spatial positions and needs input (N, C, L) or "
                f"(N, C, H, W); got shape {tuple(x.shape)}"
            )
        return super().forward(x)


# ---------------------------------------------------------------------------------------------------
# Spectral matrix function Σ ↦ Σ^{-1/2} with Daleckii–Krein derivatives (finite at repeated eigenvalues)
# ---------------------------------------------------------------------------------------------------


def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.mT)


def _first_divided_difference(lam: Tensor) -> Tensor:
    """F1_ij = f[λi, λj] for f(λ) = λ^{-1/2}: (f(λi) − f(λj))/(λi − λj), f'(λ) on ties.

    The closed form −1/(√λi √λj (√λi + √λj)) equals the quotient for λi ≠ λj and its limit
    f'(λ) = −λ^{-3/2}/2 for λi = λj, with no division by λi − λj: exact at (near-)ties, so no
    tie tolerance is needed.
    """
    r = lam.sqrt()
    ri, rj = r[..., :, None], r[..., None, :]
    return -1.0 / (ri * rj * (ri + rj))  # (..., n, n)


def _second_divided_difference(lam: Tensor) -> Tensor:
    """F2_ikj = f[λi, λk, λj] for f(λ) = λ^{-1/2}, in the closed form that is exact at ties.

    (a + b + c) / (√λa √λb √λc (a+b)(a+c)(b+c)) with a = √λi, b = √λk, c = √λj; at a triple tie it is
    f''(λ)/2 = 3/8 λ^{-5/2}, at a double tie (f'(a) − F1(a, b))/(a − b).
    """
    r = lam.sqrt()
    a, b, c = r[..., :, None, None], r[..., None, :, None], r[..., None, None, :]
    return (a + b + c) / (a * b * c * (a + b) * (a + c) * (b + c))  # (..., n, n, n)


def _dk_first(u: Tensor, f1: Tensor, g: Tensor) -> Tensor:
    """Daleckii–Krein: Df(Σ)[G] = U (F1 ∘ (Uᵀ sym(G) U)) Uᵀ (self-adjoint in G)."""
    gt = u.mT @ _sym(g) @ u
    return u @ (f1 * gt) @ u.mT


def _dk_second(u: Tensor, f2: Tensor, g: Tensor, e: Tensor) -> Tensor:
    """Second-order Daleckii–Krein: D²f(Σ)[G, E] = U (Σ_k F2_ikj (G̃_ik Ẽ_kj + Ẽ_ik G̃_kj)) Uᵀ.

    Symmetric in (G, E) and self-adjoint in each, so it is also the adjoint used by double backward.
    """
    gt = u.mT @ _sym(g) @ u
    et = u.mT @ _sym(e) @ u
    m = torch.einsum("...ikj,...ik,...kj->...ij", f2, gt, et)
    return u @ (m + m.mT) @ u.mT  # the second term is the transpose of the first (F2, G̃, Ẽ symmetric)


def _eigh_positive(s: Tensor, floor: float | None) -> tuple[Tensor, Tensor]:
    lam, u = torch.linalg.eigh(_sym(s))
    return lam.clamp_min(torch.finfo(lam.dtype).tiny if floor is None else floor), u


class _NoThirdOrder(torch.autograd.Function):
    """Identity on (grad_Σ, grad_G) that depends on (G, H) and raises if differentiated: third
    derivatives of Σ^{-1/2} are not implemented (``once_differentiable`` misses the saved G)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_s: Tensor, grad_g: Tensor, g: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        return grad_s.clone(), grad_g.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *_grads):
        raise RuntimeError("third derivatives of inv_sqrt_psd (dbn, ZCA) are not implemented")

    @staticmethod
    def jvp(ctx, *_tangents):
        raise RuntimeError("third derivatives of inv_sqrt_psd (dbn, ZCA) are not implemented")


class _Tied(torch.autograd.Function):
    """G itself, made to depend on Σ (with a zero derivative): the backward Df(Σ)[G] built with
    ``create_graph`` then always reaches :class:`_NoThirdOrder`'s guard, which checks G and H, even when
    only Σ carries a graph."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g: Tensor, s: Tensor) -> Tensor:
        return g.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, torch.zeros_like(grad)

    @staticmethod
    def jvp(ctx, dg: Tensor | None, _ds: Tensor | None) -> Tensor | None:
        return dg


class _InvSqrtBackward(torch.autograd.Function):
    """(Σ, G) ↦ Df(Σ)[G], the backward of :class:`_InvSqrt`; differentiable once more (in Σ and G)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(s: Tensor, g: Tensor, lam: Tensor, u: Tensor) -> Tensor:
        return _dk_first(u, _first_divided_difference(lam), g)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, g, lam, u = inputs
        ctx.save_for_backward(g, lam, u)
        ctx.save_for_forward(g, lam, u)

    @staticmethod
    def backward(ctx, h: Tensor):
        g, lam, u = ctx.saved_tensors
        with torch.no_grad():
            grad_s = _dk_second(u, _second_divided_difference(lam), g, h)
            grad_g = _dk_first(u, _first_divided_difference(lam), h)
        if torch.is_grad_enabled() and (g.requires_grad or h.requires_grad):
            grad_s, grad_g = _NoThirdOrder.apply(grad_s, grad_g, g, h)
        return grad_s, grad_g, None, None

    @staticmethod
    def jvp(ctx, ds: Tensor | None, dg: Tensor | None, _dlam, _du) -> Tensor:
        g, lam, u = ctx.saved_tensors
        out = torch.zeros_like(g)
        if dg is not None:
            out = out + _dk_first(u, _first_divided_difference(lam), dg)
        if ds is not None:
            out = out + _dk_second(u, _second_divided_difference(lam), g, ds)
        return out


class _InvSqrt(torch.autograd.Function):
    """Σ ↦ Σ^{-1/2} = U Λ^{-1/2} Uᵀ of sym(Σ); returns (Σ^{-1/2}, λ, U), the last two non-differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(s: Tensor, floor: float | None) -> tuple[Tensor, Tensor, Tensor]:
        lam, u = _eigh_positive(s, floor)
        return (u * lam.rsqrt()[..., None, :]) @ u.mT, lam, u

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        s, _ = inputs
        _, lam, u = output
        ctx.mark_non_differentiable(lam, u)
        ctx.save_for_backward(s, lam, u)
        ctx.save_for_forward(s, lam, u)

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_lam, _grad_u) -> tuple[Tensor, None]:
        s, lam, u = ctx.saved_tensors
        if torch.is_grad_enabled() and s.requires_grad:  # a graph for higher derivatives
            grad_y = _Tied.apply(grad_y, s)
        return _InvSqrtBackward.apply(s, grad_y, lam, u), None

    @staticmethod
    def jvp(ctx, ds: Tensor, _dfloor):
        s, lam, u = ctx.saved_tensors
        return _InvSqrtBackward.apply(s, ds, lam, u), None, None


def inv_sqrt_psd(sigma: Tensor, *, floor: float | None = None) -> Tensor:
    """Σ^{-1/2} of a (batch of) symmetric positive definite matrices, ``(..., n, n)``.

    Eigenvalues below ``floor`` (default: the dtype's smallest normal number) are raised to it. A
    covariance plus εI has none below ε, but in float32 ``eigh`` of a nearly rank-deficient one returns
    some below ε, even negative (−1.5e-6 for ε = 1e-5): 1/√λ then explodes (1e13) where the exact
    value is at most ε^{-1/2}. Pass ``floor=ε`` to put those rounding errors back on their bound.

    Spectral matrix function f(Σ) = U f(Λ) Uᵀ with f(λ) = λ^{-1/2}. Its derivatives follow the
    Daleckii–Krein formulas (Bhatia, *Matrix Analysis*, §V.3): Df(Σ)[E] = U (F1 ∘ Uᵀ E U) Uᵀ and
    D²f(Σ)[G, E] = U (Σ_k F2_ikj (G̃_ik Ẽ_kj + Ẽ_ik G̃_kj)) Uᵀ with first and second divided differences
    F1, F2 of f; in closed form for λ^{-1/2}, so they stay exact (finite) at repeated eigenvalues,
    unlike ``torch.linalg.eigh``'s backward, which divides by λi − λj. Supports backward, double
    backward (third order raises a RuntimeError), forward mode (``jvp``) and ``torch.func`` (grad,
    jacrev, jacfwd, hessian, vmap).
    Only sym(Σ) = (Σ + Σᵀ)/2 is read, so gradients are exact for any square input.
    """
    return _InvSqrt.apply(sigma, floor)[0]


class _Whitening(BatchStatNorm):
    """Shared group whitening: per group of g channels, y = W (x − μ) with W a whitening matrix of
    Σ = X Xᵀ/m + εI (X the centered ``(g, m)`` group, m = N·spatial); running mean and running W."""

    def __init__(self, num_features: int, *, group_size: int = 16, **options) -> None:
        super().__init__(num_features, **options)
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        self.group_size = _largest_divisor(num_features, group_size)
        groups = num_features // self.group_size
        self.register_buffer("running_mean", torch.zeros(num_features))
        eye = torch.eye(self.group_size).expand(groups, -1, -1).clone()
        self.register_buffer("running_whitening", eye)  # (G, g, g)

    def _whitening_matrix(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        self._check_batch(x)
        c, g = self.num_features, self.group_size
        xt = x.transpose(0, 1)  # (C, N, *spatial)
        xc = xt.reshape(c, -1)  # (C, m)
        m = xc.shape[1]
        if self.uses_batch_stats:
            mean = xc.mean(dim=1)
            xg = (xc - mean[:, None]).reshape(c // g, g, m)  # (G, g, m)
            eye = torch.eye(g, dtype=x.dtype, device=x.device)
            sigma = xg @ xg.mT / m + self.eps * eye  # (G, g, g)
            w = self._whitening_matrix(sigma)
            if self.updates_running_stats:
                self._update(self.running_mean, mean)
                self._update(self.running_whitening, w)
                self._count_batch()
        else:
            mean = self.running_mean.to(x.dtype)
            w = self.running_whitening.to(x.dtype)
            xg = (xc - mean[:, None]).reshape(c // g, g, m)
        y = (w @ xg).reshape(xt.shape).transpose(0, 1)  # (N, C, *spatial)
        return self._affine(y)

    def extra_repr(self) -> str:
        return f"{self.num_features}, group_size={self.group_size}"


class DecorrelatedBatchNorm(_Whitening):
    """``dbn`` — Huang et al. 2018, *Decorrelated Batch Normalization*: y = γ ∘ (Σ^{-1/2} (x − μ_B)) + β.

    Per group of ``group_size`` channels (default 16; the largest divisor of C not above it, as in
    GroupNorm), Σ = X Xᵀ/m + εI over the m = N·spatial centered values.
    ``whitening="zca"`` (default): W = Σ^{-1/2} = U Λ^{-1/2} Uᵀ via :func:`inv_sqrt_psd`, whose
    gradients are finite and exact at repeated eigenvalues (already-white or rank-deficient inputs).
    ``whitening="pca"``: W = Λ^{-1/2} Uᵀ, eigenvalues in descending order and each eigenvector signed
    so that its largest-magnitude entry is positive. Its gradient goes through ``torch.linalg.eigh``'s
    autograd, which divides by λi − λj: unstable (inf/nan) at repeated eigenvalues.
    Eval mode uses the running mean and the running (momentum-averaged) whitening matrix. Where the
    whitened input is (nearly) rank-deficient — more channels than the layer below can span, e.g. a
    first conv from 1 to 8 channels — Σ^{-1/2} amplifies the null directions by up to ε^{-1/2} ≈ 316,
    and an average of whitening matrices over a moving network need not whiten the final one: the
    ``norm_zoo`` quick preset measured test accuracy near chance in eval mode (0.11 for the VGG) against
    0.85 with batch statistics. Compare DBN networks with batch statistics too, or re-estimate the
    running statistics at the final weights.
    """

    def __init__(self, num_features: int, *, whitening: str = "zca", **options) -> None:
        super().__init__(num_features, **options)
        if whitening not in ("zca", "pca"):
            raise ValueError(f"whitening must be 'zca' or 'pca', got {whitening!r}")
        self.whitening = whitening

    def _whitening_matrix(self, sigma: Tensor) -> Tensor:
        if self.whitening == "zca":
            return inv_sqrt_psd(sigma, floor=self.eps)  # Σ ⪰ εI: anything below ε is float rounding
        lam, u = torch.linalg.eigh(sigma)
        lam, u = lam.flip(-1).clamp_min(self.eps), u.flip(-1)  # descending eigenvalues, ≥ ε as above
        idx = u.detach().abs().argmax(dim=-2, keepdim=True)  # (G, 1, g)
        sign = torch.sign(torch.gather(u.detach(), -2, idx))
        u = u * torch.where(sign == 0, torch.ones_like(sign), sign)
        return lam.rsqrt()[..., :, None] * u.mT  # Λ^{-1/2} Uᵀ

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, whitening={self.whitening!r}"


class IterNorm(_Whitening):
    """``iternorm`` — Huang et al. 2019, *Iterative Normalization*: Newton–Schulz whitening.

    Per group, Σ_N = Σ/tr(Σ), P_0 = I, P_k = ½(3 P_{k−1} − P_{k−1}³ Σ_N) for k = 1..T
    (T = ``iterations``, default 5), and W = P_T / √tr(Σ) ≈ Σ^{-1/2}; y = γ ∘ W (x − μ_B) + β.
    Plain torch ops; running mean and running W for eval.

    The iterates are computed in the coupled form, stable for any T
    (:func:`probes.conditioning.iternorm_whitening`).
    """

    def __init__(self, num_features: int, *, iterations: int = 5, **options) -> None:
        super().__init__(num_features, **options)
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive int, got {iterations!r}")
        self.iterations = iterations

    def _whitening_matrix(self, sigma: Tensor) -> Tensor:
        return iternorm_whitening(sigma, self.iterations)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, iterations={self.iterations}"


class WeightNormalized(nn.Module):
    """A linear/conv layer re-parameterized as W = g · V/‖V‖ (Salimans & Kingma 2016).

    ‖V‖ is taken per output unit over all other dimensions. Parameters ``weight_v`` (init: the layer's
    weight), ``weight_g`` (init ‖V‖, so the initial function is unchanged) and the layer's ``bias``.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if type(layer) not in (nn.Linear, nn.Conv1d, nn.Conv2d):
            raise TypeError(
                f"weight normalization wraps nn.Linear, nn.Conv1d or nn.Conv2d, got {type(layer).__name__}"
            )
        if isinstance(layer, nn.Conv1d | nn.Conv2d):
            if layer.padding_mode != "zeros":
                raise ValueError(
                    f"padding_mode must be 'zeros' for weight normalization, got {layer.padding_mode!r}"
                )
            self._conv = {k: getattr(layer, k) for k in ("stride", "padding", "dilation", "groups")}
        else:
            self._conv = None
        self.kind = type(layer).__name__
        v = layer.weight.detach().clone()
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.flatten(1).norm(dim=1))
        self.bias = layer.bias

    @property
    def weight(self) -> Tensor:
        """W = g · V/‖V‖, per output unit."""
        v = self.weight_v
        scale = self.weight_g / v.flatten(1).norm(dim=1)  # (out,)
        return v * scale.view(-1, *([1] * (v.dim() - 1)))

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "Linear":
            return F.linear(x, self.weight, self.bias)
        conv = F.conv1d if self.kind == "Conv1d" else F.conv2d
        return conv(x, self.weight, self.bias, **self._conv)

    def extra_repr(self) -> str:
        return f"{self.kind}{tuple(self.weight_v.shape)}"


class WeightNorm(Norm):
    """``wn`` — Salimans & Kingma 2016, *Weight Normalization*: W = g · V/‖V‖ on the preceding layer.

    The identity on activations; :meth:`wrap_layer` returns the re-parameterized linear/conv layer.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def wrap_layer(self, layer: nn.Module) -> nn.Module:
        """``layer`` (nn.Linear, nn.Conv1d, nn.Conv2d) as :class:`WeightNormalized`; TypeError otherwise."""
        return WeightNormalized(layer)


class TimeVaryingNoise(nn.Module):
    """Santurkar et al. 2018 §2.1: i.i.d. noise of non-zero mean and non-unit variance whose
    distribution changes at every training step (our reading of their "noisy BatchNorm").

    At each training forward, per channel c: μ_c ~ U(−n_μ, n_μ) and σ_c ~ U(1, n_σ)
    (n_μ = ``noise_mean``, n_σ = ``noise_scale``); then per element
    y = s ∘ x + b with s ~ N(σ_c, ρ²), b ~ N(μ_c, ρ²) i.i.d. (ρ = ``noise_std``). The identity in eval
    mode. Draws from the global torch RNG, so seeded runs reproduce. It deliberately has no
    ``track_running_stats`` attribute: probes put it in eval mode to switch the noise off.
    """

    def __init__(
        self, num_features: int, *, noise_mean: float = 1.0, noise_scale: float = 2.0, noise_std: float = 0.1
    ) -> None:
        super().__init__()
        if noise_mean < 0:
            raise ValueError(f"noise_mean must be >= 0, got {noise_mean}")
        if noise_scale < 1:
            raise ValueError(f"noise_scale must be >= 1, got {noise_scale}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.num_features = num_features
        self.noise_mean, self.noise_scale, self.noise_std = noise_mean, noise_scale, noise_std

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        c = x.shape[1]
        opts = {"dtype": x.dtype, "device": x.device}
        mu = (2 * torch.rand(c, **opts) - 1) * self.noise_mean  # U(−n_μ, n_μ)
        sigma = 1 + torch.rand(c, **opts) * (self.noise_scale - 1)  # U(1, n_σ)
        scale = _channel_view(sigma, x) + self.noise_std * torch.randn(x.shape, **opts)
        shift = _channel_view(mu, x) + self.noise_std * torch.randn(x.shape, **opts)
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"noise_mean={self.noise_mean}, noise_scale={self.noise_scale}, noise_std={self.noise_std}"


class Noise(Norm):
    """``noise`` — the time-varying noise of :class:`TimeVaryingNoise` alone (the no-BN control)."""

    def __init__(self, num_features: int, **noise_options) -> None:
        super().__init__(num_features)
        self.noise = TimeVaryingNoise(num_features, **noise_options)

    def forward(self, x: Tensor) -> Tensor:
        self._check_channels(x)
        return self.noise(x)


class NoisyBatchNorm(BatchNorm):
    """``noisy_bn`` — Santurkar et al. 2018 §2.1: BN followed by :class:`TimeVaryingNoise`.

    Options: BN's (``eps``, ``momentum``, ``affine``, ``track_running_stats``) and the noise's
    (``noise_mean`` = 1.0, ``noise_scale`` = 2.0, ``noise_std`` = 0.1). The noise is applied after the
    affine transform and is off in eval mode.
    """

    def __init__(
        self,
        num_features: int,
        *,
        noise_mean: float = 1.0,
        noise_scale: float = 2.0,
        noise_std: float = 0.1,
        **options,
    ) -> None:
        super().__init__(num_features, **options)
        self.noise = TimeVaryingNoise(
            num_features, noise_mean=noise_mean, noise_scale=noise_scale, noise_std=noise_std
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.noise(super().forward(x))


class LpBatchNorm(BatchStatNorm):
    """``lp_bn`` — Santurkar et al. 2018 §3.3: BN with the ℓp scale of the centered batch.

    y = γ (x − μ_B)/s_p + β per channel, μ_B the batch mean and, over the m = N·spatial values,
    p = 1: s_1 = mean|x − μ_B| + ε;  p = 2: s_2 = √(mean (x − μ_B)² + ε) (``bn`` in training; in eval
    its running scale averages the biased batch scale, where ``bn`` keeps the unbiased variance);
    p = inf: s_∞ = max|x − μ_B| + ε.  Option ``p`` in {1, 2, inf} (default 1; ``"inf"`` accepted).
    Running mean and running scale (momentum average of the ε-free batch scale) are used in eval.
    """

    def __init__(self, num_features: int, *, p: float | str = 1, **options) -> None:
        super().__init__(num_features, **options)
        if isinstance(p, str):  # "1", "2", "inf" (e.g. from the command line's --set)
            try:
                p = float(p)
            except ValueError:
                raise ValueError(f"p must be 1, 2 or inf, got {p!r}") from None
        if p not in (1, 2, float("inf")):
            raise ValueError(f"p must be 1, 2 or inf, got {p!r}")
        self.p = p
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_scale", torch.ones(num_features))

    def _inv_scale(self, scale: Tensor) -> Tensor:
        if self.p == 2:
            return torch.rsqrt(scale.square() + self.eps)
        return 1.0 / (scale + self.eps)

    def forward(self, x: Tensor) -> Tensor:
        self._check_batch(x)
        dims = _stat_dims(x)
        if self.uses_batch_stats:
            mean = x.mean(dim=dims)
            xc = x - _channel_view(mean, x)
            if self.p == 1:
                scale = xc.abs().mean(dim=dims)
            elif self.p == 2:
                scale = xc.square().mean(dim=dims).sqrt()
            else:
                scale = xc.abs().amax(dim=dims)
            if self.updates_running_stats:
                self._update(self.running_mean, mean)
                self._update(self.running_scale, scale)
                self._count_batch()
            if self.p == 2:  # √(var + ε) without √0 in the graph
                inv = torch.rsqrt(xc.square().mean(dim=dims) + self.eps)
            else:
                inv = self._inv_scale(scale)
        else:
            mean = self.running_mean.to(x.dtype)
            xc = x - _channel_view(mean, x)
            inv = self._inv_scale(self.running_scale.to(x.dtype))
        return self._affine(xc * _channel_view(inv, x))

    def extra_repr(self) -> str:
        return f"{self.num_features}, p={self.p}"


NORMS: dict[str, Callable[..., nn.Module]] = {
    "none": NoNorm,
    "bn": BatchNorm,
    "ln": LayerNorm,
    "gn": partial(GroupNorm, groups=8),
    "in": InstanceNorm,
    "dbn": DecorrelatedBatchNorm,
    "iternorm": IterNorm,
    "wn": WeightNorm,
    "noisy_bn": NoisyBatchNorm,
    "noise": Noise,
    "lp_bn": LpBatchNorm,
}

#: Norms that normalize over spatial positions only and are undefined on ``(N, C)`` inputs.
NEEDS_POSITIONS = frozenset({"in"})


def make_norm(name: str, num_features: int, **options) -> nn.Module:
    """Build the norm layer registered as ``name`` for ``num_features`` channels.

    >>> make_norm("gn", 64, groups=16)
    GroupNorm(64, groups=16)
    """
    try:
        factory = NORMS[name]
    except KeyError:
        raise KeyError(f"unknown norm {name!r}; known norms: {', '.join(NORMS)}") from None
    return factory(num_features, **options)
