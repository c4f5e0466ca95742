"""Per-layer gradient probes against closed forms (deep linear nets), hand-computed optimizer steps and
the scale invariance that BN gives the weights before it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from probes.functional import ModelState
from probes.gradients import (
    BN_RELU_GRADIENT_GROWTH,
    effective_learning_rates,
    growth_rate,
    layer_gradient_norms,
    ordered_layers,
    scale_invariance,
    update_to_weight_ratios,
)
from probes.ics import ics_gradient_change
from studies.lab.nets import make_net
from tests.cases import CASES, make_batch


def mlp(norm: str, *, bias: bool = True, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return make_net(
        "mlp", norm=norm, in_shape=(3,), num_classes=3, depth=3, width=4, bias=bias, **kw
    ).double()


def plain_grads(model, loss_fn, batch) -> dict[str, torch.Tensor]:
    """∇L per parameter name by plain autograd on a train-mode deep copy."""
    m = copy.deepcopy(model).train()
    x, y = batch
    names, params = zip(*[(n, p) for n, p in m.named_parameters() if p.requires_grad], strict=True)
    grads = torch.autograd.grad(loss_fn(m(x), y), params)
    return dict(zip(names, grads, strict=True))


# ------------------------------------------------------------------------------- gradient norms


def test_deep_linear_net_gradient_ratios_are_singular_value_ratios():
    """W_l = s_l Q_l (Q_l orthogonal): ∇W_l = (Π_{k>l} W_k)ᵀ Σ δxᵀ (Π_{k<l} W_k)ᵀ, so ‖∇W_l‖ = C·Π_{k≠l} s_k
    and ‖∇W_l‖/‖∇W_{l+1}‖ = s_{l+1}/s_l; with s_l = s₀qˡ the growth rate towards the input is q."""
    d, depth, q = 4, 4, 0.8
    torch.manual_seed(0)
    net = make_net(
        "dln", norm="none", in_shape=(d,), num_classes=d, depth=depth, width=d, bias=False
    ).double()
    layers = ordered_layers(net)
    assert [m for m, _ in layers] == [f"blocks.{i}.layer" for i in range(depth)] + ["head"]
    s = 1.3 * q ** np.arange(depth + 1)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for (name, _), s_l in zip(layers, s, strict=True):
            Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
            net.get_submodule(name).weight.copy_(s_l * Q)
    x = torch.randn(10, d, generator=gen, dtype=torch.float64)
    y = torch.randn(10, d, generator=gen, dtype=torch.float64)
    state = ModelState.capture(net)
    r = layer_gradient_norms(net, F.mse_loss, (x, y))
    assert state.differences(net) == []
    np.testing.assert_allclose(r.ratios, s[1:] / s[:-1], rtol=1e-10)
    assert r.growth_rate == pytest.approx(q, rel=1e-10)
    np.testing.assert_allclose(r.weight_norms, s * d**0.5, rtol=1e-12)
    # ‖∇W_l‖ = ‖Σ δxᵀ‖·Π_{k≠l} s_k with δ = ∂L/∂out
    out = net(x).detach().requires_grad_(True)
    (delta,) = torch.autograd.grad(F.mse_loss(out, y), out)
    core = float(torch.linalg.matrix_norm(delta.T @ x))
    np.testing.assert_allclose(r.grad_norms, core * np.prod(s) / s, rtol=1e-10)
    grads = plain_grads(net, F.mse_loss, (x, y))
    np.testing.assert_allclose(
        r.grad_norms, [float(grads[f"{m}.weight"].norm()) for m, _ in layers], rtol=1e-12
    )


def test_bn_relu_gradient_explosion_rate_at_init():
    """Yang et al. 2019: at init a BN–ReLU net's hidden-layer gradients grow ≈ 1.21 per layer backwards."""
    torch.manual_seed(0)
    depth = 20
    net = make_net(
        "mlp", norm="bn", in_shape=(32,), num_classes=10, depth=depth, width=128, bias=False, init="kaiming"
    ).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (256,), generator=gen)
    hidden = [f"blocks.{i}.layer" for i in range(1, depth)]
    r = layer_gradient_norms(net, F.cross_entropy, (x, y), layers=hidden)
    assert r.growth_rate == pytest.approx(BN_RELU_GRADIENT_GROWTH, abs=0.04)
    assert r.layers == tuple(hidden)


