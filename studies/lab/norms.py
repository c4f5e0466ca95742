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

    def __init__(self, num_features: int, **_ignored) -> None:
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
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_features, affine=affine)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
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
        """running ← (1 − momentum)·running + momentum·batch_value, in place and outside autograd."""
        with torch.no_grad():
            running.lerp_(batch_value.detach().to(running.dtype), self.momentum)

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


class GroupNorm(_Affine):
    """``gn`` — Wu & He 2018: normalize each sample over groups of C/G channels (and all positions).

    ``groups=1`` is layer normalization over (C, *); ``groups=C`` is instance normalization.
    """

    def __init__(self, num_features: int, *, groups: int = 8, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, affine=affine)
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        # Fall back to the largest divisor of C not above `groups`, so narrow layers still build.
        self.groups = max(g for g in range(1, min(groups, num_features) + 1) if num_features % g == 0)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        self._check_channels(x)
        n = x.shape[0]
        xg = x.reshape(n, self.groups, -1)  # (N, G, C/G · spatial)
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


NORMS: dict[str, Callable[..., nn.Module]] = {
    "none": NoNorm,
    "bn": BatchNorm,
    "ln": LayerNorm,
    "gn": partial(GroupNorm, groups=8),
    "in": InstanceNorm,
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
