"""The tiny float64 cases every probe is checked on (curvlinops' ``test/cases.py`` habit).

Each factory returns a fresh :class:`Case` (fixed seeds, ≤ 75 parameters, so an explicit Hessian by
``torch.func.hessian`` costs well under a second). Names are ``<arch>-<norm>[-<bn mode>]``; BN nets
appear twice: ``bn="batch"`` (the training loss) and ``bn="running"`` with non-trivial running statistics.
``saddle`` has a known spectrum whose most negative eigenvalue dominates in magnitude.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from probes.functional import functional_loss, is_batch_dependent
from studies.lab.nets import make_net

NUM_CLASSES = 3
IN_SHAPES = {"mlp": (3,), "vgg": (1, 4, 4)}
WIDTHS = {"mlp": 4, "vgg": 2}
NORMS = ("none", "bn", "ln", "gn", "dbn", "iternorm", "wn")


@dataclass
class Case:
    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    batches: list[tuple[Tensor, Tensor]]
    bn: str = "batch"
    eigenvalues: np.ndarray | None = None  # the exact Hessian spectrum (ascending) where known


def make_batch(arch: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` float64 inputs of the arch's shape and integer class targets, from a local generator."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *IN_SHAPES[arch], generator=gen, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    return x, y


def tiny_net(arch: str, norm: str, *, seed: int = 0) -> nn.Module:
    """A depth-2 ``arch`` with ``norm``, float64, tanh (smooth, so the Hessian has no kinks), train mode."""
    torch.manual_seed(seed)
    net = make_net(
        arch,
        norm=norm,
        in_shape=IN_SHAPES[arch],
        num_classes=NUM_CLASSES,
        depth=2,
        width=WIDTHS[arch],
        activation="tanh",
        # gn's default 8 groups on 4 units are groups of one value: an output independent of the input
        **({"norm_options": {"groups": 2}} if norm == "gn" else {}),
    )
    net = net.double().train()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move affine params off their init (1, 0) so their Hessian blocks are generic
        for name, p in net.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


def set_running_stats(net: nn.Module, seed: int = 2) -> nn.Module:
    """Non-trivial running statistics (means ≠ 0, variances ≠ 1) in every batch-dependent layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if is_batch_dependent(m) and hasattr(m, "running_mean"):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64))
                m.num_batches_tracked.fill_(7)
    return net


def net_case(arch: str, norm: str, bn: str = "batch", *, n: int = 8) -> Case:
    net = tiny_net(arch, norm)
    if bn == "running":
        set_running_stats(net)
    return Case(net, F.cross_entropy, [make_batch(arch, n, seed=10)], bn)


class Saddle(nn.Module):
    """out = x Wᵀ with W ∈ ℝ^{d×d}; with :func:`saddle_loss` L(W) = ½ mean_n Σ_i D_i (W xₙ)_i².

    H = D ⊗ S with S = XᵀX/N, so its eigenvalues are the products D_i s_j: with D = diag(−10, 1, …)
    the most negative, −10 s_max, is 10× larger in magnitude than the largest positive.
    """

    def __init__(self, d: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.weight = nn.Parameter(torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T


def saddle_loss(out: Tensor, target: Tensor) -> Tensor:
    """½ mean_n Σ_i target_{n,i} out_{n,i}² (target carries the curvatures D)."""
    return 0.5 * (target * out**2).sum(1).mean()


def saddle_case(d: int = 6, n: int = 10) -> Case:
    gen = torch.Generator().manual_seed(4)
    curvatures = torch.tensor([-10.0, 1.0, 0.7, 0.5, 0.3, 0.1][:d], dtype=torch.float64)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    s = torch.linalg.eigvalsh(x.T @ x / n)
    eigenvalues = np.sort(torch.outer(curvatures, s).flatten().numpy())
    return Case(Saddle(d), saddle_loss, [(x, curvatures.expand(n, d))], "batch", eigenvalues)


CASES: dict[str, Callable[[], Case]] = {}
for _arch in ("mlp", "vgg"):
    for _norm in NORMS:
        CASES[f"{_arch}-{_norm}"] = partial(net_case, _arch, _norm)
    CASES[f"{_arch}-bn-running"] = partial(net_case, _arch, "bn", "running")
CASES["saddle"] = saddle_case


def explicit_hessian(model: nn.Module, loss_fn, batches, **kw) -> Tensor:
    """The reference: ``torch.func.hessian`` of the functional loss, as a dense matrix."""
    f, theta = functional_loss(model, loss_fn, batches, **kw)
    return torch.func.hessian(f)(theta)
