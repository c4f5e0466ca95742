"""Hessian-vector products against explicit float64 Hessians on the shared tiny cases."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from probes.functional import ModelState, functional_loss, norm_mode, preserved
from probes.gradients import layer_gradient_norms
from probes.hvp import HessianOperator, auto_method, hessian_operator
from tests.cases import CASES, explicit_hessian, make_batch, set_running_stats, tiny_net

METHODS = ["double_backward", "forward_over_reverse"]


def dense(op: HessianOperator) -> torch.Tensor:
    return op.matvec(torch.eye(op.shape[0], dtype=op.dtype))


def plain_hessian(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    """Double backward on the model itself (train mode, running stats move): the textbook reference."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(x), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [torch.autograd.grad(g[i], params, retain_graph=True) for i in range(g.numel())]
    return torch.stack([torch.cat([t.reshape(-1) for t in row]) for row in rows])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_operator_equals_explicit_hessian(name, method):
    case = CASES[name]()
    state = ModelState.capture(case.model)
    expected = explicit_hessian(case.model, case.loss_fn, case.batches, bn=case.bn)
    with hessian_operator(case.model, case.loss_fn, case.batches, bn=case.bn, method=method) as op:
        assert op.shape == expected.shape and op.dtype == torch.float64
        hessian = dense(op)
        assert op.n_matvecs == op.shape[0]
        assert state.differences(case.model) == []  # after a matvec, not only after close
    torch.testing.assert_close(hessian, expected, atol=1e-8, rtol=0)
    assert state.differences(case.model) == []


def test_saddle_case_spectrum_is_known_and_negative_dominated():
    case = CASES["saddle"]()
    eig = torch.linalg.eigvalsh(explicit_hessian(case.model, case.loss_fn, case.batches)).numpy()
    np.testing.assert_allclose(eig, case.eigenvalues, atol=1e-10)
    assert -eig[0] > 5 * eig[-1] > 0


@pytest.mark.parametrize("arch", ["mlp", "vgg"])
def test_batch_mode_differs_from_running_mode(arch):
    net = set_running_stats(tiny_net(arch, "bn"))
    batch = make_batch(arch, 8, seed=10)
    h_batch = dense(hessian_operator(net, F.cross_entropy, batch, bn="batch"))
    h_running = dense(hessian_operator(net, F.cross_entropy, batch, bn="running"))
    assert (h_batch - h_running).abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("flavor", ["torch", "zoo-mlp", "zoo-vgg"])
def test_batch_mode_equals_plain_train_mode_double_backward(flavor, method):
    if flavor == "torch":
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
        set_running_stats(net)
        batch = make_batch("mlp", 8, seed=10)
    else:
        arch = flavor.split("-")[1]
        net, batch = set_running_stats(tiny_net(arch, "bn")), make_batch(arch, 8, seed=10)
    net.eval()  # the probe must not care about the caller's mode
    state = ModelState.capture(net)
    reference_net = copy.deepcopy(net).train()
    expected = plain_hessian(reference_net, F.cross_entropy, *batch)
    moved = ModelState.capture(net).differences(reference_net)
    assert any("running_mean" in d for d in moved)  # the plain path moved the copy's running stats
    op = hessian_operator(net, F.cross_entropy, batch, bn="batch", method=method)
    torch.testing.assert_close(dense(op), expected, atol=1e-10, rtol=0)
    op.close()
    assert state.differences(net) == []  # the original's running stats did not move


