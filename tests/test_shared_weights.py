"""Weight sharing: a submodule registered twice and a parameter assigned to two modules.

torch 2.13's ``functional_call`` (``tie_weights=True``) restores a shared submodule's parameter slot to
the tensor it swapped in (pytorch/pytorch#164759), so a probe built on it would leave a plain tensor in
the model in place of the parameter the optimizer holds. These tests check each probe on both kinds of
sharing against hand-written functions of the shared tensors, and that every parameter and buffer
*object* is still in its place afterwards (``ModelState.differences`` compares identities too).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from probes import (
    effective_learning_rates,
    hessian_density,
    hessian_eigenvalues,
    hessian_operator,
    hessian_outliers,
    hessian_trace,
    ics_gradient_change,
    kfac_factor_conditioning,
    landscape_along_gradient,
    layer_gradient_norms,
    layer_input_conditioning,
    layer_input_statistics,
    rank_collapse,
    scale_invariance,
    update_to_weight_ratios,
)
from probes.functional import ModelState, probe_guard, tensor_slots

EPS = 1e-5


class SharedBlock(nn.Module):
    """``block`` applied twice: one Linear–BN–tanh, registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, eps=EPS), nn.Tanh())
        self.again = self.block
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.again(self.block(torch.tanh(self.inp(x)))))


class TiedWeight(nn.Module):
    """Two Linear layers with one weight (``second.weight = first.weight``) and their own biases."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        return self.head(torch.tanh(self.second(torch.tanh(self.first(h)))))


def by_hand(kind: str, p: dict[str, Tensor], x: Tensor) -> Tensor:
    """The same networks written out over their distinct tensors (BN with batch statistics)."""
    h = torch.tanh(x @ p["inp.weight"].T + p["inp.bias"])
    if kind == "shared":
        for _ in range(2):
            z = h @ p["block.0.weight"].T + p["block.0.bias"]
            z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + EPS)
            h = torch.tanh(z * p["block.1.weight"] + p["block.1.bias"])
    else:
        h = torch.tanh(h @ p["first.weight"].T + p["first.bias"])
        h = torch.tanh(h @ p["first.weight"].T + p["second.bias"])
    return h @ p["head.weight"].T + p["head.bias"]


def make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = (SharedBlock() if kind == "shared" else TiedWeight()).double().train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # BN's affine parameters off (1, 0) too
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def batch(n: int = 8, seed: int = 2) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def hand_loss(kind: str, model: nn.Module, x: Tensor, y: Tensor):
    """L as a function of the flat vector of ``model.named_parameters()`` (each shared tensor once)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    numels = [p.numel() for _, p in model.named_parameters()]

    def loss(theta: Tensor) -> Tensor:
        parts = dict(
            zip(names, (t.view(s) for t, s in zip(theta.split(numels), shapes, strict=True)), strict=True)
        )
        return F.cross_entropy(by_hand(kind, parts, x), y)

    theta0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    return loss, theta0


KINDS = ["shared", "tied"]


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_lists_count_each_shared_tensor_once(kind):
    model = make(kind)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == (8 if kind == "shared" else 7)  # inp 2, block 4 | first 2 + second.bias, head 2
    slots = [name for name, *_ in tensor_slots(model)]
    if kind == "shared":  # the shared block's slots once, under its first name; BN buffers included
        assert "again.0.weight" not in slots and "block.1.running_mean" in slots
    else:  # one tensor, two slots
        assert {"first.weight", "second.weight"} <= set(slots)


