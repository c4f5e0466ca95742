"""Conditioning probes against closed forms, numpy references and hand-computed K-FAC factors (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from probes.activations import capture_layer_inputs
from probes.conditioning import (
    covariance_spectrum,
    default_layers,
    gd_iterations_to_tolerance,
    kfac_factor_conditioning,
    layer_input_conditioning,
    least_squares_conditioning,
    make_least_squares,
    normalization_disturbance,
    rank_collapse,
    spectrum_stats,
    whitening_transform,
)
from probes.functional import ModelState, norm_mode
from probes.ics import layer_input_statistics
from studies.lab.norms import DecorrelatedBatchNorm, IterNorm
from tests.cases import net_case


def gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------ covariance spectra


def test_closed_form_spectrum_stats():
    s = spectrum_stats(torch.diag(torch.tensor([1.0, 4.0, 1.0], dtype=torch.float64)))
    np.testing.assert_allclose(s.eigenvalues, [4.0, 1.0, 1.0])
    assert s.condition_number == pytest.approx(4.0)
    assert s.effective_rank == pytest.approx(36 / 18)  # (Σλ)²/Σλ²
    assert s.stable_rank == pytest.approx(6 / 4)  # Σλ/λmax
    assert s.whiteness == pytest.approx(math.sqrt(1.5))  # diag(2, .5, .5) − I
    assert s.numerical_rank == 3 and s.trace == pytest.approx(6.0)


def test_stable_rank_is_that_of_the_centered_data_matrix():
    x = gaussian(50, 4, 0) @ torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.1], dtype=torch.float64))
    xc = (x - x.mean(0)).numpy()
    s = covariance_spectrum(x)
    assert s.stable_rank == pytest.approx(np.linalg.norm(xc) ** 2 / np.linalg.norm(xc, 2) ** 2)
    c = xc.T @ xc / 50
    assert s.effective_rank == pytest.approx(np.trace(c) ** 2 / np.linalg.norm(c) ** 2)
    np.testing.assert_allclose(s.eigenvalues, np.linalg.eigvalsh(c)[::-1], rtol=1e-12)
    u = covariance_spectrum(x, center=False)
    np.testing.assert_allclose(u.eigenvalues, np.linalg.eigvalsh(x.numpy().T @ x.numpy() / 50)[::-1])


def test_isotropic_and_rank_one_data():
    iso = covariance_spectrum(gaussian(20000, 5, 1))
    assert iso.effective_rank == pytest.approx(5.0, rel=0.01)
    assert iso.stable_rank > 4.5 and iso.condition_number < 1.1 and iso.whiteness < 0.05
    z, v = gaussian(100, 1, 2), gaussian(1, 6, 3)
    one = covariance_spectrum(z @ v)
    assert one.effective_rank == pytest.approx(1.0) and one.stable_rank == pytest.approx(1.0)
    assert one.numerical_rank == 1 and one.condition_number == math.inf


def test_spatial_positions_pool_as_samples():
    x = gaussian(6 * 3 * 2 * 2, 1, 4).view(6, 3, 2, 2)
    pooled = x.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    np.testing.assert_allclose(
        covariance_spectrum(x).eigenvalues,
        np.linalg.eigvalsh(np.atleast_2d(np.cov(pooled.T, bias=True)))[::-1],
    )


def test_zca_whitened_data_is_white():
    x, _, _ = make_least_squares(400, 6, correlated=True, seed=0)
    zca = least_squares_conditioning(x)["zca"]
    assert zca.whiteness < 1e-8 and zca.condition_number == pytest.approx(1.0, abs=1e-8)
    white = whitening_transform(torch.as_tensor(x), method="zca", eps=0.0)
    assert covariance_spectrum(white).whiteness < 1e-8


# ---------------------------------------------------------------------------------- least squares


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda x: x[:1], r"^X: standardizing and whitening need at least 2 samples, got 1"),
        (lambda x: np.hstack([x, np.ones((len(x), 1))]), r"^X: feature\(s\) \[4\] are constant.*intercept"),
        (lambda x: np.hstack([x, x[:, :1] - 2 * x[:, 1:2]]), r"^X: the centered features have rank 4 < d"),
        (lambda x: x[:3], r"^X: the centered features have rank 2 < d = 4"),
        (lambda x: np.where(np.arange(len(x))[:, None] == 3, np.nan, x), r"^X: contains NaN or infinite"),
    ],
)
def test_least_squares_conditioning_names_features_that_cannot_be_whitened(change, match):
    """An intercept column, collinear features or too few samples have no standardization or whitening;
    each used to fail inside numpy's eigh (LinAlgError) after dividing by zero."""
    x = make_least_squares(50, 4, correlated=False, seed=1)[0]
    assert least_squares_conditioning(x)["zca"].condition_number == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match=match):
        least_squares_conditioning(change(x))