def test_gradient_norms_match_autograd_forward_order_and_records():
    case = CASES["mlp-wn"]()
    r = layer_gradient_norms(case.model, case.loss_fn, case.batches)
    assert r.layers == ("blocks.0.layer", "blocks.1.layer", "head")
    grads = plain_grads(case.model, case.loss_fn, case.batches[0])
    expected = [grads["blocks.0.layer.weight_v"], grads["blocks.1.layer.weight_v"], grads["head.weight"]]
    np.testing.assert_allclose(r.grad_norms, [float(g.norm()) for g in expected], rtol=1e-12)
    rows = r.to_records()
    assert {row["metric"] for row in rows} == {
        "grad_norm",
        "weight_norm",
        "grad_norm_ratio_to_next",
        "growth_rate",
        "loss",
    }

    # forward order differs from registration order
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Linear(4, 2).double()
            self.early = nn.Linear(3, 4).double()

        def forward(self, x):
            return self.late(torch.tanh(self.early(x)))

    x, y = make_batch("mlp", 6, seed=1)
    assert layer_gradient_norms(Reversed(), F.cross_entropy, (x, y % 2)).layers == ("early", "late")


def test_a_layer_that_never_runs_is_left_out_of_the_default_selection():
    """An auxiliary head the forward pass skips has no gradient to grow: by default it is left out (its
    zero gradient would make the last depth ratio inf and the growth rate nan)."""
    case = CASES["mlp-bn"]()
    batch = case.batches[0]
    before = layer_gradient_norms(case.model, case.loss_fn, batch)
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1, momentum=0.9)
    ratios = update_to_weight_ratios(case.model, case.loss_fn, batch, opt)
    case.model.aux = nn.Linear(4, 3).double()
    opt.add_param_group({"params": case.model.aux.parameters()})
    after = layer_gradient_norms(case.model, case.loss_fn, batch)
    assert after.layers == before.layers and "aux" not in after.layers
    np.testing.assert_array_equal(after.grad_norms, before.grad_norms)
    assert np.isfinite(after.growth_rate) and after.growth_rate == before.growth_rate
    assert update_to_weight_ratios(case.model, case.loss_fn, batch, opt).layers == ratios.layers
    named = layer_gradient_norms(case.model, case.loss_fn, batch, layers=["head", "aux"])
    assert named.grad_norms[1] == 0.0  # named: the gradient of a weight the loss does not use


@pytest.mark.parametrize(
    ("layers", "match"),
    [(["nope"], "no module named"), (["blocks.0.norm"], "owns no"), ("head", "expected a list")],
)
def test_layer_errors(layers, match):
    case = CASES["mlp-bn"]()
    with pytest.raises(ValueError, match=match):
        layer_gradient_norms(case.model, case.loss_fn, case.batches, layers=layers)


def test_no_parameterized_layer():
    model = nn.Sequential(nn.Tanh())
    with pytest.raises(ValueError, match="no parameterized layer"):
        layer_gradient_norms(model, F.mse_loss, (torch.ones(2, 3), torch.ones(2, 3)))


# ------------------------------------------------------------------------------ scale invariance


