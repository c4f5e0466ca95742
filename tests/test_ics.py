"""Internal covariate shift: Santurkar et al.'s gradient change against a brute-force reference
(copied model, preceding layers updated by hand, plain autograd); distributional statistics against
numpy on the captured layer inputs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn
from torch.nn import functional as F

from probes.functional import ModelState
from probes.ics import (
    distribution_shift,
    ics_gradient_change,
    layer_input_statistics,
    parameterized_layers,
    unit_statistics,
    wasserstein1,
)
from studies.lab.nets import make_net
from tests.cases import make_batch

IN_SHAPES = {"mlp": (3,), "vgg": (1, 4, 4)}


def make_model(arch: str, norm: str) -> nn.Module:
    torch.manual_seed(0)
    depth, width = (3, 5) if arch == "mlp" else (2, 2)
    net = make_net(arch, norm=norm, in_shape=IN_SHAPES[arch], num_classes=3, depth=depth, width=width)
    return net.double().train()


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.3),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.8, nesterov=True, weight_decay=0.02),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.95), weight_decay=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1, amsgrad=True),
}


def trained(model: nn.Module, make_opt, steps: int = 3, arch: str = "mlp") -> torch.optim.Optimizer:
    """A few real steps on other batches, so momentum buffers / Adam moments are non-trivial."""
    opt = make_opt(model.parameters())
    for s in range(steps):
        x, y = make_batch(arch, 8, seed=100 + s)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def by_hand_step(opt: torch.optim.Optimizer, model: nn.Module, grads: dict[str, torch.Tensor]) -> dict:
    """W' = the optimizer's update written out (PyTorch's SGD / Adam / AdamW formulas)."""
    group = opt.param_groups[0]
    new = {}
    for name, p in model.named_parameters():
        w, g = p.detach(), grads[name]
        state = opt.state.get(p, {})
        lr, wd = group["lr"], group["weight_decay"]
        if isinstance(opt, torch.optim.SGD):
            d = g + wd * w
            if group["momentum"]:
                buf = state.get("momentum_buffer")
                buf = d.clone() if buf is None else group["momentum"] * buf + (1 - group["dampening"]) * d
                d = d + group["momentum"] * buf if group["nesterov"] else buf
            new[name] = w - lr * d
            continue
        b1, b2 = group["betas"]
        t = float(state["step"]) + 1
        if isinstance(opt, torch.optim.AdamW):
            w = w * (1 - lr * wd)
        else:
            g = g + wd * w
        m = b1 * state["exp_avg"] + (1 - b1) * g
        v = b2 * state["exp_avg_sq"] + (1 - b2) * g * g
        if group["amsgrad"]:
            v = torch.maximum(state["max_exp_avg_sq"], v)
        denom = (v / (1 - b2**t)).sqrt() + group["eps"]
        new[name] = w - lr * (m / (1 - b1**t)) / denom
    return new


def block_of(name: str) -> float:
    """Forward-execution position of a parameter in make_net's mlp/vgg: blocks.<j>.* then head."""
    return int(name.split(".")[1]) if name.startswith("blocks.") else math.inf


def reference_ics(model, opt, x, y, bn: str = "batch") -> dict[str, tuple[float, float, float]]:
    """Def. 2.1 by brute force: deep-copied model, preceding blocks moved by hand, plain autograd."""

    def grads_of(net):
        net = net.train() if bn == "batch" else net.eval()
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    full = grads_of(copy.deepcopy(model))
    new = by_hand_step(opt, model, full)
    out = {}
    for layer in ["blocks.0.layer", "blocks.1.layer", "blocks.2.layer", "head"]:
        own = [n for n in full if n.startswith(layer + ".")]
        if not own:
            continue
        net = copy.deepcopy(model)
        pos = block_of(own[0])
        with torch.no_grad():
            for n, p in net.named_parameters():
                if block_of(n) < pos:
                    p.copy_(new[n])
        g = torch.cat([full[n].flatten() for n in own])
        g2 = torch.cat([grads_of(net)[n].flatten() for n in own])
        diff = (g - g2).norm().item()
        out[layer] = (diff, diff / g.norm().item(), (g @ g2 / (g.norm() * g2.norm())).item(), g.norm().item())
    return out


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize(("arch", "norm"), [("mlp", "none"), ("mlp", "bn"), ("mlp", "wn"), ("vgg", "bn")])
def test_ics_matches_brute_force(arch, norm, opt_name):
    model = make_model(arch, norm)
    opt = trained(model, OPTIMIZERS[opt_name], steps=0 if opt_name == "sgd" else 3, arch=arch)
    x, y = make_batch(arch, 10, seed=7)
    expected = reference_ics(model, opt, x, y)

    opt_state = copy.deepcopy(opt.state_dict())
    groups = [({k: v for k, v in g.items() if k != "params"}, list(g["params"])) for g in opt.param_groups]
    state = ModelState.capture(model)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    result = ics_gradient_change(model, F.cross_entropy, (x, y), opt)
    hook.remove()

    assert [r.layer for r in result.layers] == list(expected)
    for r in result.layers:
        l2, rel, cos, gnorm = expected[r.layer]
        assert r.grad_norm == pytest.approx(gnorm, rel=1e-9)
        assert r.l2 == pytest.approx(l2, rel=1e-9, abs=1e-13)
        assert r.relative_l2 == pytest.approx(rel, rel=1e-9, abs=1e-13)
        assert r.cosine == pytest.approx(cos, rel=1e-9)
    first = result.layers[0]
    assert first.l2 == 0.0 and first.relative_l2 == 0.0 and first.cosine == 1.0 and first.preceding == ()
    assert max(r.l2 for r in result.layers) > 1e-4  # the check is not vacuous
    # cost: one full gradient + one per layer after the first, each one forward pass
    n_layers = len(parameterized_layers(model))
    assert result.n_gradients == n_layers == len(calls) <= n_layers + 1
    # the model, the optimizer's state and its param groups are untouched
    assert state.differences(model) == []
    after = opt.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    assert after["state"].keys() == opt_state["state"].keys()
    for k, s in opt_state["state"].items():
        for key, v in s.items():
            assert torch.equal(torch.as_tensor(after["state"][k][key]), torch.as_tensor(v)), (k, key)
    for (hyper, params), g in zip(groups, opt.param_groups, strict=True):
        assert {k: v for k, v in g.items() if k != "params"} == hyper
        assert all(a is b for a, b in zip(params, g["params"], strict=True))
    rows = result.to_records()
    assert len(rows) == 4 * len(result.layers)
    assert {r["metric"] for r in rows} == {"l2", "relative_l2", "cosine", "grad_norm"}
    norms = {r["layer"]: r["value"] for r in rows if r["metric"] == "grad_norm"}
    assert norms == {r.layer: r.grad_norm for r in result.layers}
    assert all(r["probe"] == "ics_gradient_change" for r in rows)


def test_bn_preceding_includes_earlier_norm_affine_only():
    model = make_model("mlp", "bn")
    opt = trained(model, OPTIMIZERS["sgd_momentum"])
    x, y = make_batch("mlp", 10, seed=7)
    result = ics_gradient_change(model, F.cross_entropy, (x, y), opt)
    assert result["blocks.1.layer"].preceding == (
        "blocks.0.layer.weight",
        "blocks.0.layer.bias",
        "blocks.0.norm.weight",
        "blocks.0.norm.bias",
    )


def test_running_mode_matches_eval_reference():
    model = make_model("vgg", "bn")
    opt = trained(model, OPTIMIZERS["adam"], arch="vgg")
    x, y = make_batch("vgg", 10, seed=7)
    expected = reference_ics(model, opt, x, y, bn="running")
    result = ics_gradient_change(model, F.cross_entropy, (x, y), opt, bn="running", layers=["head"])
    assert [r.layer for r in result.layers] == ["head"]
    assert result["head"].l2 == pytest.approx(expected["head"][0], rel=1e-9)
    assert result.n_gradients == 2


def test_single_layer_network_has_zero_ics():
    torch.manual_seed(0)
    model = nn.Linear(3, 3).double()
    opt = trained(model, OPTIMIZERS["adam"])
    x, y = make_batch("mlp", 6, seed=1)
    result = ics_gradient_change(model, F.cross_entropy, (x, y), opt)
    assert len(result.layers) == 1 and result.n_gradients == 1
    r = result.layers[0]
    assert (r.l2, r.relative_l2, r.cosine) == (0.0, 0.0, 1.0)


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, 3).double()
        self.unused = nn.Linear(3, 3).double()

    def forward(self, x):
        return self.used(x)


