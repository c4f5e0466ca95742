"""The functional core: parameter selection, batches, the pure loss function and the probe guard."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from probes.functional import (
    FunctionalLoss,
    ModelState,
    as_batches,
    check_loss,
    functional_loss,
    in_one_allocation,
    norm_mode,
    probe_guard,
    resolve_params,
)
from studies.lab.norms import BatchNorm
from tests.cases import make_batch, set_running_stats, tiny_net


def test_resolve_params_all_forms():
    net = tiny_net("mlp", "bn")
    all_names = [n for n, _ in net.named_parameters()]
    assert [n for n, _ in resolve_params(net, None)] == all_names
    net.head.bias.requires_grad_(False)
    assert [n for n, _ in resolve_params(net, None)] == all_names[:-1]
    assert [n for n, _ in resolve_params(net, net.blocks[1].norm)] == [
        "blocks.1.norm.weight",
        "blocks.1.norm.bias",
    ]
    assert [n for n, _ in resolve_params(net, ["head.weight", "blocks.0.layer.bias"])] == [
        "blocks.0.layer.bias",
        "head.weight",
    ]
    chosen = resolve_params(net, [net.head.weight])
    assert chosen[0][0] == "head.weight" and chosen[0][1] is net.head.weight


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (nn.Linear(2, 2), "params: expected a submodule of the model"),
        (["blocks.9.weight"], "params: the model has no parameter named"),
        ([nn.Parameter(torch.zeros(3))], r"params: a parameter of shape \(3,\) is not part of the model"),
        ([], "params: empty selection"),
        (["head.bias", "head.bias"], "params: duplicate parameters"),
        ("head.bias", "params: expected None, a submodule"),
        ([3], "params: expected parameter names or parameters"),
    ],
)
def test_resolve_params_errors(params, match):
    with pytest.raises(ValueError, match=match):
        resolve_params(tiny_net("mlp", "bn"), params)


def test_resolve_params_module_without_params_and_frozen_model():
    net = tiny_net("mlp", "none")
    with pytest.raises(ValueError, match="params: the Tanh submodule has no parameters"):
        resolve_params(net, net.blocks[0].act)
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="params: the model has no trainable"):
        resolve_params(net, None)


def test_as_batches_and_check_loss():
    x, y = torch.zeros(4, 3), torch.zeros(4)
    assert len(as_batches((x, y))) == 1
    assert len(as_batches([(x, y), (x, y)])) == 2
    assert len(as_batches(iter([(x, y)] * 3))) == 3
    for bad in ([], iter([])):
        with pytest.raises(ValueError, match="batches: empty"):
            as_batches(bad)
    with pytest.raises(ValueError, match="batches: expected"):
        as_batches(3)
    with pytest.raises(ValueError, match="batches: every item"):
        as_batches([(x, y, y)])
    assert check_loss(torch.tensor(1.0)) == 1.0
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar .*\(4,\)"):
        check_loss(torch.zeros(4))


def test_functional_loss_is_pure_and_matches_the_model():
    net = set_running_stats(tiny_net("vgg", "bn"))
    batches = [make_batch("vgg", 5, seed=1), make_batch("vgg", 3, seed=2)]
    state = ModelState.capture(net)
    f, theta = functional_loss(net, F.cross_entropy, batches, params=net.head, bn="batch")
    assert theta.shape == (net.head.weight.numel() + net.head.bias.numel(),)
    with torch.no_grad(), norm_mode(net, "batch"):
        expected = sum(len(x) * F.cross_entropy(net(x), y) for x, y in batches) / 8
    torch.testing.assert_close(f(theta), expected, atol=1e-14, rtol=0)
    torch.testing.assert_close(f(f.unflatten(theta)), expected, atol=1e-14, rtol=0)
    assert state.differences(net) == []
    with torch.no_grad():  # f froze the model at creation: later changes do not reach it
        net.blocks[0].layer.weight.add_(1.0)
    torch.testing.assert_close(f(theta), expected, atol=1e-14, rtol=0)
    grads = torch.func.grad(f)(theta)  # composes with torch.func; no buffer mutation refused
    assert grads.shape == theta.shape
    f_running, _ = functional_loss(net, F.cross_entropy, batches, params=net.head, bn="running")
    with torch.no_grad(), norm_mode(net, "running"):
        expected = sum(len(x) * F.cross_entropy(net(x), y) for x, y in batches) / 8
    torch.testing.assert_close(f_running(theta), expected, atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match="theta: expected the parameters"):
        f({"head.weight": net.head.weight})
    with pytest.raises(ValueError, match="theta must have shape"):
        f(torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("factory", [nn.BatchNorm1d, BatchNorm], ids=["torch", "zoo"])
def test_batch_of_one_under_batch_mode(factory):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), factory(4), nn.Linear(4, 2))
    x, y = torch.randn(1, 3), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^batches: a batch of 1 sample\(s\).*bn='batch'"):
        functional_loss(net, F.cross_entropy, (x, y), bn="batch")
    functional_loss(net, F.cross_entropy, (x, y), bn="running")


def test_probe_guard_restores_and_strict_reports():
    net = tiny_net("mlp", "bn")
    net.head.weight.grad = torch.ones_like(net.head.weight)
    state = ModelState.capture(net)
    with pytest.raises(
        AssertionError, match=r"the probe changed the model: .*buffers: blocks.0.norm.running_mean"
    ):
        with probe_guard(net, strict=True):
            net(make_batch("mlp", 8, seed=0)[0]).sum().backward()
    assert state.differences(net) == []
    with probe_guard(net, strict=True):
        with torch.no_grad(), norm_mode(net, "batch"):
            net(make_batch("mlp", 8, seed=0)[0])
    with pytest.raises(RuntimeError, match="inside"), probe_guard(net):
        torch.rand(3)
        raise RuntimeError("inside")
    assert state.differences(net) == []


def test_in_one_allocation_copies_into_views_of_one_buffer():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), torch.randn(2, 1, 2, generator=g)]
    copies = in_one_allocation(tensors)
    assert [c.shape for c in copies] == [t.shape for t in tensors]
    assert all(torch.equal(c, t) for c, t in zip(copies, tensors, strict=True))
    base = copies[0].untyped_storage().data_ptr()
    assert all(c.untyped_storage().data_ptr() == base for c in copies)  # one buffer ...
    assert [c.storage_offset() for c in copies] == [0, 12, 17]  # ... laid out in order
    tensors[0].zero_()
    assert copies[0].abs().sum() > 0  # copies, not aliases
    mixed = in_one_allocation([torch.ones(2), torch.ones(3, dtype=torch.float64)])
    assert [c.dtype for c in mixed] == [torch.float32, torch.float64]  # one buffer each, values kept
    assert all(torch.equal(c, torch.ones_like(c)) for c in mixed)
    assert in_one_allocation([]) == []


class HandBatchNorm(nn.Module):
    """A user's batch norm: batch statistics in training, running ones in eval; ``track`` decides
    whether it follows torch's ``track_running_stats`` convention."""

    def __init__(self, width: int, *, track: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width, dtype=torch.float64))
        self.register_buffer("running_mean", torch.full((width,), 0.3, dtype=torch.float64))
        self.register_buffer("running_var", torch.full((width,), 2.0, dtype=torch.float64))
        if track:
            self.track_running_stats = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            if getattr(self, "track_running_stats", True):
                with torch.no_grad():
                    self.running_mean.lerp_(mean, 0.1)
                    self.running_var.lerp_(var, 0.1)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) / torch.sqrt(var + 1e-5) * self.weight