def test_bn_preceded_weights_are_scale_invariant():
    net = mlp("bn", bias=False, norm_options={"eps": 1e-30})  # ε → 0: exact invariance
    batch = make_batch("mlp", 16, seed=3)
    state = ModelState.capture(net)
    for layer in ("blocks.0.layer", "blocks.2.layer"):
        r = scale_invariance(net, F.cross_entropy, batch, layer=layer, scales=(0.5, 2.0, 10.0))
        assert r.invariant
        assert np.all(r.loss_changes < 1e-10) and abs(r.cosine) < 1e-10
    head = scale_invariance(net, F.cross_entropy, batch, layer=net.head)
    assert not head.invariant and abs(head.cosine) > 1e-3 and head.loss_changes.min() > 1e-3
    assert state.differences(net) == []
    # the default ε = 1e-5 breaks invariance only at the default tolerance's scale
    assert scale_invariance(mlp("bn", bias=True), F.cross_entropy, batch, layer="blocks.1.layer").invariant
    # without a norm, no layer is scale-invariant
    plain = mlp("none", activation="tanh")  # tanh: no dead units, so every weight gets a gradient
    r = scale_invariance(plain, F.cross_entropy, batch, layer="blocks.1.layer")
    assert not r.invariant and r.loss_changes.min() > 1e-4
    # ⟨∇L, W⟩ = d/dc L(cW) at c = 1
    grads = plain_grads(plain, F.cross_entropy, batch)
    w = plain.blocks[1].layer.weight.detach()
    g = grads["blocks.1.layer.weight"]
    assert r.cosine == pytest.approx(float((g * w).sum() / (g.norm() * w.norm())), rel=1e-12)
    rows = r.to_records()
    assert [row["scale"] for row in rows if row["metric"] == "loss_change"] == [0.5, 2.0]


def test_weight_normalized_direction_is_scale_invariant():
    case = CASES["mlp-wn"]()
    r = scale_invariance(case.model, case.loss_fn, case.batches, layer="blocks.0.layer")
    assert r.invariant and abs(r.cosine) < 1e-12 and np.all(r.loss_changes < 1e-12)


@pytest.mark.parametrize("kw", [{"scales": (0.0,)}, {"scales": ()}, {"layer": "blocks.0.norm"}])
def test_scale_invariance_errors(kw):
    case = CASES["mlp-bn"]()
    with pytest.raises(ValueError):
        scale_invariance(case.model, case.loss_fn, case.batches, **{"layer": "head", **kw})


# ------------------------------------------------------------------------ effective learning rates


def test_effective_learning_rates():
    net = mlp("bn", bias=False)
    hidden = [p for n, p in net.named_parameters() if n.startswith("blocks")]
    opt = torch.optim.SGD([{"params": hidden, "lr": 0.1}, {"params": net.head.parameters(), "lr": 0.02}])
    r = effective_learning_rates(net, opt)
    assert r.layers == ("blocks.0.layer", "blocks.1.layer", "blocks.2.layer", "head")
    norms = [float(net.get_submodule(n).weight.detach().norm()) for n in r.layers]
    lrs = [0.1, 0.1, 0.1, 0.02]
    np.testing.assert_allclose(r.effective_lrs, np.array(lrs) / np.array(norms) ** 2, rtol=1e-12)
    np.testing.assert_allclose(r.learning_rates, lrs)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert effective_learning_rates(net, opt, layers=["head"]).learning_rates[0] == pytest.approx(0.01)
    only_head = torch.optim.SGD(net.head.parameters(), lr=0.1)  # a frozen body: only its layer reported
    assert effective_learning_rates(net, only_head).layers == ("head",)
    with pytest.raises(ValueError, match="does not own"):
        effective_learning_rates(net, only_head, layers=["blocks.0.layer", "head"])
    norms_only = torch.optim.SGD([p for n, p in net.named_parameters() if ".norm." in n], lr=0.1)
    with pytest.raises(ValueError, match="holds the weight of none"):
        effective_learning_rates(net, norms_only)
    with pytest.raises(ValueError, match="not part of the model"):
        effective_learning_rates(net, torch.optim.SGD(mlp("bn").parameters(), lr=0.1))


# --------------------------------------------------------------------------------- update ratios


def train_step(net, opt, batch) -> None:
    opt.zero_grad()
    F.cross_entropy(net(batch[0]), batch[1]).backward()
    opt.step()


def opt_snapshot(opt) -> dict:
    return copy.deepcopy(opt.state_dict())


