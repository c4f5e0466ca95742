"""Tests of the normalization zoo (studies/lab/norms.py): references, whitening, invariances, autograd."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import func, nn
from torch.autograd import gradcheck, gradgradcheck

from studies.lab.norms import NEEDS_POSITIONS, NORMS, inv_sqrt_psd, make_norm

D = torch.float64


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D)


def _cov(y: torch.Tensor) -> torch.Tensor:
    """Biased channel covariance of (N, C, *) activations, (C, C)."""
    yc = y.transpose(0, 1).reshape(y.shape[1], -1)
    yc = yc - yc.mean(1, keepdim=True)
    return yc @ yc.T / yc.shape[1]


# ------------------------------------------------------------------ torch.nn references


@pytest.mark.parametrize("momentum", [0.3, None])  # None: the cumulative moving average
@pytest.mark.parametrize("shape", [(8, 5), (6, 5, 7), (4, 5, 3, 3)])
def test_bn_matches_torch_batchnorm(shape, momentum):
    ours = make_norm("bn", 5, momentum=momentum).double()
    ref = (nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d)(5, momentum=momentum).double()
    with torch.no_grad():
        ours.weight.copy_(torch.linspace(0.5, 2, 5))
        ref.weight.copy_(torch.linspace(0.5, 2, 5))
        ours.bias.fill_(0.3)
        ref.bias.fill_(0.3)
    for step in range(3):
        x = _randn(*shape, seed=step) * 2 + 1
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    ours.eval(), ref.eval()
    x = _randn(*shape, seed=9)
    torch.testing.assert_close(ours(x), ref(x))


def test_ln_gn_in_match_torch():
    x = _randn(4, 6, 5, seed=1) * 3 - 1
    ln, ref_ln = make_norm("ln", 6).double(), nn.LayerNorm([6, 5], elementwise_affine=False).double()
    torch.testing.assert_close(ln(x), ref_ln(x))
    gn, ref_gn = make_norm("gn", 6, groups=3).double(), nn.GroupNorm(3, 6).double()
    with torch.no_grad():
        for m in (gn, ref_gn):
            m.weight.copy_(torch.arange(1.0, 7.0))
            m.bias.copy_(torch.arange(6.0) / 10)
    torch.testing.assert_close(gn(x), ref_gn(x))
    for shape, ref_cls in (((4, 6, 5), nn.InstanceNorm1d), ((3, 6, 4, 4), nn.InstanceNorm2d)):
        xi = _randn(*shape, seed=2)
        inn, ref_in = make_norm("in", 6).double(), ref_cls(6, affine=True).double()
        with torch.no_grad():
            for m in (inn, ref_in):
                m.weight.copy_(torch.linspace(-1, 1, 6))
                m.bias.fill_(0.5)
        torch.testing.assert_close(inn(xi), ref_in(xi))
    torch.testing.assert_close(make_norm("gn", 6, groups=1).double()(x), ln(x))
    torch.testing.assert_close(make_norm("gn", 6, groups=6).double()(x), make_norm("in", 6).double()(x))
    assert make_norm("gn", 6, groups=4).groups == 3  # largest divisor of 6 not above 4


# ------------------------------------------------------------------ whitening


@pytest.mark.parametrize("whitening", ["zca", "pca"])
def test_dbn_whitens_each_group(whitening):
    a = _randn(12, 12, seed=3)
    x = (_randn(4000, 12, seed=4) @ a).reshape(1000, 4, 12).transpose(1, 2)  # (N, C, L), correlated
    dbn = make_norm("dbn", 12, group_size=5, whitening=whitening, eps=1e-9).double()
    assert dbn.group_size == 4
    cov = _cov(dbn(x))
    for g in range(3):
        block = cov[4 * g : 4 * g + 4, 4 * g : 4 * g + 4]
        torch.testing.assert_close(block, torch.eye(4, dtype=D), atol=1e-6, rtol=0)
    assert (cov[:4, 4:8].abs().max() > 0.05) and (
        torch.cov(x.transpose(0, 1).reshape(12, -1))[0, 1].abs() > 0.1
    )
    off = cov - torch.diag(cov.diagonal())
    assert off.reshape(3, 4, 3, 4).diagonal(dim1=0, dim2=2).abs().max() < 1e-3


def test_pca_and_zca_differ_by_rotation():
    x = _randn(500, 4, seed=5) @ _randn(4, 4, seed=6)
    y_zca = make_norm("dbn", 4, whitening="zca", affine=False).double()(x)
    y_pca = make_norm("dbn", 4, whitening="pca", affine=False).double()(x)
    q = torch.linalg.lstsq(y_pca, y_zca).solution  # y_zca = y_pca Q with Q orthogonal
    torch.testing.assert_close(q @ q.T, torch.eye(4, dtype=D), atol=1e-6, rtol=0)
    assert (y_zca - y_pca).abs().max() > 0.1


def test_iternorm_converges_with_iterations():
    x = _randn(2000, 8, seed=7) @ (torch.eye(8, dtype=D) + 0.15 * _randn(8, 8, seed=8))
    errors = []
    for t in (1, 3, 5, 9):
        y = make_norm("iternorm", 8, iterations=t, group_size=8, affine=False).double()(x)
        errors.append((torch.linalg.eigvalsh(_cov(y)) - 1).abs().max().item())
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.1 * errors[0], errors


def test_iternorm_is_the_papers_iteration_and_stays_stable_for_many_iterations():
    """W = P_T/√tr Σ with the paper's P_k = ½(3P − P³Σ_N), computed without rounding in Σ's eigenbasis
    (a scalar recursion per eigenvalue). At κ(Σ) = 2·10⁴ the one-matrix form drifted from it by a
    factor 5e2 at T = 14 and gave NaN at T = 20 in float64, and was 90× off at T = 11 in float32 (finite:
    nothing flagged it); the coupled form follows it to rounding."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=D))
    x = torch.randn(64, 16, generator=g, dtype=D) @ torch.diag(torch.logspace(0, -2.2, 16, dtype=D)) @ q.T
    xc = x - x.mean(0)
    sigma = xc.T @ xc / 64 + 1e-5 * torch.eye(16, dtype=D)
    lam, u = torch.linalg.eigh(sigma)
    assert lam[-1] / lam[0] > 2e4
    for t in (5, 11, 20):
        p = torch.ones_like(lam)
        for _ in range(t):
            p = 1.5 * p - 0.5 * p**3 * lam / lam.sum()
        exact = u @ torch.diag(p / lam.sum().sqrt()) @ u.T
        expected = xc @ exact.T
        for dtype, rtol in ((D, 1e-10), (torch.float32, 1e-3)):  # float32: Σ itself is κε off
            y = make_norm("iternorm", 16, iterations=t, group_size=16, affine=False).to(dtype)(x.to(dtype))
            assert y.isfinite().all()
            err = (y.double() - expected).norm() / expected.norm()
            assert err < rtol, (t, dtype, float(err))