def test_standardization_fixes_scaling_but_only_whitening_fixes_correlation():
    scaled = least_squares_conditioning(make_least_squares(2000, 8, correlated=False, seed=0)[0])
    assert scaled["raw"].condition_number > 50
    assert scaled["standardized"].condition_number < 1.3
    corr = least_squares_conditioning(make_least_squares(2000, 8, correlated=True, seed=0)[0])
    expected = (1 + 7 * 0.95) / 0.05  # κ of the equicorrelation matrix
    assert corr["standardized"].condition_number == pytest.approx(expected, rel=0.2)
    assert corr["raw"].condition_number > 50
    for kind in ("pca", "zca"):
        assert corr[kind].condition_number == pytest.approx(1.0, abs=1e-8)
        assert scaled[kind].condition_number == pytest.approx(1.0, abs=1e-8)


def _features(x: np.ndarray) -> dict[str, np.ndarray]:
    xc = x - x.mean(0)
    lam, u = np.linalg.eigh(xc.T @ xc / len(x))
    return {"raw": x, "standardized": xc / x.std(0), "zca": xc @ u / np.sqrt(lam) @ u.T}


@pytest.mark.parametrize("correlated", [False, True])
def test_gd_iterations_follow_condition_numbers(correlated):
    x, y, _ = make_least_squares(1000, 8, correlated=correlated, seed=1)
    runs = {k: gd_iterations_to_tolerance(v, y, tol=1e-6) for k, v in _features(x).items()}
    kappas = {k: r.condition_number for k, r in runs.items()}
    assert all(r.converged for r in runs.values())
    for a in runs:  # ordered as κ wherever the condition numbers differ clearly (2×)
        for b in runs:
            if kappas[a] > 2 * kappas[b]:
                assert runs[a].iterations > runs[b].iterations, (a, b)
    if not correlated:
        assert runs["raw"].iterations > runs["standardized"].iterations > runs["zca"].iterations
    assert runs["zca"].iterations <= 2  # H = I: one step of size 1 solves it
    for r in runs.values():  # excess loss ≤ (1 − 1/κ)^{2k}: k ≤ (κ/2) ln(1/tol) + 1
        assert r.iterations <= r.condition_number / 2 * math.log(1e6) + 1
    if correlated:
        assert runs["standardized"].iterations > 20 * runs["zca"].iterations


# ------------------------------------------------------------------------------ layer conditioning


@pytest.mark.parametrize("name", ["mlp-bn", "mlp-none", "vgg-dbn", "mlp-wn"])
@pytest.mark.parametrize("bn", ["batch", "running"])
def test_layer_input_conditioning_matches_numpy_and_leaves_model(name, bn):
    case = net_case(*name.split("-"))
    model, (x, y) = case.model, case.batches[0]
    batches = [(x, y), (x[:5] * 2, y[:5])]
    state = ModelState.capture(model)
    result = layer_input_conditioning(model, batches, bn=bn)
    assert state.differences(model) == []
    assert list(result.layers) == list(default_layers(model))
    with norm_mode(model, bn), torch.no_grad(), capture_layer_inputs(model, default_layers(model)) as ins:
        for xb, _ in batches:
            model(xb)
    state.restore(model)
    for layer, a in ins.items():
        rows = a.movedim(1, -1).reshape(-1, a.shape[1]).numpy()
        ref = np.linalg.eigvalsh(np.atleast_2d(np.cov(rows.T, bias=True)))[::-1]
        np.testing.assert_allclose(result[layer].eigenvalues, np.clip(ref, 0, None), atol=1e-12)
        assert result[layer].n_samples == rows.shape[0]
    assert {r["metric"] for r in result.to_records()} >= {"condition_number", "effective_rank", "whiteness"}