def test_a_batch_norm_without_track_running_stats_is_named_in_a_warning():
    """Under bn="batch" an unrecognized BN would silently use its running statistics: warned, by class;
    under bn="running" eval mode is right, so nothing is said."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model = nn.Sequential(nn.Linear(3, 3).double(), HandBatchNorm(3, track=False))
    state = ModelState.capture(model)
    with pytest.warns(
        UserWarning, match="HandBatchNorm has running-statistics buffers but no track_running_stats"
    ):
        f, theta = functional_loss(model, F.cross_entropy, (x, y), bn="batch")
        eval_loss = f(theta)
    assert eval_loss.item() == pytest.approx(F.cross_entropy(model.eval()(x), y).item(), rel=1e-14)
    model.train()
    assert state.differences(model) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with norm_mode(model, "running"):
            pass


def test_a_batch_norm_with_track_running_stats_is_run_on_batch_statistics():
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model = nn.Sequential(nn.Linear(3, 3).double(), HandBatchNorm(3, track=True))
    state = ModelState.capture(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f, theta = functional_loss(model, F.cross_entropy, (x, y), bn="batch")
        loss = f(theta)
    h = model[0](x)
    batch_stats = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * model[1].weight
    assert loss.item() == pytest.approx(F.cross_entropy(batch_stats, y).item(), rel=1e-14)
    assert state.differences(model) == []


def _probe_calls() -> dict:
    from probes.conditioning import kfac_factor_conditioning, layer_input_conditioning
    from probes.gradients import layer_gradient_norms, update_to_weight_ratios
    from probes.hessian import hessian_density, hessian_eigenvalues, hessian_trace
    from probes.ics import ics_gradient_change, layer_input_statistics
    from probes.smoothness import landscape_along_gradient

    ce = F.cross_entropy
    return {
        "eigenvalues": lambda m, b, o: hessian_eigenvalues(m, ce, b, k=2).values,
        "eigenvalues_top1": lambda m, b, o: hessian_eigenvalues(m, ce, b, k=1).values,  # gradient start
        "eigenvalues_uncached": lambda m, b, o: hessian_eigenvalues(m, ce, b, cache_graphs=False).values,
        "eigenvalues_fwd": lambda m, b, o: hessian_eigenvalues(m, ce, b, hvp="forward_over_reverse").values,
        "trace": lambda m, b, o: hessian_trace(m, ce, b, n_probes=6).value,
        "density": lambda m, b, o: hessian_density(m, ce, b, n_iter=6, n_runs=2).density,
        "landscape": lambda m, b, o: landscape_along_gradient(m, ce, b, step_sizes=[0.1, 0.4]).losses,
        "ics": lambda m, b, o: [r.l2 for r in ics_gradient_change(m, ce, b, o).layers],
        "gradient_norms": lambda m, b, o: layer_gradient_norms(m, ce, b).grad_norms,
        "update_ratios": lambda m, b, o: update_to_weight_ratios(m, ce, b, o).ratios,
        "kfac": lambda m, b, o: kfac_factor_conditioning(m, ce, b)["head"].G,
        "input_conditioning": lambda m, b, o: layer_input_conditioning(m, b)["head"].eigenvalues,
        "input_statistics": lambda m, b, o: layer_input_statistics(m, b).layers[-1].var,
    }


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "inference_tensors", "autocast"])
@pytest.mark.parametrize("probe", list(_probe_calls()))
def test_probes_work_in_the_callers_no_grad_and_inference_mode(probe, mode):
    """A probe called in an evaluation loop (``torch.no_grad()``, ``torch.inference_mode()``, or on
    batches made there) or in a mixed-precision step (``torch.autocast``, bfloat16 on CPU) gives what
    it gives outside, in the model's dtype, and leaves the model as found."""
    call = _probe_calls()[probe]
    net = tiny_net("mlp", "bn")
    batch = make_batch("mlp", 8, seed=3)
    if mode == "autocast":  # CPU autocast lowers float32 ops (float64 ones it leaves alone)
        net, batch = net.float(), (batch[0].float(), batch[1])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    expected = call(net, batch, opt)
    state = ModelState.capture(net)
    if mode == "inference_tensors":
        with torch.inference_mode():
            made = (batch[0].clone(), batch[1].clone())
        assert made[0].is_inference()
        got = call(net, made, opt)
    elif mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call(net, batch, opt)
    else:
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            got = call(net, batch, opt)
    assert state.differences(net) == []
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_bound_evaluates_at_its_own_theta_and_leaves_the_model_as_found():
    net = tiny_net("mlp", "bn")
    batch = make_batch("mlp", 8, seed=3)
    f = FunctionalLoss.of(net, F.cross_entropy, batch)
    state = ModelState.capture(net)
    theta = f.theta0 + 0.1
    assert f.bound(theta, lambda: f(theta)).item() == f(theta).item()
    assert state.differences(net) == []  # every slot back to the model's own tensor
    with pytest.raises(ValueError, match="inside bound"):
        f.bound(theta, lambda: f(theta.clone()))
    with pytest.raises(RuntimeError, match="already inside a bound"):
        f.bound(theta, lambda: f.bound(theta, lambda: None))
    assert state.differences(net) == []