def test_group_norms_refuse_groups_of_one_value():
    """gn's default 8 groups on an (N, 8) layer left one value a group: x − mean = 0, so the output was
    the bias for every input (an MLP of width 8 with gn had input-independent logits and zero
    gradients). Now a ValueError naming the shape; so is ln on (N, 1) and in on a single position."""
    for name, shape in (("gn", (4, 8)), ("ln", (4, 1)), ("in", (4, 8, 1)), ("gn", (4, 16, 1, 1))):
        norm = make_norm(name, shape[1], **({"groups": 16} if shape[1:] == (16, 1, 1) else {}))
        with pytest.raises(ValueError, match=r"single values on input shape \(4, "):
            norm(_randn(*shape, seed=1))
    assert make_norm("gn", 8)(_randn(4, 8, 2, seed=1)).shape == (4, 8, 2)  # 2 positions: defined


@pytest.mark.parametrize("name", ["dbn", "iternorm"])
def test_whitening_cumulative_average_with_momentum_none(name):
    m = make_norm(name, 6, group_size=3, momentum=None, affine=False).double()
    means, whitenings = [], []
    for step in range(3):
        x = _randn(10, 6, seed=30 + step)
        m(x)
        means.append(x.mean(0))
        own = make_norm(name, 6, group_size=3, momentum=1.0, affine=False).double()
        own(x)  # momentum 1: its running matrix is this batch's whitening matrix
        whitenings.append(own.running_whitening)
    torch.testing.assert_close(m.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(m.running_whitening, torch.stack(whitenings).mean(0))
    assert m.num_batches_tracked.item() == 3


@pytest.mark.parametrize("name", ["dbn", "iternorm"])
def test_whitening_eval_uses_running_statistics(name):
    m = make_norm(name, 6, group_size=3, momentum=0.5).double()
    xs = [_randn(50, 6, seed=s) + s for s in range(3)]
    mean, w = torch.zeros(6, dtype=D), torch.eye(3, dtype=D).repeat(2, 1, 1)
    for x in xs:
        m(x)
        batch_mean = x.mean(0)
        xg = (x - batch_mean).T.reshape(2, 3, -1)
        sigma = xg @ xg.mT / x.shape[0] + m.eps * torch.eye(3, dtype=D)
        w_batch = inv_sqrt_psd(sigma) if name == "dbn" else m._whitening_matrix(sigma)
        mean, w = 0.5 * mean + 0.5 * batch_mean, 0.5 * w + 0.5 * w_batch
    torch.testing.assert_close(m.running_mean, mean)
    torch.testing.assert_close(m.running_whitening, w)
    assert m.num_batches_tracked.item() == 3
    m.eval()
    x = _randn(7, 6, seed=11)
    expected = (w @ (x - mean).T.reshape(2, 3, -1)).reshape(6, -1).T
    torch.testing.assert_close(m(x), expected)


# ------------------------------------------------------------------ Σ^{-1/2} derivatives at ties


def _inv_sqrt_eigh(s):
    lam, u = torch.linalg.eigh(0.5 * (s + s.mT))
    return (u * lam.rsqrt()[..., None, :]) @ u.mT


def test_inv_sqrt_matches_eigh_autograd_on_separated_spectrum():
    a = _randn(3, 4, 4, seed=12)
    s = (a @ a.mT + torch.diag(torch.arange(1.0, 5.0, dtype=D))).requires_grad_()
    torch.testing.assert_close(inv_sqrt_psd(s), _inv_sqrt_eigh(s))
    w = _randn(3, 4, 4, seed=13)
    (g1,) = torch.autograd.grad((inv_sqrt_psd(s) * w).sum().square(), s, create_graph=True)
    (g2,) = torch.autograd.grad((_inv_sqrt_eigh(s) * w).sum().square(), s, create_graph=True)
    torch.testing.assert_close(g1, g2)
    v = _randn(3, 4, 4, seed=14)
    torch.testing.assert_close(
        torch.autograd.grad((g1 * v).sum(), s)[0], torch.autograd.grad((g2 * v).sum(), s)[0]
    )


def test_inv_sqrt_gradients_finite_and_correct_at_repeated_eigenvalues():
    for s in (torch.eye(4, dtype=D), torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=D))):
        s = s.requires_grad_()
        assert gradcheck(inv_sqrt_psd, (s,)) and gradgradcheck(inv_sqrt_psd, (s,))
        assert not torch.autograd.grad(_inv_sqrt_eigh(s).sum(), s)[0].isfinite().all()  # eigh breaks here
    a = _randn(2, 3, 3, seed=15)
    s = (a @ a.mT + torch.eye(3, dtype=D)).requires_grad_()
    assert gradcheck(inv_sqrt_psd, (s,)) and gradgradcheck(inv_sqrt_psd, (s,))


