"""Input-statistics probes on a token model: an ``nn.Embedding`` takes indices, which have no statistics,
and an ``nn.Linear`` on ``(N, T, C)`` tokens has C features, each pooled over the N·T tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from probes.activations import feature_axis
from probes.conditioning import layer_input_conditioning
from probes.functional import ModelState
from probes.gradients import effective_learning_rates, layer_gradient_norms
from probes.ics import layer_input_statistics


def token_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    ids = torch.randint(0, 11, (5, 7), generator=torch.Generator().manual_seed(1))
    return model, ids


def test_feature_axis_is_last_for_matrix_weights_only():
    assert feature_axis(nn.Linear(3, 2)) == -1
    assert feature_axis(nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))) == -1
    assert feature_axis(nn.Conv1d(3, 2, 1)) == 1
    assert feature_axis(nn.BatchNorm1d(3)) == 1


def test_input_statistics_skip_the_embedding_and_pool_tokens():
    model, ids = token_model()
    state = ModelState.capture(model)
    stats = layer_input_statistics(model, ids)
    conditioning = layer_input_conditioning(model, (ids, torch.zeros(5)))
    assert state.differences(model) == []
    assert [s.layer for s in stats.layers] == ["1", "3"] and list(conditioning.layers) == ["1", "3"]
    tokens = model[0](ids).detach().reshape(-1, 4)  # (N·T, C): the first Linear's input
    hidden = torch.relu(model[1](tokens)).detach()
    for name, rows in (("1", tokens), ("3", hidden)):
        s = stats[name]
        np.testing.assert_allclose(s.mean, rows.mean(0).numpy(), rtol=1e-12)
        np.testing.assert_allclose(s.var, rows.var(0, unbiased=False).numpy(), rtol=1e-12)
        assert s.sorted_samples.shape == (rows.shape[1], 35)
        expected = np.linalg.eigvalsh(np.cov(rows.numpy(), rowvar=False, bias=True))[::-1]
        np.testing.assert_allclose(conditioning[name].eigenvalues, expected.clip(0), rtol=1e-9, atol=1e-14)
        assert conditioning[name].n_samples == 35


def test_naming_an_index_fed_layer_is_an_error():
    model, ids = token_model()
    with pytest.raises(ValueError, match=r"layers: '0' \(torch.int64\) take indices"):
        layer_input_statistics(model, ids, layers=["0", "1"])
    with pytest.raises(ValueError, match=r"layers: '0' \(torch.int64\) take indices"):
        layer_input_conditioning(model, (ids, torch.zeros(5)), layers=[nn.Embedding])
    with pytest.raises(ValueError, match=r"every selected layer \(0\) takes indices"):
        layer_input_statistics(nn.Sequential(nn.Embedding(11, 4), nn.Flatten()).double(), ids)


class AttentionModel(nn.Module):
    """nn.MultiheadAttention reads ``out_proj.weight`` without calling ``out_proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_multihead_attention_is_a_layer_and_its_out_proj_is_named_not_guessed():
    """The attention is a layer: its weight is ``in_proj_weight`` with ``out_proj.weight``, its input
    the query (``(N, T, E)``: E features). ``out_proj`` never runs as a module, so it has no input to
    measure and no place in the forward order: default selections leave it out (the input probes used
    to raise for every MHA model); named, its gradient is the true one."""
    torch.manual_seed(0)
    model = AttentionModel().double()
    x = torch.randn(5, 6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    state = ModelState.capture(model)
    conditioning = layer_input_conditioning(model, (x, y))
    assert list(conditioning.layers) == ["attn", "head"]
    expected = np.linalg.eigvalsh(np.cov(x.reshape(-1, 4).numpy().T, bias=True))
    np.testing.assert_allclose(np.sort(conditioning["attn"].eigenvalues), np.sort(expected), rtol=1e-10)
    norms = layer_gradient_norms(model, F.cross_entropy, (x, y))
    assert norms.layers == ("attn", "head")
    attn = model.attn
    g_in, g_out = torch.autograd.grad(
        F.cross_entropy(model(x), y), [attn.in_proj_weight, attn.out_proj.weight]
    )
    assert norms.grad_norms[0] == pytest.approx(
        float(torch.cat([g_in.flatten(), g_out.flatten()]).norm()), rel=1e-12
    )
    weights = torch.cat([attn.in_proj_weight.detach().flatten(), attn.out_proj.weight.detach().flatten()])
    assert norms.weight_norms[0] == pytest.approx(float(weights.norm()), rel=1e-12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert effective_learning_rates(model, opt).layers == ("attn", "head")  # out_proj: inside attn's weight
    named = layer_gradient_norms(model, F.cross_entropy, (x, y), layers=["attn.out_proj", "head"])
    assert named.layers == ("head", "attn.out_proj")  # forward order; never called as a module: last
    assert named.grad_norms[1] == pytest.approx(float(g_out.norm()), rel=1e-12)
    assert state.differences(model) == []