@pytest.mark.parametrize("cache_graphs", [None, True, False])
@pytest.mark.parametrize("method", METHODS)
def test_multi_batch_is_sample_weighted_mean(method, cache_graphs):
    net = tiny_net("mlp", "bn")
    batches = [make_batch("mlp", 5, seed=1), make_batch("mlp", 3, seed=2)]
    per_batch = [explicit_hessian(net, F.cross_entropy, b) for b in batches]
    expected = (5 * per_batch[0] + 3 * per_batch[1]) / 8
    state = ModelState.capture(net)
    with hessian_operator(
        net, F.cross_entropy, iter(batches), method=method, cache_graphs=cache_graphs
    ) as op:
        assert op.cache_graphs is (False if cache_graphs is None else cache_graphs)
        torch.testing.assert_close(dense(op), expected, atol=1e-10, rtol=0)
        # gradient and loss of the same weighted loss, against the model run plainly on a copy
        ref = copy.deepcopy(net)
        with norm_mode(ref, "batch"):
            losses = [F.cross_entropy(ref(x), y) for x, y in batches]
        ref_loss = (5 * losses[0] + 3 * losses[1]) / 8
        ref_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ref_loss, list(ref.parameters()))])
        torch.testing.assert_close(op.gradient(), ref_grad, atol=1e-12, rtol=0)
        assert op.loss() == pytest.approx(float(ref_loss.detach()), abs=1e-12)
    assert state.differences(net) == []
    # the equal-weight average would differ: the weighting is really by sample count
    assert (expected - (per_batch[0] + per_batch[1]) / 2).abs().max() > 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_params_block_is_diagonal_block_of_full_hessian(method):
    case = CASES["vgg-bn"]()
    net = case.model
    names = [n for n, _ in net.named_parameters()]
    offsets = np.cumsum([0] + [p.numel() for p in net.parameters()])
    index = {n: torch.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names)}
    full = explicit_hessian(net, case.loss_fn, case.batches)
    selections = {
        "module": (net.blocks[1].layer, ["blocks.1.layer.weight", "blocks.1.layer.bias"]),
        "names": (["head.bias", "blocks.0.norm.weight"], ["blocks.0.norm.weight", "head.bias"]),
        "parameters": ([net.head.weight], ["head.weight"]),
    }
    for params, expected_names in selections.values():
        op = hessian_operator(net, case.loss_fn, case.batches, params=params, method=method)
        assert op.param_names == expected_names  # model order, whatever order was asked
        assert op.param_shapes == [tuple(dict(net.named_parameters())[n].shape) for n in expected_names]
        idx = torch.cat([index[n] for n in expected_names])
        torch.testing.assert_close(dense(op), full[idx][:, idx], atol=1e-10, rtol=0)
        v = torch.arange(op.shape[0], dtype=torch.float64)
        parts = op.unflatten(v)
        assert list(parts) == expected_names and parts[expected_names[0]].shape == op.param_shapes[0]