def test_inv_sqrt_third_order_raises_instead_of_being_silently_wrong():
    s = (2 * torch.eye(3, dtype=D)).requires_grad_()
    (g,) = torch.autograd.grad(inv_sqrt_psd(s).sin().sum(), s, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), s, create_graph=True)
    with pytest.raises(RuntimeError, match="third derivatives"):
        torch.autograd.grad(h.sum(), s)


def test_inv_sqrt_third_order_raises_when_only_sigma_carries_the_graph():
    # d/dΣ ⟨H(Σ)v, v⟩ of f(Σ) = ⟨C, Σ^{-1/2}⟩ + ¼ΣΣ⁴: the upstream gradient C and the direction v carry no
    # graph, only Σ does (through the quartic term); the Σ^{-1/2} part used to count as zero, silently
    a = _randn(3, 3, seed=18)
    s = (a @ a.T + torch.eye(3, dtype=D)).requires_grad_()
    c, v = _randn(3, 3, seed=19), _randn(3, 3, seed=20)
    (g,) = torch.autograd.grad((c * inv_sqrt_psd(s)).sum() + 0.25 * s.pow(4).sum(), s, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), s, create_graph=True)
    with pytest.raises(RuntimeError, match="third derivatives"):
        torch.autograd.grad((h * v).sum(), s)