def test_bad_inputs_name_the_argument():
    case = net_case("mlp", "none")
    model, batch = case.model, case.batches[0]
    model.unused = nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match="layers never ran during the capture: unused"):
        layer_input_conditioning(model, batch, layers=["unused", "head"])
    with pytest.raises(ValueError, match="layers never ran during the forward pass: unused"):
        kfac_factor_conditioning(model, case.loss_fn, batch, layers=["unused"])
    with pytest.raises(ValueError, match="layers never ran during the capture: unused"):
        rank_collapse(model, batch, layer="unused")
    with pytest.raises(ValueError, match="layers"):
        layer_input_conditioning(nn.Sequential(nn.ReLU()), batch)
    with pytest.raises(ValueError, match="bn"):
        layer_input_conditioning(model, batch, layers=["head"], bn="eval")
    with pytest.raises(ValueError, match="batch_size"):
        normalization_disturbance(batch[0], batch_size=1)
    with pytest.raises(ValueError, match="batch: expected inputs with at least 2 samples, got 1"):
        rank_collapse(model, batch[0][:1])
    with pytest.raises(
        ValueError, match=r"batch: expected one \(inputs, targets\) pair .* got a list of tuple"
    ):
        rank_collapse(model, [batch, batch])
    with pytest.raises(ValueError, match="layers"):
        kfac_factor_conditioning(nn.Sequential(nn.ReLU()), F.cross_entropy, batch)


def test_a_layer_that_never_runs_is_left_out_of_the_default_selection():
    """An auxiliary head the forward pass does not call: the default selection measures the layers that
    ran (as ``ics_gradient_change`` does), and rank collapse is taken at the last layer that ran."""
    case = net_case("mlp", "none")
    model, batch = case.model, case.batches[0]
    before = layer_input_conditioning(model, batch)
    rank = rank_collapse(model, batch)
    kfac = kfac_factor_conditioning(model, case.loss_fn, batch)
    stats = layer_input_statistics(model, batch)
    model.aux = nn.Linear(2, 3).double()
    state = ModelState.capture(model)
    after = layer_input_conditioning(model, batch)
    assert list(after.layers) == list(before.layers) and "aux" not in after.layers
    for name in before.layers:
        np.testing.assert_array_equal(after[name].eigenvalues, before[name].eigenvalues)
    assert rank_collapse(model, batch).layer == rank.layer == "head"
    np.testing.assert_array_equal(rank_collapse(model, batch).singular_values, rank.singular_values)
    kfac_after = kfac_factor_conditioning(model, case.loss_fn, batch)
    assert list(kfac_after.layers) == list(kfac.layers)
    np.testing.assert_array_equal(kfac_after["head"].G, kfac["head"].G)
    stats_after = layer_input_statistics(model, batch)
    assert [s.layer for s in stats_after.layers] == [s.layer for s in stats.layers]
    with pytest.raises(ValueError, match="never ran during the capture: aux"):
        layer_input_statistics(model, batch, layers=["aux"])
    assert state.differences(model) == []


# ----------------------------------------------------------------------------------- rank collapse


def deep_mlp(depth: int, width: int, norm: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), *([nn.BatchNorm1d(width)] if norm else []), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 3)).double()


