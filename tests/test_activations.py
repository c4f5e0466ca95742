"""Capture hooks and the state guard."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from probes.activations import capture, capture_layer_inputs, capture_layer_outputs
from probes.functional import ModelState, eval_mode, norm_mode, preserved
from studies.lab.norms import BatchNorm


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Sigmoid(), nn.Dropout(0.5), nn.Linear(5, 2))


def test_capture_inputs_outputs_by_type_name_and_module():
    net = small_net().eval()
    x = torch.randn(6, 4)
    with capture_layer_inputs(net, [nn.Linear]) as ins, capture_layer_outputs(net, ["2"]) as outs:
        y = net(x)
    assert set(ins) == {"0", "4"}
    torch.testing.assert_close(ins["0"], x)
    torch.testing.assert_close(outs["2"], torch.sigmoid(net[1](net[0](x))))
    torch.testing.assert_close(net[4](ins["4"]), y)
    with capture_layer_inputs(net, [net[2]]) as ins:
        net(x[:3])
        net(x[3:])
    torch.testing.assert_close(ins["2"], net[1](net[0](x)))  # two calls concatenated along the batch


def test_a_model_that_is_one_layer_is_selected_by_default_and_by_type():
    """The root module's name is ``""``; a model that is a single ``nn.Linear`` is its own only leaf and
    matches its type (both selections used to come out empty)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    for layers in (None, [nn.Linear], [""], [model]):
        with capture_layer_inputs(model, layers) as inputs, capture_layer_outputs(model, layers) as outputs:
            model(x)
        assert list(inputs) == [""] and torch.equal(inputs[""], x)
        torch.testing.assert_close(outputs[""], model(x).detach(), rtol=0, atol=0)


def test_hooks_removed_on_exit_even_after_error():
    net = small_net()
    with pytest.raises(RuntimeError), capture(net, [nn.Linear]):
        raise RuntimeError("inside")
    assert all(not m._forward_hooks for m in net.modules())


def test_bad_layers_and_layers_that_never_ran():
    net = small_net()
    with pytest.raises(ValueError, match="no submodule named 'nope'"), capture(net, ["nope"]):
        pass
    with pytest.raises(ValueError, match="no Conv2d module"), capture(net, [nn.Conv2d]):
        pass
    with pytest.raises(ValueError, match="not part of the model"), capture(net, [nn.Linear(1, 1)]):
        pass
    with pytest.raises(ValueError, match="never ran during the capture: 4"), capture_layer_inputs(net, ["4"]):
        net[0](torch.randn(2, 4))


def test_state_guard_detects_and_restores_everything():
    net = small_net().train()
    net[0].weight.grad = torch.ones_like(net[0].weight)
    state = ModelState.capture(net)
    assert state.differences(net) == []
    net(torch.randn(8, 4)).sum().backward()  # moves BN stats, grads, RNG (dropout)
    net[4].weight.data.add_(1)
    net[2].eval()
    net[4].bias.requires_grad_(False)
    random.random()
    np.random.rand()  # noqa: NPY002 - global state on purpose
    diffs = state.differences(net)
    for expected in (
        "buffers: 1.running_mean",
        "buffers: 1.num_batches_tracked",
        "parameters: 4.weight",
        "grads: 0.weight",
        "training: 2",
        "requires_grad: 4.bias",
        "rng: torch",
        "rng: numpy",
        "rng: python",
    ):
        assert expected in diffs
    state.restore(net)
    assert state.differences(net) == []


def test_preserved_and_eval_mode_restore_flags():
    net = small_net().train()
    net[3].eval()  # a mixed state must come back as it was, not as all-train
    before = {n: m.training for n, m in net.named_modules()}
    with preserved(net):
        net(torch.randn(8, 4))
    assert ModelState.capture(net).differences(net) == []
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert {n: m.training for n, m in net.named_modules()} == before


@pytest.mark.parametrize("factory", [nn.BatchNorm1d, BatchNorm], ids=["torch", "whybn"])
def test_norm_mode_batch_and_running(factory):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), factory(5), nn.Dropout(0.5), nn.Linear(5, 2)).train()
    net[1].running_mean.fill_(3.0)
    x = torch.randn(16, 4)
    state = ModelState.capture(net)
    h = net[0](x)
    with torch.no_grad(), norm_mode(net, "batch"):
        out = net(x)
        assert net[1].training and not net[2].training
    z = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(out, net[3](z * net[1].weight + net[1].bias))  # batch stats, dropout off
    with torch.no_grad(), norm_mode(net, "running"):
        out = net(x)
    z = (h - 3.0) / torch.sqrt(net[1].running_var + 1e-5)
    torch.testing.assert_close(out, net[3](z * net[1].weight + net[1].bias))
    assert state.differences(net) == []  # no running-stat update, flags restored
    with pytest.raises(ValueError, match="bn must be one of"), norm_mode(net, "train"):
        pass