def test_inv_sqrt_floor_puts_rounded_eigenvalues_back_on_their_bound():
    u, _ = torch.linalg.qr(_randn(3, 3, seed=21))
    s = u @ torch.diag(torch.tensor([-1e-6, 1.0, 4.0], dtype=D)) @ u.T  # λ < floor, as float32 rounding gives
    want = u @ torch.diag(torch.tensor([1e-2, 1.0, 4.0], dtype=D).rsqrt()) @ u.T
    torch.testing.assert_close(inv_sqrt_psd(s, floor=1e-2), want)
    assert inv_sqrt_psd(s).abs().max() > 1e100  # without a floor: 1/√tiny
    (g,) = torch.autograd.grad(inv_sqrt_psd(s.requires_grad_(), floor=1e-2).sin().sum(), s)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("whitening", ["zca", "pca"])
def test_dbn_in_float32_on_a_nearly_rank_deficient_group(whitening):
    # a first conv from 1 to 8 channels: Σ + εI has eigenvalues near ε, and float32 eigh returns one
    # below ε, even negative; 1/√λ made the output 1e13 (zca) or nan (pca) where the exact layer gives 2.8
    torch.manual_seed(0)
    conv = nn.Conv1d(1, 8, 3, padding=1)
    x = conv(10 * torch.randn(16, 1, 40)).detach()
    xg = x.transpose(0, 1).reshape(8, -1)
    xg = (xg - xg.mean(1)[:, None]).reshape(1, 8, -1)  # Σ as the layer computes it
    sigma = xg @ xg.mT / xg.shape[-1] + 1e-5 * torch.eye(8)
    assert torch.linalg.eigh(sigma)[0].min() < 0  # the case: rounding has crossed zero
    exact = make_norm("dbn", 8, whitening=whitening).double()(x.double())
    layer = make_norm("dbn", 8, whitening=whitening)
    xx = x.clone().requires_grad_()
    y = layer(xx)
    y.square().sum().backward()
    torch.testing.assert_close(y.double(), exact, rtol=0, atol=0.02 * exact.abs().max().item())
    assert torch.isfinite(xx.grad).all()
    assert layer.running_whitening.abs().max() <= 1e-5**-0.5  # Σ^{-1/2} ⪯ ε^{-1/2}


def test_inv_sqrt_under_torch_func():
    a = _randn(3, 3, seed=16)
    s = a @ a.T + torch.eye(3, dtype=D)
    f = lambda m: inv_sqrt_psd(m).sin().sum()  # noqa: E731
    g = lambda m: _inv_sqrt_eigh(m).sin().sum()  # noqa: E731
    torch.testing.assert_close(func.grad(f)(s), func.grad(g)(s))
    torch.testing.assert_close(func.jacfwd(inv_sqrt_psd)(s), func.jacrev(_inv_sqrt_eigh)(s))
    torch.testing.assert_close(func.hessian(f)(s), func.hessian(g)(s))
    torch.testing.assert_close(func.jacrev(func.jacrev(f))(s), func.hessian(g)(s))