def assert_same_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for key, value in a["state"][k].items():
            other = b["state"][k][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_update_ratios_equal_hand_computed_step(kind):
    net = mlp("bn")
    batch = make_batch("mlp", 8, seed=4)
    lr, wd, mu, betas, eps = 0.05, 0.01, 0.9, (0.9, 0.999), 1e-8
    if kind == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=mu, weight_decay=wd)
    elif kind == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd)
    train_step(net, opt, make_batch("mlp", 8, seed=5))  # non-trivial optimizer state
    saved, state = opt_snapshot(opt), ModelState.capture(net)

    r = update_to_weight_ratios(net, F.cross_entropy, batch, opt)
    assert state.differences(net) == []
    assert_same_state(saved, opt_snapshot(opt))

    grads = plain_grads(net, F.cross_entropy, batch)
    expected = []
    for layer in r.layers:
        p = net.get_submodule(layer).weight
        w, g, st = p.detach(), grads[f"{layer}.weight"], opt.state[p]
        if kind == "sgd":
            delta = -lr * (mu * st["momentum_buffer"] + g + wd * w)
        else:
            t = float(st["step"]) + 1
            g_eff = g + wd * w if kind == "adam" else g
            m = betas[0] * st["exp_avg"] + (1 - betas[0]) * g_eff
            v = betas[1] * st["exp_avg_sq"] + (1 - betas[1]) * g_eff**2
            mhat, vhat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
            delta = -lr * mhat / (vhat.sqrt() + eps) - (lr * wd * w if kind == "adamw" else 0)
        expected.append(float(delta.norm() / w.norm()))
    np.testing.assert_allclose(r.ratios, expected, rtol=1e-9)
    np.testing.assert_allclose(r.update_norms / r.weight_norms, r.ratios)
    assert {row["metric"] for row in r.to_records()} == {"update_norm", "weight_norm", "update_to_weight"}


def test_update_ratio_errors():
    net = mlp("bn")
    batch = make_batch("mlp", 8, seed=4)
    with pytest.raises(ValueError, match="does not own"):
        update_to_weight_ratios(
            net,
            F.cross_entropy,
            batch,
            torch.optim.SGD(net.head.parameters(), lr=0.1),
            layers=["blocks.1.layer"],
        )
    with pytest.raises(ValueError, match="holds the weight of none"):
        update_to_weight_ratios(net, F.cross_entropy, batch, torch.optim.SGD([net.head.bias], lr=0.1))
    with pytest.raises(ValueError, match="not part of the model"):
        update_to_weight_ratios(net, F.cross_entropy, batch, torch.optim.SGD(mlp("bn").parameters(), lr=0.1))
    # restricted to the layers it owns: fine
    r = update_to_weight_ratios(
        net, F.cross_entropy, batch, torch.optim.SGD(net.head.parameters(), lr=0.1), layers=["head"]
    )
    g = plain_grads(net, F.cross_entropy, batch)["head.weight"]
    assert r.ratios[0] == pytest.approx(float(0.1 * g.norm() / net.head.weight.detach().norm()), rel=1e-12)
    default = update_to_weight_ratios(
        net, F.cross_entropy, batch, torch.optim.SGD(net.head.parameters(), lr=0.1)
    )
    assert default.layers == ("head",) and default.ratios[0] == pytest.approx(r.ratios[0], rel=1e-12)