@pytest.mark.parametrize("probe", list(_probe_calls()))
def test_a_shuffling_data_loader_leaves_the_random_stream_as_found(probe):
    """Iterating a ``DataLoader(shuffle=True)`` draws its permutation from torch's global generator;
    a probe given one puts the generator back, so a training loop that probes goes on with the random
    numbers it would have drawn without the probe (the same dropout masks, the same next epoch)."""
    from torch.utils.data import DataLoader, TensorDataset

    call = _probe_calls()[probe]
    net = tiny_net("mlp", "bn")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = make_batch("mlp", 16, seed=3)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    torch.manual_seed(11)
    drawn = list(loader)  # the batches this loader draws from this state
    torch.manual_seed(11)
    unprobed = torch.rand(3)  # what the run draws next without a probe
    torch.manual_seed(11)
    state = ModelState.capture(net)
    got = call(net, loader, opt)
    assert state.differences(net) == []  # the RNG states included
    assert torch.equal(torch.rand(3), unprobed)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(call(net, drawn, opt)))


@pytest.mark.parametrize("probe", list(_probe_calls()))
def test_every_probe_names_a_batch_of_one_under_batch_mode(probe):
    """BN has no batch statistics for one sample: each probe says so, naming ``batches`` and the way
    out, instead of torch's message from deep inside the forward pass (the input probes used to)."""
    net = tiny_net("mlp", "bn")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = make_batch("mlp", 8, seed=3)
    state = ModelState.capture(net)
    with pytest.raises(ValueError, match=r"^batches: a batch.*one value per channel under bn='batch'"):
        _probe_calls()[probe](net, (x[:1], y[:1]), opt)
    assert state.differences(net) == []


