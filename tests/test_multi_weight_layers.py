"""Layers whose weight is several matrices (``nn.LSTM``, ``nn.GRU``, ``nn.MultiheadAttention``), the
hook-based ``torch.nn.utils.spectral_norm`` (``weight_orig``), and modules called with keyword inputs
or returning tuples. Each probe is checked against plain autograd on copies of the model, finite
differences or numpy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from probes import (
    effective_learning_rates,
    hessian_operator,
    ics_gradient_change,
    layer_gradient_norms,
    layer_input_conditioning,
    layer_input_statistics,
    rank_collapse,
    scale_invariance,
    update_to_weight_ratios,
)
from probes.activations import (
    capture_layer_inputs,
    capture_layer_outputs,
    layer_weight_names,
    parameterized_layers,
)
from probes.functional import ModelState

RNN_WEIGHTS = ("weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1")


class Recurrent(nn.Module):
    """A two-layer LSTM or GRU over (N, T, 2) sequences, then a linear head on the last step."""

    def __init__(self, cell: type[nn.RNNBase] = nn.LSTM) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = cell(2, 3, num_layers=2, batch_first=True).double()
        self.head = nn.Linear(3, 2).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def sequences(n: int = 5) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, 2, generator=gen, dtype=torch.float64), torch.randint(0, 2, (n,), generator=gen)


def plain_grads(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    m = copy.deepcopy(model)
    names, params = zip(*m.named_parameters(), strict=True)
    return dict(zip(names, torch.autograd.grad(F.cross_entropy(m(x), y), params), strict=True))


def joint(tensors) -> float:
    return float(torch.cat([t.detach().flatten() for t in tensors]).norm())


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_a_recurrent_layer_is_one_layer_whose_weight_is_all_its_matrices(cell):
    model = Recurrent(cell)
    x, y = sequences()
    state = ModelState.capture(model)
    assert layer_weight_names(model.rnn) == RNN_WEIGHTS
    assert list(parameterized_layers(model)) == ["rnn", "head"]
    grads = plain_grads(model, x, y)
    rnn = [f"rnn.{n}" for n in RNN_WEIGHTS]

    norms = layer_gradient_norms(model, F.cross_entropy, (x, y))
    assert norms.layers == ("rnn", "head")
    assert norms.grad_norms[0] == pytest.approx(joint(grads[n] for n in rnn), rel=1e-12)
    assert norms.weight_norms[0] == pytest.approx(joint(model.get_parameter(n) for n in rnn), rel=1e-12)
    assert norms.grad_norms[1] == pytest.approx(float(grads["head.weight"].norm()), rel=1e-12)

    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    ratios = update_to_weight_ratios(model, F.cross_entropy, (x, y), opt)
    assert ratios.update_norms[0] == pytest.approx(
        0.3 * joint(grads[n] for n in rnn), rel=1e-12
    )  # no buffer yet
    elr = effective_learning_rates(model, opt)
    assert elr.effective_lrs[0] == pytest.approx(0.3 / norms.weight_norms[0] ** 2, rel=1e-12)

    scale = scale_invariance(model, F.cross_entropy, (x, y), layer="rnn", scales=(2.0,))
    w = torch.cat([model.get_parameter(n).detach().flatten() for n in rnn])
    g = torch.cat([grads[n].flatten() for n in rnn])
    assert scale.cosine == pytest.approx(float(g @ w / (g.norm() * w.norm())), rel=1e-10)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for n in rnn:
            scaled.get_parameter(n).mul_(2.0)
    with torch.no_grad():
        expected = abs(float(F.cross_entropy(scaled(x), y)) - float(F.cross_entropy(model(x), y)))
    assert scale.loss_changes[0] == pytest.approx(expected, rel=1e-10)
    assert not scale.invariant

    conditioning = layer_input_conditioning(model, (x, y))
    assert list(conditioning.layers) == ["rnn", "head"]  # input (N, T, 2): 2 features, N·T samples
    covariance = np.cov(x.reshape(-1, 2).numpy().T, bias=True)
    np.testing.assert_allclose(
        conditioning["rnn"].eigenvalues, np.linalg.eigvalsh(covariance)[::-1], rtol=1e-10
    )
    statistics = layer_input_statistics(model, (x, y))
    np.testing.assert_allclose(statistics["rnn"].mean, x.reshape(-1, 2).mean(0).numpy(), rtol=1e-12)
    assert rank_collapse(model, (x, y)).layer == "head"

    ics = ics_gradient_change(model, F.cross_entropy, (x, y), torch.optim.SGD(model.parameters(), lr=0.5))
    assert [r.layer for r in ics.layers] == ["rnn", "head"]
    assert ics["rnn"].l2 == 0.0 and ics["rnn"].preceding == ()
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            if n.startswith("rnn."):
                p.sub_(0.5 * grads[n])
    g2 = plain_grads(moved, x, y)
    head = ["head.weight", "head.bias"]
    expected_l2 = float(torch.cat([(grads[n] - g2[n]).flatten() for n in head]).norm())
    assert ics["head"].l2 == pytest.approx(expected_l2, rel=1e-9)
    assert set(ics["head"].preceding) == {n for n, _ in model.named_parameters() if n.startswith("rnn.")}
    assert state.differences(model) == []


def test_recurrent_hessian_matches_finite_differences_of_gradients():
    model = Recurrent(nn.LSTM)
    x, y = sequences()
    op = hessian_operator(model, F.cross_entropy, (x, y))
    n = op.shape[0]
    basis = torch.eye(n, dtype=torch.float64)
    H = torch.stack([op.matvec(e) for e in basis], 1)
    theta = nn.utils.parameters_to_vector(model.parameters()).detach()

    def grad_at(t: Tensor) -> Tensor:
        m = copy.deepcopy(model)
        nn.utils.vector_to_parameters(t, m.parameters())
        return torch.cat([g.flatten() for g in plain_grads(m, x, y).values()])

    eps = 1e-5
    fd = torch.stack([(grad_at(theta + eps * e) - grad_at(theta - eps * e)) / (2 * eps) for e in basis], 1)
    torch.testing.assert_close(H, fd, rtol=0, atol=1e-8)
    assert float(H.abs().max()) > 0.05  # not vacuous


def test_learning_rates_that_differ_within_a_layer_give_nan():
    model = Recurrent(nn.GRU)
    ih = [p for n, p in model.rnn.named_parameters() if "_ih_" in n]
    rest = [p for n, p in model.named_parameters() if "_ih_" not in n]
    opt = torch.optim.SGD([{"params": ih, "lr": 0.1}, {"params": rest, "lr": 0.2}])
    elr = effective_learning_rates(model, opt)
    assert np.isnan(elr.learning_rates[0]) and np.isnan(elr.effective_lrs[0])
    assert elr.learning_rates[1] == 0.2


def test_hook_based_spectral_norm_is_a_layer_and_is_left_as_found():
    """``torch.nn.utils.spectral_norm`` keeps its parameter as ``weight_orig`` and recomputes ``weight``
    in a pre-hook, with a power-iteration step that updates ``weight_u`` in training mode: probes run it
    in eval mode (no step) and restore everything."""
    torch.manual_seed(3)
    model = (
        nn.Sequential(nn.utils.spectral_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)).double().train()
    )
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    state = ModelState.capture(model)
    assert layer_weight_names(model[0]) == ("weight_orig",)
    reference = copy.deepcopy(model).eval()  # the weight a probe sees: no power-iteration step
    grad = torch.autograd.grad(F.cross_entropy(reference(x), y), reference[0].weight_orig)[0]
    norms = layer_gradient_norms(model, F.cross_entropy, (x, y))
    assert norms.layers == ("0", "2")
    assert norms.grad_norms[0] == pytest.approx(float(grad.norm()), rel=1e-12)
    assert list(layer_input_conditioning(model, (x, y)).layers) == ["0", "2"]
    ics = ics_gradient_change(model, F.cross_entropy, (x, y), torch.optim.SGD(model.parameters(), lr=0.1))
    assert [r.layer for r in ics.layers] == ["0", "2"]
    assert state.differences(model) == []


class Keyworded(nn.Module):
    """Calls its attention with keyword inputs only, and its LSTM (which returns a tuple)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.embed = nn.Linear(2, 4).double()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True).double()
        self.rnn = nn.LSTM(4, 3, batch_first=True).double()
        self.head = nn.Linear(3, 2).double()

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h = self.attn(query=h, key=h, value=h, need_weights=False)[0]
        return self.head(self.rnn(input=h)[0][:, -1])