def test_bn_avoids_rank_collapse_of_deep_relu_net():
    x = gaussian(64, 32, 1)
    plain, bn = deep_mlp(30, 32, norm=False), deep_mlp(30, 32, norm=True)
    state = ModelState.capture(bn)
    collapsed, kept = rank_collapse(plain, (x, None)), rank_collapse(bn, (x, None))
    assert state.differences(bn) == []
    assert collapsed.layer == "60" and kept.layer == "90"  # the classifier's input
    assert collapsed.effective_rank < 1.05 and collapsed.mean_cosine > 0.99
    assert kept.effective_rank > 4 * collapsed.effective_rank and kept.mean_cosine < 0.6
    assert kept.numerical_rank == 32 and kept.stable_rank > 2
    s2 = kept.singular_values**2
    assert kept.effective_rank == pytest.approx(s2.sum() ** 2 / (s2**2).sum())


# ------------------------------------------------------------------------- whitening stochasticity


def test_iternorm_transform_follows_the_papers_iterates_for_many_iterations():
    """The probe's IterNorm transform had the layer's one-matrix Newton–Schulz form: at κ(Σ) = 2·10⁴,
    NaN at T = 20 in float64. Both now share the coupled form; here against P_T computed without
    rounding in Σ's eigenbasis."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -2.2, 16, dtype=torch.float64)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64) @ torch.diag(scales) @ q.T
    xc = x - x.mean(0)
    lam, u = torch.linalg.eigh(xc.T @ xc / 64 + 1e-5 * torch.eye(16, dtype=torch.float64))
    p = torch.ones_like(lam)
    for _ in range(20):
        p = 1.5 * p - 0.5 * p**3 * lam / lam.sum()
    expected = xc @ (u @ torch.diag(p / lam.sum().sqrt()) @ u.T)
    y = whitening_transform(x, method="iternorm", iterations=20)
    assert float((y - expected).norm() / expected.norm()) < 1e-10


def test_transforms_match_the_norm_layers():
    x = gaussian(40, 8, 5)
    for whitening in ("zca", "pca"):
        layer = DecorrelatedBatchNorm(8, group_size=4, whitening=whitening, affine=False).double()
        np.testing.assert_allclose(
            whitening_transform(x, method=whitening, group_size=4), layer(x).detach(), atol=1e-10
        )
    layer = IterNorm(8, group_size=8, iterations=3, affine=False).double()
    np.testing.assert_allclose(
        whitening_transform(x, method="iternorm", iterations=3), layer(x).detach(), atol=1e-10
    )
    bn = F.batch_norm(x, None, None, training=True, eps=1e-5)
    np.testing.assert_allclose(whitening_transform(x, method="bn"), bn, atol=1e-12)
    np.testing.assert_allclose(whitening_transform(x, method="zca", group_size=1), bn, atol=1e-12)
    y = whitening_transform(x, method="cholesky", eps=0.0)
    np.testing.assert_allclose(y.T @ y / 40, torch.eye(8, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("method", ["zca", "pca"])
def test_transform_in_float32_on_a_nearly_rank_deficient_batch(method):
    # 8 channels from one input channel: Σ + εI has eigenvalues near ε, and float32 eigh returns one
    # below zero; the transform must stay within rounding of the float64 one (it was nan / 1e13)
    torch.manual_seed(0)
    x = nn.Conv1d(1, 8, 3, padding=1)(30 * torch.randn(16, 1, 40)).detach()
    x = x.movedim(1, -1).reshape(-1, 8)  # (N·L, C)
    xg = (x - x.mean(0)).T.reshape(1, 8, -1)  # Σ as the transform computes it
    assert torch.linalg.eigh(xg @ xg.mT / x.shape[0] + 1e-5 * torch.eye(8))[0].min() < 0
    exact = whitening_transform(x.double(), method=method)
    y = whitening_transform(x, method=method)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    np.testing.assert_allclose(y.double(), exact, atol=0.02 * exact.abs().max().item())


def test_snd_zero_for_full_batch():
    x = gaussian(64, 8, 6)
    for method in ("bn", "zca", "pca", "iternorm", "cholesky"):
        assert normalization_disturbance(x, method=method, batch_size=64, n_batches=3).mean == 0.0


def test_snd_decreases_with_batch_size_and_increases_with_group_size():
    x = gaussian(256, 16, 2)
    snd = {
        m: [
            normalization_disturbance(x, method=m, batch_size=b, n_batches=20).mean for b in (16, 32, 64, 128)
        ]
        for m in ("bn", "zca")
    }
    for m, values in snd.items():
        assert values == sorted(values, reverse=True), m
    assert all(b < z for b, z in zip(snd["bn"], snd["zca"], strict=True))
    groups = [
        normalization_disturbance(x, method="zca", batch_size=32, group_size=g, n_batches=20)
        for g in (1, 2, 4, 8, 16)
    ]
    means = [r.mean for r in groups]
    assert means == sorted(means) and means[-1] > 1.5 * means[0]
    assert [r.group_size for r in groups] == [1, 2, 4, 8, 16]
    assert groups[0].n_draws >= 2 and len(groups[0].to_records()) == 2


# -------------------------------------------------------------------------------------------- K-FAC


def test_kfac_factors_equal_hand_computed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)).double()
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
        for n in (5, 7)
    ]
    model[0].weight.grad = torch.ones_like(model[0].weight)
    state = ModelState.capture(model)
    result = kfac_factor_conditioning(model, F.cross_entropy, batches)
    assert state.differences(model) == []
    x = torch.cat([b[0] for b in batches])
    t = torch.cat([b[1] for b in batches])
    w1, b1, w2 = model[0].weight.detach(), model[0].bias.detach(), model[2].weight.detach()
    h = torch.tanh(x @ w1.T + b1)
    g2 = torch.softmax(h @ w2.T, dim=1) - F.one_hot(t, 3)  # n_b ∂L_b/∂s₂ for the mean CE loss
    g1 = (g2 @ w2) * (1 - h**2)
    a1 = torch.cat([x, torch.ones(12, 1, dtype=torch.float64)], dim=1)
    n = 12
    expected = {"0": (a1.T @ a1 / n, g1.T @ g1 / n), "2": (h.T @ h / n, g2.T @ g2 / n)}
    assert list(result.layers) == ["0", "2"]
    for name, (a, g) in expected.items():
        np.testing.assert_allclose(result[name].A, a, atol=1e-12)
        np.testing.assert_allclose(result[name].G, g, atol=1e-12)
        lam = np.linalg.eigvalsh(a.numpy())
        assert result[name].a_stats.condition_number == pytest.approx(lam[-1] / lam[0])
    assert result["2"].G.shape == (3, 3) and result["0"].A.shape == (4, 4)
    assert any(r["metric"] == "condition_number_AxG" for r in result.to_records())


def test_kfac_factors_of_a_model_that_is_one_linear_layer():
    """Logistic regression, the model *is* an ``nn.Linear`` (the root module): A = E[ā āᵀ] of the
    inputs, G = E[(p − y)(p − y)ᵀ]; the probe used to say the model had no linear layer."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(10, 3, generator=gen, dtype=torch.float64), torch.randint(0, 4, (10,), generator=gen)
    result = kfac_factor_conditioning(model, F.cross_entropy, (x, t))
    assert list(result.layers) == [""]
    a = torch.cat([x, torch.ones(10, 1, dtype=torch.float64)], dim=1)
    g = torch.softmax(model(x).detach(), dim=1) - F.one_hot(t, 4)
    np.testing.assert_allclose(result[""].A, a.T @ a / 10, atol=1e-12)
    np.testing.assert_allclose(result[""].G, g.T @ g / 10, atol=1e-12)