@pytest.mark.parametrize("method", METHODS)
def test_state_guard_holds_after_every_operation(method):
    net = set_running_stats(tiny_net("mlp", "bn"))
    net.blocks[0].act.eval()  # a mixed mode
    net.head.bias.requires_grad_(False)
    net.blocks[0].layer.weight.grad = torch.full_like(net.blocks[0].layer.weight, 3.0)
    batch = make_batch("mlp", 8, seed=10)
    state = ModelState.capture(net)
    op = hessian_operator(net, F.cross_entropy, batch, method=method)
    assert "head.bias" not in op.param_names  # None = trainable parameters only
    assert state.differences(net) == []
    v = torch.randn(op.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hv = op.matvec(v)
    assert op.n_matvecs == 3 and hv.shape == v.shape
    assert state.differences(net) == []
    torch.testing.assert_close(op.matvec(v[:, 1]), hv[:, 1], atol=1e-12, rtol=0)
    op.gradient(), op.loss()
    assert state.differences(net) == []
    lin = op.to_scipy()
    out = lin @ v[:, 0].numpy()
    assert out.dtype == np.float64 and op.n_matvecs == 5
    np.testing.assert_allclose(out, hv[:, 0].numpy(), atol=1e-12)
    np.testing.assert_allclose(lin.matmat(v.numpy()), hv.numpy(), atol=1e-12)
    assert op.n_matvecs == 8
    op.close()
    assert state.differences(net) == []
    assert torch.equal(net.blocks[0].layer.weight.grad, torch.full_like(net.blocks[0].layer.weight, 3.0))
    with pytest.raises(RuntimeError, match="closed"):
        op.matvec(v)


def test_noisy_bn_noise_is_off_during_the_probe():
    noisy, plain = tiny_net("mlp", "noisy_bn"), tiny_net("mlp", "bn")
    plain.load_state_dict(noisy.state_dict())
    batch = make_batch("mlp", 8, seed=10)
    state = ModelState.capture(noisy)
    for method in METHODS:
        h1 = dense(hessian_operator(noisy, F.cross_entropy, batch, method=method))
        h2 = dense(hessian_operator(noisy, F.cross_entropy, batch, method=method))
        torch.testing.assert_close(h1, h2, atol=0, rtol=0)  # no random draws
        torch.testing.assert_close(
            h1, dense(hessian_operator(plain, F.cross_entropy, batch)), atol=1e-10, rtol=0
        )
    assert state.differences(noisy) == []  # RNG included


def test_float32_and_dtype_option():
    net = tiny_net("mlp", "bn").float()
    x, y = make_batch("mlp", 8, seed=10)
    op = hessian_operator(net, F.cross_entropy, (x.float(), y), dtype=torch.float32)
    assert op.dtype == torch.float32 and op.matvec(torch.ones(op.shape[0])).dtype == torch.float32
    expected = explicit_hessian(net.double(), F.cross_entropy, (x, y))
    torch.testing.assert_close(dense(op).double(), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"dtype: .*model\.double\(\)"):
        hessian_operator(net, F.cross_entropy, (x, y), dtype=torch.float32)


def test_auto_method_per_device():
    assert auto_method("cpu") == "double_backward"
    assert auto_method("cuda") == "double_backward"
    case = CASES["mlp-none"]()
    assert hessian_operator(case.model, case.loss_fn, case.batches).method == "double_backward"


def test_bad_inputs():
    case = CASES["mlp-bn"]()
    net, batch = case.model, case.batches[0]
    state = ModelState.capture(net)
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        hessian_operator(net, lambda out, y: F.cross_entropy(out, y, reduction="none"), batch)
    with pytest.raises(ValueError, match="batches: empty"):
        hessian_operator(net, F.cross_entropy, [])
    with pytest.raises(ValueError, match=r"params: .*not part of the model"):
        hessian_operator(net, F.cross_entropy, batch, params=[nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="params: the model has no parameter named 'nope'"):
        hessian_operator(net, F.cross_entropy, batch, params=["nope"])
    with pytest.raises(ValueError, match=r"batches: a batch of 1 sample.*bn='batch'"):
        hessian_operator(net, F.cross_entropy, [batch, (batch[0][:1], batch[1][:1])])
    hessian_operator(
        net, F.cross_entropy, (batch[0][:1], batch[1][:1]), bn="running"
    )  # fine with running stats
    with pytest.raises(ValueError, match="method must be one of"):
        hessian_operator(net, F.cross_entropy, batch, method="finite_differences")
    with pytest.raises(ValueError, match="bn must be one of"):
        hessian_operator(net, F.cross_entropy, batch, bn="train")
    op = hessian_operator(net, F.cross_entropy, batch)
    with pytest.raises(ValueError, match="v must have shape"):
        op.matvec(torch.ones(op.shape[0] + 1))
    assert state.differences(net) == []


class _AuxHead(nn.Module):
    """A trunk and an auxiliary head that this loss does not use (``forward`` returns the trunk's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.aux = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


@pytest.mark.parametrize("cache_graphs", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_a_block_the_loss_does_not_use_or_is_linear_in_has_a_zero_hessian(method, cache_graphs):
    """Double backward raised autograd's "element 0 of tensors does not require grad" for a block no
    forward pass uses (per-layer probes over a model with an auxiliary head) and for one the loss is
    linear in (a constant gradient); both Hessian blocks are zero, and so is the first one's gradient."""
    from probes.hessian import hessian_eigenvalues, hessian_outliers, hessian_trace

    torch.manual_seed(0)
    model = _AuxHead().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    lin = nn.Linear(4, 3).double()
    state = ModelState.capture(model)
    kw = {"method": method, "cache_graphs": cache_graphs if method == "double_backward" else None}
    with hessian_operator(
        model, F.cross_entropy, [(x[:4], y[:4]), (x[4:], y[4:])], params=model.aux, **kw
    ) as op:
        v = torch.randn(op.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        assert torch.equal(op.matvec(v), torch.zeros_like(v))
        assert torch.equal(op.gradient(), torch.zeros(op.shape[0], dtype=torch.float64))
        with torch.no_grad():
            assert op.loss() == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-12)
    # the mixed selection: the aux block's rows and columns of the Hessian are zero, the rest is the trunk's
    both = [*[n for n, _ in model.trunk.named_parameters(prefix="trunk")], "aux.weight"]
    with hessian_operator(model, F.cross_entropy, (x, y), params=both, **kw) as op:
        H = op.matvec(torch.eye(op.shape[0], dtype=torch.float64))
    n_aux = model.aux.weight.numel()
    trunk_only = dense(hessian_operator(model, F.cross_entropy, (x, y), params=model.trunk, method=method))
    torch.testing.assert_close(H[:-n_aux, :-n_aux], trunk_only, rtol=1e-12, atol=1e-14)
    assert torch.equal(H[-n_aux:], torch.zeros_like(H[-n_aux:])) and torch.equal(
        H[:, -n_aux:], 0 * H[:, -n_aux:]
    )
    # the probes: a zero spectrum, and outlier measures that are undefined (NaN), not an error
    eig = hessian_eigenvalues(model, F.cross_entropy, (x, y), k=2, params=model.aux, hvp=method)
    assert eig.converged and np.array_equal(eig.values, [0.0, 0.0])
    assert (
        hessian_trace(model, F.cross_entropy, (x, y), params=model.aux, hvp=method, n_probes=4).value == 0.0
    )
    out = hessian_outliers(model, F.cross_entropy, (x, y), num_classes=2, params=model.aux, hvp=method)
    assert math.isnan(out.ratio) and math.isnan(out.gradient_fraction)
    # the functional loss's own gradient (the gradient probes' path) is zero there too, not that error
    f, theta0 = functional_loss(model, F.cross_entropy, (x, y), params=model.aux)
    value, grad = f.value_and_grad(theta0)
    with torch.no_grad():
        expected = float(F.cross_entropy(model(x), y))
    assert torch.equal(grad, torch.zeros_like(theta0)) and value == pytest.approx(expected, rel=1e-12)
    # a loss linear in the block: the gradient is constant, the Hessian block zero
    with hessian_operator(lin, lambda o, t: o.mean(), (x, y), params=["bias"], **kw) as op:
        assert torch.equal(op.matvec(torch.ones(3, dtype=torch.float64)), torch.zeros(3, dtype=torch.float64))
        torch.testing.assert_close(op.gradient(), torch.full((3,), 1 / 3, dtype=torch.float64))
    assert state.differences(model) == []


def test_torch_batchnorm_in_a_users_model_is_right_with_both_methods():
    """A researcher's own model with ``torch.nn.BatchNorm1d`` (the fused kernel), ``bn="batch"``.

    Reference: the same network with whybn's composite ``bn`` (same weights), whose ``torch.func.hessian``
    is checked against double backward above, and central differences of plain autograd gradients.
    ``torch.func.hessian`` (jacfwd over jacrev) of the *fused* kernel itself is not a valid reference
    in torch 2.13: its block between the BN weight and the conv parameters before it came out wrong
    (asymmetric; 0.15 off on this net), while ``jvp(grad)`` and double backward agree with finite
    differences — whybn's two HVP methods are the latter.
    """
    from studies.lab.norms import make_norm

    torch.manual_seed(0)

    def net(norm: nn.Module) -> nn.Module:
        return nn.Sequential(nn.Conv1d(3, 4, 1), norm, nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)).double()

    users = net(nn.BatchNorm1d(4))
    ours = net(make_norm("bn", 4))
    with torch.no_grad():
        nn.init.uniform_(users[1].weight, 0.5, 1.5)
        nn.init.uniform_(users[1].bias, -0.5, 0.5)
    ours.load_state_dict(users.state_dict())
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    expected = explicit_hessian(ours, F.cross_entropy, (x, y), bn="batch")

    params = list(users.parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def grad_at(t: torch.Tensor) -> torch.Tensor:
        model = copy.deepcopy(users)
        torch.nn.utils.vector_to_parameters(t, model.parameters())
        with norm_mode(model, "batch"):
            loss = F.cross_entropy(model(x), y)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])

    eps = 1e-6
    eye = torch.eye(theta.numel(), dtype=torch.float64)
    fd = torch.stack([(grad_at(theta + eps * e) - grad_at(theta - eps * e)) / (2 * eps) for e in eye])
    torch.testing.assert_close(expected, fd, rtol=1e-6, atol=1e-7)
    state = ModelState.capture(users)
    for method in METHODS:
        with hessian_operator(users, F.cross_entropy, (x, y), bn="batch", method=method) as op:
            torch.testing.assert_close(dense(op), expected, rtol=1e-10, atol=1e-12)
    assert state.differences(users) == []