def test_bad_inputs_raise():
    x, y = make_batch("mlp", 6, seed=1)
    model = make_model("mlp", "none")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    no_layer = nn.Sequential(nn.BatchNorm1d(3)).double()
    with pytest.raises(ValueError, match="model"):
        ics_gradient_change(no_layer, F.cross_entropy, (x, y), torch.optim.SGD(no_layer.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="optimizer"):
        other = make_model("mlp", "none")
        ics_gradient_change(model, F.cross_entropy, (x, y), torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="optimizer"):
        ics_gradient_change(model, F.cross_entropy, (x, y), torch.optim.RMSprop(model.parameters()))
    with pytest.raises(ValueError, match="layers"):
        ics_gradient_change(model, F.cross_entropy, (x, y), opt, layers=["blocks.0.norm"])
    unused = WithUnused()
    with pytest.raises(ValueError, match=r"layers.*unused"):
        ics_gradient_change(
            unused, F.cross_entropy, (x, y), torch.optim.SGD(unused.parameters(), lr=0.1), layers=["unused"]
        )
    # by default a layer that never ran is left out
    result = ics_gradient_change(
        unused, F.cross_entropy, (x, y), torch.optim.SGD(unused.parameters(), lr=0.1)
    )
    assert [r.layer for r in result.layers] == ["used"]


# ------------------------------------------------------- "preceding" by first read, not by owner


class PositionEmbedded(nn.Module):
    """A vision-transformer front: ``embed`` (patch linear), then the root's own ``pos`` is added, then
    a hidden layer and a head. ``pos`` belongs to the root, which is called first, but is read after
    ``embed``: it precedes ``hidden`` and ``head``, not ``embed``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pos = nn.Parameter(0.5 * torch.randn(4, 5, dtype=torch.float64))
        self.embed = nn.Linear(3, 5).double()
        self.hidden = nn.Linear(5, 5).double()
        self.head = nn.Linear(5, 3).double()

    def forward(self, x):  # x: (N, 4 tokens, 3)
        h = torch.tanh(self.hidden(torch.tanh(self.embed(x) + self.pos)))
        return self.head(h.mean(1))


class Attentive(nn.Module):
    """Linear → nn.MultiheadAttention → Linear. The attention is a layer (its weight: ``in_proj_weight``)
    that reads ``out_proj``'s weight inside its own call without calling ``out_proj``; those parameters
    precede ``head``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Linear(3, 4).double()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True).double()
        self.head = nn.Linear(4, 3).double()

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