@pytest.mark.parametrize("case", ["white", "duplicated"])
def test_dbn_gradients_on_degenerate_inputs(case):
    x = _randn(16, 4, seed=17)
    if case == "white":  # exactly white: Σ = (1 + ε) I, all eigenvalues equal
        x = x - x.mean(0)
        x = x @ torch.linalg.inv(torch.linalg.cholesky(x.T @ x / 16)).T
    else:  # rank-deficient: Σ = εI on the null space
        x = torch.cat([x[:, :3], x[:, :1]], dim=1)
    dbn = make_norm("dbn", 4, group_size=4, eps=1e-3).double()
    w = _randn(16, 4, seed=18)
    x = x.requires_grad_()
    (grad,) = torch.autograd.grad((dbn(x) * w).sum().square(), x)
    assert grad.isfinite().all()
    f = lambda inp: (dbn(inp) * w).sum().square()  # noqa: E731
    assert gradcheck(f, (x,))
    d = _randn(16, 4, seed=19)
    h = 1e-6
    fd = (f(x.detach() + h * d) - f(x.detach() - h * d)) / (2 * h)
    torch.testing.assert_close((grad * d).sum(), fd, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ gradcheck / gradgradcheck


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("dbn", {"group_size": 3}),
        ("dbn", {"whitening": "pca"}),
        ("iternorm", {"group_size": 3}),
        ("lp_bn", {"p": 1}),
        ("lp_bn", {"p": 2}),
    ],
)
def test_gradcheck_norms(name, options):
    m = make_norm(name, 6, **options).double()
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 1.5, 6))
    x = _randn(8, 6, 2, seed=20).requires_grad_()
    assert gradcheck(m, (x,)) and gradgradcheck(m, (x,))
    f = lambda w: torch.func.functional_call(m, {"weight": w}, (x.detach(),))  # noqa: E731
    assert gradcheck(f, (m.weight.detach().clone().requires_grad_(),))


def test_gradcheck_weight_norm():
    for layer, shape in (
        (nn.Linear(4, 3), (5, 4)),
        (nn.Conv1d(2, 3, 3), (2, 2, 6)),
        (nn.Conv2d(2, 3, 2), (1, 2, 3, 3)),
    ):
        wrapped = make_norm("wn", 3).wrap_layer(layer.double())
        x = _randn(*shape, seed=21)
        torch.testing.assert_close(wrapped(x), layer(x))  # g = ‖V‖ leaves the function unchanged
        assert {n for n, _ in wrapped.named_parameters()} == {"weight_v", "weight_g", "bias"}

        def f(v, g, inp, wrapped=wrapped):
            return torch.func.functional_call(wrapped, {"weight_v": v, "weight_g": g}, (inp,))

        args = (wrapped.weight_v.detach().clone(), wrapped.weight_g.detach().clone() * 1.5)
        args = (*(a.requires_grad_() for a in args), x)
        assert gradcheck(f, args)
        if isinstance(layer, nn.Linear):  # the conv double backward is slow in gradgradcheck
            assert gradgradcheck(f, args)
    with pytest.raises(TypeError, match="weight normalization"):
        make_norm("wn", 3).wrap_layer(nn.ReLU())


# ------------------------------------------------------------------ Ba et al. 2016, Table 1