def test_cached_graph_is_built_with_the_operator_and_validates_the_batches():
    """With one batch and double backward the operator builds its gradient graph at once (that forward
    pass is the input check, so there is no second one): the gradient is ready, no product has been
    counted, the model is untouched, and a non-scalar loss fails at construction."""
    case = CASES["mlp-bn"]()
    state = ModelState.capture(case.model)
    op = hessian_operator(case.model, case.loss_fn, case.batches, method="double_backward")
    assert op._graphs_ready() and op.n_matvecs == 0
    assert state.differences(case.model) == []
    f, theta = functional_loss(case.model, case.loss_fn, case.batches, bn="batch")
    torch.testing.assert_close(op.gradient(), torch.func.grad(f)(theta), rtol=1e-10, atol=1e-12)
    for cache in (True, False):
        with pytest.raises(ValueError, match="scalar"):
            hessian_operator(
                case.model,
                lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none"),
                case.batches,
                method="double_backward",
                cache_graphs=cache,
            )
    assert state.differences(case.model) == []


def test_accumulating_a_product_never_aliases_or_changes_the_input():
    """The first product of a single vector becomes the result (no second n-vector); should autograd
    hand back the input vector itself (a backward pass that passes it through), it is copied first."""
    from probes.hvp import _accumulate

    cols = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    for w in (1.0, 0.25):
        out = _accumulate(None, cols, 0, w, cols[:, 0])  # hv aliasing the input
        torch.testing.assert_close(out, w * torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64))
        assert out.untyped_storage().data_ptr() != cols.untyped_storage().data_ptr()
        torch.testing.assert_close(cols, torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64))
        fresh = torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64)
        out = _accumulate(None, cols, 0, w, fresh)  # a fresh product is reused, scaled in place
        assert out.untyped_storage().data_ptr() == fresh.untyped_storage().data_ptr()
        torch.testing.assert_close(out[:, 0], w * torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64))
        out = _accumulate(out, cols, 0, 2.0, torch.ones(3, dtype=torch.float64))  # a second batch adds
        torch.testing.assert_close(out[:, 0], w * torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64) + 2.0)
    two = torch.zeros(3, 2, dtype=torch.float64)
    out = _accumulate(None, two, 1, 0.5, torch.ones(3, dtype=torch.float64))  # k > 1: a fresh (n, k) buffer
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5]] * 3, dtype=torch.float64))