class Gained(nn.Module):
    """A container whose own ``gain`` scales its child's output: ``gain`` is read after ``inner`` ran."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.gain = nn.Parameter(torch.full((5,), 1.5, dtype=torch.float64))
        self.inner = nn.Linear(3, 5).double()
        self.head = nn.Linear(5, 3).double()

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x.mean(1)) * self.gain))


class Templated(nn.Module):
    """Uses later layers' parameters for their metadata only, before the first layer runs: as a dtype
    template (``type_as``, ``to``), a shape template (``view_as``) and for new tensors (``zeros_like``,
    ``new_zeros``). None of these reads a value, so nothing precedes ``a`` (``head.weight`` used to)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a = nn.Linear(3, 5).double()
        self.b = nn.Linear(5, 5).double()
        self.head = nn.Linear(5, 3).double()

    def forward(self, x):
        x = x.mean(1).type_as(self.head.weight).to(self.head.weight)
        offset = torch.zeros_like(self.b.bias) + self.head.weight.new_zeros(5)
        h = torch.tanh(self.a(x) + offset.view_as(self.b.bias))
        return self.head(torch.tanh(self.b(h)))


def by_definition(model: nn.Module, lr: float, x, y, layer: str, moved: set[str]) -> tuple[float, float]:
    """(‖G − G'‖, cos) with the parameters ``moved`` stepped by plain SGD (rate ``lr``), by hand."""

    def grads_of(net):
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    full = grads_of(copy.deepcopy(model))
    net = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n in moved:
                p.sub_(lr * full[n])
    own = [n for n in full if n.startswith(layer + ".")]
    g = torch.cat([full[n].flatten() for n in own])
    g2 = torch.cat([grads_of(net)[n].flatten() for n in own])
    return (g - g2).norm().item(), (g @ g2 / (g.norm() * g2.norm())).item()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            PositionEmbedded,
            {
                "embed": (),
                "hidden": ("pos", "embed.weight", "embed.bias"),
                "head": ("pos", "embed.weight", "embed.bias", "hidden.weight", "hidden.bias"),
            },
        ),
        (
            Attentive,
            {
                "embed": (),
                "attn": ("embed.weight", "embed.bias"),  # its weight: in_proj_weight (and its bias)
                "head": (
                    "embed.weight",
                    "embed.bias",
                    "attn.in_proj_weight",
                    "attn.in_proj_bias",
                    "attn.out_proj.weight",
                    "attn.out_proj.bias",
                ),
            },
        ),
        (Gained, {"inner": (), "head": ("gain", "inner.weight", "inner.bias")}),
        (
            Templated,
            {"a": (), "b": ("a.weight", "a.bias"), "head": ("a.weight", "a.bias", "b.weight", "b.bias")},
        ),
    ],
)
def test_preceding_parameters_are_those_read_before_the_layer_runs(make, expected):
    """Def. 2.1 moves the parameters the layer's input depends on, so a parameter is placed where the
    forward pass first reads it: the first layer has exactly zero ICS even when a parameter of a module
    called earlier (the root) is read after it, and a weight that a module reads without calling its
    owner (MultiheadAttention's out_proj) precedes the layers after it."""
    model = make()
    x = torch.randn(6, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.SGD(model.parameters(), lr=0.4)
    state = ModelState.capture(model)
    result = ics_gradient_change(model, F.cross_entropy, (x, y), opt)
    assert state.differences(model) == []
    assert {r.layer: r.preceding for r in result.layers} == expected
    for r in result.layers:
        l2, cosine = by_definition(model, 0.4, x, y, r.layer, set(r.preceding))
        assert r.l2 == pytest.approx(l2, rel=1e-9, abs=1e-15)
        assert r.cosine == pytest.approx(cosine, rel=1e-9)
    first = result.layers[0]
    assert (first.l2, first.cosine) == (0.0, 1.0)
    assert result.layers[-1].l2 > 1e-3  # the check is not vacuous


# ---------------------------------------------------------------------------------- distributional


@pytest.mark.parametrize(("arch", "norm"), [("mlp", "bn"), ("vgg", "bn"), ("vgg", "none")])
def test_input_statistics_match_numpy(arch, norm):
    model = make_model(arch, norm)
    x, y = make_batch(arch, 12, seed=3)
    reference = copy.deepcopy(model).train()  # train mode = batch statistics, as bn="batch"
    seen = {}

    def keep(name):
        def hook(_module, args, _output) -> None:  # returns None: the output is left alone
            seen.setdefault(name, args[0].detach())

        return hook

    for name, m in parameterized_layers(reference).items():
        m.register_forward_hook(keep(name))
    reference(x)

    state = ModelState.capture(model)
    stats = layer_input_statistics(model, (x, y), percentiles=(10, 50, 90))
    assert state.differences(model) == []
    assert [s.layer for s in stats.layers] == list(seen)
    for s in stats.layers:
        a = seen[s.layer].numpy()
        units = np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)  # (C, N·H·W)
        np.testing.assert_allclose(s.mean, units.mean(1), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(s.var, units.var(1), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(s.percentiles, np.percentile(units, [10, 50, 90], axis=1), rtol=1e-12)
        np.testing.assert_array_equal(s.sorted_samples, np.sort(units, axis=1))
    rows = stats.to_records(n_units=2)
    first = stats.layers[0]
    summary = {r["metric"]: r["value"] for r in rows if r["layer"] == first.layer and "unit" not in r}
    assert summary == pytest.approx(
        {"mean": first.mean.mean(), "var": first.var.mean(), "p10": first.percentiles[0].mean(),
         "p50": first.percentiles[1].mean(), "p90": first.percentiles[2].mean()}
    )  # fmt: skip
    for s in stats.layers:  # 5 statistics for each of the first min(2, units) units
        per_unit = [r for r in rows if r["layer"] == s.layer and "unit" in r]
        assert len(per_unit) == 5 * min(2, s.n_units)
        assert {r["value"] for r in per_unit if r["unit"] == 0 and r["metric"] == "var"} == {s.var[0]}


def test_shift_is_zero_for_itself_and_the_shift_for_a_shifted_input():
    model = make_model("vgg", "bn")
    x, _ = make_batch("vgg", 12, seed=3)
    before = layer_input_statistics(model, x)
    same = distribution_shift(before, layer_input_statistics(model, x))
    assert all(s.wasserstein == 0 and s.mean_shift == 0 and s.var_shift == 0 for s in same.layers)
    delta = 0.7
    shifted = distribution_shift(before, layer_input_statistics(model, x + delta))
    first = shifted["blocks.0.layer"]  # its input is x itself
    assert first.wasserstein == pytest.approx(delta, rel=1e-12)
    assert first.mean_shift == pytest.approx(delta, rel=1e-12)
    assert first.var_shift == pytest.approx(0, abs=1e-12)
    # BN after the first conv removes a constant shift of its output only approximately (zero padding)
    assert {r["metric"] for r in shifted.to_records()} == {"mean_shift", "var_shift", "wasserstein"}


def test_wasserstein1_matches_scipy_for_unequal_sizes():
    rng = np.random.default_rng(0)
    a = np.sort(rng.normal(size=(3, 7)), axis=1)
    b = np.sort(rng.normal(1.0, 2.0, size=(3, 11)), axis=1)
    expected = [scipy.stats.wasserstein_distance(a[i], b[i]) for i in range(3)]
    np.testing.assert_allclose(wasserstein1(a, b), expected, rtol=1e-12)
    np.testing.assert_allclose(wasserstein1(a, a + 0.25), 0.25, rtol=1e-12)


def test_wasserstein1_sorts_unsorted_rows_and_refuses_empty_ones():
    """The quantile coupling needs sorted samples: unsorted rows are sorted first (they gave 1.35 where
    the distance is 0.44); a row without samples has no distribution (``ValueError``)."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 9)), rng.normal(0.5, 1.5, size=(2, 13))
    expected = [scipy.stats.wasserstein_distance(a[i], b[i]) for i in range(2)]
    np.testing.assert_allclose(wasserstein1(a, b), expected, rtol=1e-12)
    np.testing.assert_allclose(wasserstein1(a, a[:, ::-1]), 0.0, atol=0)
    with pytest.raises(ValueError, match="at least one sample"):
        wasserstein1(np.empty((2, 0)), b)
    with pytest.raises(ValueError, match=r"samples: expected a non-empty \(units, samples\)"):
        unit_statistics("x", torch.empty(3, 0), (50,))
