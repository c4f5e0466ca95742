"""Layers under ``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``, ``spectral_norm``).

Their weight is computed from parameters that a child module holds (``parametrizations.weight.original…``),
so a layer cannot be recognized by the parameters it owns itself. Each per-layer probe is checked here on
such layers against plain autograd on copies of the model, and the Hessian against a hand-written
function of the weight-norm parameters.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations

from probes import (
    effective_learning_rates,
    hessian_operator,
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
from probes.activations import layer_parameters, layer_weight_name, parameterized_layers
from probes.functional import ModelState

V0, G0 = "0.parametrizations.weight.original1", "0.parametrizations.weight.original0"
S2 = "2.parametrizations.weight.original"


def make() -> nn.Module:
    """weight-normed Linear → tanh → spectral-normed Linear → tanh → Linear, float64, eval mode (no
    power iteration runs: the spectral norm uses its stored singular vectors, as a probe does)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        parametrizations.weight_norm(nn.Linear(3, 4)),
        nn.Tanh(),
        parametrizations.spectral_norm(nn.Linear(4, 4)),
        nn.Tanh(),
        nn.Linear(4, 3),
    ).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def batch(n: int = 10) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def plain_grads(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    m = copy.deepcopy(model)
    names, params = zip(*m.named_parameters(), strict=True)
    return dict(zip(names, torch.autograd.grad(F.cross_entropy(m(x), y), params), strict=True))


def test_a_parametrized_weight_makes_a_layer():
    model = make()
    assert layer_weight_name(model[0]) == "parametrizations.weight.original1"  # v, not the gain g
    assert layer_weight_name(model[2]) == "parametrizations.weight.original"
    assert layer_weight_name(model[4]) == "weight" and layer_weight_name(model[1]) is None
    assert list(parameterized_layers(model)) == ["0", "2", "4"]
    assert [p.shape for p in layer_parameters(model[0])] == [(4,), (4, 1), (4, 3)]  # bias, g, v
    assert model[0].parametrizations.weight.original0.dim() == 2  # g is 2-D too: the larger one is v


def test_gradient_norms_and_optimizer_probes_read_the_parametrization():
    model = make()
    x, y = batch()
    grads = plain_grads(model, x, y)
    state = ModelState.capture(model)
    norms = layer_gradient_norms(model, F.cross_entropy, (x, y))
    assert norms.layers == ("0", "2", "4")
    expected = [grads[V0].norm(), grads[S2].norm(), grads["4.weight"].norm()]
    np.testing.assert_allclose(norms.grad_norms, [float(t) for t in expected], rtol=1e-10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ratios = update_to_weight_ratios(model, F.cross_entropy, (x, y), opt)
    v = model.get_parameter(V0).detach()
    assert ratios.ratios[0] == pytest.approx(float(0.1 * grads[V0].norm() / v.norm()), rel=1e-10)
    elr = effective_learning_rates(model, opt)
    assert elr.effective_lrs[0] == pytest.approx(0.1 / float(v.norm()) ** 2, rel=1e-12)
    inv = scale_invariance(model, F.cross_entropy, (x, y), layer="0")  # W = g·v/‖v‖: invariant in v
    assert inv.invariant and abs(inv.cosine) < 1e-10
    assert state.differences(model) == []


def test_ics_moves_the_parametrization_of_preceding_layers():
    """Def. 2.1 by hand: SGD steps every parameter of layer 0 (bias, g, v), then layer 2's gradient."""
    model = make()
    x, y = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    result = ics_gradient_change(model, F.cross_entropy, (x, y), opt)
    assert [r.layer for r in result.layers] == ["0", "2", "4"]
    assert set(result["2"].preceding) == {"0.bias", G0, V0}
    grads = plain_grads(model, x, y)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("0.bias", G0, V0):
            moved.get_parameter(name).sub_(0.5 * grads[name])
    own = ["2.bias", S2]
    g = torch.cat([grads[n].reshape(-1) for n in own])
    g2 = torch.cat([t.reshape(-1) for t in (plain_grads(moved, x, y)[n] for n in own)])
    assert result["2"].l2 == pytest.approx(float((g - g2).norm()), rel=1e-9)
    assert result["0"].l2 == 0.0


def test_hessian_equals_the_hand_written_weight_norm():
    model = make()
    x, y = batch()
    names = [n for n, _ in model.named_parameters()]
    assert names[:3] == ["0.bias", G0, V0]
    with hessian_operator(model, F.cross_entropy, (x, y), params=names[:3]) as op:
        dense = op.matvec(torch.eye(op.shape[0], dtype=torch.float64))
    rest = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        w2 = model[2].weight.detach()  # spectral norm in eval mode: stored singular vectors, fixed

    def loss(theta: Tensor) -> Tensor:
        b, g, v = theta[:4], theta[4:8].view(4, 1), theta[8:].view(4, 3)
        w = g * v / v.norm(dim=1, keepdim=True)
        h = torch.tanh(torch.tanh(x @ w.T + b) @ w2.T + rest["2.bias"])
        return F.cross_entropy(h @ rest["4.weight"].T + rest["4.bias"], y)

    theta0 = torch.cat([rest[n].reshape(-1) for n in names[:3]])
    torch.testing.assert_close(dense, torch.func.hessian(loss)(theta0), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "probe",
    [
        lambda m, b: landscape_along_gradient(m, F.cross_entropy, b, step_sizes=[0.1, 1.0]),
        lambda m, b: layer_input_conditioning(m, b),
        lambda m, b: layer_input_statistics(m, b),
        lambda m, b: kfac_factor_conditioning(m, F.cross_entropy, b),
        lambda m, b: rank_collapse(m, b),
    ],
    ids=["landscape", "conditioning", "input_statistics", "kfac", "rank_collapse"],
)
def test_input_probes_see_every_layer_and_leave_the_model(probe):
    model = make().train()  # train mode: a spectral norm would run its power iteration if evaluated so
    state = ModelState.capture(model)
    records = probe(model, batch()).to_records()
    assert state.differences(model) == []  # the power iteration's buffers did not move
    layers = {r["layer"] for r in records}
    assert layers == {"all"} or layers >= ({"4"} if "rank" in records[0]["probe"] else {"0", "2", "4"})