def test_kfac_factors_of_a_frozen_layer_are_those_of_the_trainable_one():
    """G = ∂(N·L)/∂s needs no trainable weight: freezing the first layer (fine-tuning) changes no factor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(9, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (9,), generator=gen))
    trainable = kfac_factor_conditioning(model, F.cross_entropy, batch)
    model[0].requires_grad_(False)
    state = ModelState.capture(model)
    frozen = kfac_factor_conditioning(model, F.cross_entropy, batch)
    assert state.differences(model) == []
    for name in ("0", "2"):
        np.testing.assert_allclose(frozen[name].A, trainable[name].A, rtol=1e-15)
        np.testing.assert_allclose(frozen[name].G, trainable[name].G, rtol=1e-13)
    assert not np.allclose(frozen["0"].G, 0)


def test_kfac_conv_factors_use_unfolded_patches():
    case = net_case("vgg", "bn")
    state = ModelState.capture(case.model)
    result = kfac_factor_conditioning(case.model, case.loss_fn, case.batches, bn=case.bn)
    assert state.differences(case.model) == []
    first = result["blocks.0.layer"]
    assert first.A.shape == (1 * 9 + 1, 1 * 9 + 1) and first.G.shape == (2, 2)
    x = case.batches[0][0]
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 9)
    rows = torch.cat([patches, torch.ones(len(patches), 1, dtype=torch.float64)], dim=1)
    np.testing.assert_allclose(first.A, rows.T @ rows / len(rows), atol=1e-12)
    assert first.a_stats.n_samples == len(rows)


CONVS = {
    # 1-d, groups of 2, "same" with an even kernel (asymmetric padding), reflect padding
    "conv1d_same_reflect_grouped": (
        lambda: nn.Conv1d(4, 6, 4, padding="same", groups=2, padding_mode="reflect"),
        (5, 4, 9),
    ),
    # depthwise 2-d, stride 2, circular padding: each group's G is 1 × 1
    "conv2d_depthwise_circular": (
        lambda: nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3, padding_mode="circular"),
        (4, 3, 7, 6),
    ),
    # 2-d, rectangular kernel, anisotropic stride and dilation, replicate padding, no bias
    "conv2d_dilated_replicate": (
        lambda: nn.Conv2d(
            2, 3, (2, 3), stride=(1, 2), dilation=(2, 1), padding=(1, 0), bias=False, padding_mode="replicate"
        ),
        (4, 2, 6, 7),
    ),
    "conv3d_grouped": (lambda: nn.Conv3d(2, 4, 2, padding=1, groups=2), (3, 2, 3, 4, 3)),
}


@pytest.mark.parametrize("kind", list(CONVS))
def test_kfac_conv_factors_equal_weight_jacobians(kind):
    """Any Conv1d/2d/3d: row (n, position) of A is ∂s[n, o, position]/∂(W[o], b[o]) for an output
    channel o of the group — the patch, read off the convolution itself by ``torch.func.jacrev`` — and
    G's rows are ∂(N·L)/∂s split by group; κ of the block-diagonal ⊕ᵢ Aᵢ ⊗ Gᵢ from its eigenvalues."""
    make, shape = CONVS[kind]
    torch.manual_seed(0)
    conv = make().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen)
    n_out = conv(x)[0].numel()
    model = nn.Sequential(conv, nn.Flatten(), nn.Tanh(), nn.Linear(n_out, 3)).double()
    y = torch.randint(0, 3, (shape[0],), generator=gen)
    state = ModelState.capture(model)
    result = kfac_factor_conditioning(model, F.cross_entropy, (x, y), layers=["0"])["0"]
    assert state.differences(model) == []

    groups, c_out = conv.groups, conv.out_channels
    per_group = c_out // groups
    params = dict(conv.named_parameters())

    def out_of(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return torch.func.functional_call(conv, {"weight": w, **({"bias": b} if b is not None else {})}, (x,))

    w_jac = torch.func.jacrev(out_of)(
        params["weight"].detach(), None if conv.bias is None else conv.bias.detach()
    )
    w_jac = w_jac.reshape(shape[0], c_out, -1, c_out, params["weight"][0].numel())  # (N, o, L, o', fan_in)
    s = conv(x).detach().requires_grad_()
    g = torch.autograd.grad(F.cross_entropy(model[1:](s), y) * shape[0], s)[0].flatten(2)  # (N, C_out, L)
    a_expected, g_expected = [], []
    for i in range(groups):
        o = i * per_group  # patches are the same for every output channel of the group
        patches = w_jac[:, o, :, o].reshape(-1, w_jac.shape[-1])  # (N·L, C_in/groups·∏k)
        if conv.bias is not None:
            patches = torch.cat([patches, torch.ones(len(patches), 1, dtype=torch.float64)], dim=1)
        rows = g[:, o : o + per_group].transpose(1, 2).reshape(-1, per_group)
        a_expected.append(patches.T @ patches / len(patches))
        g_expected.append(rows.T @ rows / len(rows))
    a_blocks, g_blocks = torch.stack(a_expected), torch.stack(g_expected)  # (groups, d, d)
    assert result.groups == groups
    squeeze = (lambda t: t[0]) if groups == 1 else (lambda t: t)  # one group: plain matrices
    np.testing.assert_allclose(result.A, squeeze(a_blocks), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(result.G, squeeze(g_blocks), rtol=1e-12, atol=1e-14)
    kron = [torch.kron(a, gg) for a, gg in zip(a_blocks, g_blocks, strict=True)]
    lam = torch.linalg.eigvalsh(torch.block_diag(*kron))
    assert lam[0] > 1e-8 * lam[-1]
    assert result.condition_number == pytest.approx(float(lam[-1] / lam[0]), rel=1e-9)
    (row,) = [r for r in result_records(model, x, y) if r["metric"] == "condition_number_AxG"]
    assert row["value"] == pytest.approx(result.condition_number, rel=1e-12)
    union = torch.linalg.eigvalsh(torch.block_diag(*a_blocks))
    np.testing.assert_allclose(np.sort(result.a_stats.eigenvalues), union.numpy(), rtol=1e-9, atol=1e-13)


def result_records(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    return kfac_factor_conditioning(model, F.cross_entropy, (x, y), layers=["0"]).to_records()


def test_kfac_grouped_condition_number_is_infinite_when_one_group_is_singular():
    """A group whose input channel is constant has a rank-one Aᵢ (kernel 2, no bias): the layer's block
    ⊕ᵢ Aᵢ ⊗ Gᵢ is singular, κ = inf, though the other group's factors are well conditioned."""
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 2, 2, groups=2, bias=False).double()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(8, 3)).double()
    x = torch.randn(8, 2, 5, dtype=torch.float64)
    x[:, 1] = 1.5
    result = kfac_factor_conditioning(model, F.cross_entropy, (x, torch.arange(8) % 3), layers=["0"])["0"]
    assert result.A.shape == (2, 2, 2) and result.G.shape == (2, 1, 1)
    np.testing.assert_allclose(result.A[1], np.full((2, 2), 2.25), rtol=1e-15)
    assert np.isfinite(np.linalg.cond(result.A[0])) and result.G.min() > 0
    assert result.condition_number == math.inf


def test_layer_input_conditioning_of_token_inputs_pools_tokens():
    """A linear layer on (N, T, C) tokens acts on C: its input covariance is C × C over the N·T tokens."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    x = torch.randn(5, 7, 4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64)
    result = layer_input_conditioning(model, (x, torch.zeros(5)), layers=["0", "2"])
    a = x.reshape(-1, 4)
    expected = np.linalg.eigvalsh(np.cov(a.numpy(), rowvar=False, bias=True))
    stats = result.layers["0"]
    np.testing.assert_allclose(np.sort(stats.eigenvalues), np.sort(expected), rtol=1e-10)
    assert stats.n_samples == 35 and result.layers["2"].eigenvalues.shape == (6,)


# ---------------------------------------------------------------- rank tolerance of float32 data


def test_rank_tolerance_reads_the_precision_of_float32_activations():
    """Float32 activations are known to 1.2e-7, not to float64's 2.2e-16: the rounding of an exactly
    singular input covariance must not read as a direction. The same nets in float32 and float64 give
    the same ranks and κ = inf (float32 gave rank 16 and κ = 5e12 for a rank-3 bottleneck, and rank d
    for BN's centered outputs with N = d samples)."""
    gen = torch.Generator().manual_seed(0)
    x3, x32 = torch.randn(64, 3, generator=gen), torch.randn(16, 32, generator=gen)
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(1)
        bottleneck = nn.Sequential(nn.Linear(3, 16), nn.Linear(16, 2)).to(dtype)
        with torch.no_grad():
            bottleneck[0].bias.fill_(50.0)  # inputs of layer 1: 50 + rank-3 variation
        stats = layer_input_conditioning(bottleneck, (x3.to(dtype), torch.zeros(64)), layers=["1"])["1"]
        assert (stats.numerical_rank, stats.condition_number) == (3, math.inf), dtype
        assert stats.eigenvalues[2] / stats.eigenvalues[0] > 1e-3  # the genuine directions stay

        torch.manual_seed(2)
        centered = nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)).to(dtype)
        collapse = rank_collapse(centered, x32.to(dtype))  # N = d = 16, centered by BN: rank 15
        assert collapse.layer == "2" and collapse.numerical_rank == 15, dtype
        kfac = kfac_factor_conditioning(centered, F.cross_entropy, (x32.to(dtype), torch.arange(16) % 3))
        assert kfac["2"].g_stats.numerical_rank == 2, dtype  # softmax gradients sum to 0 over classes
        assert kfac["2"].g_stats.condition_number == math.inf, dtype


