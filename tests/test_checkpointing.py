"""Probes on a model that uses activation checkpointing (``torch.utils.checkpoint``, non-reentrant).

The backward pass recomputes a checkpointed segment's forward. Unless that recomputation happens while
the probe's tensors are still in the model (``FunctionalLoss.bound``), it uses the model's own
parameters: gradients at other weights and every HVP come out silently wrong. Each probe must give
exactly what it gives on the same network without checkpointing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from probes.functional import FunctionalLoss, ModelState
from probes.gradients import layer_gradient_norms
from probes.hessian import hessian_eigenvalues
from probes.hvp import hessian_operator
from probes.ics import ics_gradient_change
from probes.smoothness import landscape_along_gradient


class Net(nn.Module):
    """Linear → tanh → [Linear → (BN) → tanh → Linear → tanh] → Linear; the bracket checkpointed."""

    def __init__(self, bn: bool, checkpointed: bool) -> None:
        super().__init__()
        self.checkpointed = checkpointed
        self.a = nn.Linear(5, 6)
        norm = [nn.BatchNorm1d(6)] if bn else []
        self.block = nn.Sequential(nn.Linear(6, 6), *norm, nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = checkpoint(self.block, h, use_reentrant=False) if self.checkpointed else self.block(h)
        return self.head(h)


def twins(bn: bool) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    plain = Net(bn, checkpointed=False).double()
    ckpt = Net(bn, checkpointed=True).double()
    ckpt.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(12, 5, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (12,), generator=gen),
    )
    return plain, ckpt, batch


@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn"])
def test_hvps_and_gradients_through_a_checkpointed_segment(bn):
    plain, ckpt, batch = twins(bn)
    state = ModelState.capture(ckpt)
    v = torch.randn(
        sum(p.numel() for p in plain.parameters()),
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(3),
    )
    expected = hessian_operator(plain, F.cross_entropy, batch).matvec(v)
    op = hessian_operator(ckpt, F.cross_entropy, batch)
    first, again = op.matvec(v), op.matvec(v)  # the second product reuses the cached graph
    np.testing.assert_allclose(first, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(again, first)
    fresh = hessian_operator(ckpt, F.cross_entropy, batch, cache_graphs=False).matvec(v)
    np.testing.assert_allclose(fresh, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        hessian_eigenvalues(ckpt, F.cross_entropy, batch, k=2).values,
        hessian_eigenvalues(plain, F.cross_entropy, batch, k=2).values,
        rtol=1e-10,
    )
    f_plain, f_ckpt = (
        FunctionalLoss.of(plain, F.cross_entropy, batch),
        FunctionalLoss.of(ckpt, F.cross_entropy, batch),
    )
    moved = f_plain.theta0 + 0.3 * torch.randn(
        f_plain.theta0.shape, generator=torch.Generator().manual_seed(2)
    )
    (loss, grad), (loss_c, grad_c) = f_plain.value_and_grad(moved), f_ckpt.value_and_grad(moved)
    assert loss_c == loss
    np.testing.assert_allclose(grad_c, grad, rtol=1e-12, atol=1e-14)  # was 37% off at θ ≠ θ₀
    assert state.differences(ckpt) == []


@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn"])
def test_gradient_probes_through_a_checkpointed_segment(bn):
    """ICS moves the layers before each layer, also inside the checkpointed block; the landscape and
    the gradient norms evaluate at other weights and at the model's own."""
    plain, ckpt, batch = twins(bn)
    state = ModelState.capture(ckpt)

    def ics(model: nn.Module) -> list[float]:
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        return [layer.l2 for layer in ics_gradient_change(model, F.cross_entropy, batch, opt).layers]

    np.testing.assert_allclose(ics(ckpt), ics(plain), rtol=1e-12, atol=1e-15)
    steps = [0.3, 1.0]
    a = landscape_along_gradient(plain, F.cross_entropy, batch, step_sizes=steps)
    b = landscape_along_gradient(ckpt, F.cross_entropy, batch, step_sizes=steps)
    np.testing.assert_allclose(b.grad_distances, a.grad_distances, rtol=1e-12)
    np.testing.assert_allclose(
        layer_gradient_norms(ckpt, F.cross_entropy, batch).grad_norms,
        layer_gradient_norms(plain, F.cross_entropy, batch).grad_norms,
        rtol=1e-12,
    )
    assert state.differences(ckpt) == []


def test_forward_over_reverse_names_checkpointing():
    _, ckpt, batch = twins(False)
    with pytest.raises(
        ValueError, match=r"hvp='forward_over_reverse'.*activation checkpointing.*double_backward"
    ):
        hessian_eigenvalues(ckpt, F.cross_entropy, batch, hvp="forward_over_reverse")