def test_a_tied_parameter_is_selected_by_any_of_its_names():
    """``params=["second.weight"]`` said "no parameter named" while the same tensor as an object was
    accepted: a tied parameter is one parameter under two names, and either selects it."""
    model = make("tied")
    x, y = batch()
    loss, theta0 = hand_loss("tied", model, x, y)
    names = [n for n, _ in model.named_parameters()]
    start = sum(
        p.numel() for n, p in model.named_parameters() if names.index(n) < names.index("first.weight")
    )
    block = slice(start, start + model.first.weight.numel())
    expected = torch.func.hessian(loss)(theta0)[block, block]
    for params in (["first.weight"], ["second.weight"], [model.second.weight]):
        with hessian_operator(model, F.cross_entropy, (x, y), params=params) as op:
            dense = op.matvec(torch.eye(op.shape[0], dtype=torch.float64))
        torch.testing.assert_close(dense, expected, rtol=1e-9, atol=1e-11)
    for params in (["first.weight", "second.weight"], ["second.weight", model.first.weight]):
        with pytest.raises(ValueError, match=r"params: duplicate parameters \['first.weight'\].*tied"):
            hessian_operator(model, F.cross_entropy, (x, y), params=params)
    with pytest.raises(ValueError, match=r"params: the model has no parameter named 'third\.weight'"):
        hessian_operator(model, F.cross_entropy, (x, y), params=["third.weight"])


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
@pytest.mark.parametrize("kind", KINDS)
def test_hessian_equals_the_hand_written_function(kind, method):
    model = make(kind)
    x, y = batch()
    loss, theta0 = hand_loss(kind, model, x, y)
    expected = torch.func.hessian(loss)(theta0)
    state = ModelState.capture(model)
    with hessian_operator(model, F.cross_entropy, (x, y), method=method) as op:
        dense = op.matvec(torch.eye(op.shape[0], dtype=torch.float64))
        torch.testing.assert_close(op.gradient(), torch.func.grad(loss)(theta0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dense, expected, rtol=1e-9, atol=1e-11)
    assert state.differences(model) == []
    values = hessian_eigenvalues(model, F.cross_entropy, (x, y), k=2, which="LA", tol=1e-10).values
    np.testing.assert_allclose(values, torch.linalg.eigvalsh(expected).numpy()[::-1][:2], rtol=1e-7)
    assert state.differences(model) == []


@pytest.mark.parametrize("kind", KINDS)
def test_landscape_and_gradient_norms_equal_the_hand_written_function(kind):
    model = make(kind)
    x, y = batch()
    loss, theta0 = hand_loss(kind, model, x, y)
    g = torch.func.grad(loss)(theta0)
    etas = [0.1, 0.5]
    state = ModelState.capture(model)
    land = landscape_along_gradient(model, F.cross_entropy, (x, y), step_sizes=etas)
    expected = [float(loss(theta0 - eta * g)) for eta in etas]
    distances = [float((g - torch.func.grad(loss)(theta0 - eta * g)).norm()) for eta in etas]
    np.testing.assert_allclose(land.losses, expected, rtol=1e-12)
    np.testing.assert_allclose(land.grad_distances, distances, rtol=1e-9)
    norms = layer_gradient_norms(model, F.cross_entropy, (x, y))
    grads = dict(
        zip(
            [n for n, _ in model.named_parameters()],
            g.split([p.numel() for p in model.parameters()]),
            strict=True,
        )
    )
    if kind == "tied":  # both layers report the gradient of their one weight: the sum over its two uses
        assert norms.layers == ("inp", "first", "second", "head")
        shared = float(grads["first.weight"].norm())
        np.testing.assert_allclose(
            norms.grad_norms,
            [float(grads["inp.weight"].norm()), shared, shared, float(grads["head.weight"].norm())],
            rtol=1e-10,
        )
    else:  # the shared block is one layer
        assert norms.layers == ("inp", "block.0", "head")
        np.testing.assert_allclose(norms.grad_norms[1], float(grads["block.0.weight"].norm()), rtol=1e-10)
    assert state.differences(model) == []


@pytest.mark.parametrize(
    "probe",
    [
        lambda m, b, opt: hessian_trace(m, F.cross_entropy, b, n_probes=6),
        lambda m, b, opt: hessian_density(m, F.cross_entropy, b, n_iter=5, n_runs=2),
        lambda m, b, opt: hessian_outliers(m, F.cross_entropy, b, num_classes=3),
        lambda m, b, opt: ics_gradient_change(m, F.cross_entropy, b, opt),
        lambda m, b, opt: update_to_weight_ratios(m, F.cross_entropy, b, opt),
        lambda m, b, opt: effective_learning_rates(m, opt),
        lambda m, b, opt: scale_invariance(m, F.cross_entropy, b, layer="head"),
        lambda m, b, opt: layer_input_conditioning(m, b),
        lambda m, b, opt: layer_input_statistics(m, b),
        lambda m, b, opt: kfac_factor_conditioning(m, F.cross_entropy, b),
        lambda m, b, opt: rank_collapse(m, b),
    ],
    ids=[
        "trace",
        "density",
        "outliers",
        "ics",
        "update_ratios",
        "effective_lr",
        "scale_invariance",
        "conditioning",
        "input_statistics",
        "kfac",
        "rank_collapse",
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_every_probe_leaves_shared_tensors_in_place(kind, probe):
    model = make(kind)
    b = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(b[0]), b[1]).backward()
    opt.step()  # a momentum buffer, and running statistics that moved
    opt_state = copy.deepcopy(opt.state_dict())
    state = ModelState.capture(model)
    objects = [t for *_, t in tensor_slots(model)]
    result = probe(model, b, opt)
    assert result.to_records()
    assert state.differences(model) == []
    assert all(a is b for a, b in zip(objects, [t for *_, t in tensor_slots(model)], strict=True))
    assert str(opt.state_dict()) == str(opt_state)


def test_guard_puts_back_a_replaced_parameter_object_and_strict_reports_it():
    model = make("shared")
    weight, running = model.block[0].weight, model.block[1].running_mean
    with pytest.raises(AssertionError, match=r"parameters: block.0.weight is another tensor object"):
        with probe_guard(model, strict=True):
            model.block[0]._parameters["weight"] = weight.detach() * 2  # what torch's bug leaves behind
            model.block[1]._buffers["running_mean"] = running + 1
    assert model.block[0].weight is weight and model.again[0].weight is weight
    assert model.block[1].running_mean is running
    assert isinstance(model.block[0].weight, nn.Parameter)