@pytest.mark.parametrize("probe", list(_probe_calls()))
def test_every_probe_keeps_the_gradient_objects_and_runs_no_optimizer_hook(probe):
    """Code that holds a parameter's ``.grad`` (a gradient bucket's view, a logger) still holds the
    model's gradient after a probe: the same object with the same values (the guard used to put back
    copies). The simulated optimizer step is the update rule alone: neither torch's global step hooks
    nor the optimizer's own run (a global step counter saw a phantom step)."""
    net = tiny_net("mlp", "bn")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    batch = make_batch("mlp", 8, seed=3)
    F.cross_entropy(net(batch[0]), batch[1]).backward()  # .grad present, as just before opt.step()
    held = {name: p.grad for name, p in net.named_parameters()}
    values = {name: g.clone() for name, g in held.items()}
    calls = []
    hooks = [
        register_optimizer_step_pre_hook(lambda *a: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda *a: calls.append("global post")),
        opt.register_step_pre_hook(lambda *a: calls.append("own pre")),
        opt.register_step_post_hook(lambda *a: calls.append("own post")),
    ]
    state = ModelState.capture(net)
    try:
        _probe_calls()[probe](net, batch, opt)
    finally:
        for h in hooks:
            h.remove()
    assert calls == []
    assert state.differences(net) == []
    for name, p in net.named_parameters():
        assert p.grad is held[name], name
        assert torch.equal(p.grad, values[name]), name


def test_the_guard_names_a_replaced_gradient_object_and_puts_it_back():
    net = tiny_net("mlp", "bn")
    batch = make_batch("mlp", 8, seed=3)
    F.cross_entropy(net(batch[0]), batch[1]).backward()
    p = net.head.weight
    held, value = p.grad, p.grad.clone()
    state = ModelState.capture(net)
    p.grad = p.grad.clone()
    p.grad.add_(1.0)
    held.add_(2.0)  # written through the object itself too
    assert "grads: head.weight is another tensor object" in state.differences(net)
    state.restore(net)
    assert p.grad is held and torch.equal(held, value)
    assert state.differences(net) == []