def test_a_genuinely_ill_conditioned_float32_covariance_keeps_its_condition_number():
    """The data-precision term only drops what float32 cannot resolve: a κ of 1e6 (σ ratio 1e3) is
    kept, equal to float64's to float32 accuracy."""
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    x = torch.randn(4000, 6, generator=gen, dtype=torch.float64) * torch.logspace(
        0, -3, 6, dtype=torch.float64
    )
    x = x @ q.T
    exact = covariance_spectrum(x)
    single = covariance_spectrum(x.float())
    assert exact.condition_number == pytest.approx(1e6, rel=0.1)
    assert single.numerical_rank == 6
    assert single.condition_number == pytest.approx(exact.condition_number, rel=1e-3)


def test_gd_condition_number_of_collinear_features_is_infinite():
    """κ of a singular least-squares Hessian is inf, by the module's rank tolerance (it came out as
    inf, 3.4e15 or 2.2e18 by seed)."""
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        base = torch.randn(50, 2, generator=gen, dtype=torch.float64)
        X = torch.cat([base, base[:, :1] * 3.0 - base[:, 1:] * 0.5], dim=1)  # third = combination
        y = torch.randn(50, generator=gen, dtype=torch.float64)
        run = gd_iterations_to_tolerance(X, y, tol=1e-3)
        assert run.condition_number == math.inf, seed
        assert covariance_spectrum(X, center=False).condition_number == math.inf


def test_kfac_reads_a_layer_input_passed_by_keyword():
    """``self.fc(input=x)``: the layer's input is its forward's first argument by keyword too, as for
    the other input probes (K-FAC raised IndexError)."""

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(4, 5).double()
            self.head = nn.Linear(5, 3).double()

        def forward(self, x):
            return self.head(input=torch.tanh(self.fc(input=x)))

    model = Keyword()
    x = gaussian(10, 4, seed=1)
    y = torch.arange(10) % 3
    state = ModelState.capture(model)
    by_keyword = kfac_factor_conditioning(model, F.cross_entropy, (x, y))
    assert state.differences(model) == []
    plain = nn.Sequential(model.fc, nn.Tanh(), model.head)
    by_position = kfac_factor_conditioning(plain, F.cross_entropy, (x, y))
    for name, other in (("fc", "0"), ("head", "2")):
        np.testing.assert_array_equal(by_keyword[name].A, by_position[other].A)
        np.testing.assert_array_equal(by_keyword[name].G, by_position[other].G)