def test_an_attached_lr_scheduler_does_not_step_the_real_optimizer():
    """An ``LRScheduler`` replaces ``optimizer.step`` by a wrapper bound to the *real* optimizer. The
    probes step a deep copy, which must step its own clones: the model, its ``.grad`` and the optimizer
    state are untouched, and the simulated update is the real one at the scheduled rate."""
    net = mlp("bn")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    batch = make_batch("mlp", 8, seed=2)
    train_step(net, opt, batch)
    sched.step()
    opt.zero_grad()
    F.cross_entropy(net(batch[0]), batch[1]).backward()  # .grad present, as just before opt.step()
    state = ModelState.capture(net)
    saved = copy.deepcopy(opt.state_dict())
    result = update_to_weight_ratios(net, F.cross_entropy, batch, opt)
    ics_gradient_change(net, F.cross_entropy, batch, opt)
    assert state.differences(net) == []
    now = opt.state_dict()
    assert now["param_groups"] == saved["param_groups"]
    for i, entry in saved["state"].items():
        assert torch.equal(now["state"][i]["momentum_buffer"], entry["momentum_buffer"])
    twin = copy.deepcopy(net)
    real = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    real.load_state_dict(opt.state_dict())  # lr 0.05 after the scheduler's step
    for p, q in zip(twin.parameters(), net.parameters(), strict=True):
        p.grad = q.grad.clone()
    real.step()
    for layer, ratio in zip(result.layers, result.ratios, strict=True):
        w, w2 = net.get_submodule(layer).weight.detach(), twin.get_submodule(layer).weight.detach()
        assert ratio == pytest.approx(float((w2 - w).norm() / w.norm()), rel=1e-10)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_weight_the_loss_does_not_use_gets_no_update_as_in_a_real_step(kind):
    """``loss.backward()`` leaves a parameter outside the graph (an auxiliary head the forward pass
    skips) without ``.grad``, and ``step`` skips it: no momentum, weight decay or Adam moment moves it.
    The simulated step must do the same (it used to step a zero gradient: ‖ΔW‖/‖W‖ = 0.06 with SGD
    momentum and 1e-3 with AdamW's weight decay, where the real step gives 0)."""
    net = mlp("bn")
    net.aux = nn.Linear(4, 3).double()  # registered, never called
    if kind == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.1)
    train_step(net, opt, make_batch("mlp", 8, seed=5))
    with torch.no_grad():  # state for aux, as if it had once been trained (a head used earlier)
        opt.state[net.aux.weight].update(copy.deepcopy(opt.state[net.head.weight]))
        opt.state[net.aux.bias].update(copy.deepcopy(opt.state[net.head.bias]))
    batch = make_batch("mlp", 8, seed=4)
    r = update_to_weight_ratios(net, F.cross_entropy, batch, opt, layers=["blocks.0.layer", "head", "aux"])

    real, real_opt = copy.deepcopy((net, opt))  # one deepcopy: the copy's state refers to its parameters
    train_step(real, real_opt, batch)
    expected = []
    for name in r.layers:
        before, after = net.get_submodule(name).weight.detach(), real.get_submodule(name).weight.detach()
        expected.append(float((after - before).norm() / before.norm()))
    assert real.aux.weight.grad is None and expected[-1] == 0.0
    np.testing.assert_allclose(r.ratios, expected, rtol=1e-9, atol=0)


def test_named_layers_are_measured_in_forward_order():
    """The growth rate reads the order of the layers as depth: the same layers named output first
    gave 1/r (0.729 for 1.372). Named layers are put in forward order, as the default selection is."""
    torch.manual_seed(0)
    net = make_net("mlp", norm="bn", in_shape=(3,), num_classes=3, depth=4, width=6).double()
    batch = make_batch("mlp", 16, seed=2)
    names = ["blocks.1.layer", "blocks.2.layer", "blocks.3.layer"]
    forward = layer_gradient_norms(net, F.cross_entropy, batch, layers=names)
    backward = layer_gradient_norms(net, F.cross_entropy, batch, layers=names[::-1])
    assert forward.layers == backward.layers == tuple(names)
    np.testing.assert_array_equal(backward.grad_norms, forward.grad_norms)
    assert backward.growth_rate == forward.growth_rate
    assert forward.growth_rate == pytest.approx(growth_rate(forward.grad_norms))
    # a named layer the forward pass never calls comes last, with its zero gradient
    net.aux = nn.Linear(6, 3).double()
    with_aux = layer_gradient_norms(net, F.cross_entropy, batch, layers=["aux", *names[::-1]])
    assert with_aux.layers == (*names, "aux") and with_aux.grad_norms[-1] == 0.0