# ------------------------------------------------------------------- torch's own layers, by FD


class _Attention(nn.Module):
    """``nn.MultiheadAttention`` over 3 tokens of 4 features (its CPU flash kernel's backward has no
    derivative, so the operator must build its graph on the math backend)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.view(x.shape[0], 3, 4))
        return self.head((h + self.mha(h, h, h, need_weights=False)[0]).mean(1))


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x.view(x.shape[0], 3, 4))[0][:, -1])


def _mlp(*middle: nn.Module, first: nn.Module | None = None) -> nn.Module:
    return nn.Sequential(first or nn.Linear(12, 6), *middle, nn.Linear(6, 3))


def _conv(norm: nn.Module) -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 3, 4)),
        nn.Conv2d(1, 4, 3, padding=1),
        norm,
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(48, 3),
    )


TORCH_LAYERS = {
    "BatchNorm1d": lambda: _mlp(nn.BatchNorm1d(6), nn.Tanh()),
    "BatchNorm2d": lambda: _conv(nn.BatchNorm2d(4)),
    "LayerNorm": lambda: _mlp(nn.LayerNorm(6), nn.Tanh()),
    "RMSNorm": lambda: _mlp(nn.RMSNorm(6), nn.Tanh()),
    "GroupNorm": lambda: _conv(nn.GroupNorm(2, 4)),
    "InstanceNorm2d": lambda: _conv(nn.InstanceNorm2d(4, affine=True)),
    "parametrizations.weight_norm": lambda: _mlp(
        nn.Tanh(), first=nn.utils.parametrizations.weight_norm(nn.Linear(12, 6))
    ),
    "utils.weight_norm": lambda: _mlp(nn.Tanh(), first=nn.utils.weight_norm(nn.Linear(12, 6))),
    "parametrizations.spectral_norm": lambda: _mlp(
        nn.Tanh(), first=nn.utils.parametrizations.spectral_norm(nn.Linear(12, 6))
    ),
    "MultiheadAttention": _Attention,
    "LSTM": _Recurrent,
    "GELU": lambda: _mlp(nn.GELU()),
}


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*:FutureWarning")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer", list(TORCH_LAYERS))
def test_hvp_through_torchs_own_layers_matches_finite_differences(layer, method):
    """H v against central differences of plain autograd gradients of the model (in the probe's norm
    mode), for torch's built-in layers in a researcher's model. Two of them need the operator's
    :func:`~probes.functional.twice_differentiable` graphs: torch 2.13's fused weight norm has a wrong
    double backward (24 % off here) and no forward-mode rule, and nn.MultiheadAttention's CPU flash
    kernel has no double backward."""
    torch.manual_seed(1)
    model = TORCH_LAYERS[layer]().double().train()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(10, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    params = [p for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    sizes = [p.numel() for p in params]
    v = torch.randn(theta.numel(), generator=gen, dtype=torch.float64)

    def grad_at(t: torch.Tensor) -> torch.Tensor:  # on the model itself: the old weight_norm can't be copied
        with preserved(model), norm_mode(model, "batch"):
            with torch.no_grad():
                torch._foreach_copy_(
                    params, [c.view_as(p) for c, p in zip(t.split(sizes), params, strict=True)]
                )
            loss = F.cross_entropy(model(x), y)
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    eps = 1e-5
    fd = (grad_at(theta + eps * v) - grad_at(theta - eps * v)) / (2 * eps)
    state = ModelState.capture(model)
    with hessian_operator(model, F.cross_entropy, (x, y), method=method) as op:
        hv = op.matvec(v)
    assert float((hv - fd).norm()) <= 1e-6 * float(fd.norm())
    assert state.differences(model) == []


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # torch's, as in the user's own training
def test_a_users_full_backward_hook_leaves_the_hessian_and_forward_over_reverse_names_it():
    """A module hook the user registered for logging runs inside the probe's backward passes: double
    backward gives the Hessian of the same net without the hook; torch.func cannot transform the hook's
    autograd.Function, and says which method can."""
    net = tiny_net("mlp", "bn")
    x, y = make_batch("mlp", 8, seed=3)
    expected = explicit_hessian(net, F.cross_entropy, (x, y))
    seen = []
    handle = net.blocks[0].layer.register_full_backward_hook(lambda m, gi, go: seen.append(go[0].shape))
    op = hessian_operator(net, F.cross_entropy, (x, y), method="double_backward")
    H = torch.stack([op.matvec(e) for e in torch.eye(op.shape[0], dtype=torch.float64)], 1)
    torch.testing.assert_close(H, expected, rtol=1e-10, atol=1e-12)
    assert seen  # the hook ran
    names_it = r"forward_over_reverse.*register_full_backward_hook.*double_backward"
    with pytest.raises(ValueError, match=names_it):
        hessian_operator(net, F.cross_entropy, (x, y), method="forward_over_reverse").matvec(H[:, 0])
    assert net.blocks[0].layer._backward_hooks  # still the user's
    handle.remove()


class Counting(nn.Module):
    """A net that counts its calls in a buffer, in place (as some research code logs)."""

    def __init__(self, count: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.count = count
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.layer, self.head = nn.Linear(3, 4).double(), nn.Linear(4, 3).double()

    def forward(self, x):
        if self.count:
            self.calls += 1
        return self.head(torch.tanh(self.layer(x)))


def test_a_buffer_changed_in_place_by_the_forward_pass_is_left_as_found():
    """Double backward changes a private copy of the buffer and gives the Hessian of the same net that
    does not count; torch.func refuses the in-place change, and says which method can."""
    net, twin = Counting(), Counting(count=False)
    x, y = make_batch("mlp", 8, seed=3)
    state = ModelState.capture(net)
    op = hessian_operator(net, F.cross_entropy, (x, y), method="double_backward")
    H = torch.stack([op.matvec(e) for e in torch.eye(op.shape[0], dtype=torch.float64)], 1)
    torch.testing.assert_close(H, explicit_hessian(twin, F.cross_entropy, (x, y)), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"forward_over_reverse.*changes a buffer in place.*double_backward"):
        hessian_operator(net, F.cross_entropy, (x, y), method="forward_over_reverse").matvec(H[:, 0])
    assert state.differences(net) == [] and int(net.calls) == 0


@pytest.mark.parametrize("n_batches", [1, 2])  # one: the cached graph; two: rebuilt under the guard
def test_the_operators_products_are_in_the_models_dtype_under_a_callers_autocast(n_batches):
    """An operator made outside and applied inside a bfloat16 autocast step gives the same H v: the
    cached graph's backward used to run the caller's autocast (0.4% off on a float32 BN MLP)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
    batches = [(x[i::n_batches], y[i::n_batches]) for i in range(n_batches)]
    op = hessian_operator(net, F.cross_entropy, batches)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1))
    expected = op.matvec(v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = op.matvec(v)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


class Mixed(nn.Module):
    """A float64 layer, then a float32 one (``cast``) or, as its twin, a float64 one (``cast=False``)."""

    def __init__(self, cast: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cast = cast
        self.a, self.b = nn.Linear(3, 4).double(), nn.Linear(4, 3)
        if not cast:
            self.b.double()

    def forward(self, x):
        h = torch.tanh(self.a(x.double()))
        return self.b(h.float() if self.cast else h).double()


def test_a_model_mixing_float32_and_float64_parameters():
    """θ takes the promoted dtype and each parameter is cast back to its own: the Hessian is that of
    the float64 twin up to float32 rounding (it raised 'mat1 and mat2 must have the same dtype')."""
    mixed, twin = Mixed(), Mixed(cast=False)
    x, y = make_batch("mlp", 8, seed=3)
    state = ModelState.capture(mixed)
    op = hessian_operator(mixed, F.cross_entropy, (x, y))
    assert op.dtype == torch.float64
    H = torch.stack([op.matvec(e) for e in torch.eye(op.shape[0], dtype=torch.float64)], 1)
    expected = explicit_hessian(twin, F.cross_entropy, (x, y))
    torch.testing.assert_close(H, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert op.unflatten(op.gradient())["b.weight"].dtype == torch.float32
    plain = torch.autograd.grad(F.cross_entropy(mixed(x), y), [mixed.a.weight, mixed.b.weight])
    norms = layer_gradient_norms(mixed, F.cross_entropy, (x, y)).grad_norms
    np.testing.assert_allclose(norms, [float(g.norm()) for g in plain], rtol=1e-6)
    assert state.differences(mixed) == []