def test_inputs_passed_by_keyword_and_tuple_outputs_are_captured():
    model = Keyworded()
    x, y = sequences()
    with torch.no_grad():
        h = model.embed(x)
        a = model.attn(h, h, h, need_weights=False)[0]
        r = model.rnn(a)[0]
    with capture_layer_inputs(model, ["attn", "rnn"]) as inputs, torch.no_grad():
        model(x)
    torch.testing.assert_close(inputs["attn"], h, rtol=0, atol=0)
    torch.testing.assert_close(inputs["rnn"], a, rtol=0, atol=0)
    with capture_layer_outputs(model, ["attn", "rnn"]) as outputs, torch.no_grad():
        model(x)
    torch.testing.assert_close(outputs["attn"], a, rtol=0, atol=0)
    torch.testing.assert_close(outputs["rnn"], r, rtol=0, atol=0)
    conditioning = layer_input_conditioning(model, (x, y))
    assert list(conditioning.layers) == ["embed", "attn", "rnn", "head"]
    covariance = np.cov(a.reshape(-1, 4).numpy().T, bias=True)
    np.testing.assert_allclose(
        conditioning["rnn"].eigenvalues,
        np.clip(np.linalg.eigvalsh(covariance)[::-1], 0, None),
        rtol=1e-9,
        atol=1e-14,
    )