def _invariances(name: str) -> dict[str, bool]:
    """Whether the output of layer(x) → norm stays the same under each Table-1 transformation."""
    layer = nn.Linear(5, 4, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(_randn(4, 5, seed=22))
    norm = make_norm(name, 4, eps=1e-14, affine=False) if name != "wn" else make_norm("wn", 4)
    block = nn.Sequential(norm.wrap_layer(layer), norm).double()
    x = _randn(16, 5, seed=23)
    base = block(x)
    key = "0.weight_v" if name == "wn" else "0.weight"
    w = dict(block.named_parameters())[key].detach()
    delta = torch.tensor([0.5, 2.0, 3.0, 0.25], dtype=D)[:, None]

    def out(inp, **params):
        return func.functional_call(block, params, (inp,))

    same = lambda y: bool((y - base).abs().max() < 1e-6)  # noqa: E731
    res = {
        "vector_rescale": same(out(x, **{key: w * delta})),
        "dataset_rescale": same(out(3.0 * x)),
        "dataset_recenter": same(out(x + _randn(5, seed=24))),
        "single_rescale": same(out(torch.cat([3.0 * x[:1], x[1:]]))),
    }
    if name == "wn":  # W = g·V/‖V‖: the weight matrix re-scales through g
        g = block[0].weight_g.detach()
        res["matrix_rescale"] = same(out(x, **{"0.weight_g": 2.0 * g}))
        res["matrix_recenter"] = same(out(x, **{key: w + _randn(5, seed=25)}))
    else:
        res["matrix_rescale"] = same(out(x, **{key: 2.0 * w}))
        res["matrix_recenter"] = same(out(x, **{key: w + _randn(5, seed=25)}))
    return res


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "bn",
            dict(
                matrix_rescale=1,
                matrix_recenter=0,
                vector_rescale=1,
                dataset_rescale=1,
                dataset_recenter=1,
                single_rescale=0,
            ),
        ),
        (
            "ln",
            dict(
                matrix_rescale=1,
                matrix_recenter=1,
                vector_rescale=0,
                dataset_rescale=1,
                dataset_recenter=0,
                single_rescale=1,
            ),
        ),
        (
            "wn",
            dict(
                matrix_rescale=0,
                matrix_recenter=0,
                vector_rescale=1,
                dataset_rescale=0,
                dataset_recenter=0,
                single_rescale=0,
            ),
        ),
    ],
)
def test_ba_et_al_table1_invariances(name, expected):
    assert _invariances(name) == {k: bool(v) for k, v in expected.items()}


# ------------------------------------------------------------------ torch.func through every norm


def _net(name: str) -> nn.Module:
    torch.manual_seed(0)
    opts = {"group_size": 2} if name in ("dbn", "iternorm") else {}
    norm = make_norm(name, 4, **opts)
    net = nn.Sequential(norm.wrap_layer(nn.Conv1d(3, 4, 1)), norm, nn.Tanh()).double()
    for m in net.modules():
        if getattr(m, "weight", None) is not None and m.weight.dim() == 1:
            nn.init.uniform_(m.weight, 0.5, 1.5)  # non-trivial affine
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return net


def _probe_mode(net: nn.Module, statistics_free: bool) -> None:
    """eval mode, or the probes' statistics-free mode: batch-stat layers in train mode without
    running-stat tracking, every other module (the noise included) in eval mode."""
    net.eval()
    if statistics_free:
        for m in net.modules():
            if hasattr(m, "track_running_stats"):
                m.training = True  # this module only: its noise submodule stays in eval mode
                m.track_running_stats = False


@pytest.mark.parametrize("statistics_free", [False, True], ids=["eval", "batch"])
@pytest.mark.parametrize("name", sorted(NORMS))
def test_torch_func_grad_and_hessian(name, statistics_free):
    net = _net(name)
    if statistics_free or name not in ("dbn", "iternorm", "bn", "lp_bn", "noisy_bn"):
        pass
    else:  # move the running statistics away from their initial values first
        net.train()
        net(_randn(9, 3, 5, seed=26))
    _probe_mode(net, statistics_free)
    buffers = {k: b.clone() for k, b in net.named_buffers()}
    x, t = _randn(6, 3, 5, seed=27), _randn(6, 4, 5, seed=28)
    params = {k: p.detach() for k, p in net.named_parameters()}
    names = list(params)

    def loss(*flat):
        out = func.functional_call(net, dict(zip(names, flat, strict=True)), (x,))
        return ((out - t) ** 2).mean()

    flat = tuple(params.values())
    grads = func.grad(loss, argnums=tuple(range(len(flat))))(*flat)
    hess = func.hessian(loss, argnums=tuple(range(len(flat))))(*flat)

    ps = [p.clone().requires_grad_() for p in flat]
    ref_grads = torch.autograd.grad(loss(*ps), ps, create_graph=True)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r.detach())
    gvec = torch.cat([r.reshape(-1) for r in ref_grads])
    rows = [torch.cat([h.reshape(-1) for h in torch.autograd.grad(gi, ps, retain_graph=True)]) for gi in gvec]
    ref_h = torch.stack(rows)
    sizes = [p.numel() for p in flat]
    func_h = torch.cat(
        [
            torch.cat([hess[i][j].reshape(sizes[i], sizes[j]) for j in range(len(flat))], 1)
            for i in range(len(flat))
        ]
    )
    torch.testing.assert_close(func_h, ref_h)
    torch.testing.assert_close(func_h, func_h.T)
    assert ref_h.abs().max() > 0
    for k, b in net.named_buffers():
        assert torch.equal(b, buffers[k]), k


# ------------------------------------------------------------------ noise and ℓp BN


@pytest.mark.parametrize("name", ["noisy_bn", "noise"])
def test_noise_changes_per_step_off_in_eval_and_seeded(name):
    m = make_norm(name, 3).double()
    x = _randn(16, 3, 4, seed=29)
    torch.manual_seed(1)
    a, b = m(x), m(x)
    torch.manual_seed(1)
    torch.testing.assert_close(m(x), a)
    assert (a - b).abs().max() > 1e-2
    clean = make_norm("bn", 3).double()(x) if name == "noisy_bn" else x
    assert (a - clean).abs().max() > 1e-2
    m.eval()
    if name == "noisy_bn":
        m.track_running_stats = False  # batch statistics, noise off (the module is in eval mode)
    torch.testing.assert_close(m(x), clean)
    torch.testing.assert_close(m(x), m(x))
    assert not hasattr(m.noise, "track_running_stats")


@pytest.mark.parametrize("p", [1, 2, float("inf")])
def test_lp_bn_scales_and_running_stats(p):
    m = make_norm("lp_bn", 3, p=p, affine=False, momentum=1.0, eps=1e-12).double()
    x = _randn(40, 3, 5, seed=30) * 2 + 1
    y = m(x)
    xc = x - x.mean((0, 2), keepdim=True)
    scale = {
        1: xc.abs().mean((0, 2)),
        2: xc.square().mean((0, 2)).sqrt(),
        float("inf"): xc.abs().amax((0, 2)),
    }[p]
    torch.testing.assert_close(y, xc / scale[:, None])
    if p == 2:
        torch.testing.assert_close(y, make_norm("bn", 3, affine=False, eps=1e-12).double()(x))
    torch.testing.assert_close(m.running_scale, scale)
    m.eval()
    x2 = _randn(5, 3, 5, seed=31)
    torch.testing.assert_close(m(x2), (x2 - x.mean((0, 2))[:, None]) / scale[:, None])


# ------------------------------------------------------------------ registry and options


def test_registry_shapes_and_errors():
    for name in NORMS:  # 16 channels: gn's default 8 groups hold 2 channels on (N, C)
        for shape in ((8, 16), (8, 16, 3), (8, 16, 3, 2)):
            if name in NEEDS_POSITIONS and len(shape) == 2:
                continue
            y = make_norm(name, 16).double()(_randn(*shape, seed=32))
            assert y.shape == shape and y.isfinite().all()
    with pytest.raises(KeyError, match=r"dbn.*iternorm.*wn"):
        make_norm("batchnorm", 4)
    bad = [
        ("dbn", {"whitening": "cholesky"}, "whitening"),
        ("dbn", {"group_size": 0}, "group_size"),
        ("iternorm", {"iterations": 0}, "iterations"),
        ("lp_bn", {"p": 3}, "p must"),
        ("noisy_bn", {"noise_scale": 0.5}, "noise_scale"),
        ("noise", {"noise_mean": -1.0}, "noise_mean"),
        ("bn", {"momentum": 2.0}, "momentum"),
        ("gn", {"groups": 0}, "groups"),
        ("gn", {"groups": 4.0}, "groups must be a positive int"),  # was a TypeError from range()
        ("gn", {"eps": 0.0}, "eps"),  # was built, then NaN on a constant input
        ("ln", {"eps": -1e-3}, "eps"),
        ("in", {"eps": 0.0}, "eps"),
    ]
    for name, options, match in bad:
        with pytest.raises(ValueError, match=match):
            make_norm(name, 4, **options)


@pytest.mark.parametrize("name", ["none", "wn"])
def test_option_free_norms_reject_unknown_options(name):
    with pytest.raises(TypeError, match="groups"):
        make_norm(name, 4, groups=2)
